"""Ridge regression onto every voxel, for many alphas at once.

Pure computation, no file I/O. The objective, for each voxel ``v`` and each
alpha, is scikit-learn's::

    minimise ||y_v - X w_v||^2 + alpha ||w_v||^2

with ``X`` and ``y_v`` centred on the training samples (the intercept is the
training mean). Everything that depends only on the design ``X`` is computed
once (:func:`factorize_ridge`) and broadcast; each voxel chunk then costs a
few matrix products for *all* alphas together (:func:`ridge_chunk`). Voxels
are independent, so chunking over voxels is exact (up to BLAS rounding), and
:func:`ridge_over_voxels` maps the chunk function over a Dask array of BOLD
chunked along voxels.

Two regimes, picked from the shape of the training design ``(n, p)``:

``primal`` (``p <= n``)
    the float64 Gram matrix ``X^T X`` (``p x p``); each fold's is the total
    minus the held-out block's, centred via sums. The fold cross-products
    ``X^T Y`` are likewise the total minus the held-out block's, so ``X^T Y``
    costs one pass over the data in total.
``dual`` (``p > n``)
    the float64 kernel ``X X^T`` (``n_train x n_train``), built over feature
    blocks (a Dask design is streamed, never held whole); each fold's is a
    re-centred sub-block.

Per fold, held-out predictions for alpha ``a`` are ``(A * d_a) @ B`` with
``(s, V)`` the eigendecomposition of the fold's Gram/kernel, ``A = X_heldout
V``, ``B = V^T (X^T y)_fold`` and ``d_a = 1 / (s + a)``. By default the small
operators ``(A * d_a) V^T = X_heldout (G + a)^-1`` are precomputed ("dense"
form, within a memory budget), so every alpha is part of one stacked GEMM on
the fold's right-hand side; on CPU they are built with one float64 Cholesky
per alpha, which for a dozen alphas is twice as fast as eigh (whose
tridiagonal reduction is memory-bound) and gives the same operators. Folds
beyond the budget keep the eigh factors ("factored" form). Big products run
in the compute dtype (float32 for float32 data), decompositions and sums in
float64. Held-out predictions are centred on the held-out block (r is
unchanged) so float32 sums stay accurate.

For recordings too long for one time block, :func:`ridge_over_voxels`
accumulates ``X^T X`` and ``X^T Y`` over time chunks instead
(:func:`accumulate_design_statistics`, :func:`target_statistics`,
:func:`ridge_chunk_from_statistics`); the results equal the direct path.

Arrays are ``(sample, feature)`` for designs and ``(sample, voxel)`` for
BOLD. ``device="cuda"`` runs the same code with CuPy (imported lazily).

Where the code lives (private modules, by concern):

* ``_backend``: NumPy/CuPy by device, host copies (:func:`to_numpy`), compute dtype;
* ``_checks``: validation of alphas, designs and BOLD blocks, "auto" choices;
* ``_operators``: eigh/Cholesky of a Gram or kernel, :class:`PredictionOperator`;
* ``_factorize``: :class:`RidgeFactors` per fold and full fit, primal and dual;
* ``_select``: held-out scores, mean over folds, :func:`select_best_alpha`;
* ``_solve``: one voxel chunk (:func:`ridge_chunk`);
* ``_eager``: in-memory convenience (:func:`ridge_cv_scores`, :func:`fit_ridge`);
* ``_streamed``: time-chunked statistics (long recordings);
* ``_over_voxels``: the Dask graph (:func:`ridge_over_voxels`);
* ``_banded``: several feature spaces, one penalty per space
  (:func:`banded_ridge`, :func:`simplex_weightings`, :func:`split_r2`);
* ``_banded_eigen``: its dual-regime eigen path (one eigendecomposition per
  fold and weighting for every alpha; :func:`banded_factor_bytes`);
* ``_flops``: flop counts for benchmarks (:func:`ridge_flops`);
* :mod:`voxelflow.pipeline.ridge.scoring` (public): Pearson r and CV folds.
"""

from ._backend import get_array_module, to_numpy
from ._banded import (DEFAULT_CONCENTRATION, BandedFactors, banded_chunk,
                      SpilledFactors,
                      banded_factors, banded_ridge, check_weightings, simplex_weightings, space_slices, split_r2)
from ._banded_eigen import banded_factor_bytes
from ._checks import CHOLESKY_MAX_ALPHAS, check_alphas
from ._eager import fit_ridge, ridge_cv_scores
from ._factorize import (DEFAULT_MAX_DENSE_BYTES, FitShape, FoldFactors, RidgeFactors,
                         factorize_ridge)
from ._flops import ridge_flops
from ._operators import PredictionOperator, eigh_psd
from ._over_voxels import ridge_over_voxels
from ._select import TIE_BREAK_SLOPE, select_best_alpha
from ._solve import DEFAULT_BLOCK_VOXELS, count_constant_voxels, ridge_chunk
from ._streamed import (DesignStatistics, StreamedFactors, StreamedFold,
                        accumulate_design_statistics, factorize_from_statistics,
                        ridge_chunk_from_statistics, target_statistics)

__all__ = [
    "get_array_module",
    "to_numpy",
    "check_alphas",
    "eigh_psd",
    "PredictionOperator",
    "FitShape",
    "FoldFactors",
    "RidgeFactors",
    "factorize_ridge",
    "ridge_chunk",
    "select_best_alpha",
    "ridge_cv_scores",
    "fit_ridge",
    "ridge_over_voxels",
    "DesignStatistics",
    "StreamedFold",
    "StreamedFactors",
    "accumulate_design_statistics",
    "factorize_from_statistics",
    "target_statistics",
    "ridge_chunk_from_statistics",
    "count_constant_voxels",
    "ridge_flops",
    "DEFAULT_MAX_DENSE_BYTES",
    "DEFAULT_BLOCK_VOXELS",
    "CHOLESKY_MAX_ALPHAS",
    "TIE_BREAK_SLOPE",
    "banded_ridge",
    "banded_factors",
    "banded_chunk",
    "banded_factor_bytes",
    "SpilledFactors",
    "BandedFactors",
    "simplex_weightings",
    "check_weightings",
    "space_slices",
    "split_r2",
    "DEFAULT_CONCENTRATION",
]
