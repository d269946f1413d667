"""``--precision bf16`` against fp32 on the CPU: frames/s and feature differences.

    .venv/bin/python benchmarks/precision.py [--frames 16] [--models resnet50,vgg16]
    .venv/bin/python benchmarks/precision.py --demo-r [--demo-seconds 100]

For each model (random weights, the study's default layer, 224 px frames of the real
clip or random frames), runs the pipeline's :class:`FeatureExtractor` in fp32 and in
bf16 on the same frames, and prints frames/s of each (best of two passes), their
ratio, and the max abs / max relative difference of the features.

``--demo-r``: the downstream effect on the demo.  Runs a small demo (generated movie,
BOLD simulated from fp32 EfficientNet-Lite0 features at lags 4-7 s), extracts the
planted model's features again with ``--precision bf16`` into a second group, fits
both at the planted lag set with the demo's alphas, and prints the mean test r at
the CV-selected alphas (``r_test_cv`` over valid voxels) of each, their difference,
and the largest per-voxel change.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from voxelflow.pipeline.models.backbone import load_backbone
from voxelflow.pipeline.models.extractor import FeatureExtractor
from voxelflow.pipeline.models.registry import check_layers


def _bf16_flags() -> str:
    """The CPU's bf16 instructions (avx512_bf16, amx_bf16) from /proc/cpuinfo."""
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return "unknown"
    return ", ".join(sorted({f for f in flags if "bf16" in f}))


def measure(model: str, frames: torch.Tensor) -> None:
    backbone = load_backbone(model, "random:0")
    layers = check_layers(model, None)
    out, rate = {}, {}
    for precision in ("fp32", "bf16"):
        ex = FeatureExtractor(backbone, layers, pool="avg", precision=precision)
        ex(frames[:2])
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            feats = ex(frames)
            best = min(best, time.perf_counter() - t0)
        out[precision] = feats[0].numpy()
        rate[precision] = frames.shape[0] / best
    diff = np.abs(out["bf16"] - out["fp32"])
    scale = np.abs(out["fp32"]).max()
    print(f"{model:>9} {layers[0]}: fp32 {rate['fp32']:.2f} frames/s, bf16 "
          f"{rate['bf16']:.2f} frames/s ({rate['bf16'] / rate['fp32']:.2f}x); max abs diff "
          f"{diff.max():.3g} (max |fp32| {scale:.3g}, relative {diff.max() / scale:.2%})")


def demo_r(seconds: float) -> None:
    """Mean test r of the demo's planted fit with fp32 and with bf16 features."""
    import tempfile
    from pathlib import Path

    from voxelflow.pipeline.stages.features import run_features_stage
    from voxelflow.pipeline.stages.fit import run_fit_stage
    from voxelflow.pipeline.study.demo import (DEMO_ALPHAS, PLANTED_LAGS, PLANTED_MODEL,
                                               run_demo)
    from voxelflow.stores import Workspace

    work = Path(tempfile.mkdtemp(prefix="bf16_demo_"))
    result = run_demo(work, seconds=seconds, fps=2.0, n_voxels=400, progress=False,
                      log=lambda *_: None, report=False)
    exp = result["experiment"]
    ws = Workspace(exp.store)
    run_features_stage(ws, exp.stimulus_name, PLANTED_MODEL, weights="imagenet",
                       name=f"{PLANTED_MODEL}_bf16", precision="bf16", progress=False)
    r = {}
    for precision, group in (("fp32", PLANTED_MODEL), ("bf16", f"{PLANTED_MODEL}_bf16")):
        run_fit_stage(ws, group, exp.subject, PLANTED_LAGS, DEMO_ALPHAS,
                      test_samples=exp.test_samples, cv=5, name=f"bench_{precision}",
                      progress=False)
        fit = ws.open_node(f"fits/bench_{precision}/lags-4-5-6-7")
        valid = fit["valid"].values
        r[precision] = fit["r_test_cv"].values[valid].astype(np.float64)
    a = ws.open_run(f"features/{PLANTED_MODEL}", 0)["features"].values
    b = ws.open_run(f"features/{PLANTED_MODEL}_bf16", 0)["features"].values
    print(f"demo ({seconds:g} s at 2 fps, {r['fp32'].size} voxels), {PLANTED_MODEL} at "
          f"lags 4-7 s: features max abs diff {np.abs(a - b).max():.3g} (max |fp32| "
          f"{np.abs(a).max():.3g}); mean r_test_cv fp32 {r['fp32'].mean():.4f}, bf16 "
          f"{r['bf16'].mean():.4f} (change {r['bf16'].mean() - r['fp32'].mean():+.4f}); "
          f"largest per-voxel change {np.abs(r['bf16'] - r['fp32']).max():.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--models", default="resnet50,vgg16")
    ap.add_argument("--demo-r", action="store_true",
                    help="measure the change of the demo's test r instead")
    ap.add_argument("--demo-seconds", type=float, default=100.0)
    args = ap.parse_args()
    if args.demo_r:
        demo_r(args.demo_seconds)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"oneDNN: {torch.backends.mkldnn.is_available()}, CPU bf16 instructions: "
          f"{_bf16_flags() or 'none (bf16 is emulated)'}")
    frames = torch.randint(0, 256, (args.frames, 224, 224, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    for model in args.models.split(","):
        measure(model, frames)


if __name__ == "__main__":
    main()
