"""Argument types and option groups shared by the command modules (:mod:`voxelflow.cli`,
:mod:`voxelflow.cli_stimulus`,
:mod:`voxelflow.cli_regressors`)."""

from __future__ import annotations

import argparse

from voxelflow.stores.workspace import DEFAULT_STORE


def positive_float(text: str) -> float:
    """argparse type: a number (its range is checked by the stage, in one line)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_store_options(parser: argparse.ArgumentParser) -> None:
    """--store and --overwrite."""
    parser.add_argument("--store", default=DEFAULT_STORE,
                        help=f"workspace Zarr group (default ./{DEFAULT_STORE})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a group made with other parameters")


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """--scheduler, --workers, --memory-limit: where a stage's blocks run."""
    cluster = parser.add_argument_group("where blocks run (default: this process, threads)")
    cluster.add_argument("--scheduler", metavar="ADDRESS", default=None,
                         help="run blocks on a running Dask cluster, e.g. tcp://HOST:8786")
    cluster.add_argument("--workers", type=int, metavar="N", default=None,
                         help="start a local Dask cluster of N process workers")
    cluster.add_argument("--memory-limit", metavar="SIZE", default=None,
                         help="memory limit per local worker, e.g. 4GiB (with --workers)")


def add_stage_options(parser: argparse.ArgumentParser) -> None:
    """--store, --overwrite, --no-progress and the cluster options of a stage command."""
    add_store_options(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bar")
    add_cluster_options(parser)


def add_clip_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--clip-frames N and --clip-fps F (a video model's clips); ``what`` ends the help."""
    clips = parser.add_argument_group("video models' clips")
    clips.add_argument("--clip-frames", type=int, default=None, metavar="N",
                       help=f"frames per clip ending at each time; {what}")
    clips.add_argument("--clip-fps", type=positive_float, default=None, metavar="F",
                       help="frames per second within a clip: the frames at t - (N-1)/F ... t "
                            "(video models: default 15)")


def int_arg(text: str, flag: str) -> int:
    """``text`` as an integer; one-line error naming ``flag`` otherwise."""
    from voxelflow.pipeline.errors import InputError

    try:
        return int(text)
    except ValueError:
        raise InputError(f"{flag} must be an integer (got {text!r})") from None
