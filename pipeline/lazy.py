"""Package ``__init__`` modules whose public names load their module on first use."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose ``exports`` map a public name to
    the module that defines it (relative to ``package``, or absolute with a leading
    ``voxelflow.``).  A name is imported when first asked for, then cached in the
    package, so ``import voxelflow`` and the CLI's start do not pay for torch, SciPy or
    Matplotlib."""
    import sys

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = exports[name]
        if not module.startswith("voxelflow."):
            module = f"{package}.{module}"
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
