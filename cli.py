"""voxelflow command line: parses arguments and calls one pipeline function per command.

Errors in the user's input (``VoxelflowError``) are printed as one line,
``voxelflow: error: <what and which file, and the fix>``, with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from pipeline.errors import VoxelflowError
from stores.workspace import DEFAULT_STORE, Workspace

EXIT_INPUT_ERROR = 2


def _positive_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _store_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=DEFAULT_STORE,
                        help=f"workspace Zarr group (default ./{DEFAULT_STORE})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a group made with other parameters")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bar")


# ---------------------------------------------------------------------- frames
def add_frames(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("frames", help="decode videos into /frames/NAME (one run per video)")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files, one run each")
    p.add_argument("--name", required=True, help="stimulus name: writes /frames/NAME")
    p.add_argument("--fps", type=_positive_float, default=20.0, help="sampling rate (default 20)")
    p.add_argument("--size", type=int, default=224, help="output frames are SIZE x SIZE (224)")
    p.add_argument("--resize", choices=["squash", "crop"], default="squash",
                   help="squash the whole picture, or crop the centre square (default squash)")
    _store_arg(p)
    p.set_defaults(func=cmd_frames)


def cmd_frames(args: argparse.Namespace) -> int:
    from pipeline.frames import run_frames_stage

    summary = run_frames_stage(
        Workspace(args.store), args.videos, args.name, fps=args.fps, size=args.size,
        resize=args.resize, overwrite=args.overwrite, progress=args.progress,
    )
    counts = ", ".join(str(n) for n in summary["frames"])
    print(f"wrote /{summary['group']} in {args.store}: {summary['runs']} run(s), "
          f"{counts} frames ({summary['blocks_written']} blocks written, "
          f"{summary['blocks_skipped']} already done)")
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_frames]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxelflow",
        description="Streaming encoding models: movie -> frames -> CNN features -> "
                    "lagged ridge onto every voxel.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``voxelflow`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VoxelflowError as exc:
        print(f"voxelflow: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("voxelflow: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
