"""Input validation of the ridge engine (alphas, designs, BOLD blocks) and the
resolution of its "auto" choices (primal or dual regime, eigh or Cholesky)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ._backend import to_numpy


def check_alphas(alphas: Any) -> np.ndarray:
    """Validate ridge penalties: a non-empty 1-D list of finite values > 0.

    Returns
    -------
    alphas : float64 numpy array (n_alphas,)

    Raises
    ------
    ValueError naming the first bad alpha.
    """
    values = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"alphas must be a non-empty 1-D sequence; got shape {values.shape}.")
    for index, value in enumerate(values):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(
                f"Every alpha must be a finite number > 0; got alphas[{index}] = "
                f"{value!r}. Ridge with alpha <= 0 is ill-posed here; use a small "
                "positive value such as 1e-3 instead.")
    return values


def _check_design(x: Any, name: str, xp: Any) -> None:
    """Raise a clear ValueError if a design matrix is not 2-D and finite."""
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (sample, feature); got shape {tuple(x.shape)}.")
    finite = xp.isfinite(x)
    if not bool(finite.all()):
        bad = to_numpy(xp.argwhere(~finite)[0])
        count = int((~finite).sum())
        raise ValueError(
            f"{name} contains {count} NaN/inf value(s), first at sample "
            f"{int(bad[0])}, feature {int(bad[1])}. Features must be finite: "
            "fill or drop those samples before fitting.")


def _check_targets(y: Any, name: str, n_samples: int, xp: Any) -> None:
    """Raise a clear ValueError if a BOLD block has the wrong rows or NaN."""
    if y.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (sample, voxel); got shape {tuple(y.shape)}.")
    if y.shape[0] != n_samples:
        raise ValueError(
            f"{name} has {y.shape[0]} samples but the design has {n_samples}; "
            "X and Y must share their sample (time) axis.")
    finite = xp.isfinite(y)
    if not bool(finite.all()):
        bad = to_numpy(xp.argwhere(~finite)[0])
        raise ValueError(
            f"{name} contains {int((~finite).sum())} NaN/inf value(s), first at "
            f"sample {int(bad[0])}, voxel {int(bad[1])} of this block. Mask "
            "those voxels out before fitting.")


#: With at most this many alphas, "auto" builds dense operators with one
#: Cholesky per alpha on CPU: eigh's tridiagonal reduction is memory-bound
#: (a 3,600-sample kernel: ~20 CPU-s for eigh + build vs ~13 CPU-s for 12
#: LAPACK potrf + potrs on the project's 2-core machine).
CHOLESKY_MAX_ALPHAS = 24


def _resolve_decomposition(decomposition: str, n_alphas: int, device: str) -> str:
    """'eigh' or 'cholesky' for decomposition='auto' (see CHOLESKY_MAX_ALPHAS)."""
    if decomposition == "auto":
        fast = device == "cpu" and n_alphas <= CHOLESKY_MAX_ALPHAS
        return "cholesky" if fast else "eigh"
    if decomposition in ("eigh", "cholesky"):
        return decomposition
    raise ValueError("decomposition must be 'auto', 'eigh' or 'cholesky'; got "
                     f"{decomposition!r}.")


def _resolve_regime(solver: str, n_train: int, n_features: int) -> str:
    """'primal' (Gram, p <= n) or 'dual' (kernel, p > n) for solver='auto'."""
    if solver == "auto":
        return "primal" if n_features <= n_train else "dual"
    if solver in ("primal", "dual"):
        return solver
    raise ValueError(f"solver must be 'auto', 'primal' or 'dual'; got {solver!r}.")
