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
        if stage.writes_file:  # a checkpoint keeps its request itself
            stage.call(stage.action == "rerun")
        else:
            note_started(ws, stage.group, stage.fingerprint)
            # The request goes into the group with the write that completes it (before
            # a replacement is swapped in), so a kill never leaves a finished group
            # without the request that made it.
            with ws.attrs_at_finish(stage.group, stage.recorded_attrs):
                stage.call(stage.action == "rerun")
            if ws.attrs(stage.group).get(REQUEST_ATTR) != stage.fingerprint:
                ws.update_attrs(stage.group, stage.recorded_attrs)
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

    names = [spec.name for spec in exp.models] + [joint.name for joint in exp.joint]
    return [load_fit(ws, fit_group(f"{exp.name}/{name}", lags), name, lags)
            for name in names for lags in exp.lag_sets]


def load_fit(ws: Workspace, group: str, model: str, lags) -> FitResult:
    """One stored fit group as a :class:`FitResult` (small variables loaded)."""
    ds = ws.open_node(group)
    small = [n for n, v in ds.variables.items() if not LAZY_DIMS & set(v.dims)]
    ds = ds.assign({n: ds[n].load() for n in small if n in ds.data_vars})
    ds.attrs.update(ws.attrs(group))
    return FitResult(model, [float(l) for l in lags], ds)


def stored_results(ws: Workspace, experiment: str) -> list[FitResult]:
    """Every complete fit under ``fits/<experiment>/<model>/lags-...``, in name order
    (the lag sets from each group's ``lags`` attr)."""
    results = []
    for model in ws.child_groups(f"fits/{experiment}"):
        for name in ws.list_groups(f"fits/{experiment}/{model}"):
            group = f"fits/{experiment}/{model}/{name}"
            results.append(load_fit(ws, group, model, ws.attrs(group).get("lags", [])))
    return results


def make_report(exp: Experiment, ws: Workspace, out: Path | None = None) -> dict:
    """Write ``reports/<experiment>/`` (or ``out``) from the stored fits (maps on the
    BOLD grid; the ROI table when the experiment names an atlas)."""
    results = collect_results(exp, ws)
    roi, names = None, None
    if exp.atlas is not None:
        roi = atlas_label_of_voxel(exp.atlas, results[0].fit)
        names = read_atlas_names(exp.atlas_labels) if exp.atlas_labels else None
    return report_fits(ws, results, exp.name, out or exp.reports / exp.name,
                       roi_of_voxel=roi, roi_names=names)


def report_store(store: str | Path, out: Path | None = None) -> list[dict]:
    """``voxelflow report STORE``: the report of every experiment whose fits the
    workspace holds, from the stored fits alone, into ``out`` (one experiment) or
    ``out/<experiment>`` (several); default ``reports/<experiment>`` next to the store."""
    ws = Workspace(store)
    experiments = [e for e in ws.child_groups("fits") if stored_results_exist(ws, e)]
    if not experiments:
        raise InputError(f"{ws.path}: no complete fits in this workspace; run "
                         f"'voxelflow fit' or 'voxelflow run EXPERIMENT.toml' first")
    reports = []
    for name in experiments:
        folder = (Path(ws.path).parent / "reports" / name if out is None
                  else Path(out) if len(experiments) == 1 else Path(out) / name)
        reports.append(report_fits(ws, stored_results(ws, name), name, folder))
    return reports


def stored_results_exist(ws: Workspace, experiment: str) -> bool:
    return any(ws.list_groups(f"fits/{experiment}/{m}")
               for m in ws.child_groups(f"fits/{experiment}"))


def report_fits(ws: Workspace, results: list[FitResult], experiment: str, out: Path, *,
                roi_of_voxel: np.ndarray | None = None,
                roi_names: dict[int, str] | None = None) -> dict:
    """The report of stored fits ``results`` into ``out``: r maps through
    :func:`~voxelflow.pipeline.stages.export.export_variable`, the mean EPI of the fits'
    bold group as underlay, category maps of categorical event models (their features
    group says ``kind = categorical``)."""
    from voxelflow.pipeline.stages.export import export_variable
    from voxelflow.pipeline.study.report import map_geometry, write_report

    groups = {id(res): _group_of(res, experiment) for res in results}

    def write_map(res: FitResult, path: Path) -> None:
        export_variable(ws, groups[id(res)], "r_test_cv", path)

    def write_category_maps(res: FitResult, maps_dir: Path) -> dict | None:
        from voxelflow.pipeline.study.category_maps import category_maps

        features = res.fit.attrs.get("features_group")
        if not features or ws.attrs(features).get("kind") != "categorical":
            return None
        return category_maps(
            res.fit, f"{res.model}_lags-{res.label.replace(',', '-')}", maps_dir,
            lambda sel, path: export_variable(ws, groups[id(res)], "weights", path, sel=sel),
            f"{res.model}, lags {res.label}")

    def write_values(values: np.ndarray, path: Path, description: str) -> None:
        write_voxel_values(ws, groups[id(results[0])], values, path, description)

    underlay = None
    if results and map_geometry(results[0].fit) == "volume":
        underlay = mean_epi(ws, results[0].fit, Path(out) / "maps" / "mean_epi.nii.gz")
    return write_report(results, out, experiment=experiment, write_map=write_map,
                        roi_of_voxel=roi_of_voxel, roi_names=roi_names,
                        write_values=write_values, category_maps=write_category_maps,
                        underlay=underlay)


def _group_of(res: FitResult, experiment: str) -> str:
    from voxelflow.pipeline.stages.fit import fit_group

    return fit_group(f"{experiment}/{res.model}", res.lags)


def mean_epi(ws: Workspace, fit, path: Path) -> Path | None:
    """The mean BOLD volume of the fit's bold group (its ``mean`` over all volumes of
    all runs, zeros outside the mask) as NIfTI at ``path``; None when the bold group has
    none (older workspaces)."""
    from voxelflow.pipeline.stages.export import export_variable

    bold = fit.attrs.get("bold_group")
    if not bold or not ws.has_array(bold, "mean"):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    export_variable(ws, bold, "mean", path)
    return path


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
