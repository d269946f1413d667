"""Names that become paths: the one check for every group, report and checkpoint name.

A stimulus, feature, subject, fit or experiment name is a folder of the workspace
(``/frames/<name>``, ``/fits/<experiment>/<model>/lags-...``), of the reports
(``reports/<experiment>/``) or part of a checkpoint file name
(``autoencoders/<experiment>-<model>.pt``).  A name that is empty, ``.``/``..``,
absolute, or holds a ``/`` would write somewhere else (outside the workspace, into
the reports folder itself, over another group); the checks here refuse it before any
work.  This module lives in ``stores/`` because names become store paths here.

The rule (:func:`name_problem`): 1 to :data:`MAX_NAME_LENGTH` characters, the first a
letter or digit, the others letters, digits or ``_ - . + = @ ,``.  So no ``/`` or
``\\``, no leading dot (hence no ``.``, ``..`` or hidden folder), no leading dash (it
would read as an option), no spaces, quotes, ``:`` or shell characters.  A *nested*
name (a fit's ``EXPERIMENT/MODEL``) is several such names joined by single ``/``.
"""

from __future__ import annotations

from voxelflow.pipeline.errors import InputError

__all__ = ["MAX_NAME_LENGTH", "NAME_RULE", "check_name", "name_problem"]

MAX_NAME_LENGTH = 128
NAME_PUNCTUATION = "_-.+=@,"
NAME_RULE = (f"letters, digits and {' '.join(NAME_PUNCTUATION)} only, first a letter or "
             f"digit, at most {MAX_NAME_LENGTH} characters")


def _part_problem(part: str) -> str | None:
    if not part:
        return "is empty"
    if part in (".", ".."):
        return "is a folder reference, not a name"
    if len(part) > MAX_NAME_LENGTH:
        return f"is {len(part)} characters long (at most {MAX_NAME_LENGTH})"
    if not part[0].isalnum():
        return f"starts with {part[0]!r}"
    bad = sorted({c for c in part if not (c.isalnum() or c in NAME_PUNCTUATION)})
    if bad:
        return "holds " + " ".join(repr(c) for c in bad)
    return None


def name_problem(name: object, nested: bool = False) -> str | None:
    """What is wrong with ``name`` as a workspace/report/checkpoint name (None: nothing).

    ``nested``: several names joined by ``/`` (``EXPERIMENT/MODEL``), each checked.
    """
    if not isinstance(name, str):
        kind = type(name).__name__
        return f"is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a text name"
    if not name:
        return "is empty"
    if nested:
        if name.startswith("/"):
            return "is an absolute path"
        for part in name.split("/"):
            problem = _part_problem(part)
            if problem:
                return problem if part == name else f"part {part!r} {problem}"
        return None
    if "/" in name or "\\" in name:
        return "holds a path separator" + (" (an absolute path)" if name[0] in "/\\" else "")
    return _part_problem(name)


def check_name(name: object, option: str, nested: bool = False) -> str:
    """``name`` if it is a valid name, else a one-line :class:`InputError` naming
    ``option`` (``--name``, ``--subject``, ...) and the rule."""
    problem = name_problem(name, nested)
    if problem:
        what = "names joined by '/'" if nested else "a plain name"
        raise InputError(f"{option} {name!r}: {problem}; give {what}: {NAME_RULE}")
    return name  # type: ignore[return-value]
