"""Joint models in experiment files: ``[[fit.joint]]`` tables.

Each table names two or more ``[[models]]`` (``features = ["a", "b"]``) and is fitted
as one banded ridge model per lag set of ``[fit]``
(:func:`~voxelflow.pipeline.stages.joint_fit.run_joint_fit_stage`, ``voxelflow fit
--features a b``), into ``/fits/<experiment>/a+b/lags-...``; the report shows it as a
row named ``a+b``. Optional keys: ``weightings`` (a count of seeded random
weightings, default 20, or a list of rows with one value per model) and
``partition`` (2 or 3 models: variance partitioning).
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


def joint_fit_stages(exp: Any, ws: Any, stages: list, progress: bool) -> list:
    """One planned fit per joint model and lag set, after the models' stages."""
    from voxelflow.pipeline.stages.fit import fit_group
    from voxelflow.pipeline.stages.joint_fit import run_joint_fit_stage
    from voxelflow.pipeline.study.plan import PlannedStage

    by_group = {stage.group: stage for stage in stages}
    bold = by_group[f"bold/{exp.subject}"]
    planned = []
    for spec in exp.joint:
        feats = [by_group[f"features/{n}"] for n in spec.features]
        for lags in exp.lag_sets:
            request = {"features": [f.request for f in feats], "bold": bold.request,
                       "lags": lags, "alphas": exp.alphas, "test_samples": exp.test_samples,
                       "test_runs": exp.test_runs, "test_repeats": exp.test_repeats,
                       "cv": exp.cv, "aggregate": exp.aggregate,
                       "statistics": exp.statistics().as_params(),
                       "weightings": spec.weightings, "partition": spec.partition}
            name = f"{exp.name}/{spec.name}"
            stage = PlannedStage("fit", fit_group(name, lags), request,
                                 upstream=[f.group for f in feats] + [bold.group])
            stage.call = _caller(run_joint_fit_stage, exp, ws, spec, lags, name, progress)
            planned.append(stage)
    return planned


def _caller(run: Callable, exp: Any, ws: Any, spec: JointSpec, lags: list[float],
            name: str, progress: bool) -> Callable[[bool], Any]:
    """The stage's call (bound here, not in a loop's closure)."""
    weightings = (np.asarray(spec.weightings, np.float64)
                  if isinstance(spec.weightings, list) else spec.weightings)
    return lambda overwrite: run(
        ws, spec.features, exp.subject, lags, exp.alphas, weightings=weightings,
        seed=exp.seed, partition=spec.partition, test_samples=exp.test_samples,
        test_runs=exp.test_runs, test_repeats=exp.test_repeats, cv=exp.cv,
        aggregate=exp.aggregate, statistics=exp.statistics(), device=exp.device,
        name=name, overwrite=overwrite, progress=progress)
