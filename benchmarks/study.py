"""The study's scale on this machine: (a) every frame at 20 fps vs (b) needed frames only.

The study: 4,797 s of stimulus (the real Big Buck Bunny clip looped), BOLD at a TR of
1 s, lag sets 4 / 4-7 / 4-6 / 4-5.5 s, ``aggregate = "last"``.  The number of forward
passes of (b) is exact: :func:`needed_frame_indices` (the design's own rule) on the
full 95,940-frame grid.  Stage times are extrapolated from rates measured here on a
slice: decoding the real clip (all frames kept vs the needed ones), the bare forward
of each network (random weights; the same work as trained ones) at 224 px, and the
autoencoder's training step.  The fit is the same in (a) and (b) (same design rows)
and left out of the ratio.

    .venv/bin/python benchmarks/study.py [--frames 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from voxelflow.pipeline.design.lags import needed_frame_indices
from voxelflow.pipeline.stages.frames import run_frames_stage, sample_times
from voxelflow.stores import Workspace

STUDY_S, FPS, TR = 4797.0, 20.0, 1.0
LAG_SETS = [[4.0], [4.0, 5.0, 6.0, 7.0], [4.0, 5.0, 6.0], [4.0, 4.5, 5.0, 5.5]]
CLIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "big_buck_bunny_0_30.webm"
AE_EPOCHS = 10


def needed_count() -> tuple[int, int]:
    grid = sample_times(STUDY_S, FPS)
    bold = np.arange(int(STUDY_S / TR)) * TR
    return grid.size, needed_frame_indices(grid, bold, LAG_SETS, TR).size


def decode_rates() -> tuple[float, float]:
    """Grid frames per second of wall time: every frame kept, and the needed ones kept."""
    from voxelflow.pipeline.stages.needed_frames import NeededFrames

    rates = []
    with tempfile.TemporaryDirectory() as d:
        ws = Workspace(Path(d) / "ws.zarr")
        times = Path(d) / "times.txt"
        grid = sample_times(30.0, FPS)
        need = needed_frame_indices(grid, np.arange(30) * TR, LAG_SETS, TR)
        times.write_text("\n".join(repr(float(t)) for t in grid[need]))
        for name, needed in (("all", None), ("needed", NeededFrames(times_file=times))):
            t0 = time.perf_counter()
            run_frames_stage(ws, [CLIP], name, fps=FPS, size=224, needed=needed,
                             progress=False)
            rates.append(grid.size / (time.perf_counter() - t0))
    return rates[0], rates[1]


def forward_rate(model: str, n: int) -> float:
    import torch
    import torchvision

    net = getattr(torchvision.models, model)(weights=None).eval()
    net = net.to(memory_format=torch.channels_last)
    x = torch.rand(n, 3, 224, 224).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        net(x[:2])
        t0 = time.perf_counter()
        net(x)
    return n / (time.perf_counter() - t0)


def train_rate(n: int) -> float:
    """Autoencoder training steps: frames per second (forward + backward + step)."""
    import torch

    from voxelflow.pipeline.models.autoencoder import _skeleton_autoencoder

    net = _skeleton_autoencoder().to_empty(device="cpu")  # built on the meta device
    for module in net.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    net.train()
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    x = torch.rand(n, 3, 224, 224)
    t0 = time.perf_counter()
    loss = torch.nn.functional.mse_loss(net(x), x)
    loss.backward()
    opt.step()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16, help="frames per measured forward")
    args = ap.parse_args()
    n_all, n_needed = needed_count()
    print(f"study grid {n_all} frames; needed by the 4 lag sets: {n_needed} "
          f"({n_all / n_needed:.1f}x fewer forward passes)")
    dec_all, dec_needed = decode_rates()
    print(f"decode (real clip, 224 px): all kept {dec_all:.0f}, needed kept "
          f"{dec_needed:.0f} grid frames/s")
    rates = {m: forward_rate(m, args.frames) for m in ("resnet50", "vgg16")}
    for model, rate in rates.items():
        a = n_all / dec_all + n_all / rate
        b = n_all / dec_needed + n_needed / rate
        print(f"{model:>22}: {rate:6.2f} frames/s -> (a) {a / 3600:7.2f} h  (b) "
              f"{b / 3600:6.2f} h  ratio {a / b:5.1f}x")
    ae = train_rate(max(2, args.frames // 2))
    hours = AE_EPOCHS * n_all / ae / 3600
    print(f"autoencoder training: {ae:.2f} frames/s, {AE_EPOCHS} epochs over every frame "
          f"{hours:.1f} h in (a) and (b) alike (training keeps every frame)")


if __name__ == "__main__":
    main()
