"""Checking a TOML experiment file's values with the line they are on: the
``FILE:LINE: section.key: message`` errors of :mod:`voxelflow.pipeline.study.config`."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from voxelflow.pipeline.errors import InputError
from voxelflow.stores.names import NAME_RULE, name_problem


class _Locator:
    """Finds the line of ``key`` inside ``[section]`` / ``[[section]]`` in the raw text."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def line_of(self, section: str | None, key: str | None = None, index: int = 0) -> int:
        current, seen = None, -1
        for n, raw in enumerate(self.lines, start=1):
            line = raw.strip()
            m = re.match(r"^\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?", line)
            if m:
                current = m.group(1)
                if current == section:
                    seen += 1
                    if key is None and seen == index:
                        return n
                continue
            if key and current == section and seen == index and re.match(
                    rf"^{re.escape(key)}\s*=", line):
                return n
        return 1


class _Checker:
    """The checks of an experiment file's values; each failure is one
    ``FILE:LINE: section.key: message`` :class:`InputError`."""

    def __init__(self, path: Path, text: str, schema: dict) -> None:
        self.path, self.loc, self.schema = path, _Locator(text), schema

    def fail(self, section: str, key: str | None, message: str, index: int = 0) -> None:
        line = self.loc.line_of(section, key, index)
        where = f"{section}.{key}" if key else f"[{section}]"
        raise InputError(f"{self.path}:{line}: {where}: {message}")

    def table(self, data: dict, section: str, index: int = 0) -> dict:
        schema = self.schema[section]
        for key, value in data.items():
            if key not in schema:
                close = ", ".join(sorted(schema))
                self.fail(section, key, f"unknown key (known: {close})", index)
            types, _ = schema[key]
            if isinstance(value, bool) and types is not bool and bool not in (
                    types if isinstance(types, tuple) else (types,)):
                self.fail(section, key, f"expected {_type_name(types)}, got a boolean", index)
            if not isinstance(value, types):
                self.fail(section, key, f"expected {_type_name(types)}, got "
                          f"{type(value).__name__} {value!r}", index)
        for key, (_, required) in schema.items():
            if required and key not in data:
                self.fail(section, None, f"missing required key '{key}'", index)
        return data

    def choice(self, data: dict, section: str, key: str, choices: tuple[str, str]) -> str:
        """``data[key]`` (default: the first choice), which must be one of ``choices``."""
        value = data.get(key, choices[0])
        if value not in choices:
            self.fail(section, key, f"must be \"{choices[0]}\" or \"{choices[1]}\", got "
                      f"{value!r}")
        return value

    def name(self, value: str, section: str, key: str, index: int = 0) -> None:
        """A name that becomes a workspace group, report folder or checkpoint name."""
        problem = name_problem(value)
        if problem:
            self.fail(section, key, f"{value!r} {problem}; a name is {NAME_RULE}", index)

    def number(self, value: Any, section: str, key: str, *, positive: bool = True,
               index: int = 0) -> None:
        """A finite number (> 0 with ``positive``, else >= 0)."""
        if not math.isfinite(value) or (value <= 0 if positive else value < 0):
            self.fail(section, key, f"must be a finite number {'>' if positive else '>='} 0, "
                      f"got {value!r}", index)

    def existing(self, section: str, key: str, base: Path, value: str, index: int = 0) -> Path:
        path = (base / value).expanduser()
        if not path.exists():
            self.fail(section, key, f"file not found: {path}", index)
        return path


def _type_name(types: Any) -> str:
    if isinstance(types, tuple):
        return " or ".join(t.__name__ for t in types)
    return types.__name__
