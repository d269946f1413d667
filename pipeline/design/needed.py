"""Which stimulus frames the planned fits read: sparse time coordinates.

A lagged design at a TR of 1 s reads the frame at ``t - L`` of each BOLD sample
(:func:`~voxelflow.pipeline.design.lags.run_design_indices`), a few frames per second
out of the sampled 20.  :func:`~voxelflow.pipeline.design.lags.needed_frame_indices`
runs that same function on the full frame grid ``k / fps`` of a run, for every lag
set, and returns the union of the frames it picks (with ``aggregate="mean"`` every frame of each window), so the frames
and features stages can decode and extract those only.

A group holding such a subset keeps the full grid in the attrs of its ``time``
coordinate (``grid_fps``, ``grid_frames``, ``sparse = 1``); the features stage copies
those attrs from the frames.  The design is then built on the full grid and mapped to
the stored positions (:func:`design_grid`, :func:`stored_positions`), so it is the
same, bit for bit, as the one built from features of every frame.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from voxelflow.pipeline.errors import InputError

GRID_FPS, GRID_FRAMES, SPARSE = "grid_fps", "grid_frames", "sparse"


class MissingTimes(InputError):
    """A sparse group lacks frame times a design needs (the message says how to extend)."""


def grid_times(n_frames: int, fps: float) -> np.ndarray:
    """The full sample grid ``k / fps`` (s, float64), as the frames stage makes it."""
    return np.arange(int(n_frames), dtype=np.float64) / float(fps)


def grid_attrs(n_frames: int, fps: float, frames_name: str) -> dict:
    """The ``time`` coordinate attrs that mark a sparse subset of a ``k / fps`` grid of
    ``n_frames`` samples, taken from ``/frames/<frames_name>``."""
    return {GRID_FPS: float(fps), GRID_FRAMES: int(n_frames), SPARSE: 1,
            "frames_name": frames_name}


def design_grid(time_attrs: Mapping, times: np.ndarray) -> np.ndarray:
    """The frame times the design is built on: the full grid of a sparse run (from its
    ``time`` attrs), else the stored ``times`` themselves."""
    if time_attrs.get(SPARSE):
        return grid_times(int(time_attrs[GRID_FRAMES]), float(time_attrs[GRID_FPS]))
    return np.asarray(times, dtype=np.float64)


def stored_positions(stored: np.ndarray, grid: np.ndarray, indices: np.ndarray,
                     what: str) -> np.ndarray:
    """Position in ``stored`` (n_stored,) of ``grid[indices]``; :class:`MissingTimes`
    naming ``what`` (the group and how to extend it) when some are not stored.

    Times are compared exactly: both come from ``k / fps`` in float64.
    """
    targets = grid[np.asarray(indices, dtype=np.int64)]
    pos = np.searchsorted(stored, targets)
    ok = (pos < stored.size) & (stored[np.minimum(pos, stored.size - 1)] == targets)
    if not ok.all():
        missing = np.unique(targets[~ok])
        raise MissingTimes(f"{what}: {missing.size} frame time(s) needed are not stored "
                           f"(first {missing[0]:.3f} s)")
    return pos.astype(np.int64)


def extend_hint(frames_name: str, features_name: str, bold: str,
                lag_sets: Sequence[Sequence[float]], time_attrs: Mapping | None = None) -> str:
    """The commands that add the frames of ``lag_sets`` to sparse groups (with the clip
    options of a video model's features, read from their ``time_attrs``)."""
    lags = " ".join(f"--lags {','.join(f'{x:g}' for x in s)}" for s in lag_sets)
    attrs = time_attrs or {}
    clip = (f" --clip-frames {attrs['clip_frames']} --clip-fps {attrs['clip_fps']:g}"
            if attrs.get("clip_frames") else "")
    return (f"extend them with: voxelflow frames VIDEO... --name {frames_name} "
            f"--times-from-bold {bold} {lags}{clip} --extend, then rerun voxelflow features "
            f"--frames {frames_name} ... --name {features_name} (only the missing times are "
            f"computed)")
