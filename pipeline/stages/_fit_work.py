"""One voxel block of the fit stage: read its BOLD, compute every stored output.

:class:`FitWork` is the fit's per-block work object for
:func:`voxelflow.pipeline.execution.blocks.run_blocks` (threads here, one task per block
on a Dask cluster): :class:`BoldBlockReader` reads the design's BOLD rows of a voxel
slice straight from the workspace, :func:`block_outputs` runs the ridge engine on them
and :func:`stored_outputs` turns the engine's outputs into the block's stored float32
arrays (NaN where a voxel is not valid).  The joint (banded) fit reuses the reader, the
writer protocol and :func:`stored_outputs`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from voxelflow.pipeline import ridge
from voxelflow.pipeline.design.lags import LaggedDesign
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.stats.diagnostics import scored_voxels
from voxelflow.pipeline.stats.per_block import TestStatistics
from voxelflow.stores.workspace import StageWriter, Workspace


# ----------------------------------------------------------------- one voxel block
def _slice_len(sl: slice) -> int:
    """Number of voxels of a block's slice."""
    return int(sl.stop - sl.start)


def block_outputs(factors: ridge.RidgeFactors, block: np.ndarray, ok: np.ndarray,
                  train: np.ndarray, test: np.ndarray, save_weights: bool,
                  save_predictions: bool, stats: TestStatistics | None = None,
                  repeat_data: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The stored outputs of one voxel block.

    ``block`` (sample, voxel) float32 BOLD of the design's samples (modified: voxels
    not ``ok`` are zeroed); ``ok`` (voxel,) bool, valid and finite voxels (the others
    get NaN); ``train``/``test`` sample indices; ``repeat_data`` (repeat,
    test_sample, voxel): repeated test runs, whose mean is then the measured test
    data.  Returns ``r_test``/``r_cv``/``r2_test`` (alpha, voxel),
    ``best_alpha``/``r_test_cv``/``r2_test_cv`` (voxel,), the statistics of
    ``stats`` (:meth:`TestStatistics.block_arrays`), and ``weights`` (lag_feature,
    voxel) / ``predictions`` (test_sample, voxel) when asked for, as host (NumPy)
    arrays whatever the factors' device.
    """
    block[:, ~ok] = 0.0
    y_test = block[test] if repeat_data is None else repeat_data.mean(axis=0, dtype=np.float32)
    out = ridge.ridge_chunk(factors, block[train], y_test, return_weights=save_weights,
                            return_predictions=save_predictions or stats is not None)
    out = {k: ridge.to_numpy(v) for k, v in out.items()}
    return stored_outputs(out, ok, y_test, save_weights, save_predictions, stats,
                          repeat_data)


def stored_outputs(out: dict[str, np.ndarray], ok: np.ndarray, y_test: np.ndarray,
                   save_weights: bool, save_predictions: bool,
                   stats: TestStatistics | None, repeat_data: np.ndarray | None
                   ) -> dict[str, np.ndarray]:
    """A block's stored arrays (float32, NaN where not ``ok``) from the host
    outputs ``out`` of :func:`ridge.ridge_chunk` (or the banded engine)."""
    arrays = {name: np.where(ok, out[name], np.nan).astype(np.float32)
              for name in ("r_test", "r_cv", "best_alpha", "r_test_cv", "r2_test",
                           "r2_test_cv")}
    if stats is not None:
        scored = scored_voxels(ok, arrays["r_test"], arrays["r_cv"], arrays["best_alpha"],
                               arrays["r_test_cv"])
        arrays.update(stats.block_arrays(y_test, out["predictions"], arrays["r_test_cv"],
                                         scored, repeat_data))
    if save_weights:
        arrays["weights"] = np.where(ok[None, :], out["weights"], np.nan).astype(np.float32)
    if save_predictions:
        arrays["predictions"] = out["predictions"].astype(np.float32)
    return arrays


@dataclass(frozen=True)
class BoldBlockReader:
    """Reads the design's BOLD rows for a voxel slice straight from the workspace.

    The same rows as the design's lazy ``Y``, from a small picklable plan that any
    process can use: the workspace's absolute path and, per run, the run's node and
    the kept BOLD sample indices (the design's rows are the runs' kept samples,
    concatenated in run order).
    """

    store: str
    nodes: tuple[str, ...]
    keep: tuple[np.ndarray, ...]
    var: str = "bold"

    @classmethod
    def from_design(cls, workspace: Workspace, group: str, design: LaggedDesign
                    ) -> "BoldBlockReader":
        """Kept samples per run, recovered from the design's ``run``/``time`` rows."""
        nodes, keep = [], []
        for r in np.unique(design.run):
            times = np.asarray(workspace.open_run(group, int(r))["time"].values, np.float64)
            rows = design.time[design.run == r]
            index = np.searchsorted(times, rows)
            if index.max(initial=-1) >= times.size or not np.array_equal(times[index], rows):
                raise AssertionError(f"/{group} run {r}: design times are not BOLD times")
            nodes.append(Workspace.run_path(group, int(r)))
            keep.append(index.astype(np.int64))
        return cls(str(Path(workspace.path).resolve()), tuple(nodes), tuple(keep))

    @classmethod
    def for_repeats(cls, workspace: Workspace, group: str, design: LaggedDesign,
                    groups: list[list[int]]) -> tuple["BoldBlockReader", ...]:
        """One reader per repeat ``n``: run ``n`` of every group (sorted by first run),
        at the samples the design keeps of the group's first run (the test samples)."""
        first = cls.from_design(workspace, group, design)
        keep_of = dict(zip(first.nodes, first.keep))
        readers = []
        for n in range(len(groups[0])):
            nodes = []
            for runs in groups:
                volumes = [int((design.run == r).sum()) + design.dropped[r]
                           for r in (runs[0], runs[n])]
                if volumes[0] != volumes[1]:
                    raise InputError(f"--test-repeats: run {runs[n]} of /{group} has "
                                     f"{volumes[1]} volumes but run {runs[0]} has {volumes[0]}; "
                                     f"repeats must show the same clip for as long")
                nodes.append(Workspace.run_path(group, runs[n]))
            keep = tuple(keep_of[Workspace.run_path(group, runs[0])] for runs in groups)
            readers.append(cls(first.store, tuple(nodes), keep))
        return tuple(readers)

    def read(self, voxels: slice) -> np.ndarray:
        """float32 (sample, voxel) BOLD of the design's samples for ``voxels``."""
        parts = []
        workspace = Workspace(self.store)  # a damaged chunk: one line naming its block
        for node, keep in zip(self.nodes, self.keep):
            column = workspace.read_array(node, self.var, (slice(None), voxels))
            parts.append(np.asarray(column, dtype=np.float32)[keep])
        return np.concatenate(parts, axis=0)


#: The worker's GPU copy of the broadcast factors (``--device cuda``): ``[host
#: factors, device factors]``.  The host object is kept referenced so that it is
#: compared by identity (a later fit's factors are another object).
_DEVICE_FACTORS: list[Any] = []


def _factors_on_device(factors: ridge.RidgeFactors, device: str) -> ridge.RidgeFactors:
    """The factors with their arrays on ``device``, copied once per worker process."""
    if device == "cpu":
        return factors
    if _DEVICE_FACTORS and _DEVICE_FACTORS[0] is factors:
        return _DEVICE_FACTORS[1]
    _DEVICE_FACTORS.clear()  # free the previous fit's device copy first
    moved = _map_arrays(factors, ridge.get_array_module(device).asarray)
    _DEVICE_FACTORS.extend([factors, moved])
    return moved


def _map_arrays(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``value`` with ``fn`` applied to every array (ndim >= 1) inside it, through
    nested dataclasses and tuples; ``alphas`` stays a host array (it indexes NumPy)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _map_arrays(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value)
                                             if f.name != "alphas"})
    if isinstance(value, tuple):
        return tuple(_map_arrays(v, fn) for v in value)
    if hasattr(value, "__array__") and hasattr(value, "shape") and value.ndim > 0:
        return fn(value)
    return value


@dataclass
class FitWork:
    """Fitting one voxel block: the per-block work of the fit stage (picklable).

    ``factors`` (from :func:`ridge.factorize_ridge`) are used as they are, or, with
    ``move_to`` set (``"cuda"``: host copies sent to cluster workers), copied to that
    device once per process.  ``train``/``test`` index the design's samples,
    ``valid`` (voxel,) bool flags the BOLD voxels to score; ``stats`` is the
    test-set statistics plan; ``repeats`` one reader per repeated test run (their
    mean is then the measured test data).
    """

    factors: ridge.RidgeFactors
    reader: BoldBlockReader
    writer: StageWriter
    train: np.ndarray
    test: np.ndarray
    valid: np.ndarray
    save_weights: bool = False
    save_predictions: bool = False
    move_to: str | None = None
    stats: TestStatistics | None = None
    repeats: tuple[BoldBlockReader, ...] = ()

    def compute(self, block: int) -> dict[str, np.ndarray]:
        """The stored outputs of voxel block ``block`` (see :func:`block_outputs`)."""
        voxels = self.writer.block_slice(0, block)
        data = self.reader.read(voxels)
        ok = self.valid[voxels] & np.isfinite(data).all(axis=0)
        repeat_data = None
        if self.repeats:
            repeat_data = np.stack([reader.read(voxels) for reader in self.repeats])
            ok &= np.isfinite(repeat_data).all(axis=(0, 1))
            repeat_data[:, :, ~ok] = 0.0
        factors = (self.factors if self.move_to is None
                   else _factors_on_device(self.factors, self.move_to))
        return self.outputs(factors, data, ok, repeat_data)

    def outputs(self, factors: Any, data: np.ndarray, ok: np.ndarray,
                repeat_data: np.ndarray | None) -> dict[str, np.ndarray]:
        """The block's stored arrays from its BOLD ``data`` (sample, voxel)."""
        arrays = block_outputs(factors, data, ok, self.train, self.test, self.save_weights,
                               self.save_predictions, self.stats, repeat_data)
        if self.save_weights:  # (lag_feature, voxel) lag-major -> (lag, feature, voxel)
            n_lags, n_features = self.writer.templates[0].dataset["weights"].shape[:2]
            arrays["weights"] = arrays["weights"].reshape(n_lags, n_features, -1)
        return arrays

    def write(self, block: int, arrays: dict[str, np.ndarray]) -> int:
        """Write the block's region (data only); returns its number of voxels."""
        self.writer.write_block_data(0, block, arrays)
        return _slice_len(self.writer.block_slice(0, block))

    def for_workers(self) -> "FitWork":
        """A copy for cluster workers: host factors (copied to the workers' device
        once each), a writer with an absolute workspace path."""
        factors, move_to = self.factors, None
        if factors.device != "cpu":
            factors, move_to = _map_arrays(factors, ridge.to_numpy), factors.device
        return dataclasses.replace(self, factors=factors, writer=self.writer.for_workers(),
                                   move_to=move_to)
