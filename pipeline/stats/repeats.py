"""Repeated presentations of the test stimulus: the train/test split, the
explainable variance, the noise ceiling ``cc_max`` and ``cc_norm``.

``test_repeats = [[10, 11, 12]]`` names BOLD runs that showed the same clip.  The
test samples are those of the first run of each group (its features are the test
design); the measured test response is the mean of the group's repeats at those
samples; the other runs of a group are neither trained nor tested on.

With ``y_n`` (n = 1..N) the repeats of one voxel over the test samples,
``ybar = mean_n y_n`` and ``Var`` the sample variance over time (ddof = 1):

* explainable variance (voxelwise_tutorials' ``explainable_variance``, bias
  corrected, each repeat z-scored over time first)::

      ev0 = Var(mean_n z_n) / mean_n Var(z_n),   ev = ev0 - (1 - ev0) / (N - 1)

  the fraction of a single repeat's variance that is stimulus-driven;
* signal power and noise ceiling (Schoppe et al. 2016, eqs. 5-8)::

      SP     = (N Var(ybar) - mean_n Var(y_n)) / (N - 1)
      cc_max = sqrt(SP / Var(ybar))

  the highest correlation with ``ybar`` that any model can reach, given that
  ``ybar`` still holds noise; NaN where ``SP <= 0`` (no measurable signal);
* ``cc_norm = r / cc_max`` with ``r`` the test correlation of the prediction with
  ``ybar`` (can exceed 1 by sampling error).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from voxelflow.pipeline.errors import InputError

__all__ = ["repeat_split", "explainable_variance", "noise_ceiling", "normalised_correlation"]


def repeat_split(run_of_sample: np.ndarray, test_repeats: Sequence[Sequence[int]],
                 option: str = "--test-repeats") -> tuple[np.ndarray, np.ndarray,
                                                          list[list[int]]]:
    """``(train, test, groups)``: sample indices and the repeat groups, sorted by
    their first run (the order of the test samples).

    ``run_of_sample`` (sample,) is the design's run index per sample.  Every group
    needs at least two runs, all groups the same number, no run twice, every run
    among the design's, and some run left to train on.  Errors name ``option``.
    """
    groups = [[int(r) for r in group] for group in test_repeats]
    present = set(np.unique(run_of_sample).tolist())
    flat = [r for group in groups for r in group]
    if not groups or any(len(group) < 2 for group in groups):
        raise InputError(f"{option}: each group needs at least two runs that showed the "
                         f"same clip (got {groups})")
    if len(set(flat)) != len(flat):
        raise InputError(f"{option}: a run appears twice in {groups}")
    if len({len(group) for group in groups}) > 1:
        raise InputError(f"{option}: every group needs the same number of repeats "
                         f"(got {[len(g) for g in groups]})")
    missing = sorted(set(flat) - present)
    if missing:
        raise InputError(f"{option}: runs {missing} not among the runs {sorted(present)} "
                         f"(0-based; runs whose samples all lack a stimulus history count "
                         f"as absent)")
    groups.sort(key=lambda group: group[0])
    is_test = np.isin(run_of_sample, [group[0] for group in groups])
    is_train = ~np.isin(run_of_sample, flat)
    if not is_train.any():
        raise InputError(f"{option}: the repeats {groups} leave no training runs")
    return np.flatnonzero(is_train), np.flatnonzero(is_test), groups


def explainable_variance(repeats: np.ndarray, bias_correction: bool = True,
                         do_zscore: bool = True) -> np.ndarray:
    """float64 (voxel,): explainable variance of ``repeats`` (repeat, time, voxel), as
    ``voxelwise_tutorials.utils.explainable_variance`` defines it."""
    data = np.asarray(repeats, dtype=np.float64)
    if do_zscore:
        sd = data.std(axis=1, keepdims=True)
        data = (data - data.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, np.nan)
    mean_var = data.var(axis=1, ddof=1).mean(axis=0)
    var_mean = data.mean(axis=0).var(axis=0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ev = var_mean / mean_var
    if bias_correction:
        ev = ev - (1 - ev) / (data.shape[0] - 1)
    return ev


def noise_ceiling(repeats: np.ndarray) -> np.ndarray:
    """float64 (voxel,): ``cc_max`` of Schoppe et al. (2016) for the mean of
    ``repeats`` (repeat, time, voxel); NaN where the signal power is not positive."""
    data = np.asarray(repeats, dtype=np.float64)
    n_repeats = data.shape[0]
    var_of_mean = data.mean(axis=0).var(axis=0, ddof=1)
    mean_of_var = data.var(axis=1, ddof=1).mean(axis=0)
    signal_power = (n_repeats * var_of_mean - mean_of_var) / (n_repeats - 1)
    ok = (signal_power > 0) & (var_of_mean > 0)
    return np.where(ok, np.sqrt(np.where(ok, signal_power, 0.0)
                                / np.where(ok, var_of_mean, 1.0)), np.nan)


def normalised_correlation(r: np.ndarray, cc_max: np.ndarray) -> np.ndarray:
    """``cc_norm = r / cc_max`` (NaN where either is NaN)."""
    return np.asarray(r, np.float64) / np.asarray(cc_max, np.float64)
