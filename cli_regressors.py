"""``voxelflow events`` and ``voxelflow import-features``: features that are not computed
from frames (events files, tables, arrays, Zarr/netCDF files), parsed here and passed
to one pipeline function each (the rest of the command line is :mod:`voxelflow.cli`).
"""

from __future__ import annotations

import argparse
from typing import Sequence

from voxelflow.cli_args import add_store_options as _store_only
from voxelflow.cli_args import positive_float as _positive_float
from voxelflow.stores.workspace import Workspace


def _comma_list(text: str | None) -> list[str] | None:
    return None if text is None else [v for v in text.split(",") if v.strip()]


def add_events(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "events", help="BIDS events files into boxcar features /features/NAME",
        description="Turn events files (tab-separated, one per run, in order; onset and "
                    "duration in seconds) into /features/NAME (time, feature) float32 at "
                    "RATE Hz: per sample, the fraction of its interval covered by each "
                    "feature's events.")
    p.add_argument("files", nargs="+", metavar="EVENTS", help="events .tsv files, one per run")
    p.add_argument("--name", required=True, help="writes /features/NAME")
    p.add_argument("--rate", required=True, type=_positive_float, metavar="HZ",
                   help="samples per second of the features")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--columns", metavar="COL[,COL]", default=None,
                      help="categorical column(s): one feature per category "
                           "(default trial_type)")
    kind.add_argument("--amplitude", metavar="COL", default=None,
                      help="one feature whose boxcar height is the numeric column COL")
    p.add_argument("--duration-from", default="column", metavar="column|fixed:S",
                   help="event lengths from the duration column (default) or S seconds each")
    p.add_argument("--categories", metavar="A,B,...", default=None,
                   help="the categories, in this order (default: the first run's, sorted; "
                        "then every run must have the same)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--bold", metavar="SUBJECT",
                        help="run lengths from /bold/SUBJECT (volumes x TR)")
    length.add_argument("--duration", metavar="S[,S...]",
                        help="run lengths in seconds: one for all runs or one per run")
    _store_only(p)
    p.set_defaults(func=cmd_events)


def cmd_events(args: argparse.Namespace) -> int:
    from voxelflow.pipeline.stages.events import run_events_stage

    duration = None
    if args.duration is not None:
        duration = [_float_arg(v, "--duration") for v in _comma_list(args.duration)]
    s = run_events_stage(
        Workspace(args.store), args.files, args.name, args.rate,
        columns=_comma_list(args.columns), amplitude=args.amplitude,
        duration_from=args.duration_from, categories=_comma_list(args.categories),
        bold=args.bold, duration=duration, overwrite=args.overwrite)
    print(f"wrote /{s['group']} in {args.store}: {s['runs']} run(s), "
          f"{_counts(s['samples'])} samples at {args.rate:g} Hz, {s['n_features']} "
          f"feature(s): {_shown(s['feature_names'])} ({sum(s['events'])} events; "
          f"{s['blocks_written']} blocks written, {s['blocks_skipped']} already done)")
    return 0


def add_import_features(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-features", help="tables, arrays or Zarr/netCDF files into /features/NAME",
        description="Store features computed elsewhere (one file per run, in order) as "
                    "/features/NAME (time, feature) float32: .tsv/.csv tables (a column "
                    "per feature), .npy/.npz arrays (time x feature), or xarray datasets "
                    "(.zarr, .nc) with a time coordinate in seconds.")
    p.add_argument("files", nargs="+", metavar="FILE", help="feature files, one per run")
    p.add_argument("--name", required=True, help="writes /features/NAME")
    times = p.add_mutually_exclusive_group()
    times.add_argument("--rate", type=_positive_float, metavar="HZ", default=None,
                       help="row k is at k / HZ seconds (tables, arrays)")
    times.add_argument("--times-column", metavar="COL", default=None,
                       help="a table's column of times in seconds from the run's onset")
    p.add_argument("--variable", metavar="NAME", default=None,
                   help="the variable of a .zarr/.nc dataset (default: its only one with "
                        "a time dimension)")
    _store_only(p)
    p.set_defaults(func=cmd_import_features)


def cmd_import_features(args: argparse.Namespace) -> int:
    from voxelflow.pipeline.stages.imported import run_import_stage

    s = run_import_stage(Workspace(args.store), args.files, args.name, rate=args.rate,
                         times_column=args.times_column, variable=args.variable,
                         overwrite=args.overwrite)
    note = (f"; values of dtype {', '.join(s['converted'])} stored as float32"
            if s["converted"] else "")
    print(f"wrote /{s['group']} in {args.store}: {s['runs']} run(s), "
          f"{_counts(s['samples'])} samples, {s['n_features']} feature(s): "
          f"{_shown(s['feature_names'])} ({s['blocks_written']} blocks written, "
          f"{s['blocks_skipped']} already done{note})")
    return 0


def _counts(values: Sequence[int]) -> str:
    return (f"{len(values)} x {values[0]}" if len(set(values)) == 1
            else " + ".join(str(v) for v in values))


def _shown(names: Sequence[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _float_arg(text: str, flag: str) -> float:
    from voxelflow.pipeline.errors import InputError

    try:
        return float(text)
    except ValueError:
        raise InputError(f"{flag} must be numbers in seconds (got {text!r})") from None
