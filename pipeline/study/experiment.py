"""One experiment file -> the stages to run, skipping finished work, then the report.

The plan lists every stage with its store group and an action:

- ``skip``: the group is complete and was made from the same request;
- ``run``: the group does not exist yet;
- ``resume``: the group was interrupted (same request): finish the missing blocks;
- ``rerun``: the request changed (file, fps, model, lags, ...): replace the group.

A stage's *request* is what the experiment asks of it (files with their size and
modification time, stage options, and its upstream stages' requests); it is kept in
the group's attrs (``voxelflow_request``), so a second run of the same file computes
nothing, and a changed upstream stage reruns everything that depends on it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from voxelflow.pipeline.study.config import Experiment
from voxelflow.pipeline.errors import InputError
from voxelflow.stores.workspace import Workspace

REQUEST_ATTR = "voxelflow_request"


@dataclass
class PlannedStage:
    kind: str            # frames | bold | train | features | fit
    group: str           # store group it writes (train: the checkpoint file)
    request: dict        # what the experiment asks of it
    action: str = "run"  # skip | run | resume | rerun
    note: str = ""
    call: Callable[[bool], Any] | None = field(default=None, repr=False)
    upstream: list[str] = field(default_factory=list)  # groups/files it reads

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.request, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def writes_file(self) -> bool:
        return self.kind == "train"

    def describe(self) -> str:
        target = self.group if self.writes_file else f"/{self.group}"
        text = f"{self.action:>6}  {self.kind:<8} {target}"
        return text + (f"  ({self.note})" if self.note else "")


def _file_id(path: Path) -> dict:
    """Identity of an input file: resolved path, size and modification time."""
    if not path.exists():
        return {"file": str(path.resolve()), "missing": True}
    st = path.stat()
    return {"file": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _checkpoint_state(path: Path) -> tuple[str | None, str | None]:
    """(state, stored request) of an autoencoder checkpoint file, like a group's."""
    if not path.is_file():
        return None, None
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - damaged or foreign file: replace it
        return "writing", None
    if not isinstance(ckpt, dict):
        return "writing", None
    return ("complete" if ckpt.get("complete") else "writing"), ckpt.get("request")


def _decide(ws: Workspace, stage: PlannedStage) -> PlannedStage:
    if stage.writes_file:
        state, stored = _checkpoint_state(Path(stage.group))
    else:
        state = ws.state(stage.group)
        stored = ws.attrs(stage.group).get(REQUEST_ATTR)
    if state is None:
        stage.action = "run"
    elif stored == stage.fingerprint:
        stage.action = "skip" if state == "complete" else "resume"
        if state != "complete":
            stage.note = "interrupted earlier; finishing the missing blocks"
    elif state == "complete" and stored is None:
        stage.action = "rerun"
        stage.note = "group made outside this experiment; replacing it"
    else:
        stage.action = "rerun"
        stage.note = "parameters or inputs changed since it was made"
    return stage


def build_plan(exp: Experiment, ws: Workspace | None = None, *, progress: bool = True
               ) -> list[PlannedStage]:
    """Every stage of the experiment in order, each with its action (nothing is run)."""
    ws = ws or Workspace(exp.store)
    from voxelflow.pipeline.stages.bold import run_bold_stage
    from voxelflow.pipeline.stages.features import run_features_stage
    from voxelflow.pipeline.stages.fit import fit_group, run_fit_stage
    from voxelflow.pipeline.stages.frames import run_frames_stage

    stages: list[PlannedStage] = []
    frames_group, bold_group = f"frames/{exp.stimulus_name}", f"bold/{exp.subject}"
    frames_req = {"videos": [_file_id(v) for v in exp.videos], "fps": exp.fps,
                  "size": exp.size, "resize": exp.resize}
    frames = PlannedStage("frames", frames_group, frames_req)
    frames.call = lambda overwrite: run_frames_stage(
        ws, exp.videos, exp.stimulus_name, fps=exp.fps, size=exp.size, resize=exp.resize,
        overwrite=overwrite, progress=progress)
    stages.append(frames)

    bold_req = {"runs": [_file_id(p) for p in exp.bold_runs],
                "mask": _file_id(exp.mask) if exp.mask else None, "tr": exp.tr,
                "zscore": exp.zscore, "detrend": exp.detrend}
    bold = PlannedStage("bold", bold_group, bold_req)
    bold.call = lambda overwrite: run_bold_stage(
        ws, exp.bold_runs, exp.subject, mask=exp.mask, tr=exp.tr, zscore=exp.zscore,
        detrend=exp.detrend, overwrite=overwrite, progress=progress)
    stages.append(bold)

    for spec in exp.models:
        weights, feat_upstream, train_req = spec.weights, [frames_group], None
        if spec.is_autoencoder:
            train = _train_stage(exp, ws, spec, frames_req, bold_req, progress)
            weights = str(spec.checkpoint)
            if spec.train:
                stages.append(train)
                train_req = train.request
                feat_upstream.append(train.group)
            else:
                train_req = _file_id(spec.checkpoint)
        feat_req = {"frames": frames_req, "model": spec.model, "layer": spec.layer,
                    "weights": weights, "pool": spec.pool, "device": exp.device,
                    "trained": train_req}
        feat = PlannedStage("features", f"features/{spec.name}", feat_req,
                            upstream=feat_upstream)
        feat.call = (lambda overwrite, spec=spec, weights=weights: run_features_stage(
            ws, exp.stimulus_name, spec.model, layers=[spec.layer] if spec.layer else None,
            weights=weights, device=exp.device, batch_size=spec.batch_size,
            name=spec.name, pool=spec.pool, overwrite=overwrite, progress=progress))
        stages.append(feat)
        for lags in exp.lag_sets:
            fit_req = {"features": feat_req, "bold": bold_req, "lags": lags,
                       "alphas": exp.alphas, "test_samples": exp.test_samples,
                       "test_runs": exp.test_runs, "cv": exp.cv, "aggregate": exp.aggregate}
            name = f"{exp.name}/{spec.name}"
            fit = PlannedStage("fit", fit_group(name, lags), fit_req,
                               upstream=[feat.group, bold_group])
            fit.call = (lambda overwrite, spec=spec, lags=lags, name=name: run_fit_stage(
                ws, spec.name, exp.subject, lags, exp.alphas, test_samples=exp.test_samples,
                test_runs=exp.test_runs, cv=exp.cv, aggregate=exp.aggregate,
                device=exp.device, name=name, overwrite=overwrite, progress=progress))
            stages.append(fit)

    rerun_groups: set[str] = set()
    for stage in stages:
        _decide(ws, stage)
        if stage.action == "skip" and any(g in rerun_groups for g in stage.upstream):
            stage.action, stage.note = "rerun", "an upstream stage reruns"
        if stage.action in ("rerun", "run"):
            rerun_groups.add(stage.group)
    return stages


def _train_stage(exp: Experiment, ws: Workspace, spec, frames_req: dict, bold_req: dict,
                 progress: bool) -> PlannedStage:
    """The autoencoder's training on the frames no test sample uses
    (:func:`training_split`); writes ``spec.checkpoint``."""
    from voxelflow.pipeline.stages.train import train_autoencoder

    options = spec.train_options()
    request = {"frames": frames_req, "bold": bold_req, "lag_sets": exp.lag_sets,
               "test_samples": exp.test_samples, "test_runs": exp.test_runs,
               "aggregate": exp.aggregate, "options": options, "device": exp.device}
    stage = PlannedStage("train", str(spec.checkpoint), request,
                         upstream=[f"frames/{exp.stimulus_name}", f"bold/{exp.subject}"])

    def call(overwrite: bool):
        spec.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        return train_autoencoder(ws, exp.stimulus_name, spec.checkpoint,
                                 **training_split(exp, ws), **options, device=exp.device,
                                 overwrite=overwrite, progress=progress,
                                 request=stage.fingerprint)

    stage.call = call
    return stage


def training_split(exp: Experiment, ws: Workspace) -> dict:
    """``{"train_until": s}`` or ``{"train_runs": [...]}``: the stimulus frames before the
    earliest frame any test sample of any lag set uses (runs played in order), read
    from the stored frames and BOLD time coordinates."""
    from voxelflow.pipeline.design.lags import first_test_frame

    frames = ws.open_runs(f"frames/{exp.stimulus_name}")
    if exp.test_runs is not None:
        return {"train_runs": [r for r in range(len(frames)) if r not in exp.test_runs]}
    bold_group = f"bold/{exp.subject}"
    tr = float(ws.attrs(bold_group)["tr"])
    frame_times = [ds["time"].values for ds in frames]
    run, index = first_test_frame(frame_times,
                                  [ds["time"].values for ds in ws.open_runs(bold_group)],
                                  exp.lag_sets, tr, aggregate=exp.aggregate,
                                  test_samples=exp.test_samples)
    offset = sum(t.size for t in frame_times[:run]) / exp.fps
    return {"train_until": offset + index / exp.fps}


def execute_plan(ws: Workspace, stages: list[PlannedStage],
                 log: Callable[[str], None] = print) -> list[PlannedStage]:
    """Run every stage that is not ``skip``; return the stages that ran."""
    ran = []
    for stage in stages:
        if stage.action == "skip":
            continue
        log(stage.describe())
        t0 = time.perf_counter()
        stage.call(stage.action == "rerun")
        if not stage.writes_file:  # a checkpoint keeps its request itself
            ws.update_attrs(stage.group, {REQUEST_ATTR: stage.fingerprint})
            ws.consolidate()
        log(f"        done in {time.perf_counter() - t0:.1f} s")
        ran.append(stage)
    return ran


def collect_results(exp: Experiment, ws: Workspace) -> list:
    """The fit of every (model, lag set) as :class:`voxelflow.pipeline.study.report.FitResult`."""
    from voxelflow.pipeline.stages.fit import fit_group
    from voxelflow.pipeline.study.report import FitResult

    results = []
    for spec in exp.models:
        for lags in exp.lag_sets:
            group = fit_group(f"{exp.name}/{spec.name}", lags)
            ds = ws.open_node(group).load()
            ds.attrs.update(ws.attrs(group))
            results.append(FitResult(spec.name, lags, ds))
    return results


def _roi_of_voxel(exp: Experiment, fit) -> tuple[np.ndarray | None, dict | None]:
    if exp.atlas is None:
        return None, None
    import nibabel as nib

    atlas = np.asarray(nib.load(str(exp.atlas)).dataobj)
    try:
        labels = atlas[fit["i"].values, fit["j"].values, fit["k"].values].astype(int)
    except IndexError:
        raise InputError(f"{exp.atlas}: atlas grid {atlas.shape} is not the BOLD grid; "
                         f"resample it to the BOLD data first") from None
    names = None
    if exp.atlas_labels is not None:
        names = {}
        for line in exp.atlas_labels.read_text().splitlines():
            parts = [p.strip() for p in line.replace(",", "\t").split("\t") if p.strip()]
            if len(parts) >= 2 and parts[0].lstrip("-").isdigit():
                names[int(parts[0])] = parts[1]
    return labels, names


def make_report(exp: Experiment, ws: Workspace) -> dict:
    """Write ``reports/<experiment>/`` from the stored fits."""
    from voxelflow.pipeline.stages.export import export_variable
    from voxelflow.pipeline.stages.fit import fit_group
    from voxelflow.pipeline.study.report import write_report

    results = collect_results(exp, ws)

    def write_map(res, path: Path) -> None:
        export_variable(ws, fit_group(f"{exp.name}/{res.model}", res.lags), "r_test_cv", path)

    roi, names = _roi_of_voxel(exp, results[0].fit)
    return write_report(results, exp.reports / exp.name, experiment=exp.name,
                        write_map=write_map, roi_of_voxel=roi, roi_names=names)


def run_experiment(exp: Experiment, *, dry_run: bool = False, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Plan, run what is needed, write the report; return plan, ran stages and report."""
    ws = Workspace(exp.store)
    stages = build_plan(exp, ws, progress=progress)
    if dry_run:
        return {"plan": stages, "ran": [], "report": None}
    ran = execute_plan(ws, stages, log)
    report = make_report(exp, ws)
    return {"plan": stages, "ran": ran, "report": report}
