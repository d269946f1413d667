"""The fit stage's test set and its statistics (maths in
:mod:`voxelflow.pipeline.stats`): the split (last samples, whole runs or repeated
runs) and its fingerprint, the variables the fit group stores beside r, their
combination over voxel blocks before the group is marked complete, and the summary
lines and warnings of ``voxelflow fit``.

Stored per voxel: ``r2_test (alpha, voxel)``, ``r2_test_cv``, ``p_parametric``;
with permutations ``p_perm``, ``q_perm_fdr``, ``p_perm_fwe`` (and per block
``null_max_r (voxel_block, permutation)``); with the bootstrap the five
``block_sum_* (time_block, voxel)``, per block ``bootstrap_sum_r`` and
``bootstrap_n (voxel_block, resample)``, and ``bootstrap_mean_r (resample)``; with
repeated test runs ``explainable_variance``, ``cc_max`` and ``cc_norm``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np

from voxelflow.pipeline.design.lags import LaggedDesign, split_train_test
from voxelflow.pipeline.errors import InputError

from voxelflow.pipeline.stats import diagnostics
from voxelflow.pipeline.stats.bootstrap import BLOCK_STATISTICS, BLOCK_SUM_VARIABLES
from voxelflow.pipeline.stats.per_block import TestStatistics, combine_blocks
from voxelflow.pipeline.stats.repeats import repeat_split

_BOLD = "BOLD units (as stored in the bold group)"
#: long_name and units of every statistics variable of a fit group.
VARIABLES: dict[str, tuple[str, str]] = {
    "r2_test": ("test-set R^2 (scikit-learn r2_score) per alpha", "1"),
    "r2_test_cv": ("test-set R^2 at the CV-selected alpha", "1"),
    "p_parametric": ("one-sided p of r_test_cv > 0 by the parametric t-test (df = n_test - 2; "
                     "assumes independent samples)", "1"),
    "p_perm": ("one-sided permutation p of r_test_cv > 0 (autocorrelation-respecting null)",
               "1"),
    "q_perm_fdr": ("Benjamini-Hochberg adjusted p_perm over the scored voxels", "1"),
    "p_perm_fwe": ("max-statistic family-wise p of r_test_cv over all scored voxels", "1"),
    "null_max_r": ("largest null r over the voxel block's scored voxels, per null draw", "1"),
    "bootstrap_sum_r": ("sum of r_test_cv over the voxel block's scored voxels, per "
                        "block-bootstrap resample", "1"),
    "bootstrap_n": ("scored voxels of the voxel block where a resample's r is defined",
                    "voxels"),
    "bootstrap_mean_r": ("mean r_test_cv over scored voxels, per block-bootstrap resample",
                         "1"),
    "explainable_variance": ("explainable variance of the repeated test runs "
                             "(voxelwise_tutorials' definition, bias corrected)", "1"),
    "cc_max": ("noise ceiling: highest r with the mean of the repeats any model can reach "
               "(Schoppe et al. 2016)", "1"),
    "cc_norm": ("r_test_cv / cc_max (Schoppe et al. 2016)", "1"),
}
_SUM_UNITS = {"y": _BOLD, "yhat": _BOLD, "y2": _BOLD + " squared",
              "yhat2": _BOLD + " squared", "y_yhat": _BOLD + " squared"}
for _stat, _var in zip(BLOCK_STATISTICS, BLOCK_SUM_VARIABLES):
    VARIABLES[_var] = (f"sum over each test block of the centred {_stat.replace('_', ' x ')} "
                       f"(y measured, yhat predicted at the CV alpha)", _SUM_UNITS[_stat])


def split_samples(design: LaggedDesign, test_samples: int | None,
                   test_runs: Sequence[int] | None,
                   test_repeats: Sequence[Sequence[int]] | None
                   ) -> tuple[np.ndarray, np.ndarray, list[list[int]] | None]:
    """Training and test sample indices, and the repeat groups (None without)."""
    if test_repeats:
        if test_samples is not None or test_runs:
            raise InputError("give exactly one of --test-samples N, --test-runs R[,R...] or "
                             "--test-repeats R,R[,R...]")
        return repeat_split(design.run, test_repeats)
    train, test = split_train_test(design, test_samples=test_samples,
                                   test_runs=list(test_runs) if test_runs else None)
    return train, test, None


def test_key(bold_group: str, design: LaggedDesign, test: np.ndarray,
              groups: list[list[int]] | None) -> str:
    """A fingerprint of the test samples (BOLD group, run and time of each, repeats):
    fits with the same key have the same test data, so their bootstraps pair."""
    digest = hashlib.sha256(bold_group.encode())
    digest.update(np.ascontiguousarray(design.run[test], np.int64).tobytes())
    digest.update(np.ascontiguousarray(design.time[test], np.float64).tobytes())
    digest.update(repr(groups).encode())
    return digest.hexdigest()[:16]


def _empty(shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any) -> da.Array:
    return da.empty(shape, dtype=dtype, chunks=chunks)


def statistics_template(plan: TestStatistics, n_alphas: int, n_voxels: int, block: int,
                        n_blocks: int, repeats: bool) -> tuple[dict, dict, dict]:
    """``(data_vars, encoding, coords)`` of the statistics variables of a fit group:
    per-voxel variables in chunks of ``block`` voxels, per-block ones one row per
    chunk (``n_blocks`` rows)."""
    data: dict[str, tuple] = {}
    per_voxel = ["r2_test_cv", "p_parametric"]
    coords: dict[str, tuple] = {}
    data["r2_test"] = (("alpha", "voxel"), _empty((n_alphas, n_voxels), (n_alphas, block),
                                                  np.float32))
    if plan.n_null:
        per_voxel += ["p_perm", "q_perm_fdr", "p_perm_fwe"]
        coords["permutation"] = ("permutation", np.asarray(plan.null_labels, np.int64))
        data["null_max_r"] = (("voxel_block", "permutation"),
                              _empty((n_blocks, plan.n_null), (1, plan.n_null), np.float64))
    if plan.n_resamples:
        k, b = plan.n_time_blocks, plan.n_resamples
        coords["time_block"] = ("time_block", plan.boundaries[:-1].astype(np.int64),
                                {"long_name": "first test sample of the block"})
        coords["resample"] = ("resample", np.arange(b, dtype=np.int64))
        for name in BLOCK_SUM_VARIABLES:
            data[name] = (("time_block", "voxel"), _empty((k, n_voxels), (k, block), np.float32))
        data["bootstrap_sum_r"] = (("voxel_block", "resample"),
                                   _empty((n_blocks, b), (1, b), np.float64))
        data["bootstrap_n"] = (("voxel_block", "resample"), _empty((n_blocks, b), (1, b),
                                                                   np.int64))
        data["bootstrap_mean_r"] = (("resample",), _empty((b,), (b,), np.float64))
    if repeats:
        per_voxel += ["explainable_variance", "cc_max", "cc_norm"]
    for name in per_voxel:
        data[name] = (("voxel",), _empty((n_voxels,), (block,), np.float32))
    if "null_max_r" in data or "bootstrap_sum_r" in data:
        coords["voxel_block"] = ("voxel_block", np.arange(n_blocks, dtype=np.int64))
    encoding = {name: {"chunks": tuple(var[1].chunksize)} for name, var in data.items()}
    return data, encoding, coords


# Written whole by :func:`finalize` once every voxel block is done (not by the blocks).
FINAL_VARIABLES = ("q_perm_fdr", "p_perm_fwe", "bootstrap_mean_r")


def label_variables(ds: Any) -> None:
    """Set ``long_name`` and ``units`` of the statistics variables present in ``ds``."""
    for name, (long_name, units) in VARIABLES.items():
        if name in ds:
            ds[name].attrs.update(long_name=long_name, units=units)


def finalize(fit: Any, writer: Any) -> None:
    """Write what needs every voxel block (``q_perm_fdr``, ``p_perm_fwe``,
    ``bootstrap_mean_r``) from the stored block outputs of ``fit`` (the group's lazy
    Dataset); only (voxel,) and (voxel_block, draw) arrays are read."""
    def get(name: str) -> np.ndarray | None:
        return np.asarray(fit[name].values) if name in fit else None

    arrays = combine_blocks(p_perm=get("p_perm"), r_test_cv=get("r_test_cv"),
                            null_max_r=get("null_max_r"),
                            bootstrap_sum_r=get("bootstrap_sum_r"),
                            bootstrap_n=get("bootstrap_n"))
    if arrays:
        writer.write_final(0, arrays)


def summary_lines(fit: Any, attrs: dict, scored: np.ndarray, q: float = 0.05) -> list[str]:
    """The statistics lines of ``voxelflow fit``'s summary (no warnings)."""
    lines = []
    stats_params = attrs.get("statistics") or {}
    if "bootstrap_mean_r" in fit:
        from voxelflow.pipeline.stats.bootstrap import percentile_interval

        low, high = percentile_interval(np.asarray(fit["bootstrap_mean_r"].values))
        lines.append(f"{'95 % CI':>12}  [{low:.4f}, {high:.4f}]  (block bootstrap over test "
                     f"time: {fit.sizes['resample']} resamples of "
                     f"{stats_params.get('block_length')}-sample blocks)")
    if "r2_test_cv" in fit and scored.any():
        lines.append(f"{'R^2':>12}  {np.mean(fit['r2_test_cv'].values[scored]):.4f}  "
                     f"(mean test R^2 at CV-selected alphas)")
    counts = [f"{int((fit['q_perm_fdr'].values[scored] < q).sum())} by permutation "
              f"(BH-FDR q < {q:g})",
              f"{int((fit['p_perm_fwe'].values[scored] < q).sum())} by max-statistic "
              f"(FWE p < {q:g})"] if "q_perm_fdr" in fit else []
    if "p_parametric" in fit:
        from voxelflow.pipeline.stats.permutation import bh_fdr

        adjusted = bh_fdr(fit["p_parametric"].values[scored])
        counts.append(f"{int((adjusted < q).sum())} by the parametric t-test (BH-FDR, "
                      f"assumes independent samples)")
    if counts:
        null = (f"{stats_params.get('null')} null, {fit.sizes.get('permutation', 0)} draws, "
                f"{stats_params.get('block_length')}-sample blocks") if "q_perm_fdr" in fit else ""
        lines.append("significant voxels (r > 0): " + "; ".join(counts)
                     + (f" [{null}]" if null else ""))
    if "cc_max" in fit:
        cc_max, cc_norm = fit["cc_max"].values[scored], fit["cc_norm"].values[scored]
        defined = np.isfinite(cc_max)
        ev = fit["explainable_variance"].values[scored]
        lines.append(f"noise ceiling ({len(attrs.get('test_repeats', [[0, 0]])[0])} repeats): "
                     f"cc_max defined for {int(defined.sum())} voxels, mean "
                     f"{_mean(cc_max[defined]):.4f}; mean cc_norm {_mean(cc_norm[defined]):.4f}; "
                     f"mean explainable variance {_mean(ev):.4f}")
    return lines


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else float("nan")


def fit_warnings(fit: Any, attrs: dict) -> list[str]:
    """The one-line warnings of a stored fit (:func:`diagnostics.warnings_of`)."""
    return diagnostics.warnings_of(fit, attrs)
