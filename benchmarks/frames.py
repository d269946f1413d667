"""Frames stage benchmark: write overhead and memory against video length.

Prints
1. frames/s of the full stage (decode + resize + Zarr write) on the real clip, and of
   decode + resize alone (same sampling, same code, no store) measured in the same run,
   and their ratio (the write overhead);
2. peak RSS of the stage (a fresh subprocess each) on a generated 30 s and 10 min video,
   and their ratio (must be within 20 %).

    .venv/bin/python benchmarks/frames.py [--clip PATH] [--long-seconds 600]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from voxelflow.pipeline.stages.frames import frame_index_at, iter_sampled_frames, probe_video, run_frames_stage, sample_times  # noqa: E402
from voxelflow.pipeline.synthetic.movies import write_moving_video  # noqa: E402
from voxelflow.stores import Workspace  # noqa: E402

DEFAULT_CLIP = ROOT.parent / "shared" / "data" / "big_buck_bunny_0_30.webm"


def decode_resize_only(clip: Path, fps: float, size: int) -> tuple[int, float]:
    """Baseline: the stage's own decode + sampling + resize, frames discarded."""
    t0 = time.perf_counter()
    info = probe_video(clip)
    times = sample_times(info.end_s, fps)
    index = frame_index_at(info.pts_s, times)
    n = 0
    checksum = 0
    for frame in iter_sampled_frames(info, index, 0, size, "squash"):
        checksum += int(frame[0, 0, 0])
        n += 1
    return n, time.perf_counter() - t0


def full_stage(clip: Path, fps: float, size: int, store: Path) -> tuple[int, float]:
    """The whole stage into a new store (nothing to skip)."""
    t0 = time.perf_counter()
    summary = run_frames_stage(Workspace(store), [clip], "bench", fps=fps, size=size,
                               progress=False)
    return sum(summary["frames"]), time.perf_counter() - t0


def child_peak_rss(video: Path, workdir: Path) -> dict:
    """Run the stage in a fresh interpreter; return its peak RSS (MiB) and frame count."""
    code = (
        "import json,resource,sys;"
        "from voxelflow.pipeline.stages.frames import run_frames_stage;from voxelflow.stores import Workspace;"
        "s=run_frames_stage(Workspace(%r),[%r],'m',fps=20,size=224,progress=False);"
        "print(json.dumps({'frames':sum(s['frames']),"
        "'rss_mib':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))"
    ) % (str(workdir / f"{video.stem}.zarr"), str(video))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    parser.add_argument("--fps", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--short-seconds", type=float, default=30)
    parser.add_argument("--long-seconds", type=float, default=600)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.clip.exists():
            # Warm the page cache and imports, then alternate to share any drift.
            decode_resize_only(args.clip, args.fps, args.size)
            base, stage = [], []
            for rep in range(2):
                n, dt = decode_resize_only(args.clip, args.fps, args.size)
                base.append(n / dt)
                n, dt = full_stage(args.clip, args.fps, args.size, work / f"bench{rep}.zarr")
                stage.append(n / dt)
            b, s = max(base), max(stage)
            print(f"real clip {args.clip.name}: {n} frames at {args.fps:g} fps, {args.size} px")
            print(f"  decode+resize        : {b:8.1f} frames/s")
            print(f"  decode+resize+write  : {s:8.1f} frames/s")
            print(f"  ratio stage/baseline : {s / b:8.3f}  (write overhead {100 * (1 - s / b):.1f} %)")
        else:
            print(f"real clip not found ({args.clip}); skipping throughput part")

        rows = []
        for seconds in (args.short_seconds, args.long_seconds):
            video = work / f"gen_{int(seconds)}s.mp4"
            t0 = time.perf_counter()
            write_moving_video(video, seconds, size=(180, 320))
            gen = time.perf_counter() - t0
            res = child_peak_rss(video, work)
            rows.append(res)
            print(f"generated {seconds:6.0f} s video ({gen:.0f} s to make): {res['frames']:6d} frames, "
                  f"peak RSS {res['rss_mib']:.0f} MiB")
        ratio = rows[1]["rss_mib"] / rows[0]["rss_mib"]
        print(f"peak RSS ratio long/short: {ratio:.3f} (target within 1.20)")
        print(f"parent peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
