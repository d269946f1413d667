"""The frames of a video model's clips: which grid frames a clip ending at ``t`` holds.

A clip of ``N`` frames at ``F`` fps ending at the frame time ``t`` holds the frames at
``t - (N-1)/F, ..., t - 1/F, t`` (s), each the latest frame of the run's sample grid at
or before that time (:func:`~voxelflow.pipeline.design.lags.frame_indices_for`: the way
the lagged design picks the frame at ``t - L``).  Times before the run's first frame
take the first frame (the clip is padded by repeating it).

For a sparse frames group (needed frames only, :mod:`~voxelflow.pipeline.design.needed`)
the clip frames must be stored too: the needed-frames request includes them when
given the clip options (:func:`with_clip_frames`); :func:`clip_positions` maps every
clip onto the stored frames and says which stored times have their whole clip (the
frames added only for clips lack the earlier part of their own).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from voxelflow.pipeline.design.lags import frame_indices_for
from voxelflow.pipeline.design.needed import design_grid
from voxelflow.pipeline.errors import InputError


def check_clip(clip_frames: int, clip_fps: float) -> tuple[int, float]:
    """``(clip_frames, clip_fps)`` checked: at least one frame, a positive finite rate."""
    if isinstance(clip_frames, bool) or int(clip_frames) != clip_frames or clip_frames < 1:
        raise InputError(f"--clip-frames must be a positive number of frames (got {clip_frames})")
    if not np.isfinite(clip_fps) or clip_fps <= 0:
        raise InputError(f"--clip-fps must be a positive rate in frames per second "
                         f"(got {clip_fps})")
    return int(clip_frames), float(clip_fps)


def clip_indices(grid: np.ndarray, ends: np.ndarray, clip_frames: int,
                 clip_fps: float) -> np.ndarray:
    """``(n, clip_frames)`` int64 indices into ``grid`` (the run's frame times, s) of the
    clip ending at each ``grid[ends]`` (``ends``: (n,) indices), oldest frame first;
    times before the run's first frame take index 0."""
    offsets = (np.arange(clip_frames, dtype=np.float64) - (clip_frames - 1)) / float(clip_fps)
    targets = np.asarray(grid, dtype=np.float64)[np.asarray(ends, dtype=np.int64)]
    times = targets[:, None] + offsets[None, :]
    picked = frame_indices_for(np.asarray(grid, dtype=np.float64), times.ravel())
    return np.maximum(picked, 0).reshape(times.shape).astype(np.int64)


def with_clip_frames(grid: np.ndarray, indices: np.ndarray, clip_frames: int,
                     clip_fps: float) -> np.ndarray:
    """Sorted unique indices into ``grid``: ``indices`` and every frame of their clips."""
    if clip_frames <= 1 or np.asarray(indices).size == 0:
        return np.asarray(indices, dtype=np.int64)
    return np.unique(clip_indices(grid, indices, clip_frames, clip_fps))


def clip_positions(times: np.ndarray, time_attrs: Mapping, clip_frames: int,
                   clip_fps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, positions)`` of a run's stored frame ``times`` (s): ``keep`` (n_kept,)
    the stored times whose whole clip is stored (all of them unless the run is sparse),
    ``positions`` (n_kept, clip_frames) int64 the positions in ``times`` of each one's
    clip frames.  ``time_attrs`` are the ``time`` coordinate's (a sparse run keeps its
    full grid there)."""
    stored = np.asarray(times, dtype=np.float64)
    grid = design_grid(time_attrs, stored)
    ends = np.minimum(np.searchsorted(grid, stored), max(grid.size - 1, 0))
    if stored.size and not np.array_equal(grid[ends], stored):
        raise InputError("the stored frame times are not on the group's k / fps grid")
    wanted = grid[clip_indices(grid, ends, clip_frames, clip_fps)]  # (n, clip_frames) s
    pos = np.minimum(np.searchsorted(stored, wanted), max(stored.size - 1, 0))
    found = (stored[pos] == wanted).all(axis=1) if stored.size else np.zeros(0, bool)
    keep = np.flatnonzero(found)
    return keep, pos[keep].astype(np.int64)
