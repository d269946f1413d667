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

One voxel block is one :class:`~voxelflow.pipeline.stages._fit_work.FitWork` step (read the block's BOLD from the workspace
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
from typing import Any, Sequence

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
from voxelflow.pipeline.stages._fit_work import BoldBlockReader, FitWork, _slice_len
from voxelflow.pipeline.stats.diagnostics import nan_voxel_count, scored_in
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
    return RunTemplate(ds, encoding, block_dim="voxel", block_size=block,
                       final=tuple(n for n in _fit_stats.FINAL_VARIABLES if n in ds))


def _as_input_error(exc: ValueError, what: str) -> InputError:
    return InputError(f"{what}: {exc}")


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
    bgroup, tr = open_bold(workspace, bold)
    fgroup, design = open_design(workspace, features, bgroup, lags, tr, aggregate)
    group = fit_group(check_name(name or f"{features}__{bold}", "--name", nested=True), lags)
    train, test, groups = _fit_stats.split_samples(design, test_samples, test_runs,
                                                     test_repeats)
    folds = make_folds(cv, design.run[train])
    n_voxels = int(design.Y.shape[1])
    bold_node, valid = bold_validity(workspace, bgroup, n_voxels)
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
        run_fit_blocks(work, writer, pending, client, n_voxels, lags, progress)
    return finish_fit(workspace, group, writer, len(pending), skipped)


def open_bold(workspace: Workspace, bold: str) -> tuple[str, float]:
    """``("bold/<bold>", TR in s)`` of a complete BOLD group (one-line errors)."""
    bgroup = f"bold/{check_name(bold, '--bold')}"
    battrs = workspace.require_complete(bgroup, f"voxelflow bold RUN.nii.gz ... --subject {bold}")
    return bgroup, float(battrs.get("tr") or battrs.get("voxelflow", {}).get("params", {})
                         .get("tr"))


def open_design(workspace: Workspace, features: str, bgroup: str, lags: Sequence[float],
                tr: float, aggregate: str) -> tuple[str, LaggedDesign]:
    """``("features/<features>", lagged design)`` of a complete features group."""
    fgroup = f"features/{check_name(features, '--features')}"
    workspace.require_complete(fgroup, f"voxelflow features --frames ... --name {features}")
    return fgroup, build_design(workspace.open_runs(fgroup), workspace.open_runs(bgroup),
                                list(lags), tr, aggregate=aggregate, features_name=features,
                                bold_name=bgroup.split("/", 1)[1])


def bold_validity(workspace: Workspace, bgroup: str, n_voxels: int
                  ) -> tuple[xr.Dataset, np.ndarray]:
    """The BOLD group's first run node and its (voxel,) bool ``valid`` flags;
    refuses a group without a usable voxel."""
    bold_node = workspace.open_run(bgroup, 0)
    valid = (np.asarray(bold_node["valid"].values, bool) if "valid" in bold_node.coords
             else np.ones(n_voxels, bool))
    if not valid.any():
        raise InputError(f"{workspace.path}: /{bgroup} has no usable voxel (all {n_voxels:,} "
                         f"are constant or non-finite); re-ingest the BOLD runs")
    return bold_node, valid


def run_fit_blocks(work: "FitWork", writer: StageWriter, pending: list[int], client: Any,
                   n_voxels: int, lags: Sequence[float], progress: bool) -> None:
    """Compute and write the pending voxel blocks (here or on the cluster)."""
    bar = tqdm(total=n_voxels, unit="voxel", desc=f"fit {lag_set_label(lags)}",
               disable=not progress, dynamic_ncols=True,
               initial=n_voxels - sum(_slice_len(writer.block_slice(0, b)) for b in pending))
    run_blocks(work if client is None else work.for_workers(), pending, client=client,
               mark_done=lambda b: writer.mark_done(0, b), on_block=lambda b, n: bar.update(n))
    bar.close()


def finish_fit(workspace: Workspace, group: str, writer: StageWriter, written: int,
               skipped: int) -> FitSummary:
    """Statistics over all voxel blocks, the group marked complete, its summary."""
    if workspace.state(group) != "complete":
        _fit_stats.finalize(workspace.open_node(group), writer)
    writer.finish()
    return summarize_fit(workspace, group, n_blocks_written=written, n_skipped=skipped)


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
        raise InputError(f"{features}: features contain NaN or infinite values; check "
                         f"the stored chunks with: voxelflow verify {features.strip('/')}; "
                         f"if they are intact the network produced these values: extract "
                         f"again with other settings (--precision fp32, --weights) and "
                         f"--overwrite")
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
