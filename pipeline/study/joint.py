"""Joint models in experiment files: ``[[fit.joint]]`` tables.

Each table names two or more ``[[models]]`` (``features = ["a", "b"]``) and is fitted
as one banded ridge model per lag set of ``[fit]``
(:func:`~voxelflow.pipeline.stages.joint_fit.run_joint_fit_stage`, ``voxelflow fit
--features a b``), into ``/fits/<experiment>/a+b/lags-...``; the report shows it as a
row named ``a+b``. Optional keys: ``weightings`` (a count of seeded random
weightings, default 20, or a list of rows with one value per model) and
``partition`` (2 or 3 models: variance partitioning). This module parses and checks
the tables (:func:`parse_joint`, called by the config loader);
:mod:`~voxelflow.pipeline.study.plan` plans their fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from voxelflow.pipeline.stages.joint_fit import DEFAULT_WEIGHTINGS, PARTITION_SPACES

SECTION = "fit.joint"  # its keys: config.SCHEMA["fit.joint"]


@dataclass
class JointSpec:
    """One ``[[fit.joint]]``: the models fitted together and the search options."""

    features: list[str]
    weightings: int | list[list[float]] = DEFAULT_WEIGHTINGS
    partition: bool = False

    @property
    def name(self) -> str:
        """``"a+b"``: the fit's model name (report row, ``/fits/<exp>/a+b``)."""
        return "+".join(self.features)


def parse_joint(check: Any, tables: list, model_names: list[str]) -> list[JointSpec]:
    """The ``[[fit.joint]]`` tables, checked against the models (``check``: the
    experiment file's checker; errors are one line with the key's file line)."""
    specs = []
    for index, raw in enumerate(tables):
        if not isinstance(raw, dict):
            check.fail("fit", "joint", f"write each joint model as a [[fit.joint]] table, "
                       f"got {raw!r}")
        spec = JointSpec(**check.table(raw, SECTION, index))
        fail: Callable[[str, str], None] = (
            lambda key, message: check.fail(SECTION, key, message, index))
        names = spec.features
        if len(names) < 2 or not all(isinstance(n, str) for n in names):
            fail("features", f"name two or more [[models]], got {names!r}")
        unknown = [n for n in names if n not in model_names]
        if unknown:
            fail("features", f"{unknown} not among the [[models]] names {model_names}")
        twice = [n for i, n in enumerate(names) if n in names[:i]]
        if twice:
            fail("features", f"{twice[0]!r} named twice")
        if spec.name in model_names or spec.name in [s.name for s in specs]:
            fail("features", f"the joint model's name {spec.name!r} is already taken")
        _check_weightings(fail, spec)
        if spec.partition and len(names) not in PARTITION_SPACES:
            fail("partition", f"needs 2 or 3 features, got {len(names)}")
        specs.append(spec)
    return specs


def _check_weightings(fail: Callable[[str, str], None], spec: JointSpec) -> None:
    """A count >= 1, or rows of one finite value >= 0 per model (not all zero)."""
    from voxelflow.pipeline.ridge import check_weightings

    value = spec.weightings
    if isinstance(value, bool) or isinstance(value, int) and value < 1:
        fail("weightings", f"a count >= 1 or a list of rows, got {value!r}")
    if isinstance(value, list):
        try:
            check_weightings(np.asarray(value, dtype=np.float64), len(spec.features))
        except (ValueError, TypeError) as exc:
            fail("weightings", str(exc))
