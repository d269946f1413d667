"""The ResNet-50 autoencoder (the study's third feature space) and its trainer.

Architecture (:class:`ResNetAutoencoder`)
-----------------------------------------
* **Encoder** (:class:`Encoder`): torchvision's ResNet-50 trunk, ``conv1 .. layer4``,
  with the weights of the features stage (``imagenet`` | ``PATH`` | ``random:SEED``,
  :func:`voxelflow.pipeline.stages.features.load_backbone`).  Its parameter names are torchvision's
  (``conv1.weight``, ``layer4.2.bn3.running_var``, ...), so the encoder half of a
  checkpoint loads into a plain ``torchvision.models.resnet50()`` (without ``fc``).
* **Bottleneck**: the ``layer4`` map, ``(2048, H/32, W/32)``, is what the decoder
  reads; its global average pool, ``avgpool`` (2,048-d, exactly ResNet-50's pooled
  output), is the *code* that ``voxelflow features --model autoencoder`` writes.
* **Decoder** (:class:`Decoder`): the encoder mirrored.  Every bottleneck block of
  ``layer4 .. layer1`` becomes, in reverse order, an :class:`UpBottleneck`:
  ``1x1 conv (out -> mid) -> BN -> ReLU -> [nearest x2 where the encoder block had
  stride 2] -> 3x3 conv (mid -> mid) -> BN -> ReLU -> 1x1 conv (mid -> in) -> BN``,
  plus a shortcut (identity, or ``[nearest x2] -> 1x1 conv -> BN`` where the encoder
  block had a downsample), then ReLU.  The stem is mirrored by a nearest x2 (for the
  max-pool) and a nearest x2 followed by a 7x7 conv to 3 channels with a bias (for
  ``conv1``), so the output is ``3 x H x W`` for any ``H, W`` divisible by 32
  (``64x64`` frames give a ``2x2`` bottleneck map, ``224x224`` a ``7x7`` one).
  Output: normalised pixels (no final activation); loss: MSE against the input in
  the same normalisation (ImageNet mean/std).

Decoder initialisation from the trunk (as the study built both halves from the
pretrained ResNet-50): every decoder convolution starts as the *adjoint* (transpose)
of the encoder convolution it mirrors, which always has the right shape: a 1x1
conv ``W (out, in)`` mirrors as ``W.T (in, out)``; a 3x3 or 7x7 conv as its weight
with the two channel axes swapped and the kernel flipped in both spatial axes (the
transposed convolution of a stride-1 conv); the stem's 7x7 ``conv1 (64, 3, 7, 7)``
becomes the last conv ``(3, 64, 7, 7)``, scaled by ``sqrt(3 / 64)`` (the ratio of
the two convs' fan-ins) because no BatchNorm follows it to fix its scale.  So the
decoder starts as the encoder's linear maps run backwards.  BatchNorm layers start
fresh (running mean 0, var 1, bias 0, weight 1), since the trunk's BN statistics
describe its forward activations, not the mirrored ones; the last BN of every
residual branch starts with weight 0 (torchvision's ``zero_init_residual``), so each
mirrored block starts as its shortcut; the last conv's bias starts at 0.

Training (:func:`train_autoencoder`)
------------------------------------
* Only the *training part* of the stimulus is ever read: ``train_until=SECONDS``
  (the runs played one after another, frames strictly before ``SECONDS`` of that
  movie time; with one run, ``time < SECONDS``) or ``train_runs=[r, ...]`` (whole
  runs).  Every frame read goes through :func:`_read_frames`, which refuses a range
  outside the training frames, and the preview and the mean-frame baseline read
  through it too.
* Data order: frames stream from the Zarr store in *pieces* (the training frames of
  one Zarr chunk, 16 frames).  Per epoch, the pieces are visited in a random order and
  fed into a shuffle buffer of ``shuffle_buffer`` frames; a frame is drawn uniformly
  from the buffer whenever it is fuller than that, so memory is at most
  ``shuffle_buffer`` + one piece of frames, whatever the length of the movie.  The
  draw is planned on indices first (:meth:`ShuffleStream.epoch_order`, seeded by
  ``(seed, epoch)``), so the data-order state is one number: the stream position
  (frames consumed); epochs follow each other and every batch is full.
* AdamW (fused) on every trainable parameter (the decoder only with
  ``freeze_encoder``: then the encoder stays in eval mode, BN statistics included, and
  runs without grad); learning rate :func:`learning_rate`: linear warmup over
  ``warmup_steps`` (default min(100, a tenth of the steps)), then cosine decay to 0.
* Denormal floats are flushed to zero while training (``torch.set_flush_denormal``):
  tiny gradients made steps up to 3x slower on CPU after a few dozen steps.
* A checkpoint every ``checkpoint_every`` steps and at the end, written atomically
  (temporary file + rename) to ``out``; rerunning the same command resumes from it, and
  the loss curve equals the uninterrupted run's (bitwise on the same CPU and threads).
* After training: ``<out stem>.preview.png`` next to the checkpoint, training frames
  (top row) over their reconstructions (bottom row, eval mode).

Checkpoint (``torch.save`` of a dict; ``torch.load(path, weights_only=True)`` reads it)
--------------------------------------------------------------------------------------
``format`` ``"voxelflow-autoencoder"``, ``version`` 1, ``arch``
``"resnet50-autoencoder"``, ``config`` (everything that determines the result: frames
group and its params, training selection, weights, hyper-parameters, seed, steps),
``complete`` (bool), ``step`` / ``total_steps``, ``model`` (state_dict: ``encoder.*``
in torchvision's names, ``decoder.*``), ``optimizer`` (AdamW state_dict), ``rng``
(torch CPU RNG state), ``data`` (``position``: frames consumed; ``epoch``,
``seed``, ``shuffle_buffer``, ``n_train``), ``losses`` (training loss of every step),
``mean_frame_mse`` (loss of predicting the mean training frame), ``mean``/``std``
(normalisation), ``input_size`` ``[H, W]``, ``train_frames`` (per run ``[run,
start, stop]``), ``frames_group``, ``torch_version``.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from voxelflow.pipeline.errors import InputError, WorkspaceConflict, exception_reason
from voxelflow.stores.workspace import Workspace, describe_param_change

AUTOENCODER = "autoencoder"
ARCH = "resnet50-autoencoder"
CHECKPOINT_FORMAT = "voxelflow-autoencoder"
CHECKPOINT_VERSION = 1
DEFAULT_BATCH = {"cpu": 16, "cuda": 64}
DEFAULT_EPOCHS = 10
DEFAULT_LR = 1e-4
DEFAULT_WARMUP = 100  # steps of linear learning-rate warmup (at most a tenth of the steps)
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_BUFFER = 1024  # frames in the shuffle buffer
DEFAULT_CHECKPOINT_EVERY = 100  # steps
PREVIEW_FRAMES = 8
PREVIEW_MIN_SIDE = 128  # small frames are enlarged (nearest) to at least this in the PNG
QUEUE_BATCHES = 2  # batches read ahead by the reader thread
STRIDE = 32  # input sides must be multiples of this
ZERO_INIT_RESIDUAL = True  # each decoder block's last BN starts at 0 (block = shortcut)
MEMORY_FORMAT = torch.contiguous_format  # channels_last: BatchNorm is ~5x slower on CPU


# ---------------------------------------------------------------------------- model
class Encoder(nn.Module):
    """ResNet-50 trunk (``conv1 .. layer4``) + ``avgpool``; ``forward`` -> (B, 2048) code.

    Built from a torchvision ``resnet50`` (its modules, under their own names, minus
    ``fc``), so its state_dict keys are torchvision's and its graph nodes
    (``voxelflow features --list-layers autoencoder``) are resnet50's up to ``flatten``.
    """

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = resnet.conv1, resnet.bn1, resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        self.avgpool = resnet.avgpool

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck map ``(B, 2048, H/32, W/32)`` the decoder reads."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.spatial(x)), 1)


def _adjoint(weight: torch.Tensor) -> torch.Tensor:
    """Weight of the transpose of a stride-1 conv with ``weight``: channel axes swapped,
    kernel flipped (for a 1x1 conv simply ``W.T``)."""
    return weight.detach().transpose(0, 1).flip(2, 3).clone()


def _up(x: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x


class UpBottleneck(nn.Module):
    """Mirror of a torchvision ``Bottleneck`` (in -> mid -> out, stride s): out -> in, x s.

    ``conv1``/``conv2``/``conv3`` start as the adjoints of the block's
    ``conv3``/``conv2``/``conv1``, the shortcut conv as that of its ``downsample`` conv.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        c_out, mid, c_in = (block.conv3.out_channels, block.conv1.out_channels,
                            block.conv1.in_channels)
        self.scale = int(block.stride)
        self.conv1 = nn.Conv2d(c_out, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_in, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        with torch.no_grad():
            self.conv1.weight.copy_(_adjoint(block.conv3.weight))
            self.conv2.weight.copy_(_adjoint(block.conv2.weight))
            self.conv3.weight.copy_(_adjoint(block.conv1.weight))
        if block.downsample is not None:
            conv = nn.Conv2d(c_out, c_in, 1, bias=False)
            with torch.no_grad():
                conv.weight.copy_(_adjoint(block.downsample[0].weight))
            self.shortcut = nn.Sequential(conv, nn.BatchNorm2d(c_in))
        if ZERO_INIT_RESIDUAL:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(_up(out, self.scale))))
        out = self.bn3(self.conv3(out))
        identity = x if self.shortcut is None else self.shortcut(_up(x, self.scale))
        return self.relu(out + identity)


class Decoder(nn.Module):
    """``layer4 .. layer1`` mirrored (blocks in reverse order: ``decoder.layer4.0``
    mirrors ``encoder.layer4.2``), then the stem mirrored: nearest x2 (max-pool),
    nearest x2 + 7x7 conv 64 -> 3 with a bias (``conv1``)."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        for name in ("layer4", "layer3", "layer2", "layer1"):
            blocks = list(getattr(encoder, name))[::-1]
            setattr(self, name, nn.Sequential(*[UpBottleneck(b) for b in blocks]))
        w = encoder.conv1.weight  # (64, 3, 7, 7)
        self.conv1 = nn.Conv2d(w.shape[0], w.shape[1], w.shape[2], padding=w.shape[2] // 2,
                               bias=True)
        with torch.no_grad():
            # No BatchNorm follows this conv, so its scale matters: the adjoint is scaled
            # by sqrt(fan-in of conv1 / fan-in of this conv) = sqrt(3 / 64).
            self.conv1.weight.copy_(_adjoint(w) * math.sqrt(w.shape[1] / w.shape[0]))
            self.conv1.bias.zero_()

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.layer2(self.layer3(self.layer4(fmap))))
        x = _up(x, 2)  # mirror of the max-pool
        return self.conv1(_up(x, 2))  # mirror of the stride-2 7x7 conv1


class ResNetAutoencoder(nn.Module):
    """``forward(x)`` -> reconstruction (normalised pixels); ``encoder(x)`` -> the code."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.encoder = Encoder(resnet)
        self.decoder = Decoder(self.encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder.spatial(x))


def encoder_skeleton() -> Encoder:
    """An :class:`Encoder` with torchvision's default init (for graphs and shapes)."""
    return Encoder(torchvision.models.resnet50())


def build_autoencoder(weights: str = "imagenet"):
    """A :class:`ResNetAutoencoder` whose trunk has ``weights`` and whose decoder
    mirrors it (see the module docstring).  Returns ``(model, backbone)`` where
    ``backbone`` is the features stage's :class:`~voxelflow.pipeline.stages.features.Backbone`
    (weights file, sha256, normalisation)."""
    from voxelflow.pipeline.stages.features import load_backbone

    backbone = load_backbone("resnet50", weights)
    return ResNetAutoencoder(backbone.module), backbone


def _skeleton_autoencoder() -> ResNetAutoencoder:
    """A :class:`ResNetAutoencoder` on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return ResNetAutoencoder(torchvision.models.resnet50())


# ----------------------------------------------------------------------- checkpoints
def preview_path(out: str | Path) -> Path:
    """``autoencoder.pt`` -> ``autoencoder.preview.png`` (next to the checkpoint)."""
    out = Path(out)
    return out.with_name(out.stem + ".preview.png")


def read_checkpoint(path: str | Path, flag: str = "--weights") -> dict:
    """Load and check an autoencoder checkpoint; one-line :class:`InputError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file; train one with: voxelflow "
                         f"train-autoencoder --frames NAME --train-until SECONDS --out {path}")
    make = ("choose another --out, or pass --overwrite to replace it" if flag == "--out"
            else "make one with: voxelflow train-autoencoder ... --out PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # not a torch file, damaged, unsafe pickle
        reason = exception_reason(exc)
        raise InputError(f"{flag} {path}: not a voxelflow autoencoder checkpoint "
                         f"({reason[:120]}); {make}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        if isinstance(ckpt, dict) and ckpt and all(hasattr(v, "shape") for v in ckpt.values()):
            first = next(iter(ckpt))
            what = f"a plain state_dict of {len(ckpt)} tensors (e.g. {first}: another model)"
        else:
            what = f"a {type(ckpt).__name__} without format {CHECKPOINT_FORMAT!r}"
        raise InputError(f"{flag} {path}: {what}, not a voxelflow autoencoder checkpoint; "
                         f"{make}")
    if ckpt.get("arch") != ARCH or int(ckpt.get("version", 0)) > CHECKPOINT_VERSION:
        raise InputError(f"{flag} {path}: checkpoint of architecture {ckpt.get('arch')!r} "
                         f"(version {ckpt.get('version')}), this voxelflow reads {ARCH!r} "
                         f"version <= {CHECKPOINT_VERSION}; {make}")
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise InputError(f"{flag} {path}: checkpoint without model weights; {make}")
    _check_fits(state, _skeleton_autoencoder().state_dict(), path, flag)
    return ckpt


def _check_fits(state: dict, own: dict, path: Path, flag: str) -> None:
    from voxelflow.pipeline.stages.features import describe_state_mismatch

    mismatch = describe_state_mismatch(state, own)
    if mismatch:
        raise InputError(f"{flag} {path}: the weights do not fit the {ARCH} ({mismatch}); "
                         f"give a checkpoint written by voxelflow train-autoencoder")


def load_encoder(path: str | Path, flag: str = "--weights") -> tuple[Any, dict]:
    """The trained :class:`Encoder` (eval mode, CPU) of a finished checkpoint + its info.

    This is what ``voxelflow features --model autoencoder --weights CKPT`` runs.
    Raises :class:`InputError` for a file of another architecture or an unfinished run.
    """
    ckpt = read_checkpoint(path, flag)
    if not ckpt.get("complete"):
        raise InputError(
            f"{flag} {path}: training is unfinished (step {ckpt.get('step')} of "
            f"{ckpt.get('total_steps')}); finish it by rerunning the same voxelflow "
            f"train-autoencoder command")
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    with torch.device("meta"):
        encoder = Encoder(torchvision.models.resnet50())
    encoder.load_state_dict(state, strict=True, assign=True)
    encoder.eval()
    info = {
        "mean": tuple(float(m) for m in ckpt["mean"]),
        "std": tuple(float(s) for s in ckpt["std"]),
        "name": (f"voxelflow {ARCH}: encoder of a checkpoint trained {ckpt['step']} steps on "
                 f"{ckpt.get('n_train')} training frames of /{ckpt.get('frames_group')} "
                 f"({ckpt['input_size'][0]}x{ckpt['input_size'][1]})"),
        "input_size": list(ckpt["input_size"]),
    }
    return encoder, info


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------- training frames
@dataclass(frozen=True)
class Piece:
    """Training frames ``start:stop`` of ``run`` inside one Zarr chunk; ids from ``first``."""

    run: int
    start: int
    stop: int
    first: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def training_ranges(run_lengths: Sequence[int], fps: float, *, train_until: float | None,
                    train_runs: Sequence[int] | None, group: str) -> list[tuple[int, int, int]]:
    """``[(run, start, stop), ...]``: the training frames, from exactly one selection.

    ``train_until``: the runs played one after another (run ``r`` starts at the sum of
    the earlier runs' durations, ``n_frames / fps``); frames strictly before ``train_until``
    seconds of that movie time.  ``train_runs``: whole runs.
    """
    if (train_until is None) == (not train_runs):
        raise InputError("give exactly one of --train-until SECONDS or --train-runs R[,R...] "
                         "(the training part of the stimulus; test frames are never trained on)")
    n_runs = len(run_lengths)
    total_s = sum(run_lengths) / fps
    if train_runs:
        bad = sorted({int(r) for r in train_runs if not 0 <= int(r) < n_runs})
        if bad:
            raise InputError(f"--train-runs {','.join(map(str, bad))}: /{group} has runs "
                             f"0..{n_runs - 1}")
        ranges = [(r, 0, int(run_lengths[r])) for r in sorted({int(r) for r in train_runs})]
    else:
        if not math.isfinite(train_until):
            raise InputError(f"--train-until must be a number of seconds (got {train_until})")
        ranges = []
        offset = 0.0
        for r, n in enumerate(run_lengths):
            # frame k of run r is shown at offset + k / fps; keep those < train_until
            stop = int(np.clip(math.ceil((train_until - offset) * fps - 1e-9), 0, n))
            if stop > 0:
                ranges.append((r, 0, stop))
            offset += n / fps
    ranges = [rg for rg in ranges if rg[2] > rg[1]]
    if not ranges:
        what = (f"--train-until {train_until:g}" if train_until is not None
                else f"--train-runs {','.join(map(str, train_runs))}")
        raise InputError(
            f"training range is empty: {what} keeps no frame of /{group} ({n_runs} run(s), "
            f"{sum(run_lengths)} frames, {total_s:g} s at {fps:g} fps); give the seconds "
            f"(or runs) of the stimulus to train on, before the test samples")
    return ranges


def make_pieces(ranges: Sequence[tuple[int, int, int]], chunk: int) -> list[Piece]:
    """Cut the training ranges at Zarr chunk boundaries (the unit of a read)."""
    pieces: list[Piece] = []
    first = 0
    for run, start, stop in ranges:
        a = start
        while a < stop:
            b = min(stop, (a // chunk + 1) * chunk)
            pieces.append(Piece(run, a, b, first))
            first += b - a
            a = b
    return pieces


class ShuffleStream:
    """Planned shuffle-buffer order of the training frames (ids ``0 .. n_train - 1``).

    Epoch ``e``: pieces in the order ``default_rng([seed, e]).permutation``; each
    piece's frames enter a buffer; while the buffer holds more than ``buffer`` frames,
    one is drawn uniformly (same generator) and emitted; at the end the buffer is
    drained the same way.  The stream is the epochs one after another; stream
    position ``p`` is frame ``epoch_order(p // n)[p % n]``.
    """

    def __init__(self, pieces: Sequence[Piece], seed: int, buffer: int) -> None:
        self.pieces = list(pieces)
        self.seed = int(seed)
        self.buffer = max(1, int(buffer))
        self.n = sum(p.size for p in self.pieces)
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(frame ids in emission order, piece indices in load order) of ``epoch``."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        rng = np.random.default_rng([self.seed, int(epoch)])
        piece_order = rng.permutation(len(self.pieces))
        buf: list[int] = []
        out: list[int] = []

        def draw() -> None:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            out.append(buf.pop())

        for p in piece_order:
            piece = self.pieces[p]
            buf.extend(range(piece.first, piece.first + piece.size))
            while len(buf) > self.buffer:
                draw()
        while buf:
            draw()
        order = np.asarray(out, dtype=np.int64)
        self._cache = (int(epoch), order, piece_order)
        return order, piece_order

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Frame ids at stream positions ``start .. stop - 1``."""
        out = []
        for pos in range(start, stop):
            epoch, k = divmod(pos, self.n)
            out.append(self.epoch_order(epoch)[0][k])
        return np.asarray(out, dtype=np.int64)

    def frames(self, read: Callable[[Piece], np.ndarray],
               start: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(id, frame)`` from stream position ``start`` on, forever.

        Pieces are read in the planned load order, only as far as the next frame
        needs; frames already emitted before ``start`` (a resume) are dropped on read.
        Frames held: at most ``buffer`` + one piece.
        """
        epoch, offset = divmod(int(start), self.n)
        while True:
            order, piece_order = self.epoch_order(epoch)
            position = np.empty(self.n, dtype=np.int64)
            position[order] = np.arange(self.n)
            held: dict[int, np.ndarray] = {}
            next_piece = 0
            for i in range(offset, self.n):
                fid = int(order[i])
                while fid not in held:
                    piece = self.pieces[int(piece_order[next_piece])]
                    next_piece += 1
                    block = read(piece)
                    for k in range(piece.size):
                        if position[piece.first + k] >= i:
                            held[piece.first + k] = block[k].copy()
                    del block
                yield fid, held.pop(fid)
            epoch, offset = epoch + 1, 0

    def locate(self, fid: int) -> tuple[int, int]:
        """(run, frame index) of training frame ``fid``."""
        for piece in self.pieces:
            if piece.first <= fid < piece.first + piece.size:
                return piece.run, piece.start + fid - piece.first
        raise IndexError(fid)


def _read_frames(workspace: Workspace, group: str, ranges: Sequence[tuple[int, int, int]],
                 run: int, start: int, stop: int) -> np.ndarray:
    """``frames[start:stop]`` of ``run``: the only place training reads frames.

    Refuses (AssertionError: a bug, never an input problem) any range that is not
    inside the training frames, so no test-sample frame can be drawn.
    """
    if not any(r == run and a <= start and stop <= b for r, a, b in ranges) or stop <= start:
        raise AssertionError(f"read of /{group} run {run} frames {start}:{stop} is outside "
                             f"the training frames {list(ranges)}")
    return workspace.read_array(Workspace.run_path(group, run), "frames", slice(start, stop))


# --------------------------------------------------------------------------- helpers
class _Reader(threading.Thread):
    """Reads batches ahead into a bounded queue; its exception goes to the main thread."""

    def __init__(self, batches: Iterator, depth: int) -> None:
        super().__init__(name="voxelflow-autoencoder-reader", daemon=True)
        self.batches = batches
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for item in self.batches:
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised by get()
            self.error = exc

    def get(self):
        while True:
            try:
                return self.queue.get(timeout=0.1)
            except queue.Empty:
                if self.error is not None:
                    raise self.error
                if not self.is_alive():
                    raise RuntimeError("autoencoder reader stopped")


def _normaliser(mean: Sequence[float], std: Sequence[float], device):
    m = torch.tensor(mean, dtype=torch.float32, device=device).reshape(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).reshape(1, 3, 1, 1)

    def normalise(frames):
        """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), normalised."""
        x = frames.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        return ((x / 255.0 - m) / s).contiguous(memory_format=MEMORY_FORMAT)

    return normalise


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


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def mean_frame_mse(frames: Iterator[np.ndarray], mean: Sequence[float],
                   std: Sequence[float]) -> float:
    """MSE (normalised pixels) of predicting every frame by the mean frame, streamed."""
    total = None
    total_sq = None
    n = 0
    for block in frames:
        b = block.astype(np.float64)
        s, sq = b.sum(axis=0), (b * b).sum(axis=0)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        n += block.shape[0]
    var = np.maximum(total_sq / n - (total / n) ** 2, 0.0)  # (H, W, 3), raw units
    scale = (255.0 * np.asarray(std, dtype=np.float64)) ** 2
    return float((var / scale).mean())


def write_preview(path: Path, inputs: np.ndarray, recons: np.ndarray) -> Path:
    """PNG grid: ``inputs`` (uint8 (k, H, W, 3)) on top, ``recons`` below, 2 px gaps."""
    from PIL import Image

    k, h, w, _ = inputs.shape
    zoom = max(1, -(-PREVIEW_MIN_SIDE // max(h, w)))
    gap = 2
    H, W = h * zoom, w * zoom
    canvas = np.full((2 * H + 3 * gap, k * W + (k + 1) * gap, 3), 255, dtype=np.uint8)
    for row, imgs in enumerate((inputs, recons)):
        for i in range(k):
            img = np.repeat(np.repeat(imgs[i], zoom, axis=0), zoom, axis=1)
            y, x = gap + row * (H + gap), gap + i * (W + gap)
            canvas[y:y + H, x:x + W] = img
    Image.fromarray(canvas).save(path)
    return path


# --------------------------------------------------------------------------- trainer
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
    asked for) is kept in the checkpoint as ``request``.  Returns a summary dict (steps, losses, final loss,
    mean-frame baseline, frames/s, paths).
    """
    from voxelflow.pipeline.stages.features import check_device, parse_weights, sha256_file
    from tqdm.auto import tqdm

    # ---- validate everything before writing anything
    device = check_device(device, "fp32")
    if batch_size is None:
        batch_size = DEFAULT_BATCH["cuda" if device.startswith("cuda") else "cpu"]
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
    batch_size, epochs, shuffle_buffer = int(batch_size), int(epochs), int(shuffle_buffer)
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory; give a file name, e.g. "
                         f"{out}/autoencoder.pt")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist; create it first")
    kind, value = parse_weights(weights)  # bad spec / missing file: one-line error now

    group = f"frames/{frames_name}"
    frames_attrs = workspace.require_complete(group, f"voxelflow frames VIDEO --name {frames_name}")
    runs = workspace.open_runs(group)
    height, width = int(runs[0].sizes["y"]), int(runs[0].sizes["x"])
    if height % STRIDE or width % STRIDE:
        raise InputError(
            f"/{group}: frames are {height}x{width}; the autoencoder reconstructs sides that "
            f"are multiples of {STRIDE}; remake them with: voxelflow frames ... --name "
            f"{frames_name} --size 224")
    lengths = [int(ds.sizes["time"]) for ds in runs]
    fps = float(frames_attrs.get("fps") or 0) or 1.0 / float(runs[0]["time"].values[1])
    chunk = int(runs[0]["frames"].encoding.get("chunks", (16,))[0])
    ranges = training_ranges(lengths, fps, train_until=train_until, train_runs=train_runs,
                             group=group)
    pieces = make_pieces(ranges, chunk)
    stream = ShuffleStream(pieces, seed, shuffle_buffer)
    n_train = stream.n
    total_steps = int(steps) if steps is not None else math.ceil(epochs * n_train / batch_size)
    if warmup_steps is None:
        warmup_steps = min(DEFAULT_WARMUP, total_steps // 10)
    warmup_steps = int(warmup_steps)

    weights_key = str(Path(value).resolve()) if kind == "file" else weights
    weights_sha = sha256_file(value) if kind == "file" else None
    config = _json({
        "arch": ARCH, "frames": {"group": group, "params": workspace.params(group)},
        "train_until": train_until, "train_runs": sorted(set(map(int, train_runs or []))) or None,
        "train_frames": [list(r) for r in ranges], "n_train": n_train,
        "input_size": [height, width], "weights": weights_key, "weights_sha256": weights_sha,
        "freeze_encoder": bool(freeze_encoder), "optimizer": "AdamW", "lr": float(lr),
        "schedule": "linear warmup, cosine decay", "warmup_steps": warmup_steps,
        "weight_decay": float(weight_decay), "batch_size": batch_size,
        "epochs": None if steps is not None else epochs, "steps": total_steps,
        "seed": int(seed), "shuffle_buffer": shuffle_buffer,
        "loss": "MSE on ImageNet-normalised pixels",
    })

    # ---- an existing checkpoint: resume, done, or refuse
    ckpt = None
    out.with_name(out.name + ".partial").unlink(missing_ok=True)  # a killed save's leftover
    if out.exists():
        if overwrite:
            ckpt = None
        else:
            ckpt = read_checkpoint(out, "--out")
            old = ckpt.get("config", {})
            if old != config:
                raise WorkspaceConflict(
                    f"--out {out}: holds a training with other settings "
                    f"({describe_param_change(old, config)}); rerun with --overwrite to "
                    f"replace it, or choose another --out")

    # ---- model, optimiser, state
    if ckpt is None:
        torch.manual_seed(int(seed))
        model, backbone = build_autoencoder(weights)
        mean, std = backbone.mean, backbone.std
        start_step, losses = 0, []
        baseline = None
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
    optimiser = make_adamw(params, float(lr), float(weight_decay))
    if ckpt is not None:
        optimiser.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    normalise = _normaliser(mean, std, torch.device(device))

    def read(piece: Piece) -> np.ndarray:
        return _read_frames(workspace, group, ranges, piece.run, piece.start, piece.stop)

    if baseline is None:
        baseline = mean_frame_mse((read(p) for p in pieces), mean, std)

    def state(step: int, complete: bool) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": ARCH,
            "config": config, "complete": complete, "step": step, "total_steps": total_steps,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimiser.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "data": {"position": step * batch_size, "epoch": step * batch_size // n_train,
                     "seed": int(seed), "shuffle_buffer": shuffle_buffer, "n_train": n_train},
            "losses": list(losses), "mean_frame_mse": float(baseline),
            "mean": list(mean), "std": list(std), "input_size": [height, width],
            "train_frames": [list(r) for r in ranges], "n_train": n_train,
            "frames_group": group, "torch_version": str(torch.__version__),
            "request": request,
        }

    # ---- train
    todo = total_steps - start_step
    bar = tqdm(total=total_steps * batch_size, initial=start_step * batch_size, unit="frame",
               desc=f"train {out.name}", disable=not progress, dynamic_ncols=True)
    elapsed = 0.0
    saves: list[float] = []

    def save(step: int, complete: bool) -> None:
        t0 = time.perf_counter()
        _save_atomic(state(step, complete), out)
        saves.append(time.perf_counter() - t0)

    if todo > 0:
        def batches() -> Iterator[tuple[int, np.ndarray, Any]]:
            frames = stream.frames(read, start_step * batch_size)
            for step in range(start_step, total_steps):
                got = [next(frames) for _ in range(batch_size)]
                ids = np.asarray([g[0] for g in got], dtype=np.int64)
                x = torch.from_numpy(np.stack([g[1] for g in got]))
                if device.startswith("cuda"):
                    x = x.pin_memory()
                yield step, ids, x

        reader = _Reader(batches(), QUEUE_BATCHES)
        reader.start()
        model.train()
        if freeze_encoder:
            model.encoder.eval()
        # Denormal floats (tiny gradients, e.g. behind the zero-initialised BN weights)
        # make CPU arithmetic many times slower: flush them to zero while training.
        flushed = torch.set_flush_denormal(True)
        started = time.perf_counter()
        try:
            for _ in range(todo):
                step, _ids, frames = reader.get()
                for g in optimiser.param_groups:  # a function of the step only
                    g["lr"] = learning_rate(step, total_steps, float(lr), warmup_steps)
                x = normalise(frames)
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
                losses.append(float(loss.item()))
                bar.update(batch_size)
                bar.set_postfix(loss=f"{losses[-1]:.4f}",
                                epoch=f"{(step + 1) * batch_size / n_train:.2f}", refresh=False)
                done = step + 1
                if done % int(checkpoint_every) == 0 and done < total_steps:
                    save(done, False)
            elapsed = time.perf_counter() - started
        finally:
            reader.stop.set()
            if flushed:
                torch.set_flush_denormal(False)
        save(total_steps, True)
    elif ckpt is not None and not ckpt.get("complete"):
        save(total_steps, True)
    bar.close()

    # ---- preview
    png = None
    preview_mse = None
    if preview:
        png, preview_mse = _preview(model, stream, workspace, group, ranges, normalise,
                                    mean, std, preview_path(out))
    tail = losses[-min(len(losses), 10):] if losses else []
    return {
        "checkpoint": str(out), "preview": str(png) if png else None,
        "frames_group": group, "train_frames": [list(r) for r in ranges], "n_train": n_train,
        "steps": total_steps, "steps_run": max(todo, 0), "resumed_from": start_step,
        "batch_size": batch_size, "epochs": total_steps * batch_size / n_train,
        "losses": losses, "final_loss": float(np.mean(tail)) if tail else None,
        "mean_frame_mse": float(baseline), "preview_mse": preview_mse,
        "train_s": elapsed, "checkpoints_saved": len(saves),
        "save_s": saves[-1] if saves else None,
        "frames_per_s": todo * batch_size / elapsed if todo > 0 and elapsed > 0 else 0.0,
    }


def _preview(model, stream: ShuffleStream, workspace: Workspace, group: str, ranges,
             normalise, mean, std, path: Path) -> tuple[Path, float]:
    """Reconstruct up to 8 evenly spaced training frames (eval mode) and write the PNG."""
    k = min(PREVIEW_FRAMES, stream.n)
    ids = np.unique(np.linspace(0, stream.n - 1, k).round().astype(np.int64))
    frames = []
    for fid in ids:
        run, index = stream.locate(int(fid))
        frames.append(_read_frames(workspace, group, ranges, run, index, index + 1)[0])
    inputs = np.stack(frames)
    model.eval()
    with torch.inference_mode():
        x = normalise(torch.from_numpy(inputs))
        recon = model(x)
        mse = float(torch.nn.functional.mse_loss(recon, x))
        m = torch.tensor(mean, device=recon.device).reshape(1, 3, 1, 1)
        s = torch.tensor(std, device=recon.device).reshape(1, 3, 1, 1)
        pixels = ((recon * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)
        recons = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return write_preview(path, inputs, recons), mse
