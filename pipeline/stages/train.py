"""The train-autoencoder stage: the ResNet-50 autoencoder trained on the training frames.

Reads ``/frames/<name>`` (only its training part, :mod:`._stream`; of a sparse,
needed-frames group the stored frames of that part, chosen by their ``time``) and writes one
checkpoint file (format: :mod:`voxelflow.pipeline.models.autoencoder`) plus a
preview PNG; the network itself is :class:`~voxelflow.pipeline.models.autoencoder.
ResNetAutoencoder`.

* AdamW (fused) on every trainable parameter (the decoder only with
  ``freeze_encoder``: then the encoder stays in eval mode, BN statistics included, and
  runs without grad); learning rate :func:`learning_rate`: linear warmup over
  ``warmup_steps`` (default min(100, a tenth of the steps)), then cosine decay to 0.
* Batches come from :class:`~._stream.ShuffleStream` (frames held: the shuffle buffer
  plus one piece), read ahead on a background thread (``QUEUE_BATCHES`` batches).
* Denormal floats are flushed to zero while training (``torch.set_flush_denormal``):
  tiny gradients made steps up to 3x slower on CPU after a few dozen steps.
* A checkpoint every ``checkpoint_every`` steps and at the end, written atomically
  (temporary file + rename) to ``out``; rerunning the same command resumes from it, and
  the loss curve equals the uninterrupted run's (bitwise on the same CPU and threads).
  Replacing an existing checkpoint (``--overwrite``) saves to ``<out>.next`` until the
  new training is complete (:class:`~voxelflow.stores.files.SteppedFile`).
* After training: ``<out stem>.preview.png`` next to the checkpoint, training frames
  (top row) over their reconstructions (bottom row, eval mode).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torchvision
from tqdm.auto import tqdm

from voxelflow.pipeline.errors import InputError, WorkspaceConflict
from voxelflow.pipeline.execution.blocks import prefetch
from voxelflow.pipeline.models.autoencoder import (ARCH, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                                                   STRIDE, ResNetAutoencoder, read_checkpoint)
from voxelflow.pipeline.models.backbone import build_autoencoder
from voxelflow.pipeline.models.extractor import check_device
from voxelflow.pipeline.models.weights import parse_weights, sha256_file, weights_key
from voxelflow.pipeline.stages._train_preview import (mean_frame_mse, preview_path,
                                                       training_preview, write_preview)
from voxelflow.pipeline.stages._stream import (Piece, ShuffleStream, make_pieces,
                                               read_training_frames, training_ranges)
from voxelflow.stores.files import SteppedFile
from voxelflow.stores.replace import write_durably
from voxelflow.stores.names import check_name
from voxelflow.stores.workspace import Workspace, describe_param_change

__all__ = ["ShuffleStream", "learning_rate", "make_adamw", "make_pieces", "mean_frame_mse",
           "preview_path", "read_training_frames", "train_autoencoder", "training_ranges",
           "write_preview"]

DEFAULT_BATCH = {"cpu": 16, "cuda": 64}
DEFAULT_EPOCHS = 10
DEFAULT_LR = 1e-4
DEFAULT_WARMUP = 100  # steps of linear learning-rate warmup (at most a tenth of the steps)
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_BUFFER = 1024  # frames in the shuffle buffer
DEFAULT_CHECKPOINT_EVERY = 100  # steps
QUEUE_BATCHES = 2  # batches read ahead by the reader thread
MEMORY_FORMAT = torch.contiguous_format  # channels_last: BatchNorm is ~5x slower on CPU


@dataclass
class _Plan:
    """What one training run reads and how long it trains (fixed by its config)."""

    workspace: Workspace
    group: str
    ranges: list[tuple[int, int, int]]
    pieces: list[Piece]
    stream: ShuffleStream
    size: tuple[int, int]  # (height, width) of the frames
    batch_size: int
    total_steps: int
    config: dict

    @property
    def n_train(self) -> int:
        return self.stream.n

    def read(self, piece: Piece) -> np.ndarray:
        """uint8 ``(piece.size, H, W, 3)``: the frames of one piece (training frames only)."""
        return read_training_frames(self.workspace, self.group, self.ranges, piece.run,
                                    piece.start, piece.stop)


@dataclass
class _State:
    """The trained things: network, optimiser, normalisation, losses so far."""

    model: ResNetAutoencoder
    optimiser: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    start_step: int
    losses: list[float]
    baseline: float | None  # mean-frame MSE (None until computed)
    saves: list[float] = field(default_factory=list)  # seconds per checkpoint save


def train_autoencoder(workspace: Workspace, frames_name: str, out: str | Path, *,
                      train_until: float | None = None, train_runs: Sequence[int] | None = None,
                      epochs: int = DEFAULT_EPOCHS, steps: int | None = None,
                      batch_size: int | None = None, lr: float = DEFAULT_LR,
                      warmup_steps: int | None = None,
                      weight_decay: float = DEFAULT_WEIGHT_DECAY, weights: str = "imagenet",
                      freeze_encoder: bool = False, device: str = "cpu", seed: int = 0,
                      shuffle_buffer: int = DEFAULT_BUFFER,
                      checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                      overwrite: bool = False, progress: bool = True,
                      preview: bool = True, request: str | None = None) -> dict:
    """Train the ResNet-50 autoencoder on the training frames of ``/frames/<frames_name>``.

    Writes the checkpoint ``out`` (every ``checkpoint_every`` steps and at the end) and
    ``<out stem>.preview.png``.  ``steps`` overrides ``epochs`` (``ceil(epochs *
    n_train / batch_size)`` steps).  An unfinished checkpoint at ``out`` made with the
    same configuration is resumed; a finished one is left as it is; one with another
    configuration is refused unless ``overwrite``.  Every input is checked before
    anything is written.  ``request`` (the experiment runner's fingerprint of what it
    asked for) is kept in the checkpoint as ``request``.  Returns a summary dict (steps,
    losses, final loss, mean-frame baseline, frames/s, paths).
    """
    # ---- validate everything before writing anything
    device = check_device(device, "fp32")
    if batch_size is None:
        batch_size = DEFAULT_BATCH["cuda" if device.startswith("cuda") else "cpu"]
    _check_numbers(batch_size=batch_size, epochs=epochs, steps=steps, lr=lr,
                   warmup_steps=warmup_steps, weight_decay=weight_decay,
                   shuffle_buffer=shuffle_buffer, checkpoint_every=checkpoint_every)
    out = _check_out(Path(out))
    parse_weights(weights)  # bad spec / missing file: one-line error now
    plan = _plan(workspace, frames_name, train_until=train_until, train_runs=train_runs,
                 epochs=int(epochs), steps=steps, batch_size=int(batch_size), lr=float(lr),
                 warmup_steps=warmup_steps, weight_decay=float(weight_decay), weights=weights,
                 freeze_encoder=freeze_encoder, seed=int(seed),
                 shuffle_buffer=int(shuffle_buffer))
    _check_request(plan, out, int(shuffle_buffer), overwrite)
    target = SteppedFile(out)
    target.acquire(f"--out {out}")  # one trainer per checkpoint
    ckpt, save_to = _existing_checkpoint(target, plan.config, overwrite)

    # ---- model, optimiser, state; then train from where the checkpoint stopped
    state = _start(plan, ckpt, weights=weights, seed=int(seed), device=device,
                   freeze_encoder=freeze_encoder, lr=float(lr),
                   weight_decay=float(weight_decay))
    normalise = _normaliser(state.mean, state.std, torch.device(device))
    if state.baseline is None:
        state.baseline = mean_frame_mse((plan.read(p) for p in plan.pieces), state.mean,
                                        state.std)

    def save(step: int, complete: bool) -> None:
        t0 = time.perf_counter()
        _save_atomic(_checkpoint(plan, state, step, complete, request), save_to)
        if complete:
            target.commit(save_to)  # a replacement takes the place of ``out`` only now
        state.saves.append(time.perf_counter() - t0)

    todo = plan.total_steps - state.start_step
    bar = tqdm(total=plan.total_steps * plan.batch_size,
               initial=state.start_step * plan.batch_size, unit="frame",
               desc=f"train {out.name}", disable=not progress, dynamic_ncols=True)
    elapsed = 0.0
    if todo > 0:
        elapsed = _train_steps(plan, state, normalise, save, bar, device=device,
                               freeze_encoder=freeze_encoder, lr=float(lr),
                               checkpoint_every=int(checkpoint_every))
        save(plan.total_steps, True)
    elif ckpt is not None and not ckpt.get("complete"):
        save(plan.total_steps, True)
    bar.close()
    target.release()

    # ---- preview
    png = mse = None
    if preview:
        png, mse = training_preview(plan, state, normalise, preview_path(out))
    return _summary(plan, state, out, png, mse, todo, elapsed)


# ----------------------------------------------------------------------- planning
ACTIVATIONS_PER_INPUT = 100  # lower bound: floats kept for backward per input float


def _check_request(plan: "_Plan", out: Path, shuffle_buffer: int, overwrite: bool) -> None:
    """Refuse (one line) a training whose lower-bound memory or checkpoint size cannot
    fit: memory = model state (weights, gradients, two AdamW moments: 16 bytes per
    parameter) + the shuffle buffer (uint8 frames) + one batch's activations (at least
    :data:`ACTIVATIONS_PER_INPUT` floats per input float); disk = the checkpoint
    (weights + two moments: 12 bytes per parameter), twice while it replaces one."""
    from voxelflow.pipeline.execution.resources import check_request

    with torch.device("meta"):
        n_params = sum(p.numel() for p in ResNetAutoencoder(torchvision.models.resnet50())
                       .parameters())
    pixels = plan.size[0] * plan.size[1] * 3
    memory = (16 * n_params + shuffle_buffer * pixels
              + plan.batch_size * pixels * 4 * ACTIVATIONS_PER_INPUT)
    disk = 12 * n_params * (2 if overwrite and out.exists() else 1)
    check_request(f"train-autoencoder --batch-size {plan.batch_size} ({plan.size[0]}x"
                  f"{plan.size[1]} frames)", block_bytes=memory,
                  block_option="lower --batch-size or --shuffle-buffer", output_bytes=disk,
                  store=out.parent, disk_option="choose another --out",
                  already_written=out.stat().st_size if out.exists() and not overwrite else 0)
def _check_numbers(*, batch_size, epochs, steps, lr, warmup_steps, weight_decay,
                   shuffle_buffer, checkpoint_every) -> None:
    """One-line :class:`InputError` naming the flag of the first bad number."""
    for flag, value, low in (("--batch-size", batch_size, 1), ("--epochs", epochs, 1),
                             ("--shuffle-buffer", shuffle_buffer, 1),
                             ("--checkpoint-every", checkpoint_every, 1)):
        if int(value) < low or int(value) != value:
            raise InputError(f"{flag} must be a positive integer (got {value})")
    if steps is not None and (int(steps) < 1 or int(steps) != steps):
        raise InputError(f"--steps must be a positive integer (got {steps})")
    if not (lr > 0 and math.isfinite(lr)):
        raise InputError(f"--lr must be a positive number (got {lr})")
    if warmup_steps is not None and (int(warmup_steps) < 0 or int(warmup_steps) != warmup_steps):
        raise InputError(f"--warmup-steps must be an integer >= 0 (got {warmup_steps})")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise InputError(f"--weight-decay must be >= 0 (got {weight_decay})")


def _check_out(out: Path) -> Path:
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory; give a file name, e.g. "
                         f"{out}/autoencoder.pt")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist; create it first")
    return out


def _plan(workspace: Workspace, frames_name: str, *, train_until, train_runs, epochs: int,
          steps: int | None, batch_size: int, lr: float, warmup_steps: int | None,
          weight_decay: float, weights: str, freeze_encoder: bool, seed: int,
          shuffle_buffer: int) -> _Plan:
    """Open the frames, select the training frames, count the steps, write the config."""
    group = f"frames/{check_name(frames_name, '--frames')}"
    frames_attrs = workspace.require_complete(group, f"voxelflow frames VIDEO --name {frames_name}")
    runs = workspace.open_runs(group)
    height, width = int(runs[0].sizes["y"]), int(runs[0].sizes["x"])
    if height % STRIDE or width % STRIDE:
        raise InputError(
            f"/{group}: frames are {height}x{width}; the autoencoder reconstructs sides that "
            f"are multiples of {STRIDE}; remake them with: voxelflow frames ... --name "
            f"{frames_name} --size 224")
    lengths, fps, stored = _frame_grid(runs, frames_attrs, group)
    chunk = int(runs[0]["frames"].encoding.get("chunks", (16,))[0])
    ranges = training_ranges(lengths, fps, train_until=train_until, train_runs=train_runs,
                             group=group, stored=stored)
    pieces = make_pieces(ranges, chunk)
    stream = ShuffleStream(pieces, seed, shuffle_buffer)
    n_train = stream.n
    total_steps = int(steps) if steps is not None else math.ceil(epochs * n_train / batch_size)
    if warmup_steps is None:
        warmup_steps = min(DEFAULT_WARMUP, total_steps // 10)
    kind, value = parse_weights(weights)
    config = _json({
        "arch": ARCH, "frames": {"group": group, "params": workspace.params(group)},
        "train_until": train_until, "train_runs": sorted(set(map(int, train_runs or []))) or None,
        "train_frames": [list(r) for r in ranges], "n_train": n_train,
        "input_size": [height, width], "weights": weights_key(weights),
        "weights_sha256": sha256_file(value) if kind == "file" else None,
        "freeze_encoder": bool(freeze_encoder), "optimizer": "AdamW", "lr": lr,
        "schedule": "linear warmup, cosine decay", "warmup_steps": int(warmup_steps),
        "weight_decay": weight_decay, "batch_size": batch_size,
        "epochs": None if steps is not None else epochs, "steps": total_steps,
        "seed": seed, "shuffle_buffer": shuffle_buffer,
        "loss": "MSE on ImageNet-normalised pixels",
    })
    return _Plan(workspace, group, ranges, pieces, stream, (height, width), batch_size,
                 total_steps, config)


def _frame_grid(runs: list, frames_attrs: dict, group: str
                ) -> tuple[list[int], float, list[np.ndarray] | None]:
    """``(per-run grid lengths, fps, stored)`` of a frames group: a group of every frame
    has ``stored`` None (its positions are its grid indices); a sparse one (needed
    frames) gives, per run, the grid index (n_stored,) of each stored frame, found from
    its ``time`` coordinate and the full grid kept in that coordinate's attrs."""
    from voxelflow.pipeline.design.needed import GRID_FPS, SPARSE, design_grid
    from voxelflow.pipeline.stages.needed_frames import stored_grid_indices

    if not any(ds["time"].attrs.get(SPARSE) for ds in runs):  # dense: as it always was
        lengths = [int(ds.sizes["time"]) for ds in runs]
        fps = float(frames_attrs.get("fps") or 0) or 1.0 / float(runs[0]["time"].values[1])
        return lengths, fps, None
    grids = [design_grid(ds["time"].attrs, ds["time"].values) for ds in runs]
    stored = [stored_grid_indices(ds["time"].values.astype(np.float64), g)
              for ds, g in zip(runs, grids)]
    if any(s.size != ds.sizes["time"] for s, ds in zip(stored, runs)):
        raise InputError(f"/{group}: a stored frame time is off the group's frame grid; "
                         f"remake it with voxelflow frames ... --overwrite")
    return [int(g.size) for g in grids], float(runs[0]["time"].attrs[GRID_FPS]), stored


def _existing_checkpoint(target: SteppedFile, config: dict, overwrite: bool
                         ) -> tuple[dict | None, Path]:
    """The checkpoint to resume (same config) or None, and where to save the steps (the
    checkpoint, or ``<out>.next`` while it replaces one); another config is refused
    unless ``overwrite``."""
    def refuse(ckpt: dict) -> WorkspaceConflict:
        return WorkspaceConflict(
            f"--out {target.path}: holds a training with other settings "
            f"({describe_param_change(ckpt.get('config', {}), config)}); rerun with "
            f"--overwrite to replace it, or choose another --out")

    return target.resume_point(lambda path: read_checkpoint(path, "--out"),
                               lambda ckpt: ckpt.get("config") == config, overwrite, refuse)


def _start(plan: _Plan, ckpt: dict | None, *, weights: str, seed: int, device: str,
           freeze_encoder: bool, lr: float, weight_decay: float) -> _State:
    """A new network (seeded) or the checkpoint's, on ``device``, with its optimiser."""
    if ckpt is None:
        torch.manual_seed(seed)
        model, backbone = build_autoencoder(weights)
        mean, std = backbone.mean, backbone.std
        start_step, losses, baseline = 0, [], None
    else:
        model = ResNetAutoencoder(torchvision.models.resnet50())
        model.load_state_dict(ckpt["model"], strict=True)
        mean, std = tuple(ckpt["mean"]), tuple(ckpt["std"])
        start_step, losses = int(ckpt["step"]), [float(v) for v in ckpt["losses"]]
        baseline = ckpt.get("mean_frame_mse")
    model = model.to(device, memory_format=MEMORY_FORMAT)
    if freeze_encoder:
        model.encoder.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = make_adamw(params, lr, weight_decay)
    if ckpt is not None:
        optimiser.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    return _State(model, optimiser, mean, std, start_step, losses, baseline)


def _checkpoint(plan: _Plan, state: _State, step: int, complete: bool,
                request: str | None) -> dict:
    """The checkpoint dict after ``step`` steps (format: the autoencoder module's doc)."""
    cfg = plan.config
    n_train, batch_size = plan.n_train, plan.batch_size
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": ARCH,
        "config": cfg, "complete": complete, "step": step, "total_steps": plan.total_steps,
        "model": {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
        "optimizer": state.optimiser.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "data": {"position": step * batch_size, "epoch": step * batch_size // n_train,
                 "seed": int(cfg["seed"]), "shuffle_buffer": int(cfg["shuffle_buffer"]),
                 "n_train": n_train},
        "losses": list(state.losses), "mean_frame_mse": float(state.baseline),
        "mean": list(state.mean), "std": list(state.std), "input_size": list(plan.size),
        "train_frames": [list(r) for r in plan.ranges], "n_train": n_train,
        "frames_group": plan.group, "torch_version": str(torch.__version__),
        "request": request,
    }


# ----------------------------------------------------------------------- training
def _batches(plan: _Plan, start_step: int, pin: bool) -> Iterator[tuple[int, np.ndarray, Any]]:
    """``(step, frame ids, uint8 (B, H, W, 3) tensor)`` of every step from ``start_step``."""
    frames = plan.stream.frames(plan.read, start_step * plan.batch_size)
    for step in range(start_step, plan.total_steps):
        got = [next(frames) for _ in range(plan.batch_size)]
        ids = np.asarray([g[0] for g in got], dtype=np.int64)
        x = torch.from_numpy(np.stack([g[1] for g in got]))
        if pin:
            x = x.pin_memory()
        yield step, ids, x


def _train_steps(plan: _Plan, state: _State, normalise: Callable, save: Callable, bar, *,
                 device: str, freeze_encoder: bool, lr: float, checkpoint_every: int) -> float:
    """Train from ``state.start_step`` to the last step (checkpoints on the way); return
    the seconds spent in the loop."""
    model, optimiser, losses = state.model, state.optimiser, state.losses
    batch_size, total_steps = plan.batch_size, plan.total_steps
    warmup_steps = int(plan.config["warmup_steps"])
    model.train()
    if freeze_encoder:
        model.encoder.eval()
    # Denormal floats (tiny gradients, e.g. behind the zero-initialised BN weights)
    # make CPU arithmetic many times slower: flush them to zero while training.
    flushed = torch.set_flush_denormal(True)
    started = time.perf_counter()
    batches = prefetch(_batches(plan, state.start_step, device.startswith("cuda")),
                       QUEUE_BATCHES, name="voxelflow-autoencoder-reader")
    try:
        with contextlib.closing(batches):
            for step, _ids, frames in batches:
                for g in optimiser.param_groups:  # a function of the step only
                    g["lr"] = learning_rate(step, total_steps, lr, warmup_steps)
                losses.append(_step(model, optimiser, normalise(frames), freeze_encoder))
                bar.update(batch_size)
                bar.set_postfix(loss=f"{losses[-1]:.4f}",
                                epoch=f"{(step + 1) * batch_size / plan.n_train:.2f}",
                                refresh=False)
                done = step + 1
                if done % checkpoint_every == 0 and done < total_steps:
                    save(done, False)
        return time.perf_counter() - started
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _step(model: ResNetAutoencoder, optimiser: Any, x: torch.Tensor,
          freeze_encoder: bool) -> float:
    """One optimiser step on the normalised batch ``x`` (B, 3, H, W); returns its loss."""
    optimiser.zero_grad(set_to_none=True)
    if freeze_encoder:
        with torch.no_grad():
            fmap = model.encoder.spatial(x)
        recon = model.decoder(fmap)
    else:
        recon = model(x)
    loss = torch.nn.functional.mse_loss(recon, x)
    loss.backward()
    optimiser.step()
    return float(loss.item())


def learning_rate(step: int, total_steps: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warmup over ``warmup_steps``, then
    cosine decay to 0 at the last step.  A pure function of the step, so a resumed run
    uses exactly the same rates."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


def make_adamw(params, lr: float, weight_decay: float):
    """AdamW, fused where torch has it (one pass over the state: 4-5x faster on CPU)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _normaliser(mean: Sequence[float], std: Sequence[float], device):
    m = torch.tensor(mean, dtype=torch.float32, device=device).reshape(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).reshape(1, 3, 1, 1)

    def normalise(frames):
        """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), normalised."""
        x = frames.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        return ((x / 255.0 - m) / s).contiguous(memory_format=MEMORY_FORMAT)

    return normalise


def _save_atomic(obj: dict, path: Path) -> None:
    """The checkpoint whole or not at all (``<path>.partial``, fsync, rename)."""
    write_durably(path, lambda f: torch.save(obj, f), suffix=".partial")


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def _summary(plan: _Plan, state: _State, out: Path, png: Path | None, preview_mse,
             todo: int, elapsed: float) -> dict:
    losses, batch_size = state.losses, plan.batch_size
    tail = losses[-min(len(losses), 10):] if losses else []
    return {
        "checkpoint": str(out), "preview": str(png) if png else None,
        "frames_group": plan.group, "train_frames": [list(r) for r in plan.ranges],
        "n_train": plan.n_train, "steps": plan.total_steps, "steps_run": max(todo, 0),
        "resumed_from": state.start_step, "batch_size": batch_size,
        "epochs": plan.total_steps * batch_size / plan.n_train,
        "losses": losses, "final_loss": float(np.mean(tail)) if tail else None,
        "mean_frame_mse": float(state.baseline), "preview_mse": preview_mse,
        "train_s": elapsed, "checkpoints_saved": len(state.saves),
        "save_s": state.saves[-1] if state.saves else None,
        "frames_per_s": todo * batch_size / elapsed if todo > 0 and elapsed > 0 else 0.0,
    }
