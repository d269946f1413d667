"""`make demo`: run the stages that exist on a generated clip and say what they made.

Run as ``python -m pipeline.demo [--workdir demo_workspace]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stores.workspace import Workspace


def run_demo(workdir: Path, seconds: float = 20.0) -> dict:
    """Generate a synthetic clip in ``workdir`` and run the frames stage on it."""
    from pipeline.frames import run_frames_stage
    from pipeline.synthetic import write_moving_video

    workdir.mkdir(parents=True, exist_ok=True)
    video = workdir / "synthetic_clip.mp4"
    if not video.exists():
        write_moving_video(video, seconds)
    ws = Workspace(workdir / "voxelflow.zarr")
    summary = run_frames_stage(ws, [video], "demo", fps=20, size=224, progress=False)
    tree = ws.open_tree()
    one_second = tree["frames/demo"].sel(time=slice(1, 2))["run-000"]
    return {"video": video, "store": ws.path, "frames": summary,
            "one_second": int(one_second.sizes["time"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("demo_workspace"))
    args = parser.parse_args(argv)
    out = run_demo(args.workdir)
    print(f"generated clip : {out['video']}")
    print(f"workspace      : {out['store']}")
    print(f"frames         : /{out['frames']['group']} {out['frames']['frames']} frames at 20 fps, "
          f"224x224 RGB")
    print(f"query by time  : frames between 1 s and 2 s -> {out['one_second']} frames")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
