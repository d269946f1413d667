"""Eigendecomposition drivers at the banded fit's fold size: the decomposition that
every (fold, weighting) pays once, float32 and float64.

Times ``scipy.linalg.eigh`` with LAPACK's divide and conquer (``evd``, what
voxelflow uses) and MRRR (``evr``, what it used before), and ``numpy.linalg.eigh``
(what himalaya's numpy backend calls), on the same random PSD kernel, in this
process; prints each time and the ratio against ``evr``, plus the reconstruction
error ``max |V diag(s) V^T - K| / max |K|``.

    .venv/bin/python benchmarks/eigh.py [--n 3600]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy.linalg


def kernel(n: int, dtype) -> np.ndarray:
    """A PSD (n, n) kernel ``X X^T`` of i.i.d. Gaussian X (n, n + 200)."""
    x = np.random.default_rng(0).standard_normal((n, n + 200), dtype=np.float32)
    return (x @ x.T).astype(dtype)


def timed(function, matrix: np.ndarray) -> tuple[float, float]:
    """(seconds, relative reconstruction error) of one decomposition of a copy."""
    work = matrix.copy()
    start = time.perf_counter()
    values, vectors = function(work)
    seconds = time.perf_counter() - start
    error = np.abs((vectors * values) @ vectors.T - matrix).max() / np.abs(matrix).max()
    return seconds, float(error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3600)
    args = parser.parse_args()
    drivers = {
        "scipy evd": lambda m: scipy.linalg.eigh(m, driver="evd", overwrite_a=True,
                                                 check_finite=False),
        "scipy evr": lambda m: scipy.linalg.eigh(m, driver="evr", overwrite_a=True,
                                                 check_finite=False),
        "numpy eigh": np.linalg.eigh,
    }
    print(f"n = {args.n}; load average {os.getloadavg()[0]:.2f}")
    for dtype in (np.float32, np.float64):
        matrix = kernel(args.n, dtype)
        results = {name: timed(f, matrix) for name, f in drivers.items()}
        base = results["scipy evr"][0]
        for name, (seconds, error) in results.items():
            print(f"{np.dtype(dtype).name:>8} {name:>10}: {seconds:7.2f} s  "
                  f"(evr / this {base / seconds:5.2f}x)  reconstruction error {error:.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
