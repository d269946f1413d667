"""Array backend of the ridge engine: NumPy or CuPy by device, host copies,
the compute dtype, Dask detection and a float64 column-wise dot product.

Every array function of the engine takes an ``xp`` module (``numpy`` or ``cupy``),
so the same code runs on CPU and GPU; CuPy is imported only when asked for.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def get_array_module(device: str = "cpu") -> Any:
    """Array module for a device: ``numpy`` for "cpu", ``cupy`` for "cuda".

    CuPy is imported only when asked for; a missing CuPy raises an
    ImportError that names the package to install.
    """
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy  # noqa: PLC0415 - optional, GPU only
        except ImportError as error:  # pragma: no cover - depends on machine
            raise ImportError(
                "device='cuda' needs CuPy, which is not installed. Install it "
                "with `pip install 'voxelflow[gpu]'` (cupy-cuda12x), or use "
                "device='cpu'.") from error
        return cupy
    raise ValueError(f"device must be 'cpu' or 'cuda'; got {device!r}.")


def to_numpy(array: Any) -> np.ndarray:
    """Host (numpy) copy of a numpy or cupy array."""
    if isinstance(array, np.ndarray):
        return array
    getter = getattr(array, "get", None)
    return np.asarray(getter() if getter is not None else array)


def _compute_dtype(*dtypes: Any) -> np.dtype:
    """float32 when every input is float32 (or smaller), else float64."""
    kinds = [np.dtype(dtype) for dtype in dtypes if dtype is not None]
    if kinds and all(kind == np.float32 or kind.itemsize < 4 and kind.kind in "fiub"
                     for kind in kinds):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _is_dask(array: Any) -> bool:
    """True for a Dask array (anything with a task graph and chunks)."""
    return hasattr(array, "dask") and hasattr(array, "chunks")


def _materialize(array: Any) -> Any:
    """Compute a Dask array; return anything else unchanged."""
    return array.compute() if _is_dask(array) else array


def _column_dot(a: Any, b: Any, xp: Any) -> Any:
    """``sum_t a[t, v] * b[t, v]`` accumulated in float64: (V,)."""
    return (a * b).sum(axis=0, dtype=xp.float64)
