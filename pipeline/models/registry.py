"""Which backbones exist, how to construct one, and which of its layers can be read.

Models: every torchvision classification model (``torchvision.models.list_models``),
every torchvision video classification model (``torchvision.models.video``: they take
clips, :mod:`voxelflow.pipeline.models.video`) plus ``efficientnet_lite0`` (PyPI
``efficientnet-lite-pytorch``) and ``autoencoder`` (the encoder of a ``voxelflow
train-autoencoder`` checkpoint, :mod:`voxelflow.pipeline.models.autoencoder`).  Any
node of a model's graph can be read (torchvision's ``create_feature_extractor``;
:func:`list_layers` gives the names).  Defaults reproduce the study:

* ``resnet50``  -> ``avgpool``: the 2,048-d global-average-pooled output;
* ``vgg16``     -> ``classifier.4``: the 4,096-d fc7 output after its ReLU;
* ``efficientnet_lite0`` -> ``_avg_pooling``: the 1,280-d pooled head output;
* ``autoencoder`` -> ``avgpool``: the 2,048-d pooled bottleneck;
* ``s3d`` -> ``avgpool`` (1,024 channels per remaining time step);
* any other model -> the node just before its last one (the classifier's input).

Constructors here give the architecture with its default initialisation; weights are
loaded by :mod:`voxelflow.pipeline.models.backbone`.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import warnings
from typing import Any, Callable, Sequence

from voxelflow.pipeline.errors import InputError

EFFICIENTNET_LITE0 = "efficientnet_lite0"
AUTOENCODER = "autoencoder"  # the encoder of a voxelflow train-autoencoder checkpoint
EXTRA_MODELS = (EFFICIENTNET_LITE0, AUTOENCODER)
DEFAULT_LAYERS = {
    "resnet50": "avgpool",
    "vgg16": "classifier.4",
    EFFICIENTNET_LITE0: "_avg_pooling",
    AUTOENCODER: "avgpool",  # the 2,048-d pooled bottleneck
    "s3d": "avgpool",  # its last nodes are the classifier's logits per time step
}


def available_models() -> list[str]:
    """Names accepted by ``model=``: torchvision classification and video classification
    models + EfficientNet-Lite0 + the autoencoder."""
    import torchvision

    from voxelflow.pipeline.models.video import video_models

    return sorted(set(torchvision.models.list_models(module=torchvision.models)) |
                  video_models() | set(EXTRA_MODELS))


def check_model(model: str) -> str:
    """Return ``model`` or raise :class:`InputError` listing close matches."""
    names = available_models()
    if model in names:
        return model
    close = difflib.get_close_matches(model, names, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise InputError(
        f"unknown model {model!r}; {hint}(any torchvision classification or video model, or "
        f"{', '.join(EXTRA_MODELS)}; list them with: voxelflow features --list-models)"
    )


def quiet_build(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a model constructor without its prints (efficientnet_lite prints on load)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def construct(model: str) -> Any:
    """``model``'s ``torch.nn.Module`` with its constructor's own (random) initialisation."""
    import torchvision

    if model == EFFICIENTNET_LITE0:
        from efficientnet_lite_pytorch import EfficientNet

        return quiet_build(EfficientNet.from_name, "efficientnet-lite0")
    if model == AUTOENCODER:
        from voxelflow.pipeline.models.autoencoder import encoder_skeleton

        return encoder_skeleton()
    return torchvision.models.get_model(model)


def skeleton(model: str) -> Any:
    """The model's architecture on the meta device (no memory, no init cost)."""
    import torch

    try:
        with torch.device("meta"):
            return construct(model)
    except Exception:  # a constructor that needs real tensors: build it for real
        return construct(model)


def list_layers(model: str) -> list[str]:
    """The node names of ``model`` that ``layers=`` accepts (eval-mode graph, in order)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    check_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, eval_nodes = get_graph_node_names(skeleton(model))
    return list(eval_nodes)


def default_layer(model: str, nodes: Sequence[str] | None = None) -> str:
    """The study's layer for resnet50/vgg16/efficientnet_lite0, else the classifier's input."""
    if model in DEFAULT_LAYERS:
        return DEFAULT_LAYERS[model]
    nodes = list(nodes) if nodes is not None else list_layers(model)
    return nodes[-2] if len(nodes) >= 2 else nodes[-1]


def check_layers(model: str, layers: Sequence[str] | None) -> list[str]:
    """Resolve ``layers`` (None -> the default) and check every name exists."""
    nodes = list_layers(model)
    if not layers:
        return [default_layer(model, nodes)]
    out: list[str] = []
    for layer in layers:
        if layer not in nodes:
            close = difflib.get_close_matches(layer, nodes, n=6, cutoff=0.5)
            hint = f"close matches: {', '.join(close)}" if close else "no close match"
            raise InputError(
                f"{model} has no layer {layer!r} ({hint}); list them with: "
                f"voxelflow features --list-layers {model}"
            )
        if layer not in out:
            out.append(layer)
    return out
