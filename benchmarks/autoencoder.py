"""Autoencoder training throughput against a bare training loop, and memory vs length.

    python benchmarks/autoencoder.py                     # 224x224, batch 8, 3 steps x 3 pairs
    python benchmarks/autoencoder.py --size 64 --batch 16 --steps 6 --repeats 3

Prints, for the ResNet-50 autoencoder on the CPU with one batch size:

* pipeline frames/s: ``train_autoencoder``'s own loop (shuffle-buffer stream from the
  Zarr frames in a reader thread, normalise, forward, MSE, backward, AdamW step, loss
  to the bar), from its summary (``steps * batch / loop seconds``);
* bare frames/s: the same model (same init, train mode) and batch size, on one ready,
  normalised batch: ``zero_grad; loss = mse(model(x), x); loss.backward(); opt.step()``
  with the trainer's fused AdamW and denormals flushed to zero, as in the trainer --
  nothing else (``bare fwd+bwd`` is the same without ``opt.step()``, printed too);
* their ratio, paired: bare then pipeline, ``--repeats`` times; the median of the
  per-pair ratios is the figure (a pair sees about the same load on a shared machine);
* the time of one checkpoint save (model + AdamW state) and what it costs per step at
  the default ``--checkpoint-every 100``;
* peak RSS (``VmHWM``) of a fresh process training ``--rss-steps`` steps on a short
  and on a long frames group (``--short`` / ``--long`` frames, shuffle buffer
  ``--rss-buffer``), and its RSS after the imports: flat if memory does not grow with
  the number of frames.

Frames come from ``../shared/data/big_buck_bunny_0_30.webm`` when present (sampled at
the rate that gives the wanted count), else from a generated clip.  Weights are
``random:0`` (the same cost as ImageNet weights; no download needed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BBB = Path(os.environ.get("VOXELFLOW_SHARED_DATA", ROOT.parent / "shared" / "data")) / \
    "big_buck_bunny_0_30.webm"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def make_frames(store: Path, n_frames: int, name: str, size: int) -> int:
    """Write ``/frames/<name>`` (``size`` px) with about ``n_frames`` frames; return the count."""
    from voxelflow.pipeline.stages.frames import run_frames_stage
    from voxelflow.stores import Workspace

    if BBB.exists():
        video, seconds = BBB, 30.0
    else:
        from voxelflow.pipeline.synthetic.movies import write_moving_video

        seconds = max(10.0, n_frames / 20)
        video = store.parent / f"clip_{int(seconds)}.mp4"
        if not video.exists():
            write_moving_video(video, seconds)
    fps = n_frames / seconds
    summary = run_frames_stage(Workspace(store), [video], name, fps=fps, size=size,
                               progress=False)
    return summary["frames"][0]


def bare_fps(frames, batch: int, steps: int, with_step: bool) -> float:
    """Frames/s of the bare loop on one ready, normalised batch (first step included)."""
    import torch
    import torch.nn.functional as F

    from voxelflow.pipeline.models import build_autoencoder
    from voxelflow.pipeline.stages.train import make_adamw

    torch.manual_seed(0)
    model, backbone = build_autoencoder("random:0")
    model.train()
    opt = make_adamw(list(model.parameters()), 1e-4, 1e-4)  # what the trainer uses
    x = torch.from_numpy(frames[:batch]).permute(0, 3, 1, 2).float()
    mean = torch.tensor(backbone.mean).reshape(1, 3, 1, 1)
    std = torch.tensor(backbone.std).reshape(1, 3, 1, 1)
    x = ((x / 255.0 - mean) / std).contiguous()
    torch.set_flush_denormal(True)  # as the trainer does
    started = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), x)
        loss.backward()
        if with_step:
            opt.step()
        float(loss.item())
    return steps * batch / (time.perf_counter() - started)


def pipeline_run(store: Path, name: str, out: Path, batch: int, steps: int,
                 buffer: int, checkpoint_every: int = 100) -> dict:
    from voxelflow.pipeline.stages.train import train_autoencoder
    from voxelflow.stores import Workspace

    return train_autoencoder(
        Workspace(store), name, out, train_runs=[0], steps=steps, batch_size=batch, lr=1e-4,
        weights="random:0", shuffle_buffer=buffer, checkpoint_every=checkpoint_every,
        overwrite=True, progress=False, preview=False)


def rss_child(store: str, name: str, out: str, batch: int, steps: int, buffer: int) -> None:
    """Runs in a fresh process: RSS after imports, train, peak RSS (VmHWM)."""
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import voxelflow.pipeline.stages.features  # noqa: F401
    import voxelflow.pipeline.stages.train  # noqa: F401

    def status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    after_imports = status("VmRSS")
    summary = pipeline_run(Path(store), name, Path(out), batch, steps, buffer)
    print(json.dumps({"after_imports_mib": after_imports, "peak_mib": status("VmHWM"),
                      "n_train": summary["n_train"], "frames_per_s": summary["frames_per_s"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224, help="frame side (default 224)")
    ap.add_argument("--batch", type=int, default=8, help="frames per step (default 8)")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed run (default 3)")
    ap.add_argument("--repeats", type=int, default=3, help="bare/pipeline pairs (default 3)")
    ap.add_argument("--frames", type=int, default=64, help="frames of the timed group (64)")
    ap.add_argument("--short", type=int, default=256, help="frames of the short RSS group")
    ap.add_argument("--long", type=int, default=2048, help="frames of the long RSS group")
    ap.add_argument("--rss-steps", type=int, default=2, help="steps of each RSS run (2)")
    ap.add_argument("--rss-buffer", type=int, default=128,
                    help="shuffle buffer (frames) of the RSS runs (128)")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS,
                    metavar=("STORE", "NAME", "OUT", "BATCH", "STEPS", "BUFFER"))
    args = ap.parse_args()
    if args.child:
        store, name, out, batch, steps, buffer = args.child
        rss_child(store, name, out, int(batch), int(steps), int(buffer))
        return

    import torch

    from voxelflow.stores import Workspace

    print(f"start: {uptime()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; size {args.size}, batch {args.batch}, {args.steps} steps "
          f"per run, {args.repeats} pairs")
    with tempfile.TemporaryDirectory(prefix="vf-ae-bench-") as tmp:
        tmp = Path(tmp)
        store = tmp / "ws.zarr"
        n = make_frames(store, args.frames, "timed", args.size)
        frames = Workspace(store).read_array("frames/timed/run-000", "frames",
                                             slice(0, args.batch))
        ratios, rows = [], []
        for rep in range(args.repeats):
            bare = bare_fps(frames, args.batch, args.steps, with_step=True)
            s = pipeline_run(store, "timed", tmp / "ae.pt", args.batch, args.steps,
                             buffer=1024)
            pipe = s["frames_per_s"]
            ratios.append(pipe / bare)
            rows.append((bare, pipe, s.get("save_s")))
            print(f"pair {rep + 1}: bare {bare:.2f} frames/s, pipeline {pipe:.2f} frames/s, "
                  f"ratio {pipe / bare:.3f}  ({uptime()})", flush=True)
        fb = bare_fps(frames, args.batch, args.steps, with_step=False)
        print(f"bare fwd+bwd without opt.step(): {fb:.2f} frames/s "
              f"(pipeline/this, last pair: {rows[-1][1] / fb:.3f})")
        print(f"RESULT ratio pipeline/bare (median of {args.repeats} pairs): "
              f"{statistics.median(ratios):.3f}  [{', '.join(f'{r:.3f}' for r in ratios)}]; "
              f"{n} frames of {args.size}x{args.size}")
        save = rows[-1][2]
        step_s = args.batch / rows[-1][1]
        if save is not None:
            print(f"checkpoint save: {save:.2f} s ({(tmp / 'ae.pt').stat().st_size / 2**20:.0f} "
                  f"MiB); at --checkpoint-every 100: {save / (100 * step_s) * 100:.2f} % of "
                  f"the step time")

        if not args.skip_rss:
            for label, count in (("short", args.short), ("long", args.long)):
                got = make_frames(store, count, label, args.size)
                res = subprocess.run(
                    [sys.executable, __file__, "--child", str(store), label,
                     str(tmp / f"rss_{label}.pt"), str(args.batch), str(args.rss_steps),
                     str(args.rss_buffer)], capture_output=True, text=True, cwd=ROOT)
                if res.returncode:
                    print(res.stderr)
                    raise SystemExit(res.returncode)
                info = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"RSS {label}: {got} frames, {args.rss_steps} steps of {args.batch}, "
                      f"buffer {args.rss_buffer}: after imports {info['after_imports_mib']:.0f} "
                      f"MiB, peak {info['peak_mib']:.0f} MiB "
                      f"(peak - imports {info['peak_mib'] - info['after_imports_mib']:.0f} MiB)",
                      flush=True)
    print(f"end: {uptime()}")


if __name__ == "__main__":
    main()
