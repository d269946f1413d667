"""Ridge benchmark: voxelflow against himalaya at the study's shape.

Shape (defaults): 4,497 train + 300 test samples, 2,048 and 8,192 features,
the paper's 12 alphas, 5 contiguous CV folds, 65,665 voxels, float32 data
generated from a seed: i.i.d. Gaussian features (generated per block of 512
features) and BOLD generated per chunk of 4,096 voxels with a planted signal
on 32 features whose SNR varies over voxels, so alpha choice is meaningful.

Every method runs in its own subprocess so that its peak RSS (``ru_maxrss``)
and CPU time are its own:

* ``voxelflow``: ``voxelflow.pipeline.ridge.factorize_ridge`` + ``ridge_over_voxels``
  on Dask arrays -- features streamed by feature block, BOLD generated per
  voxel chunk (neither is ever materialised whole) -- computed with Dask's
  synchronous scheduler (BLAS uses both cores). Default engine settings.
  Outputs: r_test for every alpha, CV-selected alpha, r_test at that alpha.
* ``himalaya``: numpy backend, ``RidgeCV`` (features <= samples) or
  ``KernelRidgeCV`` (features > samples), same alphas and folds,
  ``fit_intercept=True``, ``score_func=correlation_score``,
  ``n_targets_batch=500``, ``n_alphas_batch=5``, ``n_targets_batch_refit=100``;
  fit, predict the test set, correlation per voxel. Its API needs the whole
  design and BOLD in memory (their generation is in its timing).
* ``generate``: only generates the BOLD chunks (in both timings).

It prints wall and CPU time, peak RSS, himalaya/voxelflow time ratios,
voxelflow's achieved GFLOP/s (``voxelflow.pipeline.ridge.ridge_flops``: every matrix
product of the computation including the factorisation, eigh counted as
(4/3 + 2) q^3, Cholesky as q^3/3) next to a float32 4096^3 matmul measured in
the same run, how often the two select the same alpha, and load averages
(the machine may be shared: CPU time is the steadier figure then).

    .venv/bin/python benchmarks/ridge.py                      # full (long)
    .venv/bin/python benchmarks/ridge.py --voxels 4096 --features 2048
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PAPER_ALPHAS = [0.5, 1, 5, 10, 1e2, 1e3, 1e4, 2.5e4, 5e4, 1e5, 1e6, 1e7]
BOLD_BYTES_PER_VOXEL_SAMPLE = 4
SIGNAL_FEATURES = 32
GIB = 2**30


# ------------------------------------------------------------------ data
FEATURE_BLOCK = 512


def design_block(n_samples: int, seed: int, start: int, stop: int) -> np.ndarray:
    """Float32 features (n_samples, stop - start) for features [start, stop):
    i.i.d. Gaussian, deterministic in (seed, start)."""
    rng = np.random.default_rng([seed, 0, start])
    return rng.standard_normal((n_samples, stop - start), dtype=np.float32)


def make_design(n_samples: int, n_features: int, seed: int) -> np.ndarray:
    """The whole design (n_samples, n_features), float32, in memory."""
    return np.concatenate([design_block(n_samples, seed, s, min(s + FEATURE_BLOCK,
                                                                 n_features))
                           for s in range(0, n_features, FEATURE_BLOCK)], axis=1)


def lazy_design(n_samples: int, n_features: int, seed: int):
    """The same design as a Dask array chunked by 512 features: the ridge
    engine streams it, as it would stream features stored in Zarr."""
    import dask.array as da

    chunks = tuple(min(FEATURE_BLOCK, n_features - s)
                   for s in range(0, n_features, FEATURE_BLOCK))

    def generate(block_info=None):
        first, last = block_info[None]["array-location"][1]
        return design_block(n_samples, seed, first, last)

    return da.map_blocks(generate, chunks=((n_samples,), chunks), dtype=np.float32,
                         meta=np.empty((0, 0), np.float32))


def bold_block(signal_features: np.ndarray, seed: int, start: int, stop: int
               ) -> np.ndarray:
    """Float32 BOLD (n_samples, stop - start) for voxels [start, stop).

    ``y = snr * x[:, :32] @ w + noise + 100`` with the SNR varying over
    voxels, so that the CV-selected alpha differs across voxels.
    ``signal_features`` is ``x[:, :32]``. Deterministic in (seed, start), so
    every method sees identical data for equal chunking.
    """
    rng = np.random.default_rng([seed, 1, start])
    n_voxels = stop - start
    weights = rng.standard_normal((SIGNAL_FEATURES, n_voxels), dtype=np.float32)
    snr = np.float32(0.3) * rng.random(n_voxels, dtype=np.float32)
    bold = rng.standard_normal((signal_features.shape[0], n_voxels), dtype=np.float32)
    bold += signal_features @ (weights * snr / np.sqrt(SIGNAL_FEATURES))
    bold += np.float32(100.0)
    return bold


def voxel_chunks(n_voxels: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) of each voxel chunk."""
    return [(s, min(s + chunk, n_voxels)) for s in range(0, n_voxels, chunk)]


# ------------------------------------------------------------------ workers
def _peak_rss_gib() -> float:
    """Peak resident set size of this process, GiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads), seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_generate(args, signal_features, folds, alphas) -> dict:
    """Generate (and drop) every BOLD chunk: the data cost in both timings."""
    for first, last in voxel_chunks(args.voxels, args.voxel_chunk):
        bold_block(signal_features, args.seed, first, last)
    return {}


def run_voxelflow(args, signal_features, folds, alphas) -> dict:
    """voxelflow: factorise once (features streamed from a Dask array), then
    map over lazily generated voxel chunks with Dask's synchronous scheduler."""
    import dask
    import dask.array as da

    from voxelflow.pipeline import ridge

    n_train, n_samples = args.train, args.train + args.test
    design = lazy_design(n_samples, args.features[0], args.seed)
    chunks = tuple(last - first for first, last in
                   voxel_chunks(args.voxels, args.voxel_chunk))

    def generate(block_info=None):
        first, last = block_info[None]["array-location"][1]
        return bold_block(signal_features, args.seed, first, last)

    bold = da.map_blocks(generate, chunks=((n_samples,), chunks), dtype=np.float32,
                         meta=np.empty((0, 0), np.float32))
    start = time.perf_counter()
    factors = ridge.factorize_ridge(design[:n_train], design[n_train:], alphas,
                                    folds, operator_form=args.operator_form,
                                    max_dense_bytes=int(args.max_dense_mib * 2**20),
                                    decomposition=args.decomposition)
    factor_seconds = time.perf_counter() - start
    result = ridge.ridge_over_voxels(
        design[:n_train], bold[:n_train], design[n_train:], bold[n_train:],
        alphas, folds, factors=factors)
    with dask.config.set(scheduler="synchronous"):
        result = result[["r_test", "best_alpha", "r_test_cv"]].compute()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "factor_seconds": factor_seconds,
            "flops": ridge.ridge_flops(factors, args.voxels),
            "regime": factors.regime,
            "operators": sorted({f.operator.method for f in factors.folds}),
            "dense_folds": sum(f.operator.dense is not None for f in factors.folds),
            "factor_gib": factors.nbytes / GIB,
            "best_alpha": result.best_alpha.values.tolist(),
            "r_test_cv_mean": float(np.nanmean(result.r_test_cv.values)),
            "r_test_max_alpha": float(alphas[int(np.nanargmax(
                np.nanmean(result.r_test.values, axis=1)))])}


def run_himalaya(args, signal_features, folds, alphas) -> dict:
    """himalaya: RidgeCV (p <= n) or KernelRidgeCV (p > n), numpy backend;
    it needs the whole design and BOLD in memory."""
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV
    from himalaya.scoring import correlation_score

    from voxelflow.pipeline.ridge.scoring import train_indices

    set_backend("numpy", on_error="raise")
    n_train = args.train
    start = time.perf_counter()
    design = make_design(args.train + args.test, args.features[0], args.seed)
    bold = np.concatenate([bold_block(signal_features, args.seed, first, last)
                           for first, last in voxel_chunks(args.voxels,
                                                           args.voxel_chunk)], axis=1)
    cv = [(train_indices(fold, n_train), fold) for fold in folds]
    solver_params = dict(score_func=correlation_score, n_targets_batch=500,
                         n_alphas_batch=5, n_targets_batch_refit=100)
    if design.shape[1] <= n_train:
        model = RidgeCV(alphas=alphas, cv=cv, fit_intercept=True,
                        solver_params=solver_params)
    else:
        model = KernelRidgeCV(alphas=alphas, kernel="linear", cv=cv,
                              fit_intercept=True, solver_params=solver_params)
    model.fit(design[:n_train], bold[:n_train])
    prediction = model.predict(design[n_train:])
    r_test = np.asarray(correlation_score(bold[n_train:], prediction))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "best_alpha": np.asarray(model.best_alphas_).tolist(),
            "r_test_cv_mean": float(np.nanmean(r_test))}


def worker(args) -> None:
    """Run one method in this process and print one JSON line."""
    from voxelflow.pipeline.ridge.scoring import contiguous_folds

    n_samples = args.train + args.test
    first_block = design_block(n_samples, args.seed, 0,
                               min(FEATURE_BLOCK, args.features[0]))
    signal_features = np.ascontiguousarray(first_block[:, :SIGNAL_FEATURES])
    del first_block
    folds = contiguous_folds(args.train, args.folds)
    alphas = np.asarray(args.alphas, dtype=np.float64)
    runner = {"voxelflow": run_voxelflow, "himalaya": run_himalaya,
              "generate": run_generate}[args.worker]
    load_before, start, cpu = os.getloadavg(), time.perf_counter(), _cpu_seconds()
    result = runner(args, signal_features, folds, alphas)
    result.setdefault("seconds", time.perf_counter() - start)
    result["cpu_seconds"] = _cpu_seconds() - cpu
    result["peak_rss_gib"] = _peak_rss_gib()
    result["load"] = [load_before[0], os.getloadavg()[0]]
    print("RESULT " + json.dumps(result))


# ------------------------------------------------------------------ driver
def sgemm_gflops(size: int = 4096, repeats: int = 3) -> float:
    """Best float32 ``size^3`` matmul rate of this machine, GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best / 1e9


def run_in_subprocess(method: str, n_features: int, args) -> dict:
    """Run ``method`` in a fresh interpreter; return its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", method,
               "--features", str(n_features), "--voxels", str(args.voxels),
               "--train", str(args.train), "--test", str(args.test),
               "--folds", str(args.folds), "--voxel-chunk", str(args.voxel_chunk),
               "--seed", str(args.seed), "--operator-form", args.operator_form,
               "--max-dense-mib", str(args.max_dense_mib),
               "--decomposition", args.decomposition,
               "--alphas", *map(str, args.alphas)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{method} failed:\n{completed.stdout}\n{completed.stderr}")


def report_shape(n_features: int, args, matmul: float) -> None:
    """Run every method at one feature count and print the comparison."""
    results = {}
    for method in args.methods:
        results[method] = run_in_subprocess(method, n_features, args)
        result = results[method]
        print(f"  {method:9s} {result['seconds']:8.1f} s wall  {result['cpu_seconds']:8.1f} "
              f"CPU-s  peak RSS {result['peak_rss_gib']:.2f} GiB  (load "
              f"{result['load'][0]:.1f} -> {result['load'][1]:.1f})", flush=True)
    bold_gib = (args.train + args.test) * args.voxels * BOLD_BYTES_PER_VOXEL_SAMPLE / GIB
    mine = results.get("voxelflow")
    if mine:
        rate = mine["flops"] / mine["seconds"] / 1e9
        print(f"  voxelflow: regime {mine['regime']}, fold operators by "
              f"{'+'.join(mine['operators'])}, factorisation "
              f"{mine['factor_seconds']:.1f} s, factors {mine['factor_gib']:.2f} GiB "
              f"({mine['dense_folds']}/{args.folds} folds dense)")
        print(f"  voxelflow: {mine['flops'] / 1e12:.2f} TFLOP counted -> "
              f"{rate:.0f} GFLOP/s = {100 * rate / matmul:.0f}% of sgemm "
              f"{matmul:.0f} GFLOP/s")
        print(f"  voxelflow peak RSS {mine['peak_rss_gib']:.2f} GiB vs full BOLD "
              f"{bold_gib:.2f} GiB -> {'below' if mine['peak_rss_gib'] < bold_gib else 'ABOVE'}")
        print(f"  voxelflow mean r_test at CV alpha {mine['r_test_cv_mean']:.4f}; "
              f"best alpha of mean r_test {mine['r_test_max_alpha']:g}")
    theirs = results.get("himalaya")
    if mine and theirs:
        ratio = theirs["seconds"] / mine["seconds"]
        cpu_ratio = theirs["cpu_seconds"] / mine["cpu_seconds"]
        same = np.mean(np.isclose(mine["best_alpha"], theirs["best_alpha"], rtol=1e-5))
        print(f"  himalaya_time / voxelflow_time = {ratio:.2f} (wall), "
              f"{cpu_ratio:.2f} (CPU time)")
        print(f"  selected alpha identical on {100 * same:.2f}% of voxels; himalaya "
              f"mean r_test at CV alpha {theirs['r_test_cv_mean']:.4f}")
    if "generate" in results:
        print(f"  (BOLD generation alone: {results['generate']['seconds']:.1f} s, "
              "included in both timings)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voxels", type=int, default=65_665)
    parser.add_argument("--features", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--train", type=int, default=4497)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--alphas", type=float, nargs="+", default=PAPER_ALPHAS)
    parser.add_argument("--voxel-chunk", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--operator-form", default="auto",
                        choices=["auto", "dense", "factored"])
    parser.add_argument("--max-dense-mib", type=float, default=512,
                        help="memory budget of the dense CV operators (MiB); "
                        "512 is the engine's default")
    parser.add_argument("--decomposition", default="auto",
                        choices=["auto", "eigh", "cholesky"])
    parser.add_argument("--methods", nargs="+", default=["generate", "voxelflow", "himalaya"],
                        choices=["generate", "voxelflow", "himalaya"])
    parser.add_argument("--worker", choices=["generate", "voxelflow", "himalaya"],
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    print(f"ridge benchmark: {args.train} train + {args.test} test samples, "
          f"{args.voxels} voxels (chunks of {args.voxel_chunk}), {len(args.alphas)} "
          f"alphas, {args.folds} contiguous folds, float32; {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    matmul = sgemm_gflops()
    print(f"numpy float32 4096^3 matmul: {matmul:.0f} GFLOP/s")
    for n_features in args.features:
        print(f"features = {n_features}:", flush=True)
        report_shape(n_features, args, matmul)
    print(f"float32 matmul after the runs: {sgemm_gflops():.0f} GFLOP/s; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
