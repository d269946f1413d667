"""The study's scale on this machine: (a) every frame at 20 fps vs (b) needed frames only.

The study: 4,797 s of stimulus (the real Big Buck Bunny clip looped), BOLD at a TR of
1 s, lag sets 4 / 4-7 / 4-6 / 4-5.5 s, ``aggregate = "last"``.  The number of forward
passes of (b) is exact: :func:`needed_frame_indices` (the design's own rule) on the
full 95,940-frame grid.  Stage times are extrapolated from rates measured here on a
slice: decoding the real clip (all frames kept vs the needed ones), the bare forward
of each network (random weights; the same work as trained ones) at 224 px, and the
autoencoder's training step.  The fit is the same in (a) and (b) (same design rows)
and left out of the ratio.

The autoencoder trains for 10 epochs on its training split (the frames before the
earliest frame any of the 300 test samples reads, :func:`first_test_frame`): in (a)
every frame of it, in (b) with ``train_frames = "needed"`` the needed frames of it
(exact counts).  With the default ``train_frames = "all"`` the plan keeps every frame
while the autoencoder trains, for every model, so (b) is then (a).  The study's total
is decoding + the three models' forward passes (the autoencoder's code is a ResNet-50
trunk forward: ResNet-50's rate) + the training.

    .venv/bin/python benchmarks/study.py [--frames 16] [--counts-only]
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
TEST_SAMPLES = 300


def needed_count() -> tuple[int, int]:
    grid = sample_times(STUDY_S, FPS)
    bold = np.arange(int(STUDY_S / TR)) * TR
    return grid.size, needed_frame_indices(grid, bold, LAG_SETS, TR).size


def training_counts() -> tuple[int, int]:
    """Frames the autoencoder trains on: every frame of its training split, and the
    needed frames of it (``train_frames = "needed"``); exact, from the design's rules."""
    from voxelflow.pipeline.design.lags import first_test_frame

    grid = sample_times(STUDY_S, FPS)
    bold = np.arange(int(STUDY_S / TR)) * TR
    _, first = first_test_frame([grid], [bold], LAG_SETS, TR, test_samples=TEST_SAMPLES)
    needed = needed_frame_indices(grid, bold, LAG_SETS, TR)
    return first, int((needed < first).sum())


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
    ap.add_argument("--counts-only", action="store_true",
                    help="print the exact frame counts only (no timing: seconds)")
    args = ap.parse_args()
    n_all, n_needed = needed_count()
    train_all, train_needed = training_counts()
    print(f"study grid {n_all} frames; needed by the 4 lag sets: {n_needed} "
          f"({n_all / n_needed:.1f}x fewer forward passes)")
    print(f"autoencoder training split ({TEST_SAMPLES} test samples): {train_all} frames, "
          f"{train_needed} of them needed ({train_all / train_needed:.1f}x fewer steps "
          f"per epoch with train_frames = \"needed\")")
    if args.counts_only:
        return
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
    train_a, train_b = (AE_EPOCHS * n / ae / 3600 for n in (train_all, train_needed))
    print(f"autoencoder training: {ae:.2f} frames/s, {AE_EPOCHS} epochs -> (a) every "
          f"frame {train_a:.1f} h  (b) needed frames {train_b:.1f} h  ratio "
          f"{train_a / train_b:.1f}x")
    # the three models' forward passes (the autoencoder's code: a ResNet-50 trunk)
    per_frame = 2 / rates["resnet50"] + 1 / rates["vgg16"]
    total_a = (n_all / dec_all + n_all * per_frame) / 3600 + train_a
    total_b = (n_all / dec_needed + n_needed * per_frame) / 3600 + train_b
    print(f"study total, default train_frames = \"all\" (every frame kept while the "
          f"autoencoder trains): (a) {total_a:.1f} h  (b) {total_a:.1f} h  ratio 1.0x")
    print(f"study total, train_frames = \"needed\": (a) {total_a:.1f} h  (b) "
          f"{total_b:.1f} h  ratio {total_a / total_b:.1f}x")


if __name__ == "__main__":
    main()
