"""A video model's inputs in the features stage: clip options, clip positions, clip reads.

For each stored frame time ``t`` of a frames run, a video model is fed the clip of
``clip_frames`` frames at ``clip_fps`` ending at ``t`` (the frames at
``t - (N-1)/F ... t`` of the run's grid, padded at the run's start by repeating the
first frame: :mod:`voxelflow.pipeline.design.clips`).  :func:`run_clip_positions`
maps every clip onto the stored frames before anything is written (a sparse group
lacking some is refused in one line saying how to extend it); :func:`read_clips`
reads the frames of a few clips in one contiguous read and gathers them into
``(n, clip_frames, H, W, 3)``.  The per-block work itself is the features stage's
:class:`~voxelflow.pipeline.stages.features.FeaturesWork` (its ``clips`` field).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr

from voxelflow.pipeline.design.clips import check_clip, clip_positions
from voxelflow.pipeline.design.needed import MissingTimes
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.models.video import (DEFAULT_CLIP_FPS, DEFAULT_CLIP_FRAMES,
                                             is_video_model)
from voxelflow.stores.workspace import Workspace

DEFAULT_CLIP_BATCH = {"cpu": 4, "cuda": 16}  # clips per forward (a clip is N frames)


def check_clip_options(model: str, clip_frames: int | None, clip_fps: float | None
                       ) -> tuple[int, float] | None:
    """``(clip_frames, clip_fps)`` of a video model (defaults 16 frames at 15 fps, as
    torchvision's Kinetics training), ``None`` for an image model; one-line
    :class:`InputError` for clip options given to an image model or out of range."""
    if not is_video_model(model):
        if clip_frames is not None or clip_fps is not None:
            raise InputError(f"--clip-frames/--clip-fps apply to video models (r3d_18, "
                             f"mc3_18, r2plus1d_18, s3d, mvit_v1_b, mvit_v2_s, swin3d_t, ...); "
                             f"{model} is an image model: drop them")
        return None
    return check_clip(DEFAULT_CLIP_FRAMES if clip_frames is None else clip_frames,
                      DEFAULT_CLIP_FPS if clip_fps is None else clip_fps)


def run_clip_positions(frames_group: str, frames_runs: Sequence[xr.Dataset],
                       clip: tuple[int, float], frames_params: dict | None
                       ) -> tuple[np.ndarray, ...]:
    """Per run, ``(n_times, clip_frames)`` int64 positions in the run's stored frames of
    the clip ending at each stored time; :class:`MissingTimes` (one line, with the
    command that extends the group) when a sparse group lacks some of their frames."""
    out = []
    for run, ds in enumerate(frames_runs):
        time = ds["time"]
        what = f"/{frames_group} run {run} (sparse: only the frames of its request)"
        try:
            out.append(clip_positions(time.values, time.attrs, clip[0], clip[1], what))
        except MissingTimes as exc:
            raise MissingTimes(f"{exc} for clips of {clip[0]} frames at {clip[1]:g} fps; "
                               + _extend_hint(frames_group, clip, frames_params)) from None
    return tuple(out)


def _extend_hint(frames_group: str, clip: tuple[int, float], params: dict | None) -> str:
    """The command that adds the clips' frames to a sparse frames group."""
    requests = ((params or {}).get("times") or {}).get("needed_for") or [{}]
    last = requests[-1] if isinstance(requests, list) and requests else {}
    if last.get("bold"):
        lags = " ".join(f"--lags {','.join(f'{x:g}' for x in s)}" for s in last["lag_sets"])
        source = f"--times-from-bold {last['bold']} {lags}"
    else:
        source = "--times-from-bold SUBJ --lags L1,L2,... (or --times FILE)"
    name = frames_group.split("/", 1)[-1]
    return (f"extend it with: voxelflow frames VIDEO... --name {name} {source} "
            f"--clip-frames {clip[0]} --clip-fps {clip[1]:g} --extend")


def read_clips(workspace: Workspace, node: str, positions: np.ndarray) -> np.ndarray:
    """uint8 ``(n, clip_frames, H, W, 3)``: the frames at ``positions`` (n, clip_frames)
    of ``node/frames``, read as one contiguous range and gathered."""
    first, last = int(positions.min()), int(positions.max()) + 1
    frames = workspace.read_array(node, "frames", slice(first, last))
    return np.ascontiguousarray(frames[positions - first])

