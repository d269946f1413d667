"""A video model's inputs in the features stage: clip options, clip positions, clip reads.

For each stored frame time ``t`` of a frames run, a video model is fed the clip of
``clip_frames`` frames at ``clip_fps`` ending at ``t`` (the frames at
``t - (N-1)/F ... t`` of the run's grid, padded at the run's start by repeating the
first frame: :mod:`voxelflow.pipeline.design.clips`).  :func:`plan_clip_runs`
maps every clip onto the stored frames before anything is written: the features
group holds the times whose whole clip is stored (all of a full-rate group; the
requested ones of a sparse group made with ``--clip-frames/--clip-fps``), and a
sparse group made without the clips is refused in one line saying how to extend
it.  :func:`read_clips`
reads the frames of a few clips in one contiguous read and gathers them into
``(n, clip_frames, H, W, 3)``.  The per-block work itself is the features stage's
:class:`~voxelflow.pipeline.stages.features.FeaturesWork` (its ``clips`` field).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr

from voxelflow.pipeline.design.clips import check_clip, clip_positions
from voxelflow.pipeline.design.needed import SPARSE, MissingTimes
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


def plan_clip_runs(frames_group: str, frames_runs: Sequence[xr.Dataset],
                   clip: tuple[int, float], frames_params: dict | None
                   ) -> tuple[list[xr.Dataset], tuple[np.ndarray, ...]]:
    """Per run, the frames run restricted to the output times (those whose whole clip
    is stored: every time of a full-rate group; of a sparse group, those its request
    included the clips of) with the clip options in its ``time`` attrs, and the
    ``(n_times, clip_frames)`` int64 positions of each time's clip in the stored frames.

    A sparse group whose request did not include clips of these options is refused
    in one line (:class:`MissingTimes`) with the command that extends it.
    """
    sparse = any(ds["time"].attrs.get(SPARSE) for ds in frames_runs)
    requests = ((frames_params or {}).get("times") or {}).get("needed_for")
    requests = requests if isinstance(requests, list) else []
    if sparse and not any(r.get("clip_frames") == clip[0] and r.get("clip_fps") == clip[1]
                          for r in requests if isinstance(r, dict)):
        raise MissingTimes(
            f"/{frames_group} is sparse (needed frames only) and was not made with the "
            f"frames of clips of {clip[0]} frames at {clip[1]:g} fps; "
            + _extend_hint(frames_group, clip, requests))
    runs, positions = [], []
    for run, ds in enumerate(frames_runs):
        keep, pos = clip_positions(ds["time"].values, ds["time"].attrs, clip[0], clip[1])
        if keep.size == 0:
            raise MissingTimes(f"/{frames_group} run {run}: no stored time has every frame "
                               f"of its clip; " + _extend_hint(frames_group, clip, requests))
        view = ds.isel(time=keep) if keep.size < ds.sizes["time"] else ds.copy()
        view["time"].attrs.update(clip_frames=clip[0], clip_fps=clip[1])
        runs.append(view)
        positions.append(pos)
    return runs, tuple(positions)


def _extend_hint(frames_group: str, clip: tuple[int, float], requests: list) -> str:
    """The command that adds the clips' frames to a sparse frames group."""
    last = requests[-1] if requests and isinstance(requests[-1], dict) else {}
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

