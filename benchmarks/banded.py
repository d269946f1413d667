"""Banded ridge benchmark: voxelflow against himalaya at the study's shape.

Shape (defaults): three feature spaces of 2,048 (ResNet-50), 4,096 (VGG16) and 2,048
(autoencoder) features, each lagged 4 times (4, 5, 6, 7 s) -> 32,768 columns (dual
regime); 4,497 train + 300 test samples; 65,665 voxels; the paper's 12 alphas x 20
weightings on the simplex (himalaya's random search, seed 0); 5 contiguous folds.
Data: i.i.d. Gaussian features (benchmarks/ridge.py's), BOLD planted on a few columns
of each space with a voxel-dependent mix, float32.

Methods, each in its own subprocess (peak RSS per method):

* ``voxelflow``: :func:`voxelflow.pipeline.ridge.banded_ridge` (per-space centred
  kernels once, then per weighting the summed kernel's fold factors and every alpha),
  with the product-measure split;
* ``himalaya``: ``MultipleKernelRidgeCV(kernels="precomputed", fit_intercept=True)``,
  numpy backend, the same weightings, folds and score (Pearson r); its kernels are
  computed in the same process (timed with it).

Running every weighting on every voxel takes hours on a laptop's 2 cores, so by
default each method runs ``--run-weightings`` (1) weighting(s) on ``--voxels`` (512)
voxels and the whole fit is extrapolated::

    once + (20 / run_weightings) x [fixed + 65,665 x per_voxel]

where ``once`` is the per-space kernel products (timed alone), ``fixed`` the time
spent factorising (voxelflow: ``factorize_ridge`` per weighting; himalaya: its
``_decompose_kernel_ridge`` per weighting and fold, both timed by a wrapper in the
same run) and ``per_voxel`` the rest of the run divided by the voxels; the figures
say so. ``--full`` runs all weightings on all
voxels instead (with ``--device cuda`` on a GPU, CuPy: same code).

    .venv/bin/python benchmarks/banded.py                        # extrapolated
    .venv/bin/python benchmarks/banded.py --train 1500 --lags 2  # smaller shape
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ridge import PAPER_ALPHAS, make_design, sgemm_gflops  # noqa: E402

GIB = 2 ** 30


def make_problem(args, n_voxels: int):
    """Per-space designs (train, test) and BOLD (train, test), float32."""
    n = args.train + args.test
    xs = [make_design(n, width * args.lags, args.seed + index)
          for index, width in enumerate(args.spaces)]
    rng = np.random.default_rng(args.seed)
    mix = rng.dirichlet([0.5] * len(xs), n_voxels).T.astype(np.float32)
    y = rng.standard_normal((n, n_voxels), dtype=np.float32)
    for x, share in zip(xs, mix):
        planted = rng.standard_normal((8, n_voxels), dtype=np.float32) / np.sqrt(8)
        y += (x[:, :8] @ planted) * share
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


def run_voxelflow(args, n_voxels, weightings, folds) -> dict:
    from voxelflow.pipeline import ridge
    from voxelflow.pipeline.ridge import _banded
    from voxelflow.pipeline.ridge._factorize import _centred_kernels
    xs, xs_test, y, y_test = make_problem(args, n_voxels)
    factorize = _banded.factorize_ridge = Timed(_banded.factorize_ridge)
    start = time.perf_counter()
    for x, xt in zip(xs, xs_test):  # the part done once (timed alone)
        _centred_kernels(x, xt, np.float32, np)
    once = time.perf_counter() - start
    start = time.perf_counter()
    out = ridge.banded_ridge(xs, y, xs_test, y_test, PAPER_ALPHAS, weightings, folds,
                             device=args.device, voxel_chunk=4096)
    return {"wall": time.perf_counter() - start, "once": once,
            "fixed": factorize.seconds, "space_alpha": out["space_alpha"].tolist(),
            "r_test_cv": out["r_test_cv"].tolist()}


def run_himalaya(args, n_voxels, weightings, folds) -> dict:
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import MultipleKernelRidgeCV
    from himalaya.scoring import correlation_score

    from himalaya.kernel_ridge import _random_search

    from voxelflow.pipeline.ridge.scoring import train_indices
    decompose = _random_search._decompose_kernel_ridge = Timed(
        _random_search._decompose_kernel_ridge)
    set_backend("numpy" if args.device == "cpu" else "cupy", on_error="raise")
    xs, xs_test, y, y_test = make_problem(args, n_voxels)
    start = time.perf_counter()
    kernels = np.stack([x @ x.T for x in xs])
    test_kernels = np.stack([xt @ x.T for x, xt in zip(xs, xs_test)])
    once = time.perf_counter() - start
    cv = [(train_indices(f, args.train), f) for f in folds]
    model = MultipleKernelRidgeCV(
        kernels="precomputed", cv=cv, fit_intercept=True,
        solver_params=dict(n_iter=weightings, alphas=np.asarray(PAPER_ALPHAS),
                           score_func=correlation_score, progress_bar=False))
    model.fit(kernels, y)
    prediction = np.asarray(model.predict(test_kernels))
    wall = time.perf_counter() - start
    a = prediction - prediction.mean(0)
    b = y_test - y_test.mean(0)
    r = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return {"wall": wall, "once": once, "fixed": decompose.seconds,
            "space_alpha": np.exp(-np.asarray(model.deltas_)).tolist(),
            "r_test_cv": r.tolist()}


def worker(args) -> None:
    from voxelflow.pipeline import ridge
    from voxelflow.pipeline.ridge.scoring import contiguous_folds
    weightings = ridge.simplex_weightings(len(args.spaces), args.weightings, args.seed)
    weightings = weightings[:args.weightings if args.full else args.run_weightings]
    folds = contiguous_folds(args.train, args.folds)
    run = run_voxelflow if args.worker == "voxelflow" else run_himalaya
    result = run(args, args.worker_voxels, weightings, folds)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print("RESULT " + json.dumps(result))


def in_subprocess(method: str, n_voxels: int, argv: list[str]) -> dict:
    command = [sys.executable, __file__, *argv, "--worker", method,
               "--worker-voxels", str(n_voxels)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def model_flops(args, n_voxels: int, n_weightings: int) -> float:
    """Flops of the dual dense path (Cholesky per alpha and fold, operators, one
    GEMM per fold/alpha over voxels), kernels excluded."""
    n, k, a = args.train, args.folds, len(PAPER_ALPHAS)
    held = n / k
    fit = n - held
    per_weighting = k * a * (fit ** 3 / 3 + 2 * fit ** 2 * held) + a * (
        n ** 3 / 3 + 2 * n ** 2 * args.test)
    per_voxel = 2 * a * (k * held * fit + args.test * n)
    return n_weightings * (per_weighting + n_voxels * per_voxel)


def extrapolate(run: dict, args) -> float:
    """Whole-fit seconds from one slice of ``run_weightings`` weightings."""
    per_voxel = (run["wall"] - run["once"] - run["fixed"]) / args.voxels
    scale = args.weightings / args.run_weightings
    return run["once"] + scale * (run["fixed"] + per_voxel * args.total_voxels)


def agreement(ours: dict, theirs: dict) -> tuple[float, float]:
    same = np.isclose(np.asarray(ours["space_alpha"]), np.asarray(theirs["space_alpha"]),
                      rtol=1e-4).all(axis=0)
    diff = np.abs(np.asarray(ours["r_test_cv"]) - np.asarray(theirs["r_test_cv"]))
    return float(same.mean()), float(np.nanmax(diff[same])) if same.any() else np.nan


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spaces", type=int, nargs="+", default=[2048, 4096, 2048])
    parser.add_argument("--lags", type=int, default=4)
    parser.add_argument("--train", type=int, default=4497)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--weightings", type=int, default=20)
    parser.add_argument("--run-weightings", type=int, default=1)
    parser.add_argument("--total-voxels", type=int, default=65_665)
    parser.add_argument("--voxels", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--methods", nargs="+", default=["voxelflow", "himalaya"])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-voxels", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    gflops = sgemm_gflops()
    bold_gib = (args.train + args.test) * args.total_voxels * 4 / GIB
    print(f"shape: spaces {args.spaces} x {args.lags} lags, {args.train}+{args.test} "
          f"samples, {args.total_voxels} voxels, {len(PAPER_ALPHAS)} alphas x "
          f"{args.weightings} weightings, {args.folds} folds; sgemm {gflops:.0f} "
          f"GFLOP/s; BOLD matrix {bold_gib:.2f} GiB")
    results = {}
    for method in args.methods:
        if args.full:
            run = in_subprocess(method, args.total_voxels, argv)
            total, rss, slice_run = run["wall"], run["peak_rss_gib"], run
        else:
            slice_run = in_subprocess(method, args.voxels, argv)
            total = extrapolate(slice_run, args)
            rss = slice_run["peak_rss_gib"]
        results[method] = (total, slice_run)
        kind = "measured" if args.full else (
            f"extrapolated from {args.run_weightings} weighting(s) on "
            f"{args.voxels} voxels: wall {slice_run['wall']:.1f} s, of which kernels "
            f"{slice_run['once']:.1f} s, factorising {slice_run['fixed']:.1f} s")
        rate = model_flops(args, args.total_voxels, args.weightings) / total / 1e9
        print(f"{method:>10}: {total:9.1f} s whole fit ({kind}); "
              f"{rate:.0f} GFLOP/s = {rate / gflops:.2f} of sgemm (dual model flops); "
              f"peak RSS {rss:.2f} GiB on the slice")
    if {"voxelflow", "himalaya"} <= results.keys():
        ratio = results["himalaya"][0] / results["voxelflow"][0]
        same, worst = agreement(results["voxelflow"][1], results["himalaya"][1])
        print(f"  himalaya_time / voxelflow_time = {ratio:.2f} (wall)")
        print(f"  per-space alphas identical on {100 * same:.2f}% of the slice's voxels; "
              f"max |r_test difference| there {worst:.2e}")


if __name__ == "__main__":
    main()
