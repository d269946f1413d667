"""``voxelflow frames``, ``voxelflow features`` and ``voxelflow train-autoencoder``: the
stimulus side (videos -> frames -> network features), parsed here and passed to one
pipeline function each (the rest of the command line is :mod:`voxelflow.cli`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from voxelflow.cli_args import add_clip_options
from voxelflow.cli_args import add_stage_options as _store_arg
from voxelflow.cli_args import int_arg as _int_arg
from voxelflow.cli_args import positive_float as _positive_float
from voxelflow.pipeline.errors import InputError
from voxelflow.stores.workspace import Workspace


# ---------------------------------------------------------------------- frames
def add_frames(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("frames", help="decode videos into /frames/NAME (one run per video)")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files, one run each")
    p.add_argument("--name", required=True, help="stimulus name: writes /frames/NAME")
    p.add_argument("--fps", type=_positive_float, default=20.0, help="sampling rate (default 20)")
    p.add_argument("--size", type=int, default=224, help="output frames are SIZE x SIZE (224)")
    p.add_argument("--resize", choices=["squash", "crop"], default="squash",
                   help="squash the whole picture, or crop the centre square (default squash)")
    need = p.add_mutually_exclusive_group()
    need.add_argument("--times-from-bold", metavar="SUBJ",
                      help="keep only the frames the lagged designs of --lags read for the "
                           "runs of /bold/SUBJ (a sparse time coordinate)")
    need.add_argument("--times", metavar="FILE", type=Path,
                      help="keep only the frames at these times (lines 'time' or 'run,time', s)")
    p.add_argument("--lags", action="append", metavar="L1,L2,...",
                   help="a lag set (s) of the planned fits; repeat for several sets")
    p.add_argument("--aggregate", choices=["last", "mean"], default="last",
                   help="as voxelflow fit: the frame at t-L, or every frame of the TR window")
    p.add_argument("--extend", action="store_true",
                   help="keep the times the group already holds and add the new ones "
                        "(only the missing frames are decoded)")
    add_clip_options(p, "with --times-from-bold/--times, keep the frames of the clip "
                        "ending at each kept time too (for video models)")
    _store_arg(p)
    p.set_defaults(func=cmd_frames)


def cmd_frames(args: argparse.Namespace) -> int:
    from voxelflow.pipeline.design.lags import parse_lags
    from voxelflow.pipeline.stages.frames import run_frames_stage
    from voxelflow.pipeline.stages.needed_frames import NeededFrames

    needed = None
    if args.times_from_bold or args.times:
        clip = {} if args.clip_frames is None else {"clip_frames": args.clip_frames,
                                                     "clip_fps": args.clip_fps}
        if clip and args.clip_fps is None:
            raise InputError("--clip-frames needs --clip-fps F (the clips' frames per second)")
        needed = NeededFrames(bold=args.times_from_bold, aggregate=args.aggregate,
                              lag_sets=tuple(tuple(parse_lags(t)) for t in args.lags or []),
                              times_file=args.times, extend=args.extend, **clip)
    elif args.lags or args.extend:
        raise InputError("--lags and --extend need --times-from-bold SUBJ (or --times FILE)")
    elif args.clip_frames is not None or args.clip_fps is not None:
        raise InputError("--clip-frames/--clip-fps need --times-from-bold SUBJ (or --times "
                         "FILE): every frame is kept without them")
    summary = run_frames_stage(
        Workspace(args.store), args.videos, args.name, fps=args.fps, size=args.size,
        resize=args.resize, needed=needed, overwrite=args.overwrite, progress=args.progress,
        log=lambda note: print(f"voxelflow: note: {note}", file=sys.stderr, flush=True),
    )
    print(f"wrote /{summary['group']} in {args.store}: {_frames_written(summary)})")
    return 0


def _frames_written(summary: dict) -> str:
    """``R run(s), N, M frames (B blocks written, S already done`` of a stage summary."""
    counts = ", ".join(str(n) for n in summary["frames"])
    return (f"{summary['runs']} run(s), {counts} frames ({summary['blocks_written']} blocks "
            f"written, {summary['blocks_skipped']} already done")


# ---------------------------------------------------------------------- features
def add_features(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features", help="CNN features of /frames/NAME into /features/OUT",
        description="Run a CNN over every frame of /frames/NAME and write /features/OUT "
                    "(time, feature) float32 with the frames' time and run coordinates.")
    p.add_argument("--frames", metavar="NAME", help="reads /frames/NAME")
    p.add_argument("--model", help="torchvision classification model (resnet50, vgg16, ...), "
                                    "efficientnet_lite0, or torchvision video model (r3d_18, "
                                    "s3d, mvit_v2_s, swin3d_t, ...: fed clips)")
    p.add_argument("--layer", nargs="+", action="extend", metavar="NODE",
                   help="graph node(s) to read (default: resnet50 avgpool, vgg16 classifier.4, "
                        "efficientnet_lite0 _avg_pooling); several write OUT.<NODE> each")
    p.add_argument("--weights", default=None, metavar="imagenet|kinetics|PATH|random:SEED",
                   help="imagenet (torch cache; kinetics for video models), a state_dict "
                        "file, or random:SEED (default imagenet, kinetics for video models)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="frames (clips) per forward pass (default 16 on cpu, 64 on cuda; "
                        "clips: 4, 16)")
    p.add_argument("--name", dest="out", metavar="OUT",
                   help="writes /features/OUT (default: the model name)")
    p.add_argument("--pool", choices=["avg"], default=None,
                   help="average spatial layers over space instead of flattening them")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast precision of the forward pass (default fp32)")
    p.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="time points per resumable block (default 1024, less for big layers)")
    p.add_argument("--list-layers", metavar="MODEL",
                   help="print the node names of MODEL and exit")
    p.add_argument("--list-models", action="store_true", help="print the model names and exit")
    add_clip_options(p, "video models only (default 16)")
    _store_arg(p)
    p.set_defaults(func=cmd_features)


def cmd_features(args: argparse.Namespace) -> int:
    from voxelflow.pipeline.models.registry import available_models, default_layer, list_layers
    from voxelflow.pipeline.stages.features import run_features_stage

    if args.list_models:
        print("\n".join(available_models()))
        return 0
    if args.list_layers:
        nodes = list_layers(args.list_layers)
        print("\n".join(nodes))
        print(f"default layer: {default_layer(args.list_layers, nodes)}", file=sys.stderr)
        return 0
    if not args.frames or not args.model:
        raise InputError("give --frames NAME and --model MODEL (or --list-layers MODEL, "
                         "--list-models)")
    summary = run_features_stage(
        Workspace(args.store), args.frames, args.model, layers=args.layer,
        weights=args.weights, device=args.device, batch_size=args.batch_size, name=args.out,
        pool=args.pool, precision=args.precision, overwrite=args.overwrite,
        progress=args.progress, block_size=args.block_size, clip_frames=args.clip_frames,
        clip_fps=args.clip_fps,
    )
    groups = ", ".join(f"/{g} ({n} features)" for g, n in
                       zip(summary["groups"], summary["n_features"]))
    print(f"wrote {groups} in {args.store}: {_frames_written(summary)}; "
          f"{summary['frames_per_s']:.1f} frames/s)")
    return 0


# ------------------------------------------------------------ train-autoencoder
def add_train_autoencoder(sub: argparse._SubParsersAction) -> None:
    # Defaults are voxelflow.pipeline.stages.train's DEFAULT_* (written out: no torch import here).
    p = sub.add_parser(
        "train-autoencoder",
        help="train the ResNet-50 autoencoder on the training frames of /frames/NAME",
        description="Train an autoencoder (ResNet-50 encoder, mirrored ResNet decoder) to "
                    "reconstruct the training frames of /frames/NAME; test frames are never "
                    "read.  Writes the checkpoint OUT (resumable: rerun the same command) and "
                    "OUT-stem.preview.png.  Extract its 2,048-d code with: voxelflow features "
                    "--frames NAME --model autoencoder --weights OUT")
    p.add_argument("--frames", required=True, metavar="NAME", help="reads /frames/NAME")
    split = p.add_mutually_exclusive_group(required=True)
    split.add_argument("--train-until", type=float, metavar="SECONDS",
                       help="train on the frames shown before SECONDS (runs played one "
                            "after another)")
    split.add_argument("--train-runs", nargs="+", metavar="R",
                       help="train on these whole runs (0-based), e.g. 0,1,2 or 0 1 2")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file to write")
    p.add_argument("--epochs", type=int, default=10,
                   help="passes over the training frames (default 10)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="train for N steps instead of --epochs")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="frames per step (default 16 on cpu, 64 on cuda)")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="peak AdamW learning rate (default 1e-4); cosine decay to 0")
    p.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                   help="linear learning-rate warmup (default min(100, a tenth of the steps))")
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="AdamW weight decay (default 1e-4)")
    p.add_argument("--weights", default="imagenet", metavar="imagenet|PATH|random:SEED",
                   help="initial ResNet-50 weights, as for voxelflow features (default imagenet)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train the decoder only (encoder weights and BN statistics fixed)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="data order and init seed (default 0)")
    p.add_argument("--shuffle-buffer", type=int, default=1024, metavar="FRAMES",
                   help="frames held for shuffling (default 1024)")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="STEPS",
                   help="steps between checkpoints (default 100)")
    p.add_argument("--no-preview", dest="preview", action="store_false",
                   help="do not write the reconstruction preview PNG")
    _store_arg(p)
    p.set_defaults(func=cmd_train_autoencoder)


def cmd_train_autoencoder(args: argparse.Namespace) -> int:
    from voxelflow.pipeline.stages.train import train_autoencoder

    runs = None
    if args.train_runs:
        runs = [_int_arg(r, "--train-runs") for item in args.train_runs
                for r in item.split(",") if r.strip()]
    s = train_autoencoder(
        Workspace(args.store), args.frames, args.out, train_until=args.train_until,
        train_runs=runs, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        weights=args.weights, freeze_encoder=args.freeze_encoder, device=args.device,
        seed=args.seed,
        shuffle_buffer=args.shuffle_buffer, checkpoint_every=args.checkpoint_every,
        overwrite=args.overwrite, progress=args.progress, preview=args.preview,
    )
    frames = "; ".join(f"run {r} frames {a}-{b - 1}" for r, a, b in s["train_frames"])
    how = ("already complete, nothing to do" if s["steps_run"] == 0 else
           f"{s['steps_run']} step(s) run now"
           + (f", resumed at step {s['resumed_from']}" if s["resumed_from"] else "")
           + f", {s['frames_per_s']:.1f} frames/s")
    final = "n/a" if s["final_loss"] is None else f"{s['final_loss']:.4g}"
    print(f"wrote {s['checkpoint']}: {s['steps']} steps of {s['batch_size']} frames "
          f"({s['epochs']:.2f} epochs of {s['n_train']} training frames of /{s['frames_group']}: "
          f"{frames}); {how}")
    print(f"final loss {final} (mean of the last 10 steps; predicting the mean training "
          f"frame: {s['mean_frame_mse']:.4g})" + (f"; preview {s['preview']}" if s["preview"]
                                                 else ""))
    return 0
