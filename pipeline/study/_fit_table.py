"""The ``[fit]`` table of an experiment file, checked: lag sets, alphas, the held-out
test data (``test_samples`` | ``test_runs`` | ``test_repeats``), ``cv``, ``aggregate``
and the test-set statistics options (docs/statistics.md).

:func:`fit_options` is called by :func:`voxelflow.pipeline.study.config.load_experiment`
(which re-exports :data:`STUDY_ALPHAS` and :func:`check_mean_window`); errors are the
``FILE:LINE: fit.KEY: ...`` of the checker in :mod:`voxelflow.pipeline.study.toml_checks`.
The ``[[fit.joint]]`` tables are :mod:`voxelflow.pipeline.study.joint`'s.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from voxelflow.pipeline.study.toml_checks import _Checker

# The default ``[fit] alphas`` (and of ``voxelflow fit --alphas``)
STUDY_ALPHAS = [0.5, 1, 5, 10, 1e2, 1e3, 1e4, 2.5e4, 5e4, 1e5, 1e6, 1e7]


def check_mean_window(fail: Callable[..., None], fps: float, tr: float) -> None:
    """``aggregate = "mean"`` averages the frames of one TR: at ``fps * tr < 1`` some
    windows hold no frame.  ``fail(section, key, message)`` reports it."""
    if fps * tr < 1:
        fail("fit", "aggregate", f"\"mean\" averages the frames of one TR ({tr:g} s), but "
             f"at {fps:g} fps some TRs hold no frame; use \"last\" or a higher "
             f"stimulus.fps")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def fit_options(check: _Checker, fit: dict, n_runs: int) -> dict:
    """``lag_sets`` (seconds), ``alphas``, ``test_samples``, ``test_runs``,
    ``test_repeats``, ``cv``, ``aggregate`` and the statistics options of the ``[fit]``
    table, checked (``n_runs``: the experiment's BOLD runs); keyword arguments of
    :class:`~voxelflow.pipeline.study.config.Experiment`."""
    lag_sets = []
    for lags in fit["lag_sets"]:
        if not isinstance(lags, list) or not lags or not all(_is_number(x) for x in lags):
            check.fail("fit", "lag_sets", f"each lag set is a list of seconds, got {lags!r}")
        if not all(math.isfinite(x) and x >= 0 for x in lags):
            check.fail("fit", "lag_sets", f"lags must be finite seconds >= 0, got {lags!r}")
        lag_sets.append([float(x) for x in lags])
    alphas = fit.get("alphas", STUDY_ALPHAS)
    if not alphas or not all(_is_number(a) and math.isfinite(a) and a > 0 for a in alphas):
        check.fail("fit", "alphas", f"alphas must be finite numbers > 0, got {alphas!r}")
    test_samples = fit.get("test_samples")
    test_runs = fit.get("test_runs")
    test_repeats = _test_repeats(check, fit.get("test_repeats"))
    if sum(x is not None for x in (test_samples, test_runs, test_repeats)) != 1:
        check.fail("fit", None, "give exactly one of test_samples, test_runs or test_repeats")
    if test_samples is not None and test_samples <= 0:
        check.fail("fit", "test_samples", f"must be positive, got {test_samples}")
    cv = fit.get("cv", 5)
    if isinstance(cv, str) and cv != "runs" or isinstance(cv, int) and cv < 2:
        check.fail("fit", "cv", f"cv is a number of folds >= 2 or \"runs\", got {cv!r}")
    if test_runs is not None:
        test_runs = _test_runs(check, test_runs, n_runs)
    beyond = [r for g in test_repeats or [] for r in g if r >= n_runs]
    if beyond:
        check.fail("fit", "test_repeats", f"runs {beyond} do not exist: bold.runs lists "
                   f"{n_runs} run(s), numbered from 0")
    training_runs = n_runs - len(test_runs or []) - sum(len(g) for g in test_repeats or [])
    if cv == "runs" and training_runs < 2:
        check.fail("fit", "cv", f"\"runs\" needs at least two training runs, and there "
                   f"{'is' if training_runs == 1 else 'are'} {training_runs}; give a number "
                   f"of folds")
    return {"lag_sets": lag_sets, "alphas": [float(a) for a in alphas],
            "test_samples": test_samples, "test_runs": test_runs,
            "test_repeats": test_repeats,
            "cv": cv, "aggregate": check.choice(fit, "fit", "aggregate", ("last", "mean")),
            **_statistics_options(check, fit)}


def _test_repeats(check: _Checker, value: Any) -> list[list[int]] | None:
    """``[[10, 11, 12], ...]``: groups of at least two distinct run indices (>= 0)."""
    if value is None:
        return None
    ok = isinstance(value, list) and value and all(
        isinstance(g, list) and len(g) >= 2 and all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in g)
        for g in value)
    if not ok:
        check.fail("fit", "test_repeats", f"a list of groups of at least two 0-based BOLD run "
                   f"indices that showed the same clip, e.g. [[10, 11, 12]]; got {value!r}")
    flat = [r for g in value for r in g]
    if len(set(flat)) != len(flat):
        check.fail("fit", "test_repeats", f"a run appears twice in {value!r}")
    return [list(g) for g in value]


def _statistics_options(check: _Checker, fit: dict) -> dict:
    """``permutations``, ``bootstrap`` (>= 0), ``block_length`` (>= 1), ``null`` and
    ``seed`` of the ``[fit]`` table, checked."""
    out = {}
    for key, default, least in (("permutations", 1000, 0), ("bootstrap", 1000, 0),
                                ("block_length", 10, 1), ("seed", 0, 0)):
        out[key] = int(fit.get(key, default))
        if out[key] < least:
            check.fail("fit", key, f"must be >= {least}, got {out[key]}")
    out["null"] = check.choice(fit, "fit", "null", ("blocks", "shifts"))
    return out


def _test_runs(check: _Checker, test_runs: list, n_runs: int) -> list[int]:
    """Whole runs held out: 0-based indices of ``bold.runs``, unique, leaving one to train."""
    if not test_runs or not all(isinstance(r, int) and not isinstance(r, bool)
                                for r in test_runs):
        check.fail("fit", "test_runs", f"expected a non-empty list of run indices (0-based), "
                   f"got {test_runs!r}")
    unknown = [r for r in test_runs if not 0 <= r < n_runs]
    if unknown:
        check.fail("fit", "test_runs", f"{unknown} not among the runs 0..{n_runs - 1} of "
                   f"bold.runs (0-based)")
    if len(set(test_runs)) != len(test_runs):
        check.fail("fit", "test_runs", f"a run is listed twice: {test_runs!r}")
    if len(test_runs) >= n_runs:
        check.fail("fit", "test_runs", "holds out every run: leave at least one to train on")
    return [int(r) for r in test_runs]
