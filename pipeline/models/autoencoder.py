"""The ResNet-50 autoencoder (the study's third feature space): network and checkpoints.

Architecture (:class:`ResNetAutoencoder`)
-----------------------------------------
* **Encoder** (:class:`Encoder`): torchvision's ResNet-50 trunk, ``conv1 .. layer4``,
  with the weights of the features stage (``imagenet`` | ``PATH`` | ``random:SEED``,
  :func:`voxelflow.pipeline.models.backbone.build_autoencoder`).  Its parameter names
  are torchvision's (``conv1.weight``, ``layer4.2.bn3.running_var``, ...), so the
  encoder half of a checkpoint loads into a plain ``torchvision.models.resnet50()``
  (without ``fc``).
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

Training is the ``train-autoencoder`` stage (:mod:`voxelflow.pipeline.stages.train`).

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
start, stop]``), ``frames_group``, ``torch_version``.  :func:`read_checkpoint` checks
one; :func:`load_encoder` gives the trained encoder of a finished one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from voxelflow.pipeline.errors import InputError, exception_reason
from voxelflow.pipeline.models.weights import describe_state_mismatch

ARCH = "resnet50-autoencoder"
CHECKPOINT_FORMAT = "voxelflow-autoencoder"
CHECKPOINT_VERSION = 1
STRIDE = 32  # input sides must be multiples of this
ZERO_INIT_RESIDUAL = True  # each decoder block's last BN starts at 0 (block = shortcut)


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


def _skeleton_autoencoder() -> ResNetAutoencoder:
    """A :class:`ResNetAutoencoder` on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return ResNetAutoencoder(torchvision.models.resnet50())


# ----------------------------------------------------------------------- checkpoints
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
