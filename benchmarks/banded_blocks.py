"""The joint fit stage's per-block cost: held factored folds against folds expanded to
dense per block, at the study's shape, same process.

``voxelflow fit --features A B C`` factorises every weighting once
(:func:`voxelflow.pipeline.ridge.banded_factors`; at the study's shape the fold
operators are held factored: 20 weightings of dense folds would not fit) and then
scores blocks of ``--voxel-block`` voxels (:func:`~voxelflow.pipeline.ridge.banded_chunk`).
A block of at least n_alphas x held-out voxels (10,800 at the study's shape) expands
each fold to its dense operator for its pass (one alive at a time), which costs
``2 n_alphas held q^2`` flops per fold and block and saves ``2 q^2`` per voxel and fold.

This script builds one weighting's factors as the stage does (same shape and data as
``benchmarks/banded.py``: ``make_problem``; the held dense folds' budget is one
twentieth of ``banded_factors``', as for one of the study's 20 weightings), then times ``banded_chunk`` on one block
of ``--block`` voxels, alternately with the folds kept factored (``max_dense_bytes=0``,
what a block below the threshold gets) and expanded (the default budget),
``--repeats`` times each, and prints per weighting and block the seconds, per voxel
the milliseconds, their ratio, and the whole stage's time per weighting extrapolated
to ``--total-voxels`` voxels in such blocks.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/banded_blocks.py --block 16384
    .venv/bin/python benchmarks/banded_blocks.py --train 1500 --lags 2 --block 4096  # small
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from banded import add_shape_arguments, make_problem  # noqa: E402
from ridge import PAPER_ALPHAS  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--block", type=int, default=16_384, help="voxels per block")
    parser.add_argument("--total-voxels", type=int, default=65_665)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each form")
    parser.add_argument("--lazy-designs", action="store_true",
                        help="designs as Dask arrays generated chunk by chunk")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    from voxelflow.pipeline import ridge
    from voxelflow.pipeline.ridge._banded import EIGEN_DENSE_BYTES
    from voxelflow.pipeline.ridge._banded_eigen import streamed_fold_forms
    from voxelflow.pipeline.ridge._factorize import DEFAULT_MAX_DENSE_BYTES
    from voxelflow.pipeline.ridge.scoring import contiguous_folds

    args = parse_args(argv)
    folds = contiguous_folds(args.train, args.folds)
    gammas = ridge.simplex_weightings(len(args.spaces), 20, args.seed)[:1]
    shapes = [(len(f), args.train - len(f)) for f in folds]
    forms = streamed_fold_forms(len(PAPER_ALPHAS), shapes, 4, "auto", EIGEN_DENSE_BYTES,
                                args.block)
    print(f"shape: spaces {args.spaces} x {args.lags} lags, {args.train}+{args.test} "
          f"samples, {len(PAPER_ALPHAS)} alphas, {args.folds} folds; one weighting; block "
          f"of {args.block} voxels (folds expanded per block: {forms})", flush=True)
    xs, xs_test, y, y_test = make_problem(args, args.block)
    start = time.perf_counter()
    # the budget one of the stage's 20 weightings gets for held dense folds
    banded = ridge.banded_factors(xs, xs_test, PAPER_ALPHAS, gammas, folds,
                                  keep_weight_factors=True, keep_designs=False,
                                  max_dense_bytes=DEFAULT_MAX_DENSE_BYTES // 20)
    factor_s = time.perf_counter() - start
    held = [f.operator.dense is None for f in banded.factors[0].folds]
    print(f"factors of one weighting: {factor_s:.1f} s (folds held factored: {held})",
          flush=True)
    times: dict[str, list[float]] = {"factored": [], "expanded": []}
    outputs = {}
    for repeat in range(args.repeats):
        order = ("factored", "expanded") if repeat % 2 == 0 else ("expanded", "factored")
        for form in order:
            budget = 0 if form == "factored" else EIGEN_DENSE_BYTES
            start = time.perf_counter()
            outputs[form] = ridge.banded_chunk(banded, y, y_test, max_dense_bytes=budget)
            times[form].append(time.perf_counter() - start)
            print(f"  {form:9s} folds: block of {args.block} voxels in "
                  f"{times[form][-1]:.1f} s", flush=True)
    factored, expanded = (float(np.median(times[k])) for k in ("factored", "expanded"))
    same = float(np.mean(outputs["factored"]["best_alpha"]
                         == outputs["expanded"]["best_alpha"]))
    diff = float(np.nanmax(np.abs(outputs["factored"]["r_test_cv"]
                                  - outputs["expanded"]["r_test_cv"])))
    full, rest = divmod(args.total_voxels, args.block)
    rest_expands = rest >= min(len(PAPER_ALPHAS) * rows for rows, _ in shapes)

    def stage(per_block: float, form: str) -> float:
        """One weighting of the stage: its factors, the full blocks, the last block
        (its voxels at this form's per-voxel cost, or the factored one's when it is
        too small to expand)."""
        last = per_block if form == "factored" or rest_expands else factored
        return factor_s + full * per_block + rest * last / args.block

    print(f"per block and weighting (medians of {args.repeats}): factored {factored:.1f} s "
          f"({1e3 * factored / args.block:.2f} ms/voxel), expanded {expanded:.1f} s "
          f"({1e3 * expanded / args.block:.2f} ms/voxel); factored / expanded "
          f"{factored / expanded:.2f}")
    print(f"the stage per weighting at {args.total_voxels} voxels ({full} blocks of "
          f"{args.block} + {rest}), factors included: factored "
          f"{stage(factored, 'factored'):.0f} s, expanded {stage(expanded, 'expanded'):.0f} s")
    print(f"same best alpha on {100 * same:.2f} % of voxels; r_test_cv max abs difference "
          f"{diff:.2e}")


if __name__ == "__main__":
    main()
