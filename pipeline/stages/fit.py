"""The fit stage: lagged design from stored features + BOLD -> ridge over voxel blocks.

Writes ``/fits/<name>/lags-<L1>-<L2>...`` holding, per voxel (``voxel`` dim, with the
BOLD group's ``i, j, k, valid`` coordinates):

- ``r_test (alpha, voxel)``: test-set Pearson r of the model trained on all training
  samples, for every alpha (the study's table cell = its mean over valid voxels);
- ``r_cv (alpha, voxel)``: mean held-out r over the CV folds of the training data;
- ``best_alpha (voxel)``: the alpha with the best ``r_cv`` (per voxel);
- ``r_test_cv (voxel)``: test r at that alpha (the honest number);
- ``r2_test (alpha, voxel)``, ``r2_test_cv (voxel)``: test-set R^2 beside r, and the
  test-set statistics of :mod:`voxelflow.pipeline.stages._fit_stats` (permutation
  p-values with FDR/FWE maps, block-bootstrap sums, noise ceiling with repeated test
  runs; definitions in ``docs/statistics.md``);
- optionally ``weights (lag, feature, voxel)`` at the best alpha, with coordinates
  ``lag`` (s, in the order the lags were given) and ``feature`` (the features group's
  names), so ``fit["weights"].sel(feature="face", lag=5)`` is a voxel map (the
  weights of the centred design, as scikit-learn's ``coef_``; groups written before
  this layout hold ``weights (lag_feature, voxel)``, lag-major: :func:`fit_weights`
  reads both as ``(lag, feature, voxel)``), and ``predictions (test_sample, voxel)``
  at the best alpha, in BOLD units.

The design is decomposed once; voxel blocks (4,096 by default) are then computed and
written one at a time with a done flag each, so memory holds one block of BOLD and an
interrupted fit resumes where it stopped.

One voxel block is one :class:`FitWork` step (read the block's BOLD from the workspace
with :class:`BoldBlockReader`, compute every output with :func:`block_outputs`, write
the block's region), run by :func:`voxelflow.pipeline.execution.blocks.run_blocks`:
here, block after block with the next block computed while the last one is written;
on a Dask cluster (``--scheduler ADDRESS`` / ``--workers N``, see
:mod:`voxelflow.pipeline.execution.cluster`), the work object (the factors as host
arrays, the block plan, the writer) is sent to every worker once and each pending
block is one task; the client sets the blocks' done flags.  With ``device="cuda"``
each worker copies the factors to its GPU once and every block runs in CuPy, results
copied back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import dask.array as da
import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from voxelflow.pipeline import ridge
from voxelflow.pipeline.execution.blocks import run_blocks
from voxelflow.pipeline.execution.cluster import active_client, require_shared_path
from voxelflow.pipeline.execution.resources import check_request
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.design.lags import LaggedDesign, build_design
from voxelflow.pipeline.ridge.scoring import contiguous_folds, run_folds
from voxelflow.stores.inventory import stored_bytes
from voxelflow.stores.names import check_name
from voxelflow.pipeline.stages.feature_arrays import feature_labels
from voxelflow.pipeline.stages import _fit_stats
from voxelflow.pipeline.stats.diagnostics import nan_voxel_count, scored_in, scored_voxels
from voxelflow.pipeline.stats.per_block import StatisticsOptions, TestStatistics
from voxelflow.stores.workspace import RunTemplate, StageWriter, Workspace

VOXEL_BLOCK = 4096
# A voxel block being computed and the previous one being written.
FIT_BLOCKS_IN_MEMORY = 2


def lag_set_label(lags: Sequence[float]) -> str:
    """``[4, 4.5, 5]`` -> ``"lags-4-4.5-5"`` (the node name of a lag set)."""
    return "lags-" + "-".join(f"{float(l):g}" for l in lags)


def fit_group(name: str, lags: Sequence[float]) -> str:
    return f"fits/{name}/{lag_set_label(lags)}"


@dataclass
class FitSummary:
    group: str
    alphas: np.ndarray
    mean_r: np.ndarray          # (alpha,) mean r_test over valid voxels
    mean_r_cv_selected: float   # mean r_test_cv over valid voxels
    n_voxels: int
    n_valid: int
    n_constant: int             # valid voxels with a NaN output (r_cv, best_alpha, ...)
    n_train: int
    n_test: int
    dropped: list[int]
    blocks_written: int
    blocks_skipped: int
    statistics: list[str] = dataclasses.field(default_factory=list)  # summary lines
    warnings: list[str] = dataclasses.field(default_factory=list)    # one line each

    def table(self) -> str:
        """Plain-text table: mean r per alpha, then at CV-selected alphas."""
        lines = [f"/{self.group}: {self.n_train} train + {self.n_test} test samples "
                 f"(dropped per run without full history: {self.dropped}); "
                 f"{self.n_valid} of {self.n_voxels} voxels scored "
                 f"({self.n_voxels - self.n_valid - self.n_constant} invalid, "
                 f"{self.n_constant} with NaN r_cv/best_alpha/r_test_cv; both excluded)",
                 f"{'alpha':>12}  mean r"]
        best = int(np.nanargmax(self.mean_r)) if np.isfinite(self.mean_r).any() else -1
        for i, (a, r) in enumerate(zip(self.alphas, self.mean_r)):
            mark = "  <- best" if i == best else ""
            lines.append(f"{a:>12g}  {r:.4f}{mark}")
        lines.append(f"{'CV-selected':>12}  {self.mean_r_cv_selected:.4f}  "
                     f"(per-voxel alpha chosen on training folds)")
        return "\n".join(lines + self.statistics)


def parse_alphas(text: str) -> list[float]:
    """``"0.5,1,1e3"`` -> floats; every alpha must be > 0."""
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise InputError(f"--alphas must be comma-separated numbers (got {text!r})") from None
    bad = [a for a in alphas if not np.isfinite(a) or a <= 0]
    if not alphas or bad:
        raise InputError(f"--alphas must all be > 0 (got {bad or text!r})")
    return alphas


def make_folds(cv: int | str, train_runs: np.ndarray) -> list[np.ndarray]:
    """Held-out index arrays: ``cv`` contiguous blocks, or ``"runs"`` (one per run)."""
    if cv == "runs":
        if np.unique(train_runs).size < 2:
            raise InputError("--cv runs needs at least two training runs; use --cv K")
        return run_folds(train_runs)
    k = int(cv)
    if k < 2 or k > train_runs.size:
        raise InputError(f"--cv must be between 2 and {train_runs.size} folds (got {cv})")
    return contiguous_folds(train_runs.size, k)


def _fit_template(alphas: np.ndarray, bold_node: xr.Dataset, n_voxels: int, block: int,
                  weights_axes: tuple[np.ndarray, np.ndarray] | None, n_test: int,
                  predictions: bool, stats: TestStatistics, repeats: bool) -> RunTemplate:
    """Template of a fit group: per-voxel outputs chunked in voxel blocks of ``block``;
    ``weights_axes`` = ``(lags, feature names)`` when weights are stored (the
    statistics variables: :func:`_fit_stats.statistics_template`)."""
    coords: dict = {"alpha": ("alpha", alphas)}
    for name in ("i", "j", "k", "valid"):
        if name in bold_node.coords:
            coords[name] = ("voxel", np.asarray(bold_node[name].values))
    block = min(block, max(n_voxels, 1))
    na = alphas.size
    data = {
        "r_test": (("alpha", "voxel"),
                   da.empty((na, n_voxels), dtype=np.float32, chunks=(na, block))),
        "r_cv": (("alpha", "voxel"),
                 da.empty((na, n_voxels), dtype=np.float32, chunks=(na, block))),
        "best_alpha": (("voxel",), da.empty(n_voxels, dtype=np.float32, chunks=block)),
        "r_test_cv": (("voxel",), da.empty(n_voxels, dtype=np.float32, chunks=block)),
    }
    encoding = {"r_test": {"chunks": (na, block)}, "r_cv": {"chunks": (na, block)},
                "best_alpha": {"chunks": (block,)}, "r_test_cv": {"chunks": (block,)}}
    if weights_axes is not None:
        lags, names = weights_axes
        shape = (len(lags), len(names), n_voxels)
        data["weights"] = (("lag", "feature", "voxel"),
                           da.empty(shape, dtype=np.float32, chunks=shape[:2] + (block,)))
        encoding["weights"] = {"chunks": shape[:2] + (block,)}
        coords["lag"] = ("lag", np.asarray(lags, np.float64), {"units": "s"})
        coords["feature"] = ("feature", np.asarray([str(n) for n in names], dtype=object))
        encoding["feature"] = {"chunks": (max(len(names), 1),)}
    if predictions:
        data["predictions"] = (("test_sample", "voxel"),
                               da.empty((n_test, n_voxels), dtype=np.float32,
                                        chunks=(n_test, block)))
        encoding["predictions"] = {"chunks": (n_test, block)}
    n_blocks = -(-n_voxels // block) if n_voxels else 1
    extra, extra_encoding, extra_coords = _fit_stats.statistics_template(
        stats, na, n_voxels, block, n_blocks, repeats)
    data.update(extra)
    encoding.update(extra_encoding)
    coords.update(extra_coords)
    ds = xr.Dataset(data, coords=coords)
    _fit_stats.label_variables(ds)
    for name in ("r_test", "r_cv", "r_test_cv", "weights", "predictions"):
        if name in ds:
            ds[name].attrs["units"] = "1" if name.startswith("r_") else "BOLD units"
    ds["alpha"].attrs["long_name"] = "ridge regularisation strength"
    ds["r_test"].attrs["long_name"] = "test-set Pearson r per alpha"
    ds["r_cv"].attrs["long_name"] = "mean held-out Pearson r over CV folds of the training data"
    ds["best_alpha"].attrs.update(long_name="alpha selected per voxel by CV on training data",
                                  units="same as alpha")
    ds["r_test_cv"].attrs["long_name"] = "test-set Pearson r at the CV-selected alpha"
    return RunTemplate(ds, encoding, block_dim="voxel", block_size=block)


def _as_input_error(exc: ValueError, what: str) -> InputError:
    return InputError(f"{what}: {exc}")


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
        for node, keep in zip(self.nodes, self.keep):
            ds = xr.open_zarr(self.store, group=node, consolidated=False, zarr_format=3,
                              chunks=None, decode_timedelta=False)
            column = np.asarray(ds[self.var].isel(voxel=voxels).values, dtype=np.float32)
            parts.append(column[keep])
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


def run_fit_stage(workspace: Workspace, features: str, bold: str, lags: Sequence[float],
                  alphas: Sequence[float], *, test_samples: int | None = None,
                  test_runs: Sequence[int] | None = None,
                  test_repeats: Sequence[Sequence[int]] | None = None, cv: int | str = 5,
                  aggregate: str = "last", device: str = "cpu", name: str | None = None,
                  save_weights: bool = False, save_predictions: bool = False,
                  statistics: StatisticsOptions | None = None,
                  voxel_block: int = VOXEL_BLOCK, overwrite: bool = False,
                  progress: bool = True) -> FitSummary:
    """Fit ridge for every alpha onto every voxel of ``/bold/<bold>`` from
    ``/features/<features>`` at ``lags`` (s); write ``/fits/<name>/lags-...``.

    The test set is the last ``test_samples``, whole ``test_runs``, or the first run
    of each group of ``test_repeats`` (runs showing the same clip, whose mean BOLD is
    the measured test data); ``statistics`` says which test-set statistics to add.
    """
    alphas_arr = _check_fit_options(alphas, device, voxel_block)
    stats_options = (statistics or StatisticsOptions()).checked()
    if not lags or not all(np.isfinite(l) and l >= 0 for l in lags):
        raise InputError(f"--lags must be seconds >= 0 (got {list(lags)})")
    fgroup = f"features/{check_name(features, '--features')}"
    bgroup = f"bold/{check_name(bold, '--bold')}"
    group = fit_group(check_name(name or f"{features}__{bold}", "--name", nested=True), lags)
    workspace.require_complete(fgroup, f"voxelflow features --frames ... --name {features}")
    battrs = workspace.require_complete(bgroup, f"voxelflow bold RUN.nii.gz ... --subject {bold}")
    tr = float(battrs.get("tr") or battrs.get("voxelflow", {}).get("params", {}).get("tr"))
    design = build_design(workspace.open_runs(fgroup), workspace.open_runs(bgroup), list(lags),
                          tr, aggregate=aggregate, features_name=features, bold_name=bold)
    train, test, groups = _fit_stats.split_samples(design, test_samples, test_runs,
                                                     test_repeats)
    folds = make_folds(cv, design.run[train])
    bold_node = workspace.open_run(bgroup, 0)
    n_voxels = int(design.Y.shape[1])
    valid = (np.asarray(bold_node["valid"].values, bool) if "valid" in bold_node.coords
             else np.ones(n_voxels, bool))
    if not valid.any():
        raise InputError(f"{workspace.path}: /{bgroup} has no usable voxel (all {n_voxels:,} "
                         f"are constant or non-finite); re-ingest the BOLD runs")
    _check_request(workspace, group, design, test.size, alphas_arr.size, len(folds),
                   voxel_block, save_weights, save_predictions)
    plan = TestStatistics.plan(stats_options, test.size)
    params = {
        "stage": "fit", "features": fgroup, "bold": bgroup, "lags": [float(l) for l in lags],
        "alphas": alphas_arr.tolist(), "test_samples": test_samples,
        "test_runs": list(test_runs) if test_runs else None, "test_repeats": groups,
        "cv": cv, "aggregate": aggregate, "statistics": stats_options.as_params(),
        "weights": bool(save_weights), "predictions": bool(save_predictions),
        "features_params": workspace.params(fgroup), "bold_params": workspace.params(bgroup),
        "voxel_block": int(voxel_block),
    }
    if save_weights:  # (lag, feature, voxel) since weights carry names
        params["weights_layout"] = "lag,feature,voxel"
    names = (design.feature_names if design.feature_names is not None
             else feature_labels((design.n_features,)))
    template = _fit_template(alphas_arr, bold_node, n_voxels, voxel_block,
                             (list(lags), names) if save_weights else None, test.size,
                             save_predictions, plan, repeats=groups is not None)
    writer = workspace.start_stage(
        group, params, [template], overwrite=overwrite, per_run=False,
        group_attrs={"bold_group": bgroup, "features_group": fgroup,
                     "lags": [float(l) for l in lags], "n_train": int(train.size),
                     "n_test": int(test.size), "dropped_per_run": design.dropped,
                     "tr": tr, "cv": str(cv), "aggregate": aggregate, "device": device,
                     "min_train_per_fold": int(min(train.size - f.size for f in folds)),
                     "test_repeats": groups, "statistics": stats_options.as_params(),
                     "test_key": _fit_stats.test_key(bgroup, design, test, groups)},
    )
    pending = writer.pending_blocks(0)
    skipped = template.n_blocks - len(pending)
    if pending:
        client = active_client()
        require_shared_path(client, workspace.path)  # before the costly decomposition
        factors = _factorize_design(design, train, test, alphas_arr, folds, device,
                                    save_weights, f"/{fgroup}", f"/{bgroup}")
        repeats = (BoldBlockReader.for_repeats(workspace, bgroup, design, groups)
                   if groups else ())
        work = FitWork(factors, BoldBlockReader.from_design(workspace, bgroup, design),
                       writer, train, test, valid, save_weights, save_predictions,
                       stats=plan, repeats=repeats)
        bar = tqdm(total=n_voxels, unit="voxel", desc=f"fit {lag_set_label(lags)}",
                   disable=not progress, dynamic_ncols=True,
                   initial=n_voxels - sum(_slice_len(writer.block_slice(0, b))
                                          for b in pending))
        run_blocks(work if client is None else work.for_workers(), pending, client=client,
                   mark_done=lambda b: writer.mark_done(0, b),
                   on_block=lambda b, n: bar.update(n))
        bar.close()
    if workspace.state(group) != "complete":  # statistics over all voxel blocks
        _fit_stats.finalize(workspace.open_node(group), writer)
    writer.finish()
    return summarize_fit(workspace, group, n_blocks_written=len(pending), n_skipped=skipped)


def _check_fit_options(alphas: Sequence[float], device: str, voxel_block: int) -> np.ndarray:
    """float64 (n_alphas,) alphas; one-line errors for bad alphas, a bad
    ``voxel_block`` or a missing GPU."""
    if int(voxel_block) < 1:
        raise InputError(f"--voxel-block must be >= 1 (got {voxel_block})")
    try:
        alphas_arr = ridge.check_alphas(list(alphas))
    except ValueError:
        raise InputError(f"--alphas must all be > 0 (got {list(alphas)})") from None
    if device == "cuda":
        try:
            ridge.get_array_module("cuda")
        except Exception as exc:  # noqa: BLE001 - any failure to get CuPy/CUDA
            raise InputError(f"--device cuda: {exc}; install the gpu extra "
                             f"(pip install 'voxelflow[gpu]') or use --device cpu") from None
    return alphas_arr


def fit_memory(n_samples: int, n_test: int, n_lag_features: int, n_alphas: int,
               n_folds: int, voxel_block: int, save_weights: bool, save_predictions: bool
               ) -> tuple[int, int]:
    """``(design bytes, block bytes)``: an estimate of the fit's working set.

    The design: ``X`` (sample, lag_feature) float32 and a float64 copy, plus one
    factorisation per fold and the full fit (``q x q`` float64, ``q = min(lag_features,
    samples)``).  A voxel block (``FIT_BLOCKS_IN_MEMORY`` of them): its BOLD (sample,
    voxel) float32 read and centred (3 copies), the projections (2 ``q`` float64 per
    voxel), the scores (4 per alpha) and the optional weights and predictions.
    """
    q = min(n_lag_features, n_samples)
    design = n_samples * n_lag_features * 12 + (n_folds + 1) * q * q * 8
    per_voxel = (12 * n_samples + 16 * q + 32 * n_alphas
                 + (4 * n_lag_features if save_weights else 0)
                 + (8 * n_test if save_predictions else 0))
    return design, FIT_BLOCKS_IN_MEMORY * voxel_block * per_voxel


def _check_request(workspace: Workspace, group: str, design: LaggedDesign, n_test: int,
                   n_alphas: int, n_folds: int, voxel_block: int, save_weights: bool,
                   save_predictions: bool) -> None:
    """Refuse a fit whose design and voxel block cannot fit in memory, or whose
    outputs (float32 per voxel, uncompressed) cannot fit on disk."""
    n_voxels, p = int(design.Y.shape[1]), int(design.X.shape[1])
    block = min(int(voxel_block), max(n_voxels, 1))
    design_bytes, block_bytes = fit_memory(design.n_samples, n_test, p, n_alphas, n_folds,
                                           block, save_weights, save_predictions)
    option = (f"lower --voxel-block (default {VOXEL_BLOCK})" if block_bytes >= design_bytes
              else "use fewer lags or a smaller feature layer (--pool avg)")
    per_voxel = 2 * n_alphas + 2 + (p if save_weights else 0) + (
        n_test if save_predictions else 0)
    check_request(
        f"fit of {design.n_samples:,} samples x {p:,} lagged features, --voxel-block {block}",
        block_bytes=design_bytes + block_bytes, block_option=option,
        output_bytes=4 * n_voxels * per_voxel, store=workspace.path,
        disk_option="leave out --save-weights / --save-predictions",
        already_written=stored_bytes(workspace, group))


def _factorize_design(design: LaggedDesign, train: np.ndarray, test: np.ndarray,
                      alphas: np.ndarray, folds: list[np.ndarray], device: str,
                      save_weights: bool, features: str, bold: str) -> ridge.RidgeFactors:
    """Compute the design (sample, lag_feature) and decompose it once for every fold
    and the full training fit (on ``device``); input errors as one line."""
    X = design.X.compute()
    if not np.isfinite(X).all():
        raise InputError(f"{features}: features contain NaN or infinite values; "
                         f"re-extract them (voxelflow features ... --overwrite)")
    try:
        return ridge.factorize_ridge(X[train], X[test], alphas, folds, device=device,
                                     keep_weight_factors=save_weights)
    except ValueError as exc:
        raise _as_input_error(exc, f"{features} x {bold}") from None


def fit_weights(fit: xr.Dataset, attrs: dict | None = None) -> xr.DataArray:
    """A fit's ``weights`` as ``(lag, feature, voxel)`` with ``lag`` (s) and ``feature``
    coordinates, whatever the layout it was stored in.

    Groups written before weights carried names hold ``weights (lag_feature, voxel)``
    (lag-major); they are reshaped with the group's ``lags`` attr (``attrs``, default
    ``fit.attrs``) and get ``feature = 0 .. n - 1``.
    """
    if "weights" not in fit:
        raise InputError("this fit has no weights; rerun voxelflow fit with --save-weights")
    weights = fit["weights"]
    if "lag_feature" not in weights.dims:
        return weights
    lags = list((attrs if attrs is not None else fit.attrs).get("lags", []))
    n = int(weights.sizes["lag_feature"])
    if not lags or n % len(lags):
        raise InputError(f"weights (lag_feature={n}) cannot be split into the fit's lags "
                         f"{lags}; the group's 'lags' attr is missing or wrong")
    n_features = n // len(lags)
    shaped = weights.data.reshape(len(lags), n_features, weights.sizes["voxel"])
    coords = {name: c for name, c in weights.coords.items() if c.dims == ("voxel",)}
    return xr.DataArray(shaped, dims=("lag", "feature", "voxel"), name="weights",
                        coords={**coords, "lag": np.asarray(lags, np.float64),
                                "feature": np.arange(n_features)}, attrs=weights.attrs)


def summarize_fit(workspace: Workspace, group: str, n_blocks_written: int = 0,
                  n_skipped: int = 0) -> FitSummary:
    """Read a fit group back and compute the printed summary (mean r over scored voxels:
    valid, with finite r_test, r_cv, best_alpha and r_test_cv), its statistics lines
    and its warnings."""
    ds = workspace.open_node(group)
    r_test = ds["r_test"].values
    scored = scored_in(ds)
    n_nan, _ = nan_voxel_count(ds)
    attrs = workspace.attrs(group)
    mean_r = (r_test[:, scored].mean(axis=1, dtype=np.float64) if scored.any()
              else np.full(r_test.shape[0], np.nan))
    r_cv_selected = ds["r_test_cv"].values[scored]
    return FitSummary(
        group=group, alphas=ds["alpha"].values, mean_r=mean_r,
        mean_r_cv_selected=float(r_cv_selected.mean(dtype=np.float64)) if scored.any() else np.nan,
        n_voxels=int(r_test.shape[1]), n_valid=int(scored.sum()), n_constant=n_nan,
        n_train=int(attrs.get("n_train", 0)), n_test=int(attrs.get("n_test", 0)),
        dropped=list(attrs.get("dropped_per_run", [])), blocks_written=n_blocks_written,
        blocks_skipped=n_skipped, statistics=_fit_stats.summary_lines(ds, attrs, scored),
        warnings=_fit_stats.fit_warnings(ds, attrs),
    )
