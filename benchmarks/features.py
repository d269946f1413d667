"""Features stage throughput and memory against a bare ``model(x)`` loop.

    python benchmarks/features.py                  # resnet50: 8 pairs of 64 frames; RSS 160 / 600
    python benchmarks/features.py --model vgg16 --frames 32 --repeats 4 --short 32 --long 128
    python benchmarks/features.py --sparse-every 10 --no-rss      # the needed-frames path
    python benchmarks/features.py --model r3d_18 --size 112 --clip-frames 16 --batch-size 4 \
        --frames 32 --no-rss                                       # a video model

Prints, for one model on one device with one batch size:

* pipeline frames/s: the stage's own loop (read frames from Zarr, normalise, forward,
  write features, mark blocks done), as reported by ``run_features_stage``;
* bare frames/s: ``model(x)`` on ready, normalised batches of the same frames, same
  batch size, no I/O: the torchvision model in channels_last (faster than contiguous
  on CPU; contiguous is measured once and printed too); for a video model
  (``--clip-frames``) the clips of the same frames, in channels_last_3d;
* their ratio, paired: bare and pipeline run back to back on the same frames,
  ``--repeats`` times (bare first in even pairs, the pipeline first in odd ones, so
  a drift within a pair favours neither), and the median of the per-pair ratios is the figure (on a
  shared machine the load changes from minute to minute; a pair sees about the same
  load, so the median pair ratio is robust where best-of-each is not);
* the forward share of the stage's loop: time in the forward passes over the loop's
  wall time, measured inside the same run (load changes cannot skew it; what is left
  is the pipeline's own overhead that the threads did not hide);
* peak RSS (``VmHWM``, not ``ru_maxrss``, which Linux carries over from the parent
  across fork + exec) of a fresh process running the stage on ``--short`` and on
  ``--long`` frames, and its RSS after the imports: flat if memory does not grow with
  the number of frames.

Frames come from ``../shared/data/big_buck_bunny_0_30.webm`` when present (sampled
at the rate that gives the wanted count), else from a generated clip.  Weights are
``random:0`` (same cost as ImageNet weights; no download needed).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder is sys.path[0], and benchmarks/statistics.py would shadow
# the standard library's statistics module (no quantiles: the summary line crashed).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

BBB = Path(os.environ.get("VOXELFLOW_SHARED_DATA", ROOT.parent / "shared" / "data")) / \
    "big_buck_bunny_0_30.webm"


def make_frames(store: Path, n_frames: int, name: str, size: int = 224,
                sparse_every: int = 0) -> int:
    """Write ``/frames/<name>`` with about ``n_frames`` frames; return the count.

    ``sparse_every`` K > 1: a sparse group (the needed-frames path, ``--times FILE``)
    holding every K-th time of a grid K times denser, so the same count is stored."""
    from voxelflow.pipeline.stages.frames import run_frames_stage, sample_times
    from voxelflow.pipeline.stages.needed_frames import NeededFrames
    from voxelflow.stores import Workspace

    if BBB.exists():
        video, seconds = BBB, 30.0
    else:
        from voxelflow.pipeline.synthetic.movies import write_moving_video

        seconds = max(10.0, n_frames / 20)
        video = store.parent / "clip.mp4"
        if not video.exists():
            write_moving_video(video, seconds)
    fps = n_frames / seconds
    needed = None
    if sparse_every > 1:
        fps *= sparse_every
        times = store.parent / f"{name}-times.txt"
        grid = sample_times(seconds, fps)
        times.write_text("\n".join(repr(float(t)) for t in grid[::sparse_every]))
        needed = NeededFrames(times_file=times)
    summary = run_frames_stage(Workspace(store), [video], name, fps=fps, size=size,
                               needed=needed, progress=False)
    return summary["frames"][0]


def ready_inputs(frames, clip_frames: int):
    """Normalised float32 model inputs: (N, 3, H, W) frames, or for a video model
    (N, 3, T, H, W) clips of the ``clip_frames`` frames ending at each frame (the
    first repeated before the start; the same work as the stage's clips)."""
    import torch

    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    x = (x / 255.0 - mean) / std
    if clip_frames <= 1:
        return x
    ends = torch.arange(len(x))
    index = (ends[:, None] - torch.arange(clip_frames - 1, -1, -1)[None, :]).clamp(min=0)
    return x[index].permute(0, 2, 1, 3, 4)  # (N, T, 3, H, W) -> (N, 3, T, H, W)


def bare_fps(model: str, frames, batch: int, channels_last: bool,
             clip_frames: int = 0) -> float:
    """``model(x)`` frames/s on ready, normalised batches (no I/O, no conversion)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(model).eval()
    x = ready_inputs(frames, clip_frames)
    last = torch.channels_last_3d if clip_frames > 1 else torch.channels_last
    fmt = last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    batches = [x[i:i + batch].contiguous(memory_format=fmt) for i in range(0, len(x), batch)]
    with torch.inference_mode():
        net(batches[0])  # warm-up (oneDNN primitive creation)
        start = time.perf_counter()
        for b in batches:
            net(b)
        elapsed = time.perf_counter() - start
    return len(x) / elapsed


def pipeline_fps(store: Path, frames_name: str, model: str, batch: int, device: str,
                 clip_frames: int = 0, clip_fps: float | None = None) -> dict:
    from voxelflow.pipeline.stages.features import run_features_stage
    from voxelflow.stores import Workspace

    Workspace(store).delete(f"features/bench-{model}")  # compute everything, every time
    clip = dict(clip_frames=clip_frames, clip_fps=clip_fps) if clip_frames > 1 else {}
    return run_features_stage(Workspace(store), frames_name, model, weights="random:0",
                              device=device, batch_size=batch, name=f"bench-{model}",
                              overwrite=True, progress=False, **clip)


def _vm(field: str) -> float:
    """``VmRSS``/``VmHWM`` of this process in MiB (``/proc/self/status``)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """Run the stage once in this fresh process and print its peak RSS."""
    import torch  # noqa: F401 - count the imports in the baseline
    import torchvision  # noqa: F401

    import voxelflow.pipeline.stages.features  # noqa: F401

    after_imports = _vm("VmRSS")
    summary = pipeline_fps(Path(args.store), args.child, args.model, args.batch_size,
                           args.device)
    print(json.dumps({"frames": summary["frames"][0], "peak_rss_mib": _vm("VmHWM"),
                      "imports_rss_mib": after_imports,
                      "frames_per_s": summary["frames_per_s"]}))


def rss_run(store: Path, name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--store", str(store), "--model",
           args.model, "--batch-size", str(args.batch_size), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--frames", type=int, default=64, help="frames per throughput run")
    parser.add_argument("--short", type=int, default=160, help="frames, short memory run")
    parser.add_argument("--long", type=int, default=600, help="frames, long memory run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=8, help="bare/pipeline pairs")
    parser.add_argument("--size", type=int, default=224, help="frame side, px")
    parser.add_argument("--sparse-every", type=int, default=0,
                        help="K: a sparse frames group (every K-th time of a K times "
                        "denser grid), the needed-frames path")
    parser.add_argument("--clip-frames", type=int, default=0,
                        help="a video model's clip length (frames)")
    parser.add_argument("--clip-fps", type=float, default=None,
                        help="a video model's clip rate (default: the frames' rate)")
    parser.add_argument("--no-rss", dest="rss", action="store_false",
                        help="skip the two fresh-process memory runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    import torch

    if args.clip_frames > 1:
        args.rss = False  # the memory runs measure image models' groups
    print(f"model {args.model}, device {args.device}, batch {args.batch_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; load before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="vf-bench-") as tmp:
        store = Path(tmp) / "ws.zarr"
        n_frames = make_frames(store, args.frames, "bench", args.size, args.sparse_every)
        if args.rss:
            make_frames(store, args.short, "short", args.size)
            make_frames(store, args.long, "long", args.size)
        from voxelflow.stores import Workspace

        run = Workspace(store).open_run("frames/bench", 0)
        frames = run["frames"].values
        clip_fps = args.clip_fps
        if args.clip_frames > 1 and clip_fps is None:  # consecutive stored frames
            clip_fps = 1.0 / float(np.median(np.diff(run["time"].values)))
        bare, pipe, ratios, shares = [], [], [], []
        for r in range(args.repeats):
            # alternate which half runs first, so that a drift of the CPU's speed
            # within a pair favours neither
            if r % 2 == 0:
                bare.append(bare_fps(args.model, frames, args.batch_size, True,
                                     args.clip_frames))
            summary = pipeline_fps(store, "bench", args.model, args.batch_size, args.device,
                                   args.clip_frames, clip_fps)
            if r % 2 == 1:
                bare.append(bare_fps(args.model, frames, args.batch_size, True,
                                     args.clip_frames))
            pipe.append(summary["frames_per_s"])
            shares.append(summary["forward_s"] / summary["compute_s"])
            ratios.append(pipe[-1] / bare[-1])
            print(f"  pair {r}: bare model(x) {bare[-1]:.2f}, pipeline {pipe[-1]:.2f} "
                  f"frames/s, ratio {ratios[-1]:.3f}; forward share of the stage's loop "
                  f"{shares[-1]:.3f} (load {os.getloadavg()[0]:.2f})", flush=True)
        contiguous = bare_fps(args.model, frames, args.batch_size, False, args.clip_frames)
        quart = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(f"{n_frames} frames x {args.repeats} pairs: pipeline {statistics.median(pipe):.2f} "
              f"frames/s, bare model(x) {statistics.median(bare):.2f} frames/s (medians); "
              f"ratio: median {statistics.median(ratios):.3f} (quartiles {quart[0]:.3f}, "
              f"{quart[2]:.3f}), best/best {max(pipe) / max(bare):.3f}; forward share of "
              f"the stage's loop: median {statistics.median(shares):.3f}; bare contiguous "
              f"format once: {contiguous:.2f} frames/s", flush=True)
        if args.rss:
            short = rss_run(store, "short", args)
            long = rss_run(store, "long", args)
            print(f"peak RSS (VmHWM): {short['peak_rss_mib']:.0f} MiB for {short['frames']} "
                  f"frames, {long['peak_rss_mib']:.0f} MiB for {long['frames']} frames "
                  f"(growth {long['peak_rss_mib'] - short['peak_rss_mib']:+.0f} MiB); after "
                  f"imports {short['imports_rss_mib']:.0f} / {long['imports_rss_mib']:.0f} MiB; "
                  f"stage frames/s in these runs {short['frames_per_s']:.2f} / "
                  f"{long['frames_per_s']:.2f}")
    print(f"load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
