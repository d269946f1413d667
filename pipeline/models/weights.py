"""Weight files: the ``--weights`` spec, hashes, the torch cache and state_dict files.

``--weights`` is one of ``imagenet`` (torchvision's default weights of the model, from
the torch cache ``torch.hub.get_dir()/checkpoints``, downloaded there when absent and
allowed), ``kinetics`` (the same for a video model: its Kinetics-400 weights),
``random:SEED`` (the constructor's own initialisation after
``torch.manual_seed(SEED)``) or the path of a state_dict file.  Nothing here builds a
network: :mod:`voxelflow.pipeline.models.backbone` does, with these helpers.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from voxelflow.pipeline.errors import InputError, exception_reason

OFFLINE_ENV = "VOXELFLOW_OFFLINE"  # "1": never try to download weights
DOWNLOAD_TIMEOUT_S = 60


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of the file at ``path`` (read in 1 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_weights(spec: str) -> tuple[str, Any]:
    """``imagenet`` | ``kinetics`` | ``random:SEED`` | a path -> (kind, value)."""
    if spec in ("imagenet", "kinetics"):
        return spec, None
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
            f"--weights {spec}: no such file; give imagenet (kinetics for a video model), "
            f"random:SEED or the path of a "
            f"state_dict file (torch.save(model.state_dict(), PATH))"
        )
    return "file", path


def weights_key(spec: str) -> str:
    """The spec as recorded in params: a file path made absolute, anything else as given."""
    kind, value = parse_weights(spec)
    return str(Path(value).resolve()) if kind == "file" else spec


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


def ensure_imagenet_file(model: str, label: str = "ImageNet") -> tuple[Any, Path]:
    """``(weights enum, cached file)`` of ``model``'s default (``label``: ImageNet, or
    Kinetics-400 for a video model) weights, downloaded into the torch cache if absent
    (never with ``$VOXELFLOW_OFFLINE=1``); one-line error otherwise."""
    enum, file_name, cached = imagenet_weights_file(model)
    if not cached.is_file() and os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise InputError(
            f"{label} weights for {model} are not in the torch cache and downloads are off "
            f"(${OFFLINE_ENV}); put {file_name} (from {enum.url}) into {cached.parent}/ "
            f"(set TORCH_HOME to move the cache), or use --weights PATH|random:SEED"
        )
    if not cached.is_file():
        download_weights(model, enum.url, file_name, cached, label)
    return enum, cached


def download_weights(model: str, url: str, file_name: str, cached: Path,
                     label: str = "ImageNet") -> None:
    """Download ``url`` to ``cached`` (hash-checked, atomic); one-line error if impossible."""
    import torch

    match = re.search(r"-([a-f0-9]+)\.", file_name)  # torchvision names carry a sha256 prefix
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), match.group(1) if match else None,
                                       progress=True)
    except Exception as exc:
        reason = exception_reason(exc)
        raise InputError(
            f"{label} weights for {model} are not in the torch cache and could not be "
            f"downloaded ({reason[:120]}); put {file_name} (from {url}) into {cached.parent}/ "
            f"(set TORCH_HOME to move the cache), or use --weights PATH|random:SEED"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def load_state_file(path: Path) -> dict:
    """The state_dict (name -> tensor) saved in ``path``; one-line :class:`InputError`
    for anything else.  A dict holding it under ``"state_dict"`` is unwrapped."""
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


def check_state_fits(model: str, module: Any, state: dict, path: Path) -> None:
    """Raise a one-line :class:`InputError` when ``state`` is not ``model``'s state_dict."""
    mismatch = describe_state_mismatch(state, module.state_dict())
    if mismatch:
        raise InputError(
            f"--weights {path}: the state_dict does not fit {model} ({mismatch}); "
            f"give weights saved from a {model}"
        )
