"""voxelflow command line: parses arguments and calls one pipeline function per command.

Errors in the user's input (``VoxelflowError``) are printed as one line,
``voxelflow: error: <what and which file, and the fix>``, with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from voxelflow.cli_args import add_cluster_options as _cluster_args
from voxelflow.cli_args import add_stage_options as _store_arg
from voxelflow.cli_args import int_arg as _int_arg
from voxelflow.cli_args import positive_float as _positive_float
from voxelflow.cli_regressors import add_events, add_import_features
from voxelflow.cli_stimulus import add_features, add_frames, add_train_autoencoder
from voxelflow.pipeline.execution.cluster import dask_client
from voxelflow.pipeline.errors import InputError, VoxelflowError
from voxelflow.stores.workspace import DEFAULT_STORE, Workspace

EXIT_INPUT_ERROR = 2


# ---------------------------------------------------------------------- bold
def add_bold(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bold", help="ingest BOLD runs (NIfTI, CIFTI, GIFTI or a BIDS dataset) into "
                     "/bold/SUBJECT (time, voxel)",
        description="Stream BOLD runs (4D NIfTI, CIFTI-2 .dtseries.nii or GIFTI .func.gii; "
                    "one run per file, or found in a BIDS dataset with --bids) into "
                    "/bold/SUBJECT: bold (time, voxel) float32, all time points x 4,096 "
                    "voxels per chunk, with time (s from run onset), run, and per-voxel "
                    "i, j, k, valid (and structure, vertex, hemi on surfaces).")
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help=".nii/.nii.gz, .dtseries.nii or .func.gii files, one run each "
                        "(GIFTI: see --hemi); leave out with --bids")
    p.add_argument("--subject", required=True,
                   help="writes /bold/SUBJECT (with --bids: the BIDS subject label)")
    p.add_argument("--bids", metavar="DIR",
                   help="BIDS dataset (raw, with derivatives/ if any) or fMRIPrep derivatives "
                        "folder: the runs of --subject and --task are found with pybids")
    p.add_argument("--task", help="BIDS task label (with --bids)")
    p.add_argument("--session", help="BIDS session label (with --bids)")
    p.add_argument("--space", help="derivative space, e.g. MNI152NLin2009cAsym or fsLR "
                                   "(with --bids: searches the derivatives)")
    p.add_argument("--desc", help="derivative desc label, e.g. preproc (with --bids)")
    p.add_argument("--mask", metavar="MASK",
                   help="NIfTI on the BOLD grid, voxels != 0 are kept (default: computed from "
                        "the mean volume: nilearn EPI mask, else background mask, else Otsu)")
    p.add_argument("--tr", type=_positive_float, default=None, metavar="SECONDS",
                   help="repetition time (default: the BIDS sidecar, else the file header)")
    p.add_argument("--confounds", metavar="STRATEGY",
                   help="regress out fMRIPrep confounds per run, nilearn load_confounds "
                        "strategies, e.g. motion=full,wm_csf=basic,high_pass")
    p.add_argument("--high-pass", type=_positive_float, default=None, metavar="HZ",
                   help="regress out cosine drift terms below HZ per run (nilearn's cosine "
                        "filter; needs no fMRIPrep)")
    p.add_argument("--hemi", nargs="+", choices=["L", "R"], metavar="H",
                   help="GIFTI runs: hemisphere of each file of a run, e.g. L R (files given "
                        "as run1-L run1-R run2-L ...)")
    p.add_argument("--structures", metavar="S[,S]",
                   help="CIFTI runs: brain models to keep, e.g. CORTEX_LEFT,CORTEX_RIGHT "
                        "(default all)")
    p.add_argument("--zscore", action=argparse.BooleanOptionalAction, default=True,
                   help="z-score every voxel within each run (default: --zscore)")
    p.add_argument("--detrend", choices=["none", "linear"], default="none",
                   help="remove a least-squares line per voxel and run first (default none)")
    p.add_argument("--chunk-voxels", type=int, default=None, metavar="N",
                   help="voxels per chunk and per resumable block (default 4096)")
    _store_arg(p)
    p.set_defaults(func=cmd_bold)


def cmd_bold(args: argparse.Namespace) -> int:
    from voxelflow.pipeline.stages.bold import CHUNK_VOXELS, bold_inputs, run_bold_stage

    runs, tr, tr_source, run_attrs = bold_inputs(
        args.runs, bids=args.bids, subject=args.subject, task=args.task,
        session=args.session, space=args.space, desc=args.desc, tr=args.tr)
    summary = run_bold_stage(
        Workspace(args.store), runs, args.subject, mask=args.mask, tr=tr,
        tr_source=tr_source, run_attrs=run_attrs, zscore=args.zscore, detrend=args.detrend,
        confounds=args.confounds, high_pass=args.high_pass, hemis=args.hemi,
        structures=args.structures.split(",") if args.structures else None,
        chunk_voxels=CHUNK_VOXELS if args.chunk_voxels is None else args.chunk_voxels, overwrite=args.overwrite,
        progress=args.progress,
    )
    vols = summary["volumes"]
    counts = (f"{len(vols)} x {vols[0]}" if len(set(vols)) == 1
              else " + ".join(str(n) for n in vols))
    print(f"wrote /{summary['group']} in {args.store}: {summary['runs']} run(s), {counts} "
          f"volumes, {summary['voxels']} voxels, TR {summary['tr']:g} s "
          f"({summary['tr_source']}), mask {summary['mask']} "
          f"({summary['blocks_written']} blocks written, {summary['blocks_skipped']} "
          f"already done)")
    if any(summary["confounds"]):
        print(f"confounds removed per run: {', '.join(map(str, summary['confounds']))} "
              f"regressor(s) (stored as run-NNN/confounds)")
    print(f"invalid voxels: {summary['invalid']} of {summary['voxels']} (constant or NaN in "
          f"at least one run; kept with valid=False, excluded from scoring)")
    return 0


# ---------------------------------------------------------------------- export
def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a per-voxel variable to a NIfTI map",
        description="Write GROUP's variable VAR, (voxel,) or (n, voxel), to a 3D/4D NIfTI on "
                    "the original grid and affine (zeros outside the mask).  The voxels' "
                    "i, j, k come from VAR's coordinates or from the bold group named by "
                    "GROUP's 'bold_group' attr.")
    p.add_argument("group", metavar="GROUP", help="e.g. bold/SUBJECT or fits/EXP/MODEL/LAGS")
    p.add_argument("var", metavar="VAR", help="variable with a voxel dimension, e.g. mean")
    p.add_argument("out", metavar="OUT", help="output file, .nii or .nii.gz")
    p.add_argument("--sel", action="append", metavar="DIM=VALUE[,DIM=VALUE]",
                   help="pick one value along a dimension first, e.g. feature=face,lag=5 "
                        "on a fit's weights (repeatable)")
    p.add_argument("--store", default=DEFAULT_STORE,
                   help=f"workspace Zarr group (default ./{DEFAULT_STORE})")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from voxelflow.pipeline.stages.export import (describe_export, export_variable,
                                                  parse_selection)

    print(describe_export(export_variable(Workspace(args.store), args.group, args.var,
                                          args.out, sel=parse_selection(args.sel))))
    return 0


# ------------------------------------------------------------------------- fit
def add_fit(sub: argparse._SubParsersAction) -> None:
    from voxelflow.pipeline.study.config import STUDY_ALPHAS

    p = sub.add_parser("fit", help="lagged ridge from /features/NAME onto every voxel of /bold/SUBJ")
    p.add_argument("--features", required=True, nargs="+", metavar="NAME",
                   help="features group name (/features/NAME); several: one joint banded "
                        "ridge model, one penalty per features group")
    p.add_argument("--bold", required=True, help="BOLD group name (/bold/SUBJ)")
    p.add_argument("--weightings", metavar="N|FILE",
                   help="several --features: N seeded random weightings of the spaces "
                        "(default 20, --seed) or a .tsv/.npy file, one row per candidate, "
                        "one column per features group")
    p.add_argument("--partition", action="store_true",
                   help="several --features (2 or 3): also fit every sub-model and store "
                        "the unique and shared parts of the test R^2 per voxel")
    p.add_argument("--lags", required=True, help="delays in seconds, e.g. 4 or 4,5,6,7")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in STUDY_ALPHAS),
                   help="regularisation strengths (default: the study's 12)")
    split = p.add_mutually_exclusive_group(required=True)
    split.add_argument("--test-samples", type=int, help="hold out the last N samples")
    split.add_argument("--test-runs", help="hold out whole runs, e.g. 10,11")
    split.add_argument("--test-repeats", action="append", metavar="R,R[,R...]",
                       help="hold out runs that repeat one clip, e.g. 10,11,12: test on the "
                            "first run's features against the mean BOLD of the repeats "
                            "(noise ceiling per voxel); repeat the option for more clips")
    p.add_argument("--cv", default="5", help="CV folds on training data: K contiguous "
                   "blocks (default 5) or 'runs'")
    p.add_argument("--aggregate", choices=["last", "mean"], default="last",
                   help="frame at t-L (last) or mean of frames in [t-L-TR, t-L)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--name", help="fit name: writes /fits/NAME/lags-... (default FEATURES__SUBJ)")
    p.add_argument("--save-weights", action="store_true", help="store weights at the best alpha")
    p.add_argument("--save-predictions", action="store_true", help="store test predictions")
    p.add_argument("--voxel-block", type=int, default=4096, help="voxels per block (4096)")
    _statistics_args(p)
    _store_arg(p)
    p.set_defaults(func=cmd_fit)


def _statistics_args(p: argparse.ArgumentParser) -> None:
    stats = p.add_argument_group("test-set statistics (docs/statistics.md)")
    stats.add_argument("--permutations", type=int, default=1000, metavar="N",
                       help="null draws for per-voxel permutation p-values, BH-FDR and "
                            "max-statistic FWE maps (default 1000; 0: none)")
    stats.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                       help="block-bootstrap resamples of the test set for intervals of "
                            "mean r and paired comparisons (default 1000; 0: none)")
    stats.add_argument("--block-length", type=int, default=10, metavar="SAMPLES",
                       help="test samples (TRs) per block of the permutations and the "
                            "bootstrap (default 10)")
    stats.add_argument("--null", choices=["blocks", "shifts"], default="blocks",
                       help="permutation null: shuffle whole blocks (default) or circular "
                            "shifts of the predictions")
    stats.add_argument("--seed", type=int, default=0,
                       help="seed of the permutations and resamples (default 0)")


def cmd_fit(args: argparse.Namespace) -> int:
    from voxelflow.pipeline.stages.fit import parse_alphas, run_fit_stage
    from voxelflow.pipeline.design.lags import parse_lags
    from voxelflow.pipeline.stats.per_block import StatisticsOptions

    cv = args.cv if args.cv == "runs" else _int_arg(args.cv, "--cv")
    test_runs = ([_int_arg(r, "--test-runs") for r in args.test_runs.split(",")]
                 if args.test_runs else None)
    test_repeats = ([[_int_arg(r, "--test-repeats") for r in group.split(",") if r.strip()]
                     for group in args.test_repeats] if args.test_repeats else None)
    statistics = StatisticsOptions(permutations=args.permutations, bootstrap=args.bootstrap,
                                   block_length=args.block_length, null=args.null,
                                   seed=args.seed)
    options = dict(
        test_samples=args.test_samples, test_runs=test_runs,
        test_repeats=test_repeats, cv=cv, aggregate=args.aggregate, device=args.device,
        name=args.name, save_weights=args.save_weights,
        save_predictions=args.save_predictions, statistics=statistics,
        voxel_block=args.voxel_block, overwrite=args.overwrite, progress=args.progress,
    )
    inputs = (Workspace(args.store), args.features, args.bold, parse_lags(args.lags),
              parse_alphas(args.alphas))
    if len(args.features) == 1:
        if args.weightings is not None or args.partition:
            raise InputError("--weightings and --partition need several --features "
                             "(a joint model); give two or more features groups")
        summary = run_fit_stage(*inputs[:1], args.features[0], *inputs[2:], **options)
    else:
        from voxelflow.pipeline.stages.joint_fit import DEFAULT_WEIGHTINGS, run_joint_fit_stage

        summary = run_joint_fit_stage(
            *inputs, weightings=args.weightings or DEFAULT_WEIGHTINGS, seed=args.seed,
            partition=args.partition, **options)
    print(summary.table())
    _print_warnings(summary.warnings)
    return 0


def _print_warnings(lines: Sequence[str], where: str = "") -> None:
    """One ``voxelflow: warning: ...`` line each, on stderr."""
    for line in lines:
        print(f"voxelflow: warning: {where}{line}", file=sys.stderr)


# ------------------------------------------------------------------ run / status / demo
def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run every stage of an experiment file, then the report")
    p.add_argument("experiment", help="experiment TOML file (format: README)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _cluster_args(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from voxelflow.pipeline.study.config import load_experiment
    from voxelflow.pipeline.study.run import run_experiment
    from voxelflow.pipeline.study.report import ranking, table_markdown

    exp = load_experiment(args.experiment)
    # The plan is printed (and flushed) before the first stage runs.
    out = run_experiment(exp, dry_run=args.dry_run, progress=args.progress,
                         log=lambda line: print(line, flush=True))
    if args.dry_run:
        return 0
    table = out["report"]["table"]
    print()
    print(table_markdown(table))
    top = ranking(table).iloc[0]
    print(f"best (mean r at CV-selected alphas): {top['model']}, lags {top['lags']}")
    for line in out["report"]["comparisons"][1:]:
        print(line)
    print(f"report: {out['report']['files']['html']}")
    _print_warnings(out["report"]["warnings"])
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild the HTML report from stored fits (no refit)")
    p.add_argument("source", metavar="STORE_OR_TOML",
                   help="an experiment file, or a workspace: every experiment it has fits of")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="report folder (default: the experiment's reports/<name>; for a "
                        "workspace with several experiments, DIR/<name> each)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from voxelflow.pipeline.study.config import load_experiment
    from voxelflow.pipeline.study.run import make_report, report_store

    out = Path(args.out) if args.out else None
    if args.source.endswith(".toml"):
        exp = load_experiment(args.source)
        reports = [make_report(exp, Workspace(exp.store), out)]
    else:
        reports = report_store(args.source, out)
    for report in reports:
        model, lags = report["best"]
        print(f"report: {report['files']['html']} (best: {model}, lags {lags})")
        _print_warnings(report["warnings"])
    return 0


def add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="list the workspace's groups, shapes and completeness")
    p.add_argument("--store", default=DEFAULT_STORE,
                   help=f"workspace Zarr group (default ./{DEFAULT_STORE})")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from voxelflow.stores.inventory import describe_workspace

    for line in describe_workspace(Workspace(args.store)):
        print(line)
    return 0


def add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help="re-read stored chunks; clear the done flags of damaged blocks",
        description="Check every done block of the groups (all stage groups by default) "
                    "against the digests recorded when it was written, and every other "
                    "chunk by reading it.  Damaged or missing files are listed one per "
                    "line; their blocks' done flags are cleared, so rerunning the command "
                    "that made the group recomputes exactly those blocks.  Exit status 0: "
                    "intact; 1: damage found (and cleared).")
    p.add_argument("groups", nargs="*", metavar="GROUP",
                   help="groups to check, e.g. bold/s1 frames/clip (default: every group)")
    p.add_argument("--store", default=DEFAULT_STORE,
                   help=f"workspace Zarr group (default ./{DEFAULT_STORE})")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from voxelflow.stores.verify import summary_line, verify_workspace

    ws = Workspace(args.store)
    checks = verify_workspace(ws, args.groups or None)
    for check in checks:
        for line in check.damaged:
            print(line)
        print(summary_line(ws, check))
    return 1 if any(c.damaged for c in checks) else 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on a generated movie with planted BOLD")
    p.add_argument("--workdir", default="demo_workspace", help="where it all goes")
    p.add_argument("--seconds", type=float, default=300.0, help="movie length in s (300)")
    p.add_argument("--fps", type=float, default=4.0, help="frames per second (4)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _cluster_args(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from voxelflow.pipeline.study.demo import print_summary, run_demo

    print_summary(run_demo(Path(args.workdir), seconds=args.seconds, fps=args.fps,
                           progress=args.progress))
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_frames, add_features, add_train_autoencoder, add_bold, add_events, add_import_features,
    add_export, add_fit, add_run, add_report, add_status, add_verify, add_demo,
]


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``voxelflow: error: ...``, exit 2)
    like every other refusal; the subcommand parsers inherit it."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(EXIT_INPUT_ERROR,
                  f"voxelflow: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
        with dask_client(getattr(args, "scheduler", None), getattr(args, "workers", None),
                         getattr(args, "memory_limit", None)):
            return int(args.func(args) or 0)
    except VoxelflowError as exc:
        print(f"voxelflow: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as exc:
        from voxelflow.stores.guard import DISK_FULL, NOT_WRITABLE, message_for

        if exc.errno not in DISK_FULL | NOT_WRITABLE:
            raise
        store = getattr(args, "store", None) or exc.filename or "."
        print(f"voxelflow: error: {message_for(exc, store)}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("voxelflow: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
