"""The feature extractor: a loaded backbone read at some of its nodes, frames in, features out.

:class:`FeatureExtractor` turns uint8 frames ``(B, H, W, 3)`` into one float32
``(B, n_features)`` array per requested node: normalise on the device
(``x / 255``, ``- mean``, ``/ std``, the backbone's own values), run the graph up to
the nodes (torchvision ``create_feature_extractor``, residual sums in place:
:mod:`voxelflow.pipeline.models.graph`) in channels_last under
``torch.inference_mode`` (with autocast for ``precision="bf16"|"fp16"``; strict fp32,
TF32 off, on CUDA for ``"fp32"``), then average over space (``pool="avg"``) or
flatten in C order.  :class:`ClipExtractor` does the same for video models: uint8
clips ``(B, T, H, W, 3)`` in, the graph fed ``(B, 3, T, H, W)`` in channels_last_3d.
:func:`worker_extractor` builds the same extractor once per process from an
:class:`ExtractorSpec` (what a Dask worker runs).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

from voxelflow.pipeline.errors import InputError, exception_reason
from voxelflow.pipeline.models.backbone import Backbone, load_backbone
from voxelflow.pipeline.models.graph import build_graph

POOL_MODES = (None, "avg")
PRECISIONS = ("fp32", "bf16", "fp16")


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

    MEMORY_FORMAT = "channels_last"  # torch memory format of the graph's weights
    SIZE_HINT = ""  # more of the fix when the model refuses the input's size
    STAT_SHAPE = (1, 3, 1, 1)  # mean/std broadcast over (B, C, H, W)

    def __init__(self, backbone: Backbone, layers: Sequence[str], device: str = "cpu",
                 pool: str | None = None, precision: str = "fp32") -> None:
        import torch

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
        graph = build_graph(module, self.layers)
        graph.eval()
        self.graph = graph.to(self.device, memory_format=getattr(torch, self.MEMORY_FORMAT))
        shape = self.STAT_SHAPE
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
        elif self.pool == "avg" and out.ndim == 5:
            out = out.mean(dim=(2, 3, 4))  # (B, C, T, H, W) -> (B, C)
        return out.reshape(out.shape[0], -1).float()

    def blank_input(self, height: int, width: int):
        """Two black inputs of ``height x width`` frames (what :meth:`probe` runs)."""
        import torch

        return torch.zeros((2, height, width, 3), dtype=torch.uint8)

    def input_text(self, height: int, width: int) -> str:
        """What the model is fed, for messages."""
        return f"{height}x{width} frames"

    def __call__(self, frames) -> list:
        import torch

        with torch.inference_mode(), self._autocast(), strict_fp32(self.device.type,
                                                                  self.precision):
            outputs = self.graph(self.normalise(frames))
            return [self._reduce(n, outputs[n]) for n in self.layers]

    def probe(self, height: int, width: int, model: str) -> list[tuple[int, ...]]:
        """Per-sample output shape of each layer (before flattening), from a 2-frame forward."""
        import torch

        x = self.blank_input(height, width)
        try:
            with torch.inference_mode(), self._autocast(), strict_fp32(self.device.type,
                                                                      self.precision):
                outputs = self.graph(self.normalise(x))
        except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
            reason = exception_reason(exc)
            raise InputError(
                f"{model} cannot take {self.input_text(height, width)} up to layer(s) "
                f"{', '.join(self.layers)} ({reason[:150]}); make frames at the model's input "
                f"size (voxelflow frames ... --size 224){self.SIZE_HINT}"
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
            if self.pool == "avg" and out.ndim in (4, 5):
                per = (per[0],)
            elif self.pool == "avg" and out.ndim == 3:
                per = (per[-1],)
            shapes.append(per)
        self.shapes = shapes
        return shapes


class ClipExtractor(FeatureExtractor):
    """A video model's extractor: ``__call__(uint8 (B, T, H, W, 3) clips)`` ->
    ``[float32 (B, n_features) per layer]``; the graph gets ``(B, 3, T, H, W)``
    (torchvision's video layout), normalised per channel, channels_last_3d."""

    MEMORY_FORMAT = "channels_last_3d"
    STAT_SHAPE = (1, 3, 1, 1, 1)
    SIZE_HINT = " or give longer clips (--clip-frames)"

    def __init__(self, backbone: Backbone, layers: Sequence[str], clip_frames: int,
                 device: str = "cpu", pool: str | None = None, precision: str = "fp32") -> None:
        super().__init__(backbone, layers, device=device, pool=pool, precision=precision)
        self.clip_frames = int(clip_frames)

    def normalise(self, frames):
        """uint8 (B, T, H, W, 3) -> float32 (B, 3, T, H, W), normalised."""
        x = frames.to(self.device, non_blocking=True).permute(0, 4, 1, 2, 3).float()
        return (x / 255.0 - self.mean) / self.std

    def blank_input(self, height: int, width: int):
        import torch

        return torch.zeros((2, self.clip_frames, height, width, 3), dtype=torch.uint8)

    def input_text(self, height: int, width: int) -> str:
        return f"clips of {self.clip_frames} {height}x{width} frames"


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
    clip_frames: int = 0  # frames per clip of a video model (0: an image model)


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
    if spec.clip_frames:
        return ClipExtractor(backbone, spec.layers, spec.clip_frames, device=spec.device,
                             pool=spec.pool, precision=spec.precision)
    return FeatureExtractor(backbone, spec.layers, device=spec.device, pool=spec.pool,
                            precision=spec.precision)
