"""``--precision bf16`` against fp32 on the CPU: frames/s and feature differences.

    .venv/bin/python benchmarks/precision.py [--frames 16] [--models resnet50,vgg16]

For each model (random weights, the study's default layer, 224 px frames of the real
clip or random frames), runs the pipeline's :class:`FeatureExtractor` in fp32 and in
bf16 on the same frames, and prints frames/s of each (best of two passes), their
ratio, and the max abs / max relative difference of the features.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--models", default="resnet50,vgg16")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"oneDNN: {torch.backends.mkldnn.is_available()}, CPU bf16 instructions: "
          f"{_bf16_flags() or 'none (bf16 is emulated)'}")
    frames = torch.randint(0, 256, (args.frames, 224, 224, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    for model in args.models.split(","):
        measure(model, frames)


if __name__ == "__main__":
    main()
