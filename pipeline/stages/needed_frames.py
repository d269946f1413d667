"""Which samples of each run's frame grid the frames stage decodes (``frames = "needed"``).

:class:`NeededFrames` is the request: the frames the lagged designs of ``lag_sets``
read for the BOLD runs of ``/bold/<bold>`` (:func:`needed_frame_indices`, the design's
own rule), or the times listed in a file (each snapped to the latest grid sample at
or before it, as the design picks frames).  ``extend`` keeps the times a group already
holds and adds the new ones.  With ``clip_frames`` > 1 (a video model's clips,
:mod:`~voxelflow.pipeline.design.clips`) every frame of the clip ending at each
selected time is selected too.  :func:`reuse_positions` says which samples of a new
selection an old group already holds, so an extension computes only the missing ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from voxelflow.pipeline.design.clips import check_clip, with_clip_frames
from voxelflow.pipeline.design.lags import frame_indices_for
from voxelflow.pipeline.design.lags import needed_frame_indices
from voxelflow.pipeline.errors import InputError, WorkspaceConflict
from voxelflow.stores.workspace import Workspace


@dataclass(frozen=True)
class NeededFrames:
    """The frames a set of planned fits needs.

    ``bold`` (a ``/bold`` group) with ``lag_sets`` (s) and ``aggregate``, or
    ``times_file`` (lines ``time`` or ``run,time`` in s from the run's onset); with
    ``clip_frames`` > 1, also the frames of the clips (``clip_frames`` at ``clip_fps``)
    ending at those times.
    """

    bold: str | None = None
    lag_sets: tuple[tuple[float, ...], ...] = ()
    aggregate: str = "last"
    times_file: Path | None = None
    extend: bool = False
    clip_frames: int = 1
    clip_fps: float | None = None

    def request(self, workspace: Workspace) -> dict:
        """What the selection was made from (kept in the group's params)."""
        if self.times_file is not None:
            data = Path(self.times_file).read_bytes()
            out = {"times_file": str(Path(self.times_file).resolve()),
                   "sha256": hashlib.sha256(data).hexdigest()}
        else:
            out = {"bold": self.bold, "bold_params": workspace.params(f"bold/{self.bold}"),
                   "lag_sets": [list(map(float, s)) for s in self.lag_sets],
                   "aggregate": self.aggregate}
        if self.clip_frames > 1:  # only then: requests without clips keep their form
            out.update(clip_frames=int(self.clip_frames), clip_fps=float(self.clip_fps))
        return out

    def indices(self, workspace: Workspace, grids: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per run, sorted unique indices into ``grids[r]`` (the run's ``k / fps`` times),
        with the frames of each one's clip when ``clip_frames`` > 1."""
        selected = self._selected(workspace, grids)
        if self.clip_frames == 1:
            return selected
        frames, fps = check_clip(self.clip_frames, self.clip_fps or 0.0)
        return [with_clip_frames(g, idx, frames, fps) for g, idx in zip(grids, selected)]

    def _selected(self, workspace: Workspace, grids: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per run, the sorted unique grid indices the request names (no clip frames)."""
        if self.times_file is not None:
            return _indices_from_file(Path(self.times_file), grids)
        if not self.lag_sets:
            raise InputError("--times-from-bold needs --lags (the lag sets of the planned fits)")
        group = f"bold/{self.bold}"
        attrs = workspace.require_complete(group, f"voxelflow bold RUN.nii.gz ... --subject "
                                                  f"{self.bold}")
        tr = float(attrs.get("tr") or attrs["voxelflow"]["params"]["tr"])
        bold_runs = workspace.open_runs(group)
        if len(bold_runs) != len(grids):
            raise InputError(f"/{group} has {len(bold_runs)} run(s) but {len(grids)} video(s) "
                             f"were given; runs are paired by index")
        out = []
        for r, (grid, b) in enumerate(zip(grids, bold_runs)):
            idx = needed_frame_indices(grid, b["time"].values.astype(np.float64),
                                       self.lag_sets, tr, self.aggregate)
            if idx.size == 0:
                raise InputError(f"run {r}: no BOLD sample of /{group} has a full stimulus "
                                 f"history for lags {[list(s) for s in self.lag_sets]}; use "
                                 f"shorter lags or give the frames of every time (no "
                                 f"--times-from-bold)")
            out.append(idx)
        return out


def _indices_from_file(path: Path, grids: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``--times FILE``: one time (s) per line, or ``run,time``; ``#`` comments."""
    if not path.is_file():
        raise InputError(f"--times {path}: no such file; give a text file of times in s")
    picked: list[list[int]] = [[] for _ in grids]
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#")[0].replace(",", " ").split()
        if not text:
            continue
        try:
            run, t = (0, float(text[0])) if len(text) == 1 else (int(text[0]), float(text[1]))
        except ValueError:
            raise InputError(f"--times {path}:{n}: expected 'time' or 'run,time' in seconds, "
                             f"got {line.strip()!r}") from None
        if not 0 <= run < len(grids):
            raise InputError(f"--times {path}:{n}: run {run} but {len(grids)} video(s) given")
        grid = grids[run]
        end = grid[-1] + (grid[1] - grid[0] if grid.size > 1 else 0.0)
        if not 0 <= t < end:
            raise InputError(f"--times {path}:{n}: {t} s is outside run {run} "
                             f"(0 to {end:.3f} s)")
        picked[run].append(int(frame_indices_for(grid, np.array([t]))[0]))
    if not any(picked):
        raise InputError(f"--times {path}: lists no times; one time (s) per line")
    return [np.unique(np.asarray(p, dtype=np.int64)) for p in picked]


def stored_grid_indices(times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Indices into ``grid`` of a group's stored ``times`` (all exact grid values)."""
    pos = np.searchsorted(grid, times)
    pos = np.minimum(pos, grid.size - 1)
    return pos[grid[pos] == times].astype(np.int64)


def reuse_positions(old_times: np.ndarray, new_times: np.ndarray) -> np.ndarray:
    """(n_new,) position of each new time in ``old_times``, -1 where it is not stored."""
    old = np.asarray(old_times, dtype=np.float64)
    if old.size == 0:
        return np.full(new_times.size, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(old, new_times), old.size - 1)
    return np.where(old[pos] == new_times, pos, -1).astype(np.int64)


def selection_params(indices: Sequence[np.ndarray], requests: list[dict]) -> dict:
    """The ``times`` entry of a sparse group's params: its requests and a hash of the
    selected grid indices."""
    digest = hashlib.sha256()
    for idx in indices:
        digest.update(np.asarray(idx, dtype=np.int64).tobytes() + b"|")
    return {"needed_for": requests, "frames": [int(i.size) for i in indices],
            "sha256": digest.hexdigest()}


def select_frames(workspace: Workspace, group: str, needed: NeededFrames,
               grids: list[np.ndarray], params: dict) -> tuple[list[np.ndarray] | None, dict]:
    """``(per-run grid indices, the params' "times" entry)`` of ``needed``; with
    ``extend``, united with the times the group holds (``None``: it holds all)."""
    selection = needed.indices(workspace, grids)
    requests = [needed.request(workspace)]
    old = workspace.params(group)
    if needed.extend and workspace.state(group) == "complete" and old is not None and \
            _without_times(old) == _without_times(_json(params)):
        if "times" not in old:  # the group holds every frame: nothing to add
            return None, {"needed_for": "all"}
        held = [stored_grid_indices(ds["time"].values, g)
                for ds, g in zip(workspace.open_runs(group), grids)]
        selection = [np.union1d(a, b) for a, b in zip(held, selection)]
        held_for = list(old["times"]["needed_for"])  # a request made again adds nothing
        requests = held_for + [r for r in _json(requests) if r not in held_for]
    return selection, selection_params(selection, requests)


def reuse_plan(workspace: Workspace, group: str, params: dict, times: list[np.ndarray],
                     overwrite: bool) -> list[np.ndarray] | None:
    """Per run, the old position of each new sample (-1: decode it) when the complete
    group differs from ``params`` only in its times; ``None`` otherwise."""
    old = workspace.params(group)
    new = _json(params)
    if workspace.state(group) != "complete" or old is None or old == new or \
            _without_times(old) != _without_times(new):
        return None
    runs = workspace.open_runs(group)
    positions = [reuse_positions(ds["time"].values, t) for ds, t in zip(runs, times)]
    dropped = sum(ds.sizes["time"] for ds in runs) - sum(int((p >= 0).sum()) for p in positions)
    if dropped and not overwrite:
        raise WorkspaceConflict(
            f"{workspace.path}: /{group} holds {dropped} frame time(s) the new selection "
            f"drops; add --extend to keep them, or --overwrite to replace the group")
    return positions


def _without_times(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "times"}


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))
