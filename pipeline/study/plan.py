"""One experiment file -> the stages to run, each with what to do about it (nothing runs).

The plan lists every stage with its store group and an action:

- ``skip``: the group is complete and was made from the same request;
- ``run``: the group does not exist yet;
- ``resume``: the group was interrupted (same request): finish the missing blocks;
- ``rerun``: the request changed (file, fps, model, lags, ...): replace the group.

A stage's *request* is what the experiment asks of it (files with their size and
modification time, stage options, and its upstream stages' requests); it is kept in
the group's attrs (``voxelflow_request``), so a second run of the same file computes
nothing, and a changed upstream stage reruns everything that depends on it.  A stage
that has started but not finished has no such attr yet: its request waits in the
workspace root's ``voxelflow_started`` (``{group: request}``), so a run killed mid-stage
resumes that stage next time instead of redoing it.
:mod:`voxelflow.pipeline.study.run` carries the plan out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from voxelflow.pipeline.study.config import Experiment, ModelSpec
from voxelflow.stores.workspace import Workspace

REQUEST_ATTR = "voxelflow_request"
STARTED_ATTR = "voxelflow_started"  # workspace root: {group: request} of unfinished stages
# needed-frames groups: {"base": fingerprint of the request without its lag sets,
# "lag_sets": [...]}, so that adding a lag set is recognised as an extension
LAG_SETS_ATTR = "voxelflow_request_lag_sets"


@dataclass
class PlannedStage:
    kind: str            # frames | bold | train | features | events | import | fit
    group: str           # store group it writes (train: the checkpoint file)
    request: dict        # what the experiment asks of it
    action: str = "run"  # skip | run | resume | rerun
    extends: bool = False  # a rerun that keeps every value the group holds (adds times)
    note: str = ""
    call: Callable[[bool], Any] | None = field(default=None, repr=False)
    upstream: list[str] = field(default_factory=list)  # groups/files it reads

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.request)

    @property
    def recorded_attrs(self) -> dict:
        """The attrs the group gets when this stage completes it: its request, and for
        a needed-frames stage the request without its lag sets and those lag sets."""
        attrs = {REQUEST_ATTR: self.fingerprint}
        base, lag_sets = split_lag_sets(self.request)
        if lag_sets is not None:
            attrs[LAG_SETS_ATTR] = {"base": _fingerprint(base), "lag_sets": lag_sets}
        return attrs

    @property
    def writes_file(self) -> bool:
        return self.kind == "train"

    def describe(self) -> str:
        target = self.group if self.writes_file else f"/{self.group}"
        text = f"{self.action:>6}  {self.kind:<8} {target}"
        return text + (f"  ({self.note})" if self.note else "")


def build_plan(exp: Experiment, ws: Workspace | None = None, *, progress: bool = True,
               check: bool = True) -> list[PlannedStage]:
    """Every stage of the experiment in order, each with its action (nothing is run).

    With ``check`` (the default) the inputs are checked first
    (:func:`~voxelflow.pipeline.study.inputs.check_inputs`: cheap probes of the files'
    headers), so a plan is only made for a study that can run.
    """
    from voxelflow.pipeline.study.inputs import check_inputs

    if check:
        check_inputs(exp)
    ws = ws or Workspace(exp.store)
    needs_frames = any(spec.needs_frames for spec in exp.models)
    bold = _bold_stage(exp, ws, progress)
    frames = _frames_stage(exp, ws, bold, progress) if needs_frames else None
    if frames is None:
        stages = [bold]
    else:  # needed frames are chosen from the BOLD runs' times: BOLD first
        stages = [frames, bold] if "needed_for" not in frames.request else [bold, frames]
    for spec in exp.models:
        if spec.needs_frames:
            stages += _model_stages(exp, ws, spec, frames, bold, progress)
        else:
            stages += _regressor_stages(exp, ws, spec, bold, progress)
    if exp.joint:  # [[fit.joint]]: after the stages of their models
        stages += _joint_fit_stages(exp, ws, stages, progress)
    return decide_actions(ws, stages)


def decide_actions(ws: Workspace, stages: list[PlannedStage]) -> list[PlannedStage]:
    """Set each stage's action from the store; a stage whose upstream group reruns
    reruns too (stages are in dependency order).  An upstream *extension* (a needed-
    frames group given more lag sets: it keeps every value it holds, bit for bit) does
    not make a stage rerun by itself: a fit records the features it reads without their
    lag sets, so the fits of the lag sets already there stay done."""
    rerun_groups: set[str] = set()
    started = started_requests(ws)
    for stage in stages:
        _decide(ws, stage, started.get(stage.group))
        if stage.action in ("skip", "resume") and any(g in rerun_groups for g in stage.upstream):
            stage.action, stage.note = "rerun", "an upstream stage reruns"
        elif stage.action == "rerun" and _is_extension(ws, stage) and \
                not any(g in rerun_groups for g in stage.upstream):
            stage.extends = True
            stage.note = "new lag sets: only the frame times they add are computed"
        if stage.action in ("rerun", "run") and not stage.extends:
            rerun_groups.add(stage.group)
    return stages


def _is_extension(ws: Workspace, stage: PlannedStage) -> bool:
    """Whether the stage's complete group was made from this request but for fewer lag
    sets (every lag set it was made for is still asked for)."""
    base, lag_sets = split_lag_sets(stage.request)
    stored = ws.attrs(stage.group).get(LAG_SETS_ATTR)
    if lag_sets is None or not isinstance(stored, dict) or ws.state(stage.group) != "complete":
        return False
    new = {tuple(map(float, s)) for s in lag_sets}
    return stored.get("base") == _fingerprint(base) and all(
        tuple(map(float, s)) in new for s in stored.get("lag_sets", []))


def split_lag_sets(request: dict) -> tuple[dict, list | None]:
    """``(request without the lag sets its needed frames are chosen for, those lag
    sets)`` of a frames or features request; ``(request, None)`` for any other (frames
    of every sample, events, imports)."""
    frames = request.get("frames") if isinstance(request.get("frames"), dict) else None
    needed = request.get("needed_for", (frames or {}).get("needed_for"))
    if not isinstance(needed, dict) or "lag_sets" not in needed:
        return request, None
    needed = {k: v for k, v in needed.items() if k != "lag_sets"}
    if "needed_for" in request:
        return {**request, "needed_for": needed}, request["needed_for"]["lag_sets"]
    return ({**request, "frames": {**frames, "needed_for": needed}},
            frames["needed_for"]["lag_sets"])


def _fingerprint(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------- one stage each
def _frames_stage(exp: Experiment, ws: Workspace, bold: PlannedStage,
                  progress: bool) -> PlannedStage:
    """Every sample (``frames = "all"``), or only those the fits' lag sets read
    (``"needed"``, the default; every sample while an autoencoder is trained on every
    frame, ``train_frames = "all"``, its default)."""
    from voxelflow.pipeline.stages.frames import run_frames_stage
    from voxelflow.pipeline.stages.needed_frames import NeededFrames

    request = {"videos": [_file_id(v) for v in exp.videos], "fps": exp.fps,
               "size": exp.size, "resize": exp.resize}
    needed, upstream = None, []
    training = any(spec.is_autoencoder and spec.train and spec.train_frames == "all"
                   for spec in exp.models)
    if exp.frames == "needed" and not training:
        clip = next(({"clip_frames": m.clip_frames, "clip_fps": m.clip_fps}
                     for m in exp.models if m.clip_frames), {})  # video models' clips
        needed = NeededFrames(bold=exp.subject, lag_sets=tuple(map(tuple, exp.lag_sets)),
                              aggregate=exp.aggregate, **clip)
        request["needed_for"] = {"bold": bold.request, "lag_sets": exp.lag_sets,
                                 "aggregate": exp.aggregate, **clip}
        upstream = [bold.group]
    stage = PlannedStage("frames", f"frames/{exp.stimulus_name}", request, upstream=upstream)
    stage.call = lambda overwrite: run_frames_stage(
        ws, exp.videos, exp.stimulus_name, fps=exp.fps, size=exp.size, resize=exp.resize,
        needed=needed, overwrite=overwrite, progress=progress)
    return stage


def _bold_stage(exp: Experiment, ws: Workspace, progress: bool) -> PlannedStage:
    from voxelflow.pipeline.stages.bold import run_bold_stage

    files = [f for r in exp.bold_runs for f in (r if isinstance(r, (list, tuple)) else [r])]
    request = {"runs": [_file_id(Path(p)) for p in files],
               "mask": _file_id(exp.mask) if exp.mask else None, "tr": exp.tr,
               "zscore": exp.zscore, "detrend": exp.detrend}
    options = {k: v for k, v in exp.bold_options.items() if v is not None}
    cleaning = {k: options[k] for k in ("confounds", "high_pass", "hemis", "structures")
                if k in options}
    if cleaning:  # only then, so plans of older experiment files keep their requests
        request["cleaning"] = cleaning
    stage = PlannedStage("bold", f"bold/{exp.subject}", request)
    stage.call = lambda overwrite: run_bold_stage(
        ws, exp.bold_runs, exp.subject, mask=exp.mask, tr=exp.tr, zscore=exp.zscore,
        detrend=exp.detrend, overwrite=overwrite, progress=progress, **options)
    return stage


def _model_stages(exp: Experiment, ws: Workspace, spec: ModelSpec, frames: PlannedStage,
                  bold: PlannedStage, progress: bool) -> list[PlannedStage]:
    """One feature space: [train (autoencoder)], features, then a fit per lag set."""
    stages: list[PlannedStage] = []
    weights, upstream, train_request = spec.weights, [frames.group], None
    if spec.is_autoencoder:
        weights = str(spec.checkpoint)
        if spec.train:
            train = _train_stage(exp, ws, spec, frames.request, bold.request, progress)
            stages.append(train)
            train_request = train.request
            upstream.append(train.group)
        else:
            train_request = _file_id(spec.checkpoint)
    feat = _features_stage(exp, ws, spec, weights, frames.request, train_request, upstream,
                           progress)
    stages.append(feat)
    stages += [_fit_stage(exp, ws, spec, lags, feat, bold, progress) for lags in exp.lag_sets]
    return stages


def _features_stage(exp: Experiment, ws: Workspace, spec: ModelSpec, weights: str,
                    frames_request: dict, train_request: dict | None, upstream: list[str],
                    progress: bool) -> PlannedStage:
    from voxelflow.pipeline.stages.features import run_features_stage

    request = {"frames": frames_request, "model": spec.model, "layer": spec.layer,
               "weights": weights, "pool": spec.pool, "device": exp.device,
               "trained": train_request}
    clip = {"clip_frames": spec.clip_frames, "clip_fps": spec.clip_fps} if spec.clip_frames \
        else {}  # only for video models: image models' requests keep their form
    request.update(clip)
    stage = PlannedStage("features", f"features/{spec.name}", request, upstream=upstream)
    stage.call = lambda overwrite: run_features_stage(
        ws, exp.stimulus_name, spec.model, layers=[spec.layer] if spec.layer else None,
        weights=weights, device=exp.device, batch_size=spec.batch_size,
        name=spec.name, pool=spec.pool, overwrite=overwrite, progress=progress, **clip)
    return stage


def _regressor_stages(exp: Experiment, ws: Workspace, spec: ModelSpec, bold: PlannedStage,
                      progress: bool) -> list[PlannedStage]:
    """A feature space that is not computed from frames: its events or import stage
    (``source``), then a fit per lag set."""
    from voxelflow.pipeline.study.sources import events_options, import_options

    if spec.source == "events":
        from voxelflow.pipeline.stages.events import run_events_stage

        options = {"rate": spec.rate, **events_options(spec)}
        request = {"events": [_file_id(p) for p in spec.events], **options,
                   "bold": bold.request}
        feat = PlannedStage("events", f"features/{spec.name}", request, upstream=[bold.group])
        feat.call = lambda overwrite: run_events_stage(
            ws, spec.events, spec.name, bold=exp.subject, overwrite=overwrite, **options)
    else:
        from voxelflow.pipeline.stages.imported import run_import_stage

        options = import_options(spec)
        request = {"files": [_file_id(p) for p in spec.files], **options}
        feat = PlannedStage("import", f"features/{spec.name}", request)
        feat.call = lambda overwrite: run_import_stage(ws, spec.files, spec.name,
                                                       overwrite=overwrite, **options)
    return [feat] + [_fit_stage(exp, ws, spec, lags, feat, bold, progress)
                     for lags in exp.lag_sets]


def _fit_stage(exp: Experiment, ws: Workspace, spec: ModelSpec, lags: list[float],
               feat: PlannedStage, bold: PlannedStage, progress: bool) -> PlannedStage:
    """A fit of one lag set; categorical event models keep their weights (the report's
    per-category maps)."""
    from voxelflow.pipeline.stages.fit import fit_group, run_fit_stage

    # The features without the lag sets their frames are chosen for: adding a lag set
    # extends them (old values kept bit for bit) and leaves this fit's inputs unchanged.
    request = {"features": split_lag_sets(feat.request)[0], "bold": bold.request,
               "lags": lags, "alphas": exp.alphas, "test_samples": exp.test_samples,
               "test_runs": exp.test_runs, "test_repeats": exp.test_repeats, "cv": exp.cv,
               "aggregate": exp.aggregate, "statistics": exp.statistics().as_params()}
    save_weights = spec.is_categorical_events
    if save_weights:
        request["save_weights"] = True
    name = f"{exp.name}/{spec.name}"
    stage = PlannedStage("fit", fit_group(name, lags), request,
                         upstream=[feat.group, bold.group])
    stage.call = lambda overwrite: run_fit_stage(
        ws, spec.name, exp.subject, lags, exp.alphas, test_samples=exp.test_samples,
        test_runs=exp.test_runs, test_repeats=exp.test_repeats, cv=exp.cv,
        aggregate=exp.aggregate, statistics=exp.statistics(), device=exp.device,
        name=name, save_weights=save_weights, overwrite=overwrite, progress=progress)
    return stage


def _joint_fit_stages(exp: Experiment, ws: Workspace, stages: list[PlannedStage],
                      progress: bool) -> list[PlannedStage]:
    """One planned fit per joint model and lag set, after the models' stages."""
    from voxelflow.pipeline.stages.fit import fit_group
    from voxelflow.pipeline.stages.joint_fit import run_joint_fit_stage

    by_group = {stage.group: stage for stage in stages}
    bold = by_group[f"bold/{exp.subject}"]
    planned = []
    for spec in exp.joint:
        feats = [by_group[f"features/{n}"] for n in spec.features]
        for lags in exp.lag_sets:
            request = {"features": [split_lag_sets(f.request)[0] for f in feats],
                       "bold": bold.request,
                       "lags": lags, "alphas": exp.alphas, "test_samples": exp.test_samples,
                       "test_runs": exp.test_runs, "test_repeats": exp.test_repeats,
                       "cv": exp.cv, "aggregate": exp.aggregate,
                       "statistics": exp.statistics().as_params(),
                       "weightings": spec.weightings, "partition": spec.partition}
            name = f"{exp.name}/{spec.name}"
            stage = PlannedStage("fit", fit_group(name, lags), request,
                                 upstream=[f.group for f in feats] + [bold.group])
            stage.call = _joint_caller(run_joint_fit_stage, exp, ws, spec, lags, name,
                                       progress)
            planned.append(stage)
    return planned


def _joint_caller(run: Callable, exp: Experiment, ws: Workspace, spec: Any,
                 lags: list[float], name: str, progress: bool) -> Callable[[bool], Any]:
    """The stage's call (bound here, not in a loop's closure)."""
    import numpy as np

    weightings = (np.asarray(spec.weightings, np.float64)
                  if isinstance(spec.weightings, list) else spec.weightings)
    return lambda overwrite: run(
        ws, spec.features, exp.subject, lags, exp.alphas, weightings=weightings,
        seed=exp.seed, partition=spec.partition, test_samples=exp.test_samples,
        test_runs=exp.test_runs, test_repeats=exp.test_repeats, cv=exp.cv,
        aggregate=exp.aggregate, statistics=exp.statistics(), device=exp.device,
        name=name, overwrite=overwrite, progress=progress)


def _train_stage(exp: Experiment, ws: Workspace, spec: ModelSpec, frames_request: dict,
                 bold_request: dict, progress: bool) -> PlannedStage:
    """The autoencoder's training on the frames no test sample uses
    (:func:`training_split`); writes ``spec.checkpoint``."""
    from voxelflow.pipeline.stages.train import train_autoencoder

    options = spec.train_options()
    request = {"frames": frames_request, "bold": bold_request, "lag_sets": exp.lag_sets,
               "test_samples": exp.test_samples, "test_runs": exp.test_runs,
               "aggregate": exp.aggregate, "options": options, "device": exp.device}
    if exp.test_repeats is not None:  # absent otherwise: earlier checkpoints stay valid
        request["test_repeats"] = exp.test_repeats
    if spec.train_frames != "all":  # likewise: only when set to "needed"
        request["train_frames"] = spec.train_frames
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
    from the stored frames and BOLD time coordinates.  The test frames are found on
    each run's full frame grid (a sparse, needed-frames group keeps it in its ``time``
    attrs), as the lagged design finds them, so ``train_until`` is the same for a
    sparse group as for one of every frame."""
    from voxelflow.pipeline.design.lags import first_test_frame
    from voxelflow.pipeline.design.needed import design_grid

    frames = ws.open_runs(f"frames/{exp.stimulus_name}")
    if exp.test_runs is not None:
        return {"train_runs": [r for r in range(len(frames)) if r not in exp.test_runs]}
    if exp.test_repeats is not None:  # every repeat shows the test clip
        held_out = {r for group in exp.test_repeats for r in group}
        return {"train_runs": [r for r in range(len(frames)) if r not in held_out]}
    bold_group = f"bold/{exp.subject}"
    tr = float(ws.attrs(bold_group)["tr"])
    frame_times = [design_grid(ds["time"].attrs, ds["time"].values) for ds in frames]
    run, index = first_test_frame(frame_times,
                                  [ds["time"].values for ds in ws.open_runs(bold_group)],
                                  exp.lag_sets, tr, aggregate=exp.aggregate,
                                  test_samples=exp.test_samples)
    offset = sum(t.size for t in frame_times[:run]) / exp.fps
    return {"train_until": offset + index / exp.fps}


# ------------------------------------------------------------- what the store holds
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


def started_requests(ws: Workspace) -> dict[str, str]:
    """``{group: request}`` of the stages a run started and has not finished."""
    return dict(ws.root_attrs().get(STARTED_ATTR, {}))


def note_started(ws: Workspace, group: str, request: str | None) -> None:
    """Record (``request``) or forget (``None``) the request of a started stage."""
    started = started_requests(ws)
    if request is None:
        started.pop(group, None)
    else:
        started[group] = request
    ws.set_root_attr(STARTED_ATTR, started or None)


def _decide(ws: Workspace, stage: PlannedStage, started: str | None = None) -> PlannedStage:
    """The stage's action from its state and the request it was made (or started) with."""
    if stage.writes_file:
        state, stored = _checkpoint_state(Path(stage.group))
    else:
        state = ws.state(stage.group)
        stored = ws.attrs(stage.group).get(REQUEST_ATTR)
        if state != "complete" and started is not None:
            stored = started  # interrupted: the request it was started with
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
