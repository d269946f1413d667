"""Test-set statistics against the fit itself, at the study's shape, in one process.

Shape (defaults): 4,497 train + 300 test samples, 2,048 features, the paper's 12
alphas, 5 contiguous CV folds, 65,665 voxels in blocks of 4,096, 1,000 block
permutations and 1,000 block-bootstrap resamples of 10-sample test blocks; the data
are benchmarks/ridge.py's (i.i.d. Gaussian features, a planted signal on 32 of them,
SNR varying over voxels, BOLD generated per voxel block from the seed).

What it times, with the code the fit stage runs (``FitWork.compute`` minus reading
the block from the workspace):

* the fit: the factorisation once (``ridge.factorize_ridge``), then per voxel block
  ``block_outputs(..., stats=None)`` (the ridge for every alpha with r, R^2, CV r,
  the selected alpha);
* the statistics: per voxel block, ``block_outputs(..., stats=plan)`` minus the
  above (the predictions at the CV alpha plus ``TestStatistics.block_arrays``:
  permutation null, p-values, block sums, bootstrap sums), and
  ``block_arrays`` alone; once per fit ``combine_blocks`` (BH-FDR, FWE, bootstrap
  means) on all voxels;
* the peak of the memory the statistics of one block allocate (``tracemalloc``)
  next to the block's BOLD.

By default only ``--blocks`` voxel blocks are computed (each measured ``--repeats``
times, median) and the whole fit is extrapolated: factorisation + (voxels / 4,096) x
per-block time, and likewise for the statistics; the figures say so.  ``--full``
computes every voxel block once instead (the fit and the statistics of all 65,665
voxels in the same run).  Target: statistics <= 25 % of the fit's wall time.

    .venv/bin/python benchmarks/statistics.py              # 3 blocks x 3, extrapolated
    .venv/bin/python benchmarks/statistics.py --full       # all blocks (long)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ridge import PAPER_ALPHAS, SIGNAL_FEATURES, bold_block, make_design  # noqa: E402

from voxelflow.pipeline import ridge  # noqa: E402
from voxelflow.pipeline.ridge.scoring import contiguous_folds  # noqa: E402
from voxelflow.pipeline.stages._fit_work import block_outputs  # noqa: E402
from voxelflow.pipeline.stats.diagnostics import scored_voxels  # noqa: E402
from voxelflow.pipeline.stats.per_block import (StatisticsOptions, TestStatistics,  # noqa: E402
                                                combine_blocks)

MIB = 2 ** 20


def matmul_gflops(n: int = 2048) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    start = time.perf_counter()
    a @ a
    return 2 * n ** 3 / (time.perf_counter() - start) / 1e9


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def one_block(args, factors, x_signal, plan, train, test, start: int, stop: int) -> dict:
    """Fit alone, fit + statistics, block_arrays alone and its memory, for one block."""
    bold = bold_block(x_signal, args.seed, start, stop)
    ok = np.ones(stop - start, bool)
    fit_s, out = timed(block_outputs, factors, bold.copy(), ok, train, test, False, False)
    both_s, _ = timed(block_outputs, factors, bold.copy(), ok, train, test, False, False,
                      plan)
    full = ridge.ridge_chunk(factors, bold[train], bold[test], return_predictions=True)
    predictions = ridge.to_numpy(full["predictions"])
    scored = scored_voxels(ok, out["r_test"], out["r_cv"], out["best_alpha"],
                           out["r_test_cv"])
    tracemalloc.start()
    stats_s, arrays = timed(plan.block_arrays, bold[test], predictions, out["r_test_cv"],
                            scored)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"fit": fit_s, "fit+stats": both_s, "block_arrays": stats_s, "peak": peak,
            "bold_bytes": bold.nbytes, "arrays": arrays}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voxels", type=int, default=65665)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--train", type=int, default=4497)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--voxel-block", type=int, default=4096)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--block-length", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=3, help="voxel blocks measured")
    parser.add_argument("--repeats", type=int, default=3, help="timings per block")
    parser.add_argument("--full", action="store_true", help="every voxel block, once")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"load averages at start: {os.getloadavg()}; float32 matmul "
          f"{matmul_gflops():.0f} GFLOP/s")
    n = args.train + args.test
    x = make_design(n, args.features, args.seed)
    train, test = np.arange(args.train), np.arange(args.train, n)
    folds = contiguous_folds(args.train, 5)
    factor_s, factors = timed(ridge.factorize_ridge, x[train], x[test],
                              np.asarray(PAPER_ALPHAS, float), folds)
    plan = TestStatistics.plan(StatisticsOptions(args.permutations, args.bootstrap,
                                                 args.block_length), args.test)
    x_signal = np.ascontiguousarray(x[:, :SIGNAL_FEATURES])
    starts = list(range(0, args.voxels, args.voxel_block))
    measured = starts if args.full else starts[:args.blocks]
    rows = []
    for first in measured:
        last = min(first + args.voxel_block, args.voxels)
        repeats = [one_block(args, factors, x_signal, plan, train, test, first, last)
                   for _ in range(1 if args.full else args.repeats)]
        row = {k: float(np.median([r[k] for r in repeats]))
               for k in ("fit", "fit+stats", "block_arrays", "peak")}
        row["voxels"], row["bold_bytes"] = last - first, repeats[0]["bold_bytes"]
        row["arrays"] = repeats[0]["arrays"]
        rows.append(row)
        print(f"voxels {first}-{last}: fit {row['fit']:.2f} s, fit + statistics "
              f"{row['fit+stats']:.2f} s, block_arrays {row['block_arrays']:.2f} s, "
              f"statistics peak {row['peak'] / MIB:.0f} MiB (BOLD block "
              f"{row['bold_bytes'] / MIB:.0f} MiB)", flush=True)
    report(args, factor_s, rows, plan)
    print(f"load averages at end: {os.getloadavg()}")
    return 0


def report(args, factor_s: float, rows: list[dict], plan: TestStatistics) -> None:
    """Totals (measured or extrapolated) and the ratio against the target."""
    measured_voxels = sum(r["voxels"] for r in rows)
    scale = args.voxels / measured_voxels
    n_blocks = -(-args.voxels // args.voxel_block)
    rng = np.random.default_rng(1)
    combine_s, _ = timed(combine_blocks, p_perm=rng.random(args.voxels),
                         r_test_cv=rng.normal(0, 0.1, args.voxels),
                         null_max_r=rng.random((n_blocks, plan.n_null)),
                         bootstrap_sum_r=rng.random((n_blocks, plan.n_resamples)),
                         bootstrap_n=np.full((n_blocks, plan.n_resamples), 4096))
    fit_total = factor_s + scale * sum(r["fit"] for r in rows)
    stats_total = scale * sum(r["fit+stats"] - r["fit"] for r in rows) + combine_s
    arrays_total = scale * sum(r["block_arrays"] for r in rows) + combine_s
    how = "measured" if scale == 1 else (f"extrapolated from {measured_voxels} voxels "
                                          f"(x {scale:.2f})")
    print(f"\nshape: {args.train} + {args.test} samples, {args.features} features, "
          f"{len(PAPER_ALPHAS)} alphas, 5 folds, {args.voxels} voxels in blocks of "
          f"{args.voxel_block}; {plan.n_null} permutations, {plan.n_resamples} resamples "
          f"of {args.block_length}-sample blocks")
    print(f"fit: factorisation {factor_s:.1f} s + blocks = {fit_total:.1f} s ({how})")
    print(f"statistics (fit + statistics minus fit, per block): {stats_total:.1f} s = "
          f"{100 * stats_total / fit_total:.1f} % of the fit (target <= 25 %)")
    print(f"statistics (block_arrays alone + combine {combine_s:.2f} s): "
          f"{arrays_total:.1f} s = {100 * arrays_total / fit_total:.1f} % of the fit")
    peak = max(r["peak"] for r in rows)
    print(f"statistics memory: peak {peak / MIB:.0f} MiB per voxel block of "
          f"{args.voxel_block} (its BOLD: {rows[0]['bold_bytes'] / MIB:.0f} MiB), the "
          f"same for any number of voxels")


if __name__ == "__main__":
    raise SystemExit(main())
