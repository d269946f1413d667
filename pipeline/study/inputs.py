"""Plan-time checks of an experiment against cheap probes of its input files.

:func:`check_inputs` runs before the plan is shown (``voxelflow run``, ``--dry-run``
too), so what would otherwise stop a stage hours into a study stops the run before any
work, as ``FILE:LINE: section.key: ...``:

* the videos' headers (PyAV: container duration and frame rate, nothing demuxed or
  decoded): readable, a video and not a still image, ``stimulus.fps`` within
  :func:`~voxelflow.pipeline.stages.frames.fps_cap`, one block of frames within memory
  (``stimulus.size``) and all frames within the free disk space;
* the BOLD runs' headers (nibabel: shape, TR; no data read): 4D with at least two
  volumes, one grid and one TR (or ``bold.tr``);
* each video about as long as its BOLD run (the rule of the fit stage,
  :func:`~voxelflow.pipeline.design.lags.durations_match`);
* every run at least as long as each lag set's longest lag plus one TR;
* ``test_samples`` and ``cv`` within the samples each lag set keeps, counted as the fit
  stage counts them (:func:`~voxelflow.pipeline.design.lags.run_design_indices`) on
  the header durations, with one TR of slack per run (the container's duration may
  differ slightly from the decoded frames'; the fit stage checks the exact count);
* ``aggregate = "mean"`` with at least one frame per TR, and the ``weights`` of each
  model (``random:SEED`` or an existing file).

Nothing here writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.study.config import Experiment, check_mean_window

__all__ = ["InputProbe", "check_inputs"]


@dataclass(frozen=True)
class InputProbe:
    """What the headers say: per run, the video's duration (s) and frame rate (fps,
    None: unknown), and the BOLD run's volumes; the TR (s) the experiment uses."""

    video_s: list[float]
    video_fps: list[float | None]
    volumes: list[int]
    tr: float


def check_inputs(exp: Experiment) -> InputProbe:
    """Probe the inputs' headers and check the experiment against them; raise
    :class:`InputError` as ``FILE:LINE: section.key: ...`` at the first problem."""
    probe = _probe(exp)
    if exp.videos:  # [stimulus] is absent when no model is computed from frames
        _check_stimulus(exp, probe)
        if exp.aggregate == "mean":
            check_mean_window(exp.fail, exp.fps, probe.tr)
        for r, (video_s, n) in enumerate(zip(probe.video_s, probe.volumes)):
            _check_pairing(exp, r, video_s, n, probe.tr)
    for lags in exp.lag_sets:
        _check_lag_set(exp, probe, lags)
    _check_weights(exp)
    return probe


def _probe(exp: Experiment) -> InputProbe:
    """The videos' and BOLD runs' headers (one-line errors as the file's key)."""
    from voxelflow.pipeline.stages.nifti import check_runs, probe_run
    from voxelflow.pipeline.stages.video import probe_video_header

    headers, infos = [], []
    for path in exp.videos:
        try:
            headers.append(probe_video_header(path))
        except InputError as exc:
            exp.fail("stimulus", "videos", str(exc))
    for path in exp.bold_runs:
        try:
            infos.append(probe_run(path))
        except InputError as exc:
            exp.fail("bold", "runs", str(exc))
    try:
        tr, _ = check_runs(infos, exp.tr)
    except InputError as exc:
        exp.fail("bold", "tr" if exp.tr is not None else "runs", _file_wording(str(exc)))
    durations = []
    for h in headers:
        if h.duration_s is None:  # no duration in the header: demux it (no decoding)
            from voxelflow.pipeline.stages.video import probe_video

            durations.append(probe_video(h.path).end_s)
        else:
            durations.append(h.duration_s)
    return InputProbe(durations, [h.rate for h in headers], [i.n_volumes for i in infos],
                      float(tr))


def _check_stimulus(exp: Experiment, probe: InputProbe) -> None:
    """``stimulus.fps`` within the cap of every video; frames within memory and disk."""
    from voxelflow.pipeline.execution.resources import check_disk, check_memory
    from voxelflow.pipeline.stages.frames import (frames_block_bytes, frames_disk_bytes,
                                                  fps_problem, n_samples)

    for path, seconds, rate in zip(exp.videos, probe.video_s, probe.video_fps):
        problem = fps_problem(exp.fps, rate, seconds)
        if problem:
            exp.fail("stimulus", "fps", f"{path.name}: {exp.fps:g} fps {problem}")
    try:
        check_memory(f"size = {exp.size}", frames_block_bytes(exp.size), "lower it")
    except InputError as exc:
        exp.fail("stimulus", "size", str(exc))
    total = sum(n_samples(s, exp.fps) for s in probe.video_s)
    try:
        check_disk(f"fps = {exp.fps:g}, size = {exp.size}", frames_disk_bytes(total, exp.size),
                   exp.store, "lower stimulus.fps or stimulus.size")
    except InputError as exc:
        exp.fail("stimulus", "size", str(exc))


def _check_pairing(exp: Experiment, run: int, video_s: float, n_volumes: int,
                   tr: float) -> None:
    """The video of run ``run`` about as long as its BOLD run (the fit stage's rule)."""
    from voxelflow.pipeline.design.lags import durations_match

    bold_s = n_volumes * tr
    if not durations_match(video_s, bold_s, tr):
        exp.fail("stimulus", "videos",
                 f"run {run}: {exp.videos[run].name} lasts {video_s:.1f} s but its BOLD run "
                 f"{exp.bold_runs[run].name} lasts {bold_s:.1f} s ({n_volumes} volumes x TR "
                 f"{tr:g} s); runs pair by index: give them in the same order, trimmed alike")


def _check_lag_set(exp: Experiment, probe: InputProbe, lags: list[float]) -> None:
    """Every run long enough for ``lags``; ``test_samples`` and ``cv`` within the kept
    samples (an upper bound: one TR of slack on each stimulus end)."""
    from voxelflow.pipeline.design.lags import run_design_indices, run_length_problem
    from voxelflow.pipeline.stages.frames import sample_times

    kept = []
    for r, n in enumerate(probe.volumes):
        problem = run_length_problem(n, probe.tr, lags, exp.aggregate)
        if problem:
            exp.fail("fit", "lag_sets", f"lags {_label(lags)}: run {r} "
                     f"({exp.bold_runs[r].name}) {problem}; use shorter lags or leave the "
                     f"run out")
        # Without videos (events or imported features) the features span the BOLD run;
        # ten samples per TR bound the kept samples from above.
        seconds = probe.video_s[r] if exp.videos else n * probe.tr
        rate = exp.fps if exp.videos else 10.0 / probe.tr
        frames = sample_times(seconds + probe.tr, rate)
        keep, _ = run_design_indices(frames, np.arange(n) * probe.tr, lags, probe.tr,
                                     exp.aggregate)
        kept.append(int(keep.size))
    total = sum(kept)
    if exp.test_samples is not None:
        if exp.test_samples >= total:
            exp.fail("fit", "test_samples", f"{exp.test_samples} leaves no training sample: "
                     f"lags {_label(lags)} keep at most {total} samples ({kept} per run); "
                     f"hold out fewer")
        n_train = total - exp.test_samples
    else:  # whole runs held out: test_runs, or every run of test_repeats
        held_out = set(exp.test_runs or []) | {r for g in exp.test_repeats or [] for r in g}
        n_train = sum(k for r, k in enumerate(kept) if r not in held_out)
    if isinstance(exp.cv, int) and exp.cv > n_train:
        exp.fail("fit", "cv", f"{exp.cv} folds but lags {_label(lags)} leave at most "
                 f"{n_train} training samples; use fewer folds")


def _check_weights(exp: Experiment) -> None:
    """Each model's ``weights``: imagenet, random:SEED or an existing file."""
    from voxelflow.pipeline.models.weights import parse_weights

    for i, spec in enumerate(exp.models):
        if not spec.needs_frames or spec.is_autoencoder and not spec.train:
            continue  # the checkpoint is the weights (checked when the file is loaded)
        try:
            parse_weights(spec.weights)
        except InputError as exc:
            exp.fail("models", "weights", _file_wording(str(exc)), i)


def _file_wording(message: str) -> str:
    """A stage's message in the experiment file's terms (keys, not command options)."""
    return (message.replace("pass --tr SECONDS", "set tr = SECONDS in [bold]")
            .replace("or pass --tr if the headers are wrong", "or set tr in [bold] if the "
                     "headers are wrong")
            .removeprefix("--weights "))


def _label(lags: list[float]) -> str:
    return "[" + ", ".join(f"{l:g}" for l in lags) + "]"
