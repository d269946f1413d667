"""Carry out an experiment's plan: run the stages that are not ``skip``, then the report.

:func:`run_experiment` is what ``voxelflow run EXPERIMENT.toml`` does: plan
(:func:`voxelflow.pipeline.study.plan.build_plan`), run (:func:`execute_plan`), and
write ``reports/<experiment>/`` from the stored fits (:func:`make_report`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.study.config import Experiment
from voxelflow.pipeline.study.plan import REQUEST_ATTR, PlannedStage, build_plan, note_started
from voxelflow.pipeline.study.report import FitResult
from voxelflow.stores.workspace import Workspace


def run_experiment(exp: Experiment, *, dry_run: bool = False, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Check the inputs and plan, show the plan (``log``) before anything runs, run what
    is needed, write the report; return plan, ran stages and report."""
    ws = Workspace(exp.store)
    stages = build_plan(exp, ws, progress=progress)
    log(f"plan for {exp.source} (store {exp.store}):")
    for stage in stages:
        log("  " + stage.describe())
    if dry_run:
        return {"plan": stages, "ran": [], "report": None}
    ran = execute_plan(ws, stages, log)
    report = make_report(exp, ws)
    return {"plan": stages, "ran": ran, "report": report}


def execute_plan(ws: Workspace, stages: list[PlannedStage],
                 log: Callable[[str], None] = print) -> list[PlannedStage]:
    """Run every stage that is not ``skip``; record its request (when it starts, for a
    resume, and in its group when it is done); return the stages that ran."""
    ran = []
    for stage in stages:
        if stage.action == "skip":
            continue
        log(stage.describe())
        t0 = time.perf_counter()
        if not stage.writes_file:  # a checkpoint keeps its request itself
            note_started(ws, stage.group, stage.fingerprint)
        stage.call(stage.action == "rerun")
        if not stage.writes_file:
            ws.update_attrs(stage.group, {REQUEST_ATTR: stage.fingerprint})
            note_started(ws, stage.group, None)  # and consolidates
        log(f"        done in {time.perf_counter() - t0:.1f} s")
        ran.append(stage)
    return ran


#: Dimensions of the fit variables that stay on disk (read a voxel chunk at a time).
LAZY_DIMS = {"time_block", "test_sample", "lag_feature"}


def collect_results(exp: Experiment, ws: Workspace) -> list[FitResult]:
    """The stored fit of every (model, lag set) with its group attrs: per-voxel and
    per-alpha variables loaded, those over test time or features left lazy."""
    from voxelflow.pipeline.stages.fit import fit_group

    results = []
    for spec in exp.models:
        for lags in exp.lag_sets:
            group = fit_group(f"{exp.name}/{spec.name}", lags)
            ds = ws.open_node(group)
            small = [n for n, v in ds.variables.items() if not LAZY_DIMS & set(v.dims)]
            ds = ds.assign({n: ds[n].load() for n in small if n in ds.data_vars})
            ds.attrs.update(ws.attrs(group))
            results.append(FitResult(spec.name, lags, ds))
    return results


def make_report(exp: Experiment, ws: Workspace) -> dict:
    """Write ``reports/<experiment>/`` from the stored fits (maps on the BOLD grid; the
    ROI table when the experiment names an atlas)."""
    from voxelflow.pipeline.stages.export import export_variable
    from voxelflow.pipeline.stages.fit import fit_group
    from voxelflow.pipeline.study.report import write_report

    results = collect_results(exp, ws)

    def write_map(res: FitResult, path: Path) -> None:
        export_variable(ws, fit_group(f"{exp.name}/{res.model}", res.lags), "r_test_cv", path)

    categorical = {spec.name for spec in exp.models if spec.is_categorical_events}

    def write_category_maps(res: FitResult, maps_dir: Path) -> dict | None:
        from voxelflow.pipeline.study.category_maps import category_maps

        if res.model not in categorical:
            return None
        group = fit_group(f"{exp.name}/{res.model}", res.lags)
        return category_maps(
            res.fit, f"{res.model}_lags-{res.label.replace(',', '-')}", maps_dir,
            lambda sel, path: export_variable(ws, group, "weights", path, sel=sel),
            f"{res.model}, lags {res.label}")

    def write_values(values: np.ndarray, path: Path, description: str) -> None:
        group = fit_group(f"{exp.name}/{results[0].model}", results[0].lags)
        write_voxel_values(ws, group, values, path, description)

    roi, names = None, None
    if exp.atlas is not None:
        roi = atlas_label_of_voxel(exp.atlas, results[0].fit)
        names = read_atlas_names(exp.atlas_labels) if exp.atlas_labels else None
    return write_report(results, exp.reports / exp.name, experiment=exp.name,
                        write_map=write_map, roi_of_voxel=roi, roi_names=names,
                        write_values=write_values, category_maps=write_category_maps)


def write_voxel_values(ws: Workspace, group: str, values: np.ndarray, path: Path,
                       description: str) -> None:
    """A (voxel,) array computed from fits (e.g. the winner map) as a 3D NIfTI on the
    grid of fit group ``group``'s voxels."""
    from voxelflow.pipeline.stages.export import (find_geometry, output_dtype, to_volume,
                                                  write_nifti)

    geometry = find_geometry(ws, group, ws.open_node(group)["r_test_cv"])
    dtype = output_dtype(np.asarray(values).dtype)
    write_nifti(path, iter([to_volume(values, geometry, dtype)]), geometry.shape, dtype,
                geometry, description=description)


def atlas_label_of_voxel(atlas_path: Path, fit) -> np.ndarray:
    """(voxel,) int atlas label at each fit voxel's ``(i, j, k)``; the atlas must be a
    NIfTI of integer labels on the BOLD grid."""
    import nibabel as nib

    atlas = np.asarray(nib.load(str(atlas_path)).dataobj)
    try:
        return atlas[fit["i"].values, fit["j"].values, fit["k"].values].astype(int)
    except IndexError:
        raise InputError(f"{atlas_path}: atlas grid {atlas.shape} is not the BOLD grid; "
                         f"resample it to the BOLD data first") from None


def read_atlas_names(path: Path) -> dict[int, str]:
    """``{label: name}`` from lines ``label<TAB>name`` (or ``label,name``); other lines
    (a header, comments) are ignored."""
    names = {}
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.replace(",", "\t").split("\t") if p.strip()]
        if len(parts) >= 2 and parts[0].lstrip("-").isdigit():
            names[int(parts[0])] = parts[1]
    return names
