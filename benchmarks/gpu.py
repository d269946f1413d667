"""GPU benchmark (needs an NVIDIA GPU): ridge and features on CUDA.

Ridge, at the study's shape (defaults: 4,497 train + 300 test samples, 2,048
features, the study's 12 alphas 0.5 .. 1e7, 5 contiguous CV folds, ``--voxels``
voxels), float32 data generated from a seed as in ``benchmarks/ridge.py`` (i.i.d.
Gaussian features; BOLD with a planted response on 32 features). Every method gives
r_test of the CV-selected alpha per voxel; the timings include moving BOLD to the
device and the results back:

* ``voxelflow-cupy``: ``factorize_ridge(..., device="cuda")`` then
  ``ridge_chunk`` per chunk of ``--voxel-chunk`` voxels (BOLD chunk copied to the GPU,
  outputs copied back per chunk, as the fit stage does);
* ``voxelflow-numpy``: the same on the CPU (all cores);
* ``himalaya-torch_cuda`` and ``himalaya-cupy``: himalaya's ``RidgeCV`` (features
  <= train samples; ``KernelRidgeCV`` otherwise) with the same alphas and folds,
  ``fit_intercept=True``, ``correlation_score``, then ``predict`` on the test set.

Each method runs ``--repeats`` times (the first run includes CUDA/cuBLAS start-up and
is reported apart); the figure is the median. It also reports how often the selected
alphas agree with voxelflow-numpy and the largest r_test difference.

Features: frames/s of ``run_features_stage(..., device="cuda")`` (the stage's own
loop: read frames from Zarr, normalise, forward, write) against a bare
``model(x)`` loop of the same torchvision model and batch size on ready CUDA batches
(``torch.cuda.synchronize`` before each clock read), on ``--frames`` generated frames
of 224 x 224, paired ``--repeats`` times; the figure is the median pair ratio.

    pip install -e '.[gpu]'                     # cupy-cuda12x
    .venv/bin/python benchmarks/gpu.py          # ridge (65,536 voxels) + features
    .venv/bin/python benchmarks/gpu.py --voxels 200000 --skip-features
    .venv/bin/python benchmarks/gpu.py --skip-ridge --model resnet50 --batch-size 64

Without a CUDA device (torch or CuPy cannot see one) it says so on one line and exits
with status 2 before doing anything.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

STUDY_ALPHAS = [0.5, 1, 5, 10, 1e2, 1e3, 1e4, 2.5e4, 5e4, 1e5, 1e6, 1e7]
SIGNAL_FEATURES = 32
RIDGE_METHODS = ("voxelflow-cupy", "voxelflow-numpy", "himalaya-torch_cuda", "himalaya-cupy")
EXIT_NO_GPU = 2


# ------------------------------------------------------------------ device check
def cuda_problem() -> str | None:
    """Why CUDA cannot be used here (one line), or None when torch and CuPy see a GPU."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (torch.cuda.is_available() is False)"
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed: pip install -e '.[gpu]' (cupy-cuda12x)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as exc:  # noqa: BLE001 - any CUDA runtime failure
        return f"CuPy cannot use CUDA: {str(exc).splitlines()[0]}"
    return None


def device_name() -> str:
    import torch

    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"


def synchronize() -> None:
    """Wait for every queued CUDA kernel (torch and CuPy share the device)."""
    import cupy
    import torch

    cupy.cuda.Device().synchronize()
    torch.cuda.synchronize()


# ------------------------------------------------------------------ ridge data
def make_problem(n_samples: int, n_features: int, n_voxels: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """float32 design (sample, feature) and BOLD (sample, voxel) with a planted response
    on the first 32 features whose SNR varies over voxels."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_samples, n_features), dtype=np.float32)
    weights = rng.standard_normal((SIGNAL_FEATURES, n_voxels), dtype=np.float32)
    weights *= np.float32(0.3) * rng.random(n_voxels, dtype=np.float32) / np.sqrt(SIGNAL_FEATURES)
    Y = rng.standard_normal((n_samples, n_voxels), dtype=np.float32)
    Y += X[:, :SIGNAL_FEATURES] @ weights
    return X, Y


# ------------------------------------------------------------------ ridge methods
def run_voxelflow(device: str, X: np.ndarray, Y: np.ndarray, n_train: int,
                  folds: list[np.ndarray], chunk: int) -> dict[str, np.ndarray]:
    """factorize_ridge + ridge_chunk per voxel chunk; host (numpy) outputs (voxel,)."""
    from voxelflow.pipeline import ridge

    xp = ridge.get_array_module(device)
    factors = ridge.factorize_ridge(X[:n_train], X[n_train:], STUDY_ALPHAS, folds,
                                    device=device)
    best, r_test = [], []
    for start in range(0, Y.shape[1], chunk):
        block = xp.asarray(Y[:, start:start + chunk])
        out = ridge.ridge_chunk(factors, block[:n_train], block[n_train:])
        best.append(ridge.to_numpy(out["best_alpha"]))
        r_test.append(ridge.to_numpy(out["r_test_cv"]))
    return {"best_alpha": np.concatenate(best), "r_test_cv": np.concatenate(r_test)}


def run_himalaya(backend_name: str, X: np.ndarray, Y: np.ndarray, n_train: int,
                 folds: list[np.ndarray]) -> dict[str, np.ndarray]:
    """himalaya RidgeCV / KernelRidgeCV on ``backend_name``; host outputs (voxel,)."""
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV
    from himalaya.scoring import correlation_score

    from voxelflow.pipeline.ridge.scoring import train_indices

    backend = set_backend(backend_name, on_error="raise")
    cv = [(train_indices(fold, n_train), fold) for fold in folds]
    params = dict(score_func=correlation_score, n_targets_batch=4096, n_alphas_batch=12,
                  n_targets_batch_refit=1024)
    X_train, X_test = backend.asarray(X[:n_train]), backend.asarray(X[n_train:])
    Y_train, Y_test = backend.asarray(Y[:n_train]), backend.asarray(Y[n_train:])
    if X.shape[1] <= n_train:
        model = RidgeCV(alphas=STUDY_ALPHAS, cv=cv, fit_intercept=True, solver_params=params)
    else:
        model = KernelRidgeCV(alphas=STUDY_ALPHAS, kernel="linear", cv=cv,
                              fit_intercept=True, solver_params=params)
    model.fit(X_train, Y_train)
    r_test = correlation_score(Y_test, model.predict(X_test))
    return {"best_alpha": np.asarray(backend.to_numpy(model.best_alphas_)),
            "r_test_cv": np.asarray(backend.to_numpy(r_test))}


def ridge_runner(method: str, X: np.ndarray, Y: np.ndarray, n_train: int,
                 folds: list[np.ndarray], chunk: int) -> Callable[[], dict]:
    if method == "voxelflow-cupy":
        return lambda: run_voxelflow("cuda", X, Y, n_train, folds, chunk)
    if method == "voxelflow-numpy":
        return lambda: run_voxelflow("cpu", X, Y, n_train, folds, chunk)
    return lambda: run_himalaya(method.split("-", 1)[1], X, Y, n_train, folds)


def timed(fn: Callable[[], dict], gpu: bool) -> tuple[float, dict]:
    if gpu:
        synchronize()
    start = time.perf_counter()
    out = fn()
    if gpu:
        synchronize()
    return time.perf_counter() - start, out


def bench_ridge(args: argparse.Namespace) -> None:
    from voxelflow.pipeline.ridge.scoring import contiguous_folds

    n_train = args.samples - args.test_samples
    X, Y = make_problem(args.samples, args.features, args.voxels, args.seed)
    folds = contiguous_folds(n_train, args.folds)
    print(f"ridge: {n_train:,} train + {args.test_samples} test samples x {args.features:,} "
          f"features -> {args.voxels:,} voxels, {len(STUDY_ALPHAS)} alphas, {args.folds} folds",
          flush=True)
    times: dict[str, list[float]] = {}
    outputs: dict[str, dict] = {}
    for method in args.methods:
        run = ridge_runner(method, X, Y, n_train, folds, args.voxel_chunk)
        gpu = method != "voxelflow-numpy"
        first, outputs[method] = timed(run, gpu)
        times[method] = [timed(run, gpu)[0] for _ in range(max(args.repeats - 1, 1))]
        print(f"  {method:>20}: median {statistics.median(times[method]):8.2f} s "
              f"(first run {first:.2f} s, runs {', '.join(f'{t:.2f}' for t in times[method])})",
              flush=True)
        _free_gpu_memory()
    reference = outputs.get("voxelflow-numpy")
    if reference is not None:
        for method, out in outputs.items():
            same = float(np.mean(out["best_alpha"] == reference["best_alpha"]))
            diff = float(np.nanmax(np.abs(out["r_test_cv"] - reference["r_test_cv"])))
            print(f"  {method:>20}: same alpha as voxelflow-numpy on {100 * same:.2f}% of "
                  f"voxels, max |r_test difference| {diff:.2e}")
    if "voxelflow-cupy" in times:
        base = statistics.median(times["voxelflow-cupy"])
        for method in times:
            if method != "voxelflow-cupy":
                print(f"  {method} / voxelflow-cupy time: "
                      f"{statistics.median(times[method]) / base:.2f}")


def _free_gpu_memory() -> None:
    import cupy
    import torch

    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------ features
def bare_fps(model: str, frames: np.ndarray, batch: int) -> float:
    """frames/s of ``model(x)`` on ready, normalised CUDA batches (no I/O)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(model).eval().cuda()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    batches = [((x[i:i + batch] / 255.0 - mean) / std).cuda()
               for i in range(0, len(x), batch)]
    with torch.inference_mode():
        net(batches[0])  # warm-up (cuDNN autotune, kernels)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for b in batches:
            net(b)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return len(x) / elapsed


def bench_features(args: argparse.Namespace) -> None:
    from voxelflow.pipeline.stages.features import run_features_stage
    from voxelflow.pipeline.stages.frames import run_frames_stage
    from voxelflow.pipeline.synthetic.movies import write_moving_video
    from voxelflow.stores import Workspace

    with tempfile.TemporaryDirectory(prefix="vf-gpu-") as tmp:
        video = Path(tmp) / "clip.mp4"
        seconds = max(10.0, args.frames / 20)
        write_moving_video(video, seconds)
        ws = Workspace(Path(tmp) / "ws.zarr")
        run_frames_stage(ws, [video], "clip", fps=args.frames / seconds, size=224,
                         progress=False)
        frames = ws.open_run("frames/clip", 0)["frames"].values
        print(f"features: {args.model}, batch {args.batch_size}, {len(frames)} frames "
              f"224 x 224", flush=True)
        ratios, bare, pipe = [], [], []
        for pair in range(args.repeats):
            bare.append(bare_fps(args.model, frames, args.batch_size))
            summary = run_features_stage(ws, "clip", args.model, weights="random:0",
                                         device="cuda", batch_size=args.batch_size,
                                         name="bench", overwrite=True, progress=False)
            ws.delete("features/bench")
            pipe.append(summary["frames_per_s"])
            ratios.append(pipe[-1] / bare[-1])
            print(f"  pair {pair}: bare {bare[-1]:.1f}, voxelflow features --device cuda "
                  f"{pipe[-1]:.1f} frames/s, ratio {ratios[-1]:.3f}", flush=True)
        print(f"  median: bare {statistics.median(bare):.1f} frames/s, pipeline "
              f"{statistics.median(pipe):.1f} frames/s, pipeline / bare "
              f"{statistics.median(ratios):.3f}")


# ------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voxels", type=int, default=65_536)
    p.add_argument("--samples", type=int, default=4_797, help="train + test samples")
    p.add_argument("--test-samples", type=int, default=300)
    p.add_argument("--features", type=int, default=2_048)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--voxel-chunk", type=int, default=4_096)
    p.add_argument("--methods", nargs="+", default=list(RIDGE_METHODS), choices=RIDGE_METHODS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--frames", type=int, default=1_024)
    p.add_argument("--skip-ridge", action="store_true")
    p.add_argument("--skip-features", action="store_true")
    args = p.parse_args(argv)
    for name in ("voxels", "samples", "features", "folds", "voxel_chunk", "repeats",
                 "batch_size", "frames", "test_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.test_samples >= args.samples - args.folds:
        p.error("--test-samples must leave training samples for every fold")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = cuda_problem()
    if problem:
        print(f"benchmarks/gpu.py: not run: {problem}; it needs an NVIDIA GPU with "
              f"torch (CUDA) and CuPy (pip install -e '.[gpu]')", file=sys.stderr)
        return EXIT_NO_GPU
    print(f"device: {device_name()}; {os.cpu_count()} CPUs; load {os.getloadavg()}",
          flush=True)
    if not args.skip_ridge:
        bench_ridge(args)
    if not args.skip_features:
        bench_features(args)
    print(f"load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
