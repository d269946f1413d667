"""Banded ridge benchmark: voxelflow against himalaya at the study's shape, same process.

Shape (defaults): three feature spaces of 2,048 (ResNet-50), 4,096 (VGG16) and 2,048
(autoencoder) features, each lagged 4 times (4, 5, 6, 7 s) -> 32,768 columns (dual
regime); 4,497 train + 300 test samples; the paper's 12 alphas x 20 weightings on the
simplex (himalaya's random search, seed 0); 5 contiguous folds. Data: i.i.d. Gaussian
features (benchmarks/ridge.py's), BOLD planted on a few columns of each space with a
voxel-dependent mix, float32.

Both tools run in this process on the SAME voxel slice (``--voxels``) and the same
weightings (the first ``--run-weightings`` of the 20; all of them by default):

* ``voxelflow``: :func:`voxelflow.pipeline.ridge.banded_ridge` (weighting-outer: per-space
  centred kernels once, then per weighting one eigendecomposition for the full fit and
  one per fold, streamed fold-outer (one fold operator alive at a time, dense in the
  form ``auto`` picks for the study's 65,665 voxels: ``--operator-form``), every alpha
  from it, the voxel chunks, the running best), with the product-measure split;
* ``himalaya``: ``MultipleKernelRidgeCV(kernels="precomputed", fit_intercept=True)``,
  ``solver="random_search"``, numpy (``--himalaya-backend torch``: torch; cupy on
  CUDA) backend, float32, the same weightings,
  alphas, folds and score (Pearson r), then ``predict`` on the test kernels; its
  kernels are computed in the same process (timed with it).

Each run's time is split into ``once`` (the per-space kernels: voxelflow's ``_setup``,
timed by a wrapper; himalaya's kernel products), ``fixed`` (the per
(fold, weighting) decompositions and operator builds: voxelflow's
``streamed_eigen_factors`` and its streamed folds, himalaya's
``_decompose_kernel_ridge``, timed by wrappers) and ``per_voxel`` (the rest divided
by the voxels), so the whole fit is extrapolated, and labelled so, as::

    once + (20 / run_weightings) x (fixed + 65,665 x per_voxel)

or, with ``--marginal --run-weightings 1``, from the first weighting as measured plus
19 times the marginal cost of a further weighting (the second one's, or the mean of
weightings 2..K with ``--marginal-over K``: :func:`marginal_total`), so what a tool
does once at the end (himalaya's refit) is not counted 20 times. The per-voxel part
is a difference of wall times, multiplied by 65,665 / voxels: use 4,096 voxels or more
(at 1,024, a few seconds of noise move it by 1-3 ms). voxelflow's voxel scan is also
timed directly inside the call and printed (not used in the extrapolation, which
treats both tools alike).

The per-voxel part's rate is compared with a float32 matmul of the same shape as the
held-out products (measured here, in this process); peak RSS (``getrusage``, the
process's peak after each tool: voxelflow runs first) with the BOLD matrix at the
study's shape (4,797 x 65,665 x 4 bytes). ``--device cuda`` runs both on CuPy.

    .venv/bin/python benchmarks/banded.py --voxels 4096 --run-weightings 1 --marginal --lazy-designs
    .venv/bin/python benchmarks/banded.py --train 1500 --lags 2  # smaller shape
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ridge import (FEATURE_BLOCK, PAPER_ALPHAS, design_block, lazy_design,  # noqa: E402
                   make_design)

GIB = 2 ** 30


def make_problem(args, n_voxels: int):
    """Per-space designs (train, test) and BOLD (train, test), float32."""
    n = args.train + args.test
    make = lazy_design if args.lazy_designs else make_design
    xs = [make(n, width * args.lags, args.seed + index)
          for index, width in enumerate(args.spaces)]
    rng = np.random.default_rng(args.seed)
    mix = rng.dirichlet([0.5] * len(xs), n_voxels).T.astype(np.float32)
    y = rng.standard_normal((n, n_voxels), dtype=np.float32)
    for index, share in enumerate(mix):
        planted = rng.standard_normal((8, n_voxels), dtype=np.float32) / np.sqrt(8)
        width = min(FEATURE_BLOCK, args.spaces[index] * args.lags)
        first = design_block(n, args.seed + index, 0, width)[:, :8]  # the first 8 columns
        y += (first @ planted) * share
    return ([x[:args.train] for x in xs], [x[args.train:] for x in xs],
            y[:args.train], y[args.train:])


class Timed:
    """Wrap a function (or generator function) and add up the seconds spent in it."""

    def __init__(self, function):
        self.function, self.seconds = function, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        result = self.function(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        if not hasattr(result, "__next__"):
            return result
        return self._generate(result)

    def _generate(self, generator):
        while True:
            start = time.perf_counter()
            try:
                item = next(generator)
            except StopIteration:
                self.seconds += time.perf_counter() - start
                return
            self.seconds += time.perf_counter() - start
            yield item


def _sync(device: str) -> None:
    if device == "cuda":
        import cupy
        cupy.cuda.Device().synchronize()


def run_voxelflow(args, problem, weightings, folds) -> dict:
    from voxelflow.pipeline import ridge
    from voxelflow.pipeline.ridge import _banded, _banded_eigen
    xs, xs_test, y, y_test = problem
    patched = [(_banded, "streamed_eigen_factors"),
               (_banded_eigen, "iter_dual_fold_factors"),  # the streamed folds' builds
               (_banded, "_setup"), (_banded, "_scan")]
    timers = {name: Timed(getattr(module, name)) for module, name in patched}
    for module, name in patched:
        setattr(module, name, timers[name])
    try:
        start = time.perf_counter()
        dense = {} if args.max_dense_mib is None else {
            "max_dense_bytes": int(args.max_dense_mib * 2 ** 20)}
        out = ridge.banded_ridge(xs, y, xs_test, y_test, PAPER_ALPHAS, weightings, folds,
                                 device=args.device, voxel_chunk=args.voxel_chunk,
                                 operator_form=study_form(args), **dense)
        _sync(args.device)
        wall = time.perf_counter() - start
    finally:
        for module, name in patched:
            setattr(module, name, timers[name].function)
    fixed = (timers["streamed_eigen_factors"].seconds
             + timers["iter_dual_fold_factors"].seconds)
    # the scan's time includes the streamed folds' builds: take them out
    scan = timers["_scan"].seconds - timers["iter_dual_fold_factors"].seconds
    return {"wall": wall, "once": timers["_setup"].seconds, "fixed": fixed, "scan": scan,
            "space_alpha": out["space_alpha"], "r_test_cv": out["r_test_cv"],
            "r_cv": out["r_cv"], "best_alpha": out["best_alpha"]}


def study_form(args) -> str:
    """The fold-operator form banded_ridge's "auto" picks for the WHOLE study's
    voxels (``--total-voxels``), forced on the slice (whose fewer voxels would not
    pay for dense folds): per fold dense where it fits the budget and serves enough
    voxels (:func:`voxelflow.pipeline.ridge._banded_eigen.streamed_fold_forms`)."""
    from voxelflow.pipeline.ridge._banded import EIGEN_DENSE_BYTES
    from voxelflow.pipeline.ridge._banded_eigen import streamed_fold_forms
    from voxelflow.pipeline.ridge.scoring import contiguous_folds
    if args.operator_form != "study":
        return args.operator_form
    budget = (EIGEN_DENSE_BYTES if args.max_dense_mib is None
              else int(args.max_dense_mib * 2 ** 20))
    shapes = [(len(f), args.train - len(f)) for f in contiguous_folds(args.train, args.folds)]
    forms = set(streamed_fold_forms(len(PAPER_ALPHAS), shapes, 4, "auto", budget,
                                    args.total_voxels))
    return forms.pop() if len(forms) == 1 else "auto"


def run_himalaya(args, problem, weightings, folds) -> dict:
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import MultipleKernelRidgeCV, _random_search
    from himalaya.scoring import correlation_score

    from voxelflow.pipeline.ridge.scoring import train_indices
    backend = set_backend(args.himalaya_backend if args.device == "cpu" else "cupy",
                          on_error="raise")
    decompose = _random_search._decompose_kernel_ridge = Timed(
        _random_search._decompose_kernel_ridge)
    xs, xs_test, y, y_test = problem
    xs = [np.asarray(x) for x in xs]  # Dask designs (--lazy-designs) computed here
    xs_test = [np.asarray(x) for x in xs_test]
    try:
        start = time.perf_counter()
        kernels = backend.stack([backend.asarray(x) @ backend.asarray(x).T for x in xs])
        test_kernels = backend.stack([backend.asarray(xt) @ backend.asarray(x).T
                                      for x, xt in zip(xs, xs_test)])
        _sync(args.device)
        once = time.perf_counter() - start
        cv = [(train_indices(f, args.train), f) for f in folds]
        model = MultipleKernelRidgeCV(
            kernels="precomputed", solver="random_search", cv=cv, fit_intercept=True,
            solver_params=dict(n_iter=weightings.astype(np.float32),
                               alphas=np.asarray(PAPER_ALPHAS, np.float32),
                               score_func=correlation_score, progress_bar=False))
        model.fit(kernels, y)
        prediction = backend.to_numpy(model.predict(test_kernels))
        _sync(args.device)
        wall = time.perf_counter() - start
    finally:
        _random_search._decompose_kernel_ridge = decompose.function
    a = prediction - prediction.mean(0)
    b = y_test - y_test.mean(0)
    r = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return {"wall": wall, "once": once, "fixed": decompose.seconds,
            "space_alpha": np.exp(-backend.to_numpy(model.deltas_).astype(np.float64)),
            "r_test_cv": r,
            "best_alpha": backend.to_numpy(model.best_alphas_).astype(np.float64)}


def held_out_gflops(args) -> tuple[float, float]:
    """(flops of the per-voxel part per voxel and weighting: the stacked held-out and
    test products, float32 matmul rate of the same shape here, GFLOP/s)."""
    held = args.train // args.folds
    fit = args.train - held
    n_alphas = len(PAPER_ALPHAS)
    flops = 2.0 * n_alphas * (args.folds * held * fit + args.test * args.train)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n_alphas * held, fit), dtype=np.float32)
    b = rng.standard_normal((fit, min(args.voxels, 2048)), dtype=np.float32)
    a @ b
    best = min(_timed_matmul(a, b) for _ in range(2))
    return flops, 2.0 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9


def _timed_matmul(a, b) -> float:
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def marginal_total(args, more: dict, one: dict) -> float:
    """The whole fit from a run of one weighting and one of ``K = --marginal-over``
    (default 2): the first weighting as measured (with what a tool does once per
    voxel at the end, e.g. himalaya's refit), each further weighting at the mean
    marginal cost of weightings 2..K::

        once + fixed_1 + V x per_voxel_1 + (W - 1) x (fixed_K - fixed_1
                                    + V x (per_voxel_K - per_voxel_1)) / (K - 1)

    (a difference of two runs' wall times: K > 2 averages its noise over K - 1
    weightings).
    """
    def per_voxel(run: dict) -> float:
        return (run["wall"] - run["once"] - run["fixed"]) / args.voxels

    extra = args.marginal_over - 1
    fixed = (more["fixed"] - one["fixed"]) / extra
    voxel = (per_voxel(more) - per_voxel(one)) / extra
    if "scan" in more:
        print(f"    further weightings' voxel scan timed inside the call: "
              f"{1e3 * (more['scan'] - one['scan']) / args.voxels / extra:.2f} ms per "
              "voxel", flush=True)
    print(f"    marginal cost per further weighting (mean of {extra}): decompositions "
          f"{fixed:.1f} s, per voxel {1e3 * voxel:.2f} ms", flush=True)
    return (one["once"] + one["fixed"] + per_voxel(one) * args.total_voxels
            + (args.weightings - 1) * (fixed + voxel * args.total_voxels))


def alpha_ties(ours: dict, theirs: dict) -> tuple[int, float]:
    """One weighting run: voxels whose alpha differs between the tools, and the
    largest difference of voxelflow's mean CV r between its alpha and himalaya's
    there (a near-tie when it is at the float32 noise of the scores)."""
    grid = np.asarray(PAPER_ALPHAS, dtype=np.float64)
    mine = np.searchsorted(grid, ours["best_alpha"] * (1 - 1e-6))
    other = np.searchsorted(grid, theirs["best_alpha"] * (1 - 1e-6))
    differ = np.flatnonzero((mine != other) & np.isfinite(ours["best_alpha"]))
    if not differ.size:
        return 0, 0.0
    gap = ours["r_cv"][mine[differ], differ] - ours["r_cv"][other[differ], differ]
    return int(differ.size), float(np.nanmax(np.abs(gap)))


def agreement(ours: dict, theirs: dict) -> tuple[float, float]:
    same = np.isclose(ours["space_alpha"], theirs["space_alpha"], rtol=1e-3).all(axis=0)
    diff = np.abs(ours["r_test_cv"] - theirs["r_test_cv"])
    return float(same.mean()), float(np.nanmax(diff[same])) if same.any() else np.nan


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The problem's shape (defaults: the study's), as :func:`make_problem` reads it."""
    parser.add_argument("--spaces", type=int, nargs="+", default=[2048, 4096, 2048])
    parser.add_argument("--lags", type=int, default=4)
    parser.add_argument("--train", type=int, default=4497)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--folds", type=int, default=5)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--weightings", type=int, default=20)
    parser.add_argument("--run-weightings", type=int, default=None,
                        help="run the first N weightings only (default: all)")
    parser.add_argument("--total-voxels", type=int, default=65_665)
    parser.add_argument("--voxels", type=int, default=1024)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--methods", nargs="+", default=["voxelflow", "himalaya"])
    parser.add_argument("--max-dense-mib", type=float, default=None,
                        help="voxelflow's budget for one streamed dense fold operator, MiB "
                        "(default: banded_ridge's, 256)")
    parser.add_argument("--operator-form", default="study",
                        choices=["study", "auto", "dense", "factored"],
                        help="voxelflow's fold operators; study (default): the form "
                        "'auto' picks for --total-voxels voxels (dense at the study's "
                        "shape), forced on the slice")
    parser.add_argument("--voxel-chunk", type=int, default=4096,
                        help="voxelflow's voxels per chunk")
    parser.add_argument("--lazy-designs", action="store_true",
                        help="designs as Dask arrays generated chunk by chunk (as the "
                        "stage reads features from Zarr): voxelflow never holds them")
    parser.add_argument("--marginal", action="store_true",
                        help="with --run-weightings 1: also run 2 weightings and "
                        "extrapolate each further weighting at the second's marginal cost")
    parser.add_argument("--marginal-over", type=int, default=2,
                        help="with --marginal: the second run has this many weightings "
                        "(K >= 2); the marginal cost is the mean over weightings 2..K")
    parser.add_argument("--himalaya-backend", default="numpy", choices=["numpy", "torch"],
                        help="himalaya's CPU backend (numpy: scipy's eigh; torch: MKL's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    import os

    from voxelflow.pipeline import ridge
    from voxelflow.pipeline.ridge.scoring import contiguous_folds
    args = parse_args(argv)
    run_weightings = args.run_weightings or args.weightings
    drawn = ridge.simplex_weightings(len(args.spaces), args.weightings, args.seed)
    weightings, weightings_more = drawn[:run_weightings], drawn[:args.marginal_over]
    if args.marginal and args.marginal_over < 2:
        raise SystemExit("--marginal-over must be at least 2")
    folds = contiguous_folds(args.train, args.folds)
    flops, gflops = held_out_gflops(args)
    bold_gib = (args.train + args.test) * args.total_voxels * 4 / GIB
    print(f"shape: spaces {args.spaces} x {args.lags} lags, {args.train}+{args.test} "
          f"samples, {len(PAPER_ALPHAS)} alphas x {run_weightings} of {args.weightings} "
          f"weightings, {args.folds} folds, {args.voxels} voxels run "
          f"({args.total_voxels} at study shape); device {args.device}; load average "
          f"{os.getloadavg()[0]:.2f}; float32 matmul of the held-out shape "
          f"{gflops:.0f} GFLOP/s; BOLD matrix at study shape {bold_gib:.2f} GiB; "
          f"voxelflow's fold operators {study_form(args)}")
    problem = make_problem(args, args.voxels)
    scale = args.weightings / run_weightings
    results = {}
    for method in args.methods:
        tool = run_voxelflow if method == "voxelflow" else run_himalaya
        run = tool(args, problem, weightings, folds)
        run["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        per_voxel = (run["wall"] - run["once"] - run["fixed"]) / args.voxels
        run["total"] = run["once"] + scale * (run["fixed"] + per_voxel * args.total_voxels)
        rate = flops * run_weightings / per_voxel / 1e9
        results[method] = run
        print(f"{method:>10}: measured wall {run['wall']:.1f} s on the slice (kernels "
              f"{run['once']:.1f} s, fixed per (fold, weighting) decompositions "
              f"{run['fixed']:.1f} s = {run['fixed'] / run_weightings:.1f} s per "
              f"weighting, per voxel {1e3 * per_voxel:.2f} ms = {rate:.0f} GFLOP/s = "
              f"{rate / gflops:.2f} of the matmul rate); EXTRAPOLATED to "
              f"{args.weightings} weightings x {args.total_voxels} voxels: "
              f"{run['total']:.0f} s; process peak RSS after it {run['rss']:.2f} GiB "
              f"({run['rss'] / bold_gib:.2f} x the BOLD matrix)", flush=True)
        if "scan" in run:  # timed directly, not by subtraction: far less noisy
            print(f"    voxelflow's voxel scan timed inside the call: "
                  f"{1e3 * run['scan'] / args.voxels / run_weightings:.2f} ms per voxel "
                  "and weighting", flush=True)
        if args.marginal and run_weightings == 1:
            run["total"] = marginal_total(args, tool(args, problem, weightings_more, folds),
                                          run)
            print(f"{method:>10}: with further weightings' marginal cost, EXTRAPOLATED "
                  f"to the study {run['total']:.0f} s", flush=True)
    if {"voxelflow", "himalaya"} <= results.keys():
        ours, theirs = results["voxelflow"], results["himalaya"]
        same, worst = agreement(ours, theirs)
        print(f"  himalaya / voxelflow: measured on the slice {theirs['wall'] / ours['wall']:.2f}"
              f"; EXTRAPOLATED to the study {theirs['total'] / ours['total']:.2f}")
        print(f"  per-space alphas identical on {100 * same:.2f}% of the slice's voxels; "
              f"max |r_test difference| there {worst:.2e}")
        if run_weightings == 1:
            count, gap = alpha_ties(ours, theirs)
            print(f"  where the alphas differ ({count} voxels), voxelflow's mean CV r at "
                  f"its alpha and at himalaya's differ by at most {gap:.1e} (near-ties)")


if __name__ == "__main__":
    main()
