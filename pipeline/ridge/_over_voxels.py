"""Dask: ridge over every voxel of BOLD chunked along voxels, one task per voxel
chunk with the factors broadcast once (or, for time-chunked BOLD, statistics
accumulated over time chunks first)."""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._backend import _compute_dtype, to_numpy
from ._checks import _resolve_regime
from ._factorize import DEFAULT_MAX_DENSE_BYTES, RidgeFactors, factorize_ridge
from ._solve import DEFAULT_BLOCK_VOXELS, ridge_chunk
from ._streamed import (StreamedFactors, accumulate_design_statistics,
                        factorize_from_statistics, ridge_chunk_from_statistics,
                        target_statistics)


def _output_layout(factors: RidgeFactors, has_test: bool, weights: bool,
                   predictions: bool) -> dict[str, slice]:
    """Rows of the packed per-chunk result array, by output name."""
    n_alphas = factors.n_alphas
    sizes = [("r_cv", n_alphas), ("best_alpha_index", 1), ("constant_voxel", 1),
             ("intercept", 1)]
    if has_test:
        sizes += [("r_test", n_alphas), ("r_test_cv", 1), ("r2_test", n_alphas),
                  ("r2_test_cv", 1)]
    if predictions:
        sizes.append(("predictions", factors.n_test))
    if weights:
        sizes.append(("weights", factors.n_features))
    layout, start = {}, 0
    for name, size in sizes:
        layout[name] = slice(start, start + size)
        start += size
    return layout


def _pack(result: dict[str, Any], layout: dict[str, slice], dtype: np.dtype
          ) -> np.ndarray:
    """Stack a chunk's outputs into one host array (rows, voxel_chunk)."""
    n_voxels = int(result["best_alpha_index"].shape[0])
    rows = max(part.stop for part in layout.values())
    packed = np.empty((rows, n_voxels), dtype=dtype)
    for name, rows_of in layout.items():
        packed[rows_of] = to_numpy(result[name]).reshape(-1, n_voxels)
    return packed


def _packed_chunk(Y_train_block: Any, Y_test_block: Any = None, *,
                  factors: RidgeFactors, layout: dict[str, slice],
                  out_dtype: np.dtype, weights: bool, predictions: bool,
                  block_voxels: int = DEFAULT_BLOCK_VOXELS) -> np.ndarray:
    """blockwise kernel of the direct path: one voxel chunk -> packed rows."""
    result = ridge_chunk(factors, Y_train_block, Y_test_block,
                         return_weights=weights, return_predictions=predictions,
                         block_voxels=block_voxels)
    return _pack(result, layout, out_dtype)


def _packed_chunk_from_statistics(statistics_block: Any, y_test_block: Any = None,
                                  *, factors: StreamedFactors,
                                  layout: dict[str, slice], out_dtype: np.dtype,
                                  weights: bool, predictions: bool) -> np.ndarray:
    """blockwise kernel of the time-chunked path."""
    result = ridge_chunk_from_statistics(
        factors, statistics_block, y_test_block,
        return_weights=weights, return_predictions=predictions)
    return _pack(result, layout, out_dtype)


def _broadcast(factors: Any) -> Any:
    """Wrap factors as one Dask task that every chunk task depends on."""
    import dask  # noqa: PLC0415

    return dask.delayed(factors, name=f"ridge-factors-{uuid.uuid4().hex}",
                        traverse=False)


def ridge_over_voxels(X_train: Any, Y_train: Any, X_test: Any | None,
                      Y_test: Any | None, alphas: Any, folds: Sequence[Any], *,
                      device: str = "cpu", dtype: Any = None,
                      solver: str = "auto", return_weights: bool = False,
                      return_predictions: bool = False,
                      operator_form: str = "auto",
                      max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
                      decomposition: str = "auto",
                      block_voxels: int = DEFAULT_BLOCK_VOXELS,
                      voxel: Any = None, factors: Any = None) -> Any:
    """Lazy ridge over every voxel of Dask BOLD chunked along voxels.

    Factors are computed here, once (they depend on X only), and broadcast
    as one Dask task; each voxel chunk is one task (``map_blocks``), so
    memory holds O(features^2 + features x voxel_chunk), never all of Y.
    If ``Y_train`` has several chunks along time, ``X^T X`` and ``X^T Y`` are
    accumulated over time chunks instead (primal regime; same results).

    Parameters
    ----------
    X_train : numpy/cupy (n_train, feature) -- or Dask when time-chunked
    Y_train : dask array (n_train, voxel), chunked along voxels
    X_test : (n_test, feature) or None; Y_test : dask (n_test, voxel) or None
    alphas : (n_alphas,) floats > 0; folds : held-out index arrays
    solver, operator_form, max_dense_bytes, decomposition : see
        :func:`factorize_ridge`
    block_voxels : voxels processed together inside a chunk (memory bound)
    voxel : optional coordinate values for the ``voxel`` dimension
    factors : optional precomputed :class:`RidgeFactors` (direct path)

    Returns
    -------
    xarray.Dataset (lazy) with
        ``r_cv`` (alpha, voxel), ``best_alpha`` (voxel), ``constant_voxel``
        (voxel) bool, ``intercept`` (voxel); with a test set ``r_test``
        (alpha, voxel) and ``r_test_cv`` (voxel); optionally ``weights``
        (feature, voxel) and ``predictions`` (test_sample, voxel).
        Float outputs have the compute dtype. ``attrs`` record alphas,
        regime, folds and dtype.
    """
    Y_train, Y_test = _lazy_targets(X_train, Y_train, X_test, Y_test)
    compute = (np.dtype(dtype) if dtype is not None
               else _compute_dtype(X_train.dtype, Y_train.dtype))
    streamed = len(Y_train.chunks[0]) > 1
    if streamed:
        regime = _resolve_regime(solver, X_train.shape[0], X_train.shape[1])
        if regime == "dual":
            # n < p: one time block of Y is small; no need to accumulate.
            Y_train = Y_train.rechunk({0: -1})
            streamed = False
    if streamed:
        packed, factors = _streamed_packed(
            X_train, Y_train, X_test, Y_test, alphas, folds, device=device,
            dtype=compute, return_weights=return_weights,
            return_predictions=return_predictions)
    else:
        if factors is None:
            factors = factorize_ridge(
                X_train, X_test, alphas, folds, device=device, dtype=compute,
                solver=solver, operator_form=operator_form,
                max_dense_bytes=max_dense_bytes, decomposition=decomposition,
                keep_weight_factors=return_weights)
        packed = _packed_over_chunks(
            _packed_chunk, Y_train, "tv", Y_test, factors, weights=return_weights,
            predictions=return_predictions, name="ridge-chunk",
            block_voxels=block_voxels)
    layout = _output_layout(factors, Y_test is not None, return_weights,
                            return_predictions)
    return _dataset_from_packed(packed, layout, factors, voxel)


def _lazy_targets(X_train: Any, Y_train: Any, X_test: Any | None, Y_test: Any | None
                  ) -> tuple[Any, Any | None]:
    """Check the shapes of :func:`ridge_over_voxels`' inputs; return BOLD as Dask
    arrays, ``Y_test`` (n_test, voxel) rechunked to one time block and
    ``Y_train``'s voxel chunks."""
    import dask.array as da  # noqa: PLC0415

    if (X_test is None) != (Y_test is None):
        raise ValueError("Give both X_test and Y_test, or neither.")
    Y_train = da.asarray(Y_train)
    if Y_train.ndim != 2:
        raise ValueError(f"Y_train must be 2-D (sample, voxel); got {Y_train.shape}.")
    if X_train.shape[0] != Y_train.shape[0]:
        raise ValueError(f"X_train has {X_train.shape[0]} samples, Y_train "
                         f"{Y_train.shape[0]}; they must share the time axis.")
    if Y_test is not None:
        Y_test = da.asarray(Y_test)
        if Y_test.ndim != 2 or Y_test.shape[1] != Y_train.shape[1]:
            raise ValueError(f"Y_test must be (n_test, {Y_train.shape[1]}); got "
                             f"{Y_test.shape}.")
        if X_test.shape[0] != Y_test.shape[0]:
            raise ValueError(f"X_test has {X_test.shape[0]} samples, Y_test "
                             f"{Y_test.shape[0]}.")
        Y_test = Y_test.rechunk({0: -1, 1: Y_train.chunks[1]})
    return Y_train, Y_test


def _packed_over_chunks(kernel: Any, targets: Any, target_index: str,
                        Y_test: Any | None, factors: Any, *, weights: bool,
                        predictions: bool, name: str, **extra: Any) -> Any:
    """One task per voxel chunk: ``kernel(targets_chunk, test_chunk, factors=...)``
    gives the chunk's packed outputs (rows, voxel_chunk); the factors are one
    broadcast task. ``target_index`` names ``targets``' axes for ``blockwise``
    (its last one, ``v``, is the voxel axis)."""
    import dask.array as da  # noqa: PLC0415

    layout = _output_layout(factors, Y_test is not None, weights, predictions)
    rows = max(part.stop for part in layout.values())
    arrays = ([targets, target_index] if Y_test is None
              else [targets, target_index, Y_test, "sv"])
    return da.blockwise(
        kernel, "ov", *arrays, new_axes={"o": rows}, concatenate=True,
        factors=_broadcast(factors), layout=layout, out_dtype=factors.dtype,
        weights=weights, predictions=predictions, **extra,
        dtype=factors.dtype, meta=np.empty((0, 0), dtype=factors.dtype),
        name=f"{name}-{uuid.uuid4().hex}")


def _streamed_packed(X_train, Y_train, X_test, Y_test, alphas, folds, *,
                     device, dtype, return_weights, return_predictions):
    """Dask graph of the time-chunked path: block statistics, summed over
    time blocks, then one finishing task per voxel chunk."""
    import dask.array as da  # noqa: PLC0415

    statistics = accumulate_design_statistics(X_train, folds, device=device)
    if X_test is not None and hasattr(X_test, "dask"):
        X_test = X_test.compute()
    factors = factorize_from_statistics(statistics, X_test, alphas, device=device,
                                        dtype=dtype,
                                        keep_weight_factors=return_weights)
    n_features, n_groups = factors.n_features, statistics.n_groups
    x_design = da.asarray(X_train).rechunk({0: Y_train.chunks[0], 1: -1})
    groups = da.from_array(statistics.group_of_sample, chunks=(Y_train.chunks[0],))
    y_reference = Y_train[0].astype(np.float64)
    x_reference = to_numpy(statistics.x_reference)

    def block_statistics(x_block, y_block, group_block, reference_block):
        stats = target_statistics(x_block, y_block, group_block, n_groups,
                                  x_reference, reference_block, device=device,
                                  dtype=dtype)
        return to_numpy(stats)[None]

    partial = da.blockwise(
        block_statistics, "tgrv", x_design, "tf", Y_train, "tv", groups, "t",
        y_reference, "v", new_axes={"g": n_groups, "r": n_features + 2},
        adjust_chunks={"t": 1}, dtype=np.float64, concatenate=True,
        meta=np.empty((0, 0, 0, 0), dtype=np.float64))
    summed = partial.sum(axis=0)
    reference_row = da.broadcast_to(y_reference[None, None, :],
                                    (n_groups, 1, Y_train.shape[1]),
                                    chunks=(n_groups, 1, Y_train.chunks[1]))
    packed_statistics = da.concatenate([summed, reference_row], axis=1)
    packed_statistics = packed_statistics.rechunk({0: -1, 1: -1})
    packed = _packed_over_chunks(
        _packed_chunk_from_statistics, packed_statistics, "grv", Y_test, factors,
        weights=return_weights, predictions=return_predictions, name="ridge-streamed")
    return packed, factors


def _dataset_from_packed(packed: Any, layout: dict[str, slice],
                         factors: Any, voxel: Any) -> Any:
    """Split the packed Dask array into named, lazily sliced outputs."""
    import xarray as xr  # noqa: PLC0415

    alphas = factors.alphas
    dims = {"r_cv": ("alpha", "voxel"), "r_test": ("alpha", "voxel"),
            "r2_test": ("alpha", "voxel"),
            "weights": ("feature", "voxel"), "predictions": ("test_sample", "voxel")}
    data_vars = {}
    for name, rows in layout.items():
        block = packed[rows]
        if name == "best_alpha_index":
            index = block[0]
            data_vars["best_alpha"] = (("voxel",), index.map_blocks(
                _index_to_alpha, alphas=alphas, dtype=np.float64))
        elif name == "constant_voxel":
            data_vars[name] = (("voxel",), block[0] > 0.5)
        elif name in dims:
            data_vars[name] = (dims[name], block)
        else:
            data_vars[name] = (("voxel",), block[0])
    coords = {"alpha": alphas}
    if voxel is not None:
        coords["voxel"] = voxel
    attrs = {"alphas": [float(a) for a in alphas], "regime": factors.regime,
             "n_folds": len(factors.fold_sizes),
             "fold_sizes": [int(s) for s in factors.fold_sizes],
             "n_train": factors.n_train, "n_features": factors.n_features,
             "compute_dtype": str(np.dtype(factors.dtype)),
             "objective": "||y - Xw||^2 + alpha ||w||^2, X and y centred on train",
             "alpha_selection": "argmax over alphas of mean held-out Pearson r"}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _index_to_alpha(index: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Packed best-alpha index (float) -> alpha value, NaN for -1."""
    position = np.rint(index).astype(np.int64)
    return np.where(position >= 0, alphas[np.maximum(position, 0)], np.nan)
