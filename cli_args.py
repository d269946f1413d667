"""Argument types and option groups shared by the command modules (:mod:`voxelflow.cli`,
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
