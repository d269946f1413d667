"""Banded ridge: several feature spaces, one penalty per space, chosen per voxel.

For spaces ``X_1 .. X_m`` (same samples) the objective per voxel ``v`` is::

    minimise ||y_v - sum_i X_i w_i||^2 + sum_i alpha_i ||w_i||^2

with ``X_i`` and ``y_v`` centred on the training samples. The per-space penalties
are searched as in himalaya's random search: a candidate is a *weighting*
``gamma`` (one value >= 0 per space, on the simplex when sampled) and an overall
``alpha`` from the grid, giving ``alpha_i = alpha / gamma_i``. Scaling space ``i``
by ``sqrt(gamma_i)`` turns the candidate into plain ridge with penalty ``alpha``,
so each weighting reuses the whole one-factorisation-per-fold engine
(:func:`~._factorize.factorize_ridge`, :func:`~._solve.ridge_chunk`) for every
alpha at once. Each voxel keeps the (weighting, alpha) with the best mean
held-out Pearson r: alphas tie-broken to the larger one, weightings to the
earlier one (a later one must beat it by more than the dtype's epsilon), as in
himalaya's ``solve_group_ridge_random_search``.

The loop is weighting-outer: one weighting's factors are alive at a time, so
memory is one single-space fit's plus the running per-voxel best. With a single
space and weighting ``[1]`` the scaled design is the design itself and every
output is bit-equal to :func:`~._eager.ridge_cv_scores`. With several spaces in
the dual regime (the study's shape) each weighting's factors come from the
per-space kernels with one eigendecomposition per fold reused for every alpha
(:mod:`~._banded_eigen`); in the primal regime the scaled design goes through
the engine's one-eigh-per-fold path.

Arrays are ``(sample, feature)`` per space and ``(sample, voxel)`` for BOLD.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._backend import _compute_dtype, _is_dask, get_array_module, to_numpy
from ._banded_eigen import (ChunkBest, SpaceTerms, dense_where_it_pays, eigen_factors,
                            scan_weighting, space_terms, split_r2, streamed_eigen_factors)
from ._checks import _resolve_regime, check_alphas
from ._factorize import DEFAULT_MAX_DENSE_BYTES, _centred_kernels, factorize_ridge
from ._solve import ridge_chunk
from .scoring import check_folds

#: :func:`banded_ridge`'s default budget for dense fold operators on the eigen
#: path, per fold: the folds are streamed (one operator alive at a time), and a
#: fold is dense when its operator fits this and serves enough voxels
#: (:func:`~._banded_eigen.streamed_fold_forms`). At the study's shape one dense
#: fold is 148 MiB (12 alphas x 900 held-out x 3,598 samples, float32).
EIGEN_DENSE_BYTES = 256 << 20

#: Dirichlet concentrations cycled through by :func:`simplex_weightings`
#: (himalaya's default): 0.1 favours one dominant space, 1 is uniform.
DEFAULT_CONCENTRATION = (0.1, 1.0)


def simplex_weightings(n_spaces: int, n_candidates: int, seed: int = 0,
                       concentration: Sequence[float] = DEFAULT_CONCENTRATION
                       ) -> np.ndarray:
    """Random weightings on the simplex, himalaya's random search.

    Same draws as ``himalaya.kernel_ridge.generate_dirichlet_samples`` with
    ``random_state=seed`` (NumPy ``RandomState``), alternating between the
    concentrations, with the first row replaced by the uniform weighting.

    Returns
    -------
    float64 (n_candidates, n_spaces), rows summing to 1.
    """
    if n_spaces < 1 or n_candidates < 1:
        raise ValueError(f"need at least one space and one weighting; got "
                         f"{n_spaces} spaces, {n_candidates} weightings.")
    generator = np.random.RandomState(seed)
    levels = np.atleast_1d(np.asarray(concentration, dtype=np.float64))
    per_level = int(np.ceil(n_candidates / float(len(levels))))
    draws = []
    for level in levels:
        if level == np.inf:
            draws.append(np.full((per_level, n_spaces), 1.0 / n_spaces))
        else:
            draws.append(generator.dirichlet([level] * n_spaces, per_level))
    gammas = np.swapaxes(np.stack(draws), 0, 1).reshape(-1, n_spaces)[:n_candidates]
    gammas[0] = 1.0 / n_spaces
    return gammas


def check_weightings(weightings: Any, n_spaces: int) -> np.ndarray:
    """Validate per-space weightings: (n_candidates, n_spaces), finite, >= 0,
    no all-zero row. Returns float64; raises ValueError naming the bad row."""
    values = np.asarray(weightings, dtype=np.float64)
    if values.ndim == 1 and n_spaces == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] != n_spaces:
        raise ValueError(f"weightings must have one value per feature space "
                         f"({n_spaces}) in each of >= 1 rows; got shape "
                         f"{values.shape}.")
    for index, row in enumerate(values):
        if not np.isfinite(row).all() or (row < 0).any() or not (row > 0).any():
            raise ValueError(f"weighting {index} is {row.tolist()}: every value must "
                             "be finite and >= 0, and at least one > 0.")
    return values


def space_slices(widths: Sequence[int]) -> list[slice]:
    """Column range of each space in the joint design."""
    bounds = np.concatenate([[0], np.cumsum(widths)]).astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _scaled_design(designs: Sequence[Any], gamma: np.ndarray, xp: Any) -> Any:
    """``[sqrt(gamma_1) X_1, ..., sqrt(gamma_m) X_m]`` in the designs' dtype;
    one space with weighting 1 is returned as it is (bit-equal single fits)."""
    if len(designs) == 1 and gamma[0] == 1.0:
        return xp.asarray(designs[0])
    parts = [xp.asarray(x) * np.asarray(np.sqrt(g), dtype=x.dtype)
             for x, g in zip(designs, gamma)]
    return xp.concatenate(parts, axis=1)


def _check_spaces(designs: Sequence[Any], name: str) -> list[Any]:
    """Every space 2-D with the same number of samples."""
    designs = [x if hasattr(x, "shape") else np.asarray(x) for x in designs]
    if not designs:
        raise ValueError(f"{name}: give at least one feature space.")
    for index, x in enumerate(designs):
        if len(x.shape) != 2:
            raise ValueError(f"{name}[{index}] must be 2-D (sample, feature); got "
                             f"shape {tuple(x.shape)}.")
        if x.shape[0] != designs[0].shape[0]:
            raise ValueError(f"{name}[{index}] has {x.shape[0]} samples but "
                             f"{name}[0] has {designs[0].shape[0]}; every feature "
                             "space must cover the same samples.")
    return designs


def banded_ridge(Xs_train: Sequence[Any], Y_train: Any, Xs_test: Sequence[Any] | None,
                 Y_test: Any | None, alphas: Any, weightings: Any,
                 folds: Sequence[Any], *, device: str = "cpu", dtype: Any = None,
                 solver: str = "auto", voxel_chunk: int = 4096,
                 return_weights: bool = False, return_split: bool = True,
                 operator_form: str = "auto",
                 max_dense_bytes: int | None = None,
                 decomposition: str = "auto", eigh_dtype: Any = None
                 ) -> dict[str, np.ndarray]:
    """Banded ridge over every voxel of in-memory BOLD, weighting-outer: one
    weighting's factors are alive at a time (memory: one single fit's factors
    plus the running per-voxel best).

    Parameters
    ----------
    Xs_train : per space, (n_train, feature_i); Xs_test : per space
        (n_test, feature_i), or None (then Y_test must be None)
    Y_train : (n_train, voxel); Y_test : (n_test, voxel) or None
    alphas : (n_alphas,) floats > 0, the overall grid
    weightings : (n_candidates, n_spaces) floats >= 0 (see
        :func:`simplex_weightings`); penalty of space i: alpha / weighting_i
    folds : held-out index arrays into the training samples
    voxel_chunk : voxels per chunk (results do not depend on it)
    return_weights : also ``weights`` (feature, voxel), spaces concatenated in
        order, in the units of the unscaled design (scikit-learn's ``coef_``)
    return_split : with a test set, ``r2_split`` (space, voxel)
    solver, operator_form, max_dense_bytes : see
        :func:`~._factorize.factorize_ridge`; ``max_dense_bytes`` None: the
        eigen path streams its folds and makes a fold dense where one fold's
        operator fits :data:`EIGEN_DENSE_BYTES` and serves enough voxels
        (:func:`~._banded_eigen.streamed_fold_forms`; factored otherwise: ``q^2``
        more flops per voxel and fold, far less memory), the other paths keep
        dense operators within ``DEFAULT_MAX_DENSE_BYTES``
    decomposition : one space with weighting 1 (today's single fit, bit-equal):
        as :func:`~._factorize.factorize_ridge`; several spaces: one
        eigendecomposition per (fold, weighting) reused for every alpha
        (:mod:`~._banded_eigen`; the primal regime via the engine's "eigh")
    eigh_dtype : dual eigen path: dtype of the eigendecompositions (default
        the compute dtype, as himalaya)

    Returns
    -------
    dict of numpy arrays: ``r_cv`` (alpha, voxel) and, with a test set,
    ``r_test``/``r2_test`` (alpha, voxel) at each voxel's chosen weighting;
    ``best_alpha_index``, ``best_alpha``, ``r_test_cv``, ``r2_test_cv``,
    ``constant_voxel``, ``intercept`` (voxel,) as :func:`~._solve.ridge_chunk`;
    ``best_weighting`` (voxel,) int64 (-1 if undefined); ``space_alpha``
    (space, voxel) float64 = alpha / weighting (inf for a zero weighting, NaN
    if undefined); optionally ``weights`` and ``r2_split``.
    """
    Y_train = np.asarray(Y_train) if not hasattr(Y_train, "shape") else Y_train
    setup = _setup(Xs_train, Xs_test, Y_train.dtype, weightings, solver, dtype, device,
                   return_weights or (return_split and Xs_test is not None),
                   keep_designs=return_weights, eigh_dtype=eigh_dtype)  # split: no designs
    if (Xs_test is None) != (Y_test is None):
        raise ValueError("Give both Xs_test and Y_test, or neither.")
    if max_dense_bytes is None:
        max_dense_bytes = (EIGEN_DENSE_BYTES if setup.kernels is not None
                           else DEFAULT_MAX_DENSE_BYTES)
    options = dict(device=device, operator_form=operator_form,
                   max_dense_bytes=max_dense_bytes, decomposition=decomposition,
                   eigh_dtype=eigh_dtype)
    best = ChunkBest(int(Y_train.shape[1]), float(np.finfo(setup.compute).eps))
    flags = dict(voxel_chunk=voxel_chunk, return_weights=return_weights,
                 return_split=return_split, return_predictions=False)
    for number, gamma in enumerate(setup.gammas):
        # weighting-outer: one weighting's factors alive at a time, its folds
        # streamed on the eigen path (one fold operator alive at a time)
        factors, centred_test, fold_stream = _weighting_factors(
            setup, gamma, alphas, folds, options, stream_voxels=int(Y_train.shape[1]))
        _scan(setup.eigen, factors, centred_test, gamma, number, Y_train, Y_test,
              best, setup.slices, flags, setup.xp, folds=fold_stream)
        del factors, centred_test, fold_stream
    return _finish(best, setup.gammas)


@dataclass(frozen=True)
class _Setup:
    """Checked inputs of a banded fit and what every weighting shares."""

    Xs_train: list
    Xs_test: list | None
    gammas: np.ndarray
    compute: np.dtype
    regime: str
    slices: list
    kernels: list | None
    terms: SpaceTerms | None
    keep: bool
    xp: Any

    @property
    def eigen(self) -> SpaceTerms | None:
        """The per-space terms on the eigen path, None on the scaled-design path."""
        return self.terms


def _setup(Xs_train: Sequence[Any], Xs_test: Sequence[Any] | None, y_dtype: Any,
           weightings: Any, solver: str, dtype: Any, device: str, keep: bool,
           keep_designs: bool | None = None, eigh_dtype: Any = None) -> _Setup:
    """Check the spaces and weightings; the regime; in the dual regime with several
    spaces or weightings, each space's centred kernels (once) and shared terms.

    The kernels are accumulated in float64 (:func:`~._factorize._centred_kernels`)
    and kept in the dtype the eigendecompositions use (``eigh_dtype``, default the
    compute dtype): float32 for float32 data, half the memory of float64 and what
    the decompositions read anyway."""
    xp = get_array_module(device)
    Xs_train = _check_spaces(Xs_train, "Xs_train")
    if Xs_test is not None:
        Xs_test = _check_spaces(Xs_test, "Xs_test")
        if len(Xs_test) != len(Xs_train):
            raise ValueError(f"{len(Xs_train)} training spaces but {len(Xs_test)} "
                             "test spaces.")
    gammas = check_weightings(weightings, len(Xs_train))
    compute = (np.dtype(dtype) if dtype is not None
               else _compute_dtype(*(x.dtype for x in Xs_train), y_dtype))
    slices = space_slices([x.shape[1] for x in Xs_train])
    regime = _resolve_regime(solver, int(Xs_train[0].shape[0]), slices[-1].stop)
    kernels = terms = None
    if regime == "dual" and len(slices) > 1:
        # one centred kernel per space, once; a weighting's is their weighted sum
        # (a single space keeps today's engine, bit-equal to a single fit)
        kept = np.promote_types(compute, compute if eigh_dtype is None else eigh_dtype)
        kernels = []
        for x, xt in zip(Xs_train, Xs_test or [None] * len(Xs_train)):
            train, cross, mean = _centred_kernels(  # a Dask design is streamed
                _device_or_dask(x, xp), None if xt is None else _device_or_dask(xt, xp),
                compute, xp)
            kernels.append((train.astype(kept), cross, mean))
            del train  # one float64 kernel alive at a time
        terms = space_terms(kernels, Xs_train, compute,
                            keep if keep_designs is None else keep_designs, xp)
    return _Setup(Xs_train, Xs_test, gammas, compute, regime, slices, kernels, terms,
                  keep, xp)


def _device_or_dask(x: Any, xp: Any) -> Any:
    """``x`` on the device, or left as it is when it is a Dask array (the kernels
    then read it one feature chunk at a time and it is never held whole)."""
    return x if _is_dask(x) else xp.asarray(x)


def _weighting_factors(setup: _Setup, gamma: np.ndarray, alphas: Any,
                       folds: Sequence[Any], options: dict,
                       stream_voxels: int | None = None
                       ) -> tuple[Any, Any | None, Iterator[Any] | None]:
    """One weighting's :class:`RidgeFactors`; on the scaled-design path with kept
    weights and a test set, its centred scaled test design (n_test, feature) for
    the split (else None); and, on the eigen path with ``stream_voxels`` (one pass
    over that many voxels), the folds as a stream
    (:func:`~._banded_eigen.streamed_eigen_factors`; the factors then hold none),
    else None."""
    xp, alpha_grid = setup.xp, np.asarray(alphas, dtype=np.float64)
    options = dict(options)
    eigh_dtype = options.pop("eigh_dtype", None)
    if setup.kernels is not None:
        common = dict(n_features=setup.slices[-1].stop, dtype=setup.compute,
                      device=options["device"], xp=xp, keep_basis=setup.keep,
                      operator_form=options["operator_form"],
                      max_dense_bytes=options["max_dense_bytes"], eigh_dtype=eigh_dtype)
        grid = check_alphas(alpha_grid)
        checked = check_folds(folds, int(setup.Xs_train[0].shape[0]))
        if stream_voxels is None:
            return eigen_factors(setup.kernels, gamma, grid, checked, **common), None, None
        factors, stream = streamed_eigen_factors(setup.kernels, gamma, grid, checked,
                                                 n_voxels=stream_voxels, **common)
        return factors, None, stream
    if len(setup.slices) > 1 and options["decomposition"] == "auto":
        options["decomposition"] = "eigh"  # one eigh per fold for every alpha
    x_train = _scaled_design(setup.Xs_train, gamma, xp)
    x_test = None if setup.Xs_test is None else _scaled_design(setup.Xs_test, gamma, xp)
    factors = factorize_ridge(x_train, x_test, alpha_grid, folds, dtype=setup.compute,
                              solver=setup.regime, keep_weight_factors=setup.keep,
                              **options)
    centred_test = None
    if setup.keep and x_test is not None:
        centred_test = (x_test.astype(xp.float64) - factors.x_mean).astype(factors.dtype)
    return factors, centred_test, None


def _scan(terms: SpaceTerms | None, factors: Any, centred_test: Any | None,
          gamma: np.ndarray, number: int, Y_train: Any, Y_test: Any | None,
          best: ChunkBest, slices: list[slice], flags: dict, xp: Any,
          folds: Iterator[Any] | None = None) -> None:
    """One weighting over every voxel of ``Y_train`` into ``best``: the eigen path
    (:func:`~._banded_eigen.scan_weighting`, its folds streamed when ``folds`` is
    given) or the scaled-design one."""
    if terms is not None:
        scan_weighting(factors, terms, gamma, number, Y_train, Y_test, best, xp=xp,
                       folds=folds, **flags)
        return
    out = _one_weighting(factors, centred_test, Y_train, Y_test, gamma, slices, xp=xp,
                         **flags)
    best.update(number, 0, out, factors.alphas)


def _finish(best: ChunkBest, gammas: np.ndarray) -> dict[str, np.ndarray]:
    """The best weighting's outputs plus ``best_weighting`` and ``space_alpha``."""
    result = best.arrays
    result["best_weighting"] = best.candidate
    undefined = best.candidate < 0
    chosen = gammas[np.maximum(best.candidate, 0)].T  # (space, voxel)
    with np.errstate(divide="ignore"):
        space_alpha = result["best_alpha"][None, :] / chosen
    result["space_alpha"] = np.where(undefined[None, :], np.nan, space_alpha)
    return result


@dataclass(frozen=True)
class SpilledFactors:
    """One weighting's ``(factors, centred_test)`` pickled at ``path`` (a file every
    worker can read), loaded by :func:`banded_chunk` one weighting at a time."""

    path: str
    device: str

    def load(self) -> tuple[Any, Any]:
        with open(self.path, "rb") as handle:
            return pickle.load(handle)


def _spill(pair: tuple[Any, Any], folder: str | Path, number: int) -> SpilledFactors:
    """Write one weighting's factors to ``folder`` (whole file or nothing)."""
    path = Path(folder) / f"weighting-{number:04d}.pkl"
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as handle:
        pickle.dump(pair, handle, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(partial, path)
    return SpilledFactors(str(path), pair[0].device)


@dataclass(frozen=True)
class BandedFactors:
    """Every weighting's factors, kept for many voxel chunks (:func:`banded_chunk`).

    ``factors``/``centred_tests`` one per weighting (the latter (n_test, feature)
    or None); ``gammas`` the weightings as nested tuples (host values whatever the
    device); ``widths`` the spaces' feature counts; ``eps`` the tie margin;
    ``terms`` the eigen path's per-space terms (:class:`~._banded_eigen.
    SpaceTerms`), None on the scaled-design path.
    """

    factors: tuple
    centred_tests: tuple
    gammas: tuple
    widths: tuple
    eps: float
    terms: SpaceTerms | None = None

    @property
    def nbytes(self) -> int:
        """Device bytes held (every weighting's factors and the shared terms)."""
        total = sum(f.nbytes for f in self.factors if not isinstance(f, SpilledFactors))
        total += sum(int(c.nbytes) for c in self.centred_tests if c is not None)
        if self.terms is not None:
            total += sum(int(a.nbytes) for a in (*self.terms.cross, *self.terms.designs))
        return total


def banded_factors(Xs_train: Sequence[Any], Xs_test: Sequence[Any] | None, alphas: Any,
                   weightings: Any, folds: Sequence[Any], *, device: str = "cpu",
                   dtype: Any = np.float32, solver: str = "auto",
                   keep_weight_factors: bool = False, operator_form: str = "auto",
                   max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
                   decomposition: str = "auto", eigh_dtype: Any = None,
                   keep_designs: bool | None = None,
                   spill_folder: str | Path | None = None) -> BandedFactors:
    """Factorise every weighting once for :func:`banded_chunk`; arguments as
    :func:`banded_ridge`, ``keep_weight_factors`` for weights and the split
    (``keep_designs=False``: the split only, the eigen path then holds no design).
    With ``spill_folder`` each weighting's factors are written there as soon as they
    are made (:class:`SpilledFactors`) and only one is in memory at a time, here
    and in :func:`banded_chunk`.
    Memory: on the eigen path each weighting holds its fold operators (dense
    within ``max_dense_bytes`` shared by all weightings, factored beyond), the
    full fit's test operator and eigenbasis; the centred designs once."""
    setup = _setup(Xs_train, Xs_test, dtype, weightings, solver, dtype, device,
                   keep_weight_factors, keep_designs, eigh_dtype=eigh_dtype)
    budget = max_dense_bytes // len(setup.gammas) if setup.kernels is not None \
        else max_dense_bytes
    options = dict(device=device, operator_form=operator_form, max_dense_bytes=budget,
                   decomposition=decomposition, eigh_dtype=eigh_dtype)
    pairs = []
    for number, gamma in enumerate(setup.gammas):
        pair = _weighting_factors(setup, gamma, alphas, folds, options)[:2]
        pairs.append(pair if spill_folder is None else
                     (_spill(pair, spill_folder, number), None))
        del pair
    return BandedFactors(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs),
                         tuple(tuple(float(g) for g in row) for row in setup.gammas),
                         tuple(s.stop - s.start for s in setup.slices),
                         float(np.finfo(setup.compute).eps), setup.terms)


def banded_chunk(banded: BandedFactors, Y_train: Any, Y_test: Any | None, *,
                 voxel_chunk: int = 4096, return_weights: bool = False,
                 return_split: bool = True, return_predictions: bool = False,
                 max_dense_bytes: int = EIGEN_DENSE_BYTES) -> dict[str, np.ndarray]:
    """:func:`banded_ridge`'s outputs for one chunk of voxels (Y_train (n_train,
    voxel), Y_test (n_test, voxel) or None) from :func:`banded_factors`; with
    ``return_predictions`` also ``predictions`` (n_test, voxel) at each voxel's
    chosen weighting and alpha, in BOLD units.

    On the eigen path, a factored fold is expanded to its dense operator for this
    chunk when the chunk has enough voxels for that to pay and one fold's dense
    operator fits ``max_dense_bytes`` (:func:`~._banded_eigen.dense_where_it_pays`:
    at the study's shape, 10,800 voxels or more); the folds are scanned one at a
    time, so one dense operator is alive at a time."""
    xp = get_array_module(banded.factors[0].device)
    gammas = np.asarray(banded.gammas, dtype=np.float64)
    slices = space_slices(banded.widths)
    best = ChunkBest(int(Y_train.shape[1]), banded.eps)
    flags = dict(voxel_chunk=voxel_chunk, return_weights=return_weights,
                 return_split=return_split, return_predictions=return_predictions)
    for number, (factors, centred_test) in enumerate(zip(banded.factors,
                                                         banded.centred_tests)):
        if isinstance(factors, SpilledFactors):
            factors, centred_test = factors.load()  # one weighting in memory
        folds = None if banded.terms is None else dense_where_it_pays(
            factors.folds, int(Y_train.shape[1]), factors.dtype, max_dense_bytes, xp)
        _scan(banded.terms, factors, centred_test, gammas[number], number, Y_train,
              Y_test, best, slices, flags, xp, folds=folds)
    return _finish(best, gammas)


def _one_weighting(factors: Any, centred_test: Any | None, Y_train: Any,
                   Y_test: Any | None, gamma: np.ndarray, slices: list[slice],
                   voxel_chunk: int, return_weights: bool, return_split: bool,
                   return_predictions: bool, xp: Any) -> dict[str, np.ndarray]:
    """Every voxel's outputs for one weighting (host arrays), chunk by chunk.

    Weights come back in unscaled units (``sqrt(gamma_i)`` times the scaled
    design's); the split uses each space's test prediction
    ``(X_test_i - mean) w_i`` at the voxel's best alpha."""
    need_weights = return_weights or (return_split and Y_test is not None)
    scale = np.concatenate([np.full(s.stop - s.start, np.sqrt(g))
                            for s, g in zip(slices, gamma)])
    scale = xp.asarray(scale.astype(factors.dtype))[:, None]
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, Y_train.shape[1], int(voxel_chunk)):
        stop = start + int(voxel_chunk)
        y_test = None if Y_test is None else xp.asarray(Y_test[:, start:stop])
        chunk = ridge_chunk(factors, Y_train[:, start:stop], y_test,
                            return_weights=need_weights,
                            return_predictions=return_predictions and y_test is not None)
        if need_weights:
            scaled_weights = chunk.pop("weights")
            if return_split and y_test is not None:
                predictions = [centred_test[:, s] @ scaled_weights[s] for s in slices]
                chunk["r2_split"] = split_r2(y_test, predictions, xp)
            if return_weights:
                chunk["weights"] = scaled_weights * scale
        for key, value in chunk.items():
            parts.setdefault(key, []).append(to_numpy(value))
    return {key: np.concatenate(values, axis=-1) for key, values in parts.items()}
