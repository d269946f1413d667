"""The report's numbers: Table 2 (model x lag set x alpha), ROI means, winner maps.

Input: one fit Dataset per (model, lag set) with ``r_test (alpha, voxel)``,
``r_test_cv (voxel)``, ``best_alpha (voxel)``, a ``valid (voxel)`` flag and, from the
fit stage's test-set statistics, ``p_perm``/``q_perm_fdr``/``p_perm_fwe``,
``r2_test_cv``, ``bootstrap_mean_r (resample)``, the ``block_sum_*`` and (with
repeated test runs) ``cc_max``/``cc_norm``; fits made before those existed give NaN.
The files and the page are written by :mod:`voxelflow.pipeline.study.report.build`.

Significance per voxel (counted in the table): the block-permutation p-value with
BH-FDR (``n_sig_perm_fdr``) and the max-statistic FWE p-value (``n_sig_perm_fwe``);
the *parametric* one-sided t-test of r (``t = r sqrt((n - 2) / (1 - r^2))``, n - 2
df, BH-FDR, ``n_sig_parametric``) is kept for comparison: it assumes independent
samples, which autocorrelated BOLD is not, so it is optimistic.  Between cells: a
block-bootstrap 95 % interval of each cell's mean r and paired comparisons of the
best cell with every other (:mod:`voxelflow.pipeline.stats.compare`); definitions in
``docs/statistics.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from voxelflow.pipeline.stats import compare, diagnostics
from voxelflow.pipeline.stats.bootstrap import BLOCK_SUM_VARIABLES
from voxelflow.pipeline.stats.permutation import bh_fdr, parametric_pvalues
from voxelflow.pipeline.stats.resampling import block_boundaries, bootstrap_counts

FDR_Q = 0.05
SIGNIFICANCE_METHOD = (
    "per voxel, r_test_cv > 0 by a permutation test that keeps BOLD's autocorrelation "
    "(n_sig_perm_fdr: Benjamini-Hochberg FDR q < 0.05; n_sig_perm_fwe: max-statistic "
    "family-wise p < 0.05); n_sig_parametric: the parametric one-sided t-test (df = "
    "n_test - 2, BH-FDR q < 0.05), which assumes independent samples and is optimistic "
    "for BOLD")


@dataclass
class FitResult:
    """One fitted encoding model: feature space ``model`` with lag set ``lags``."""

    model: str
    lags: list[float]
    fit: xr.Dataset

    @property
    def label(self) -> str:
        return lag_label(self.lags)


def lag_label(lags: Sequence[float]) -> str:
    """``[4, 4.5]`` -> ``"4,4.5"`` (the study's way of naming lag sets)."""
    return ",".join(f"{float(l):g}" for l in lags)


def _valid(fit: xr.Dataset) -> np.ndarray:
    """The scored voxels: valid, with finite r_test, r_cv, best_alpha and r_test_cv."""
    return diagnostics.scored_in(fit)


def n_significant(r: np.ndarray, n_test: int, q: float = FDR_Q) -> int:
    """Voxels whose r is significantly > 0 (t-test per voxel, BH-FDR over voxels)."""
    r = np.asarray(r, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0 or n_test < 4:
        return 0
    return int((bh_fdr(parametric_pvalues(r, n_test)) < q).sum())


def summary_table(results: Sequence[FitResult]) -> pd.DataFrame:
    """Rows model x lag set; columns mean test r per alpha (scored voxels), best alpha,
    mean r at per-voxel CV-selected alphas with its 95 % block-bootstrap interval, the
    paired comparison with the best row (``diff_vs_best``, its interval, ``p_vs_best``
    and Holm's ``p_vs_best_holm``), mean R^2 (and cc_max / cc_norm with repeated test
    runs) at those alphas, significant voxel counts, scored and NaN voxel counts."""
    rows = [_table_row(res) for res in results]
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    best = int(np.nanargmax(table["r_cv_selected"].to_numpy(np.float64)))
    cells = [compare.Cell(f"{r.model}, lags {r.label}", float(table["r_cv_selected"][i]),
                          _bootstrap_means(r.fit), _pairing_key(r.fit))
             for i, r in enumerate(results)]
    comparison = pd.DataFrame(compare.compare_cells(cells, best)).drop(columns="paired")
    after = table.columns.get_loc("r_cv_selected") + 1
    for offset, name in enumerate(comparison.columns):
        table.insert(after + offset, name, comparison[name])
    for name in ("n_sig_perm_fdr", "n_sig_perm_fwe"):  # counts; <NA> without permutations
        table[name] = table[name].astype("Int64")
    return table


def _table_row(res: FitResult) -> dict:
    fit = res.fit
    valid = _valid(fit)
    alphas = fit["alpha"].values
    mean_r = (fit["r_test"].values[:, valid].mean(axis=1, dtype=np.float64) if valid.any()
              else np.full(alphas.size, np.nan))
    row: dict = {"model": res.model, "lags": res.label}
    for a, m in zip(alphas, mean_r):
        row[f"{a:g}"] = float(m)
    best = int(np.nanargmax(mean_r)) if np.isfinite(mean_r).any() else 0
    r_cv = fit["r_test_cv"].values[valid]
    row["best_alpha"] = float(alphas[best])
    row["r_best_alpha"] = float(mean_r[best])
    row["r_cv_selected"] = _mean(r_cv)
    row["r2_cv_selected"] = _mean(fit["r2_test_cv"].values[valid]) if "r2_test_cv" in fit else np.nan
    if "cc_max" in fit:
        cc_max = fit["cc_max"].values[valid]
        row["cc_max_mean"] = _mean(cc_max[np.isfinite(cc_max)])
        row["cc_norm_mean"] = _mean(fit["cc_norm"].values[valid][np.isfinite(cc_max)])
    n_test = int(fit.attrs.get("n_test", 0))
    row["n_sig_perm_fdr"] = _count_below(fit, "q_perm_fdr", valid)
    row["n_sig_perm_fwe"] = _count_below(fit, "p_perm_fwe", valid)
    row["n_sig_parametric"] = n_significant(r_cv, n_test)
    row["n_valid_voxels"] = int(valid.sum())
    row["n_nan_voxels"] = diagnostics.nan_voxel_count(fit)[0]
    return row


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values, dtype=np.float64)) if values.size else float("nan")


def _count_below(fit: xr.Dataset, name: str, valid: np.ndarray, q: float = FDR_Q) -> float:
    """Scored voxels with ``name`` below ``q`` (NaN when the fit has no such variable)."""
    return float(np.sum(fit[name].values[valid] < q)) if name in fit else np.nan


def _bootstrap_means(fit: xr.Dataset) -> np.ndarray | None:
    return np.asarray(fit["bootstrap_mean_r"].values) if "bootstrap_mean_r" in fit else None


def _pairing_key(fit: xr.Dataset) -> tuple | None:
    """Fits pair when they drew the same resamples of the same test data."""
    stats_params = fit.attrs.get("statistics") or {}
    if "test_key" not in fit.attrs or "bootstrap_mean_r" not in fit:
        return None
    return (fit.attrs["test_key"], int(fit.attrs.get("n_test", 0)), stats_params.get("seed"),
            stats_params.get("block_length"), int(fit.sizes["resample"]))


def comparison_sentences(table: pd.DataFrame, q: float = FDR_Q) -> list[str]:
    """The paired comparisons of the best row with every other, in words."""
    if table.empty or "p_vs_best" not in table:
        return []
    best = table.iloc[int(np.nanargmax(table["r_cv_selected"].to_numpy(np.float64)))]
    def name(row) -> str:
        return f"{row['model']}, lags {row['lags']}"

    lines = [f"Best: {name(best)}, mean r {best['r_cv_selected']:.3f} (95 % CI "
             f"{best['ci_low']:.3f} to {best['ci_high']:.3f})."]
    for _, row in table.iterrows():
        if row["model"] == best["model"] and row["lags"] == best["lags"]:
            continue
        if not np.isfinite(row["p_vs_best"]):
            lines.append(f"Not compared with {name(row)}: no paired bootstrap (other test "
                         f"samples or statistics settings).")
            continue
        numbers = (f"difference {row['diff_vs_best']:.3f}, 95 % CI {row['diff_ci_low']:.3f} "
                   f"to {row['diff_ci_high']:.3f}, p = {row['p_vs_best']:.3g}, Holm-adjusted "
                   f"{row['p_vs_best_holm']:.3g}")
        if row["p_vs_best_holm"] < q:
            lines.append(f"It predicts significantly better than {name(row)} ({numbers}).")
        else:
            lines.append(f"The difference with {name(row)} is not significant ({numbers}).")
    return lines


def ranking(table: pd.DataFrame) -> pd.DataFrame:
    """Table sorted by the honest score (mean r at CV-selected alphas), best first."""
    return table.sort_values("r_cv_selected", ascending=False).reset_index(drop=True)


def format_number(value, column: str = "") -> str:
    """A table value for reading: ``best_alpha`` as ``1e3`` / ``0.5`` / ``2.5e4``
    (:func:`format_alpha`), counts as integers, p-values to 3 significant digits, other
    floats (r -- also in the per-alpha columns --, R^2, differences) to 3 decimals;
    NaN/NA -> ``-``."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) or column.startswith("n_"):
        return str(int(value))
    if column == "best_alpha":
        return format_alpha(float(value))
    if column.startswith("p_"):
        return f"{float(value):.3g}"
    return f"{float(value):.3f}"


def _is_alpha_column(column: str) -> bool:
    """The per-alpha columns of :func:`summary_table` are named by the alpha (``%g``)."""
    try:
        float(column)
    except ValueError:
        return False
    return True


def format_alpha(alpha: float) -> str:
    """``1000`` -> ``1e3``, ``25000`` -> ``2.5e4``, ``0.5`` -> ``0.5``, ``10`` -> ``10``."""
    text = f"{alpha:g}"
    if abs(alpha) >= 1000 or (0 < abs(alpha) < 1e-3):
        mantissa, exponent = f"{alpha:.6e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        text = f"{mantissa}e{int(exponent)}"
    return text


def table_markdown(table: pd.DataFrame) -> str:
    """GitHub-flavoured Markdown table, numbers as :func:`format_number` writes them."""
    cols = list(table.columns)
    header = [format_alpha(float(c)) if _is_alpha_column(c) else c for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(format_number(row[c], c) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def roi_table(results: Sequence[FitResult], roi_of_voxel: np.ndarray,
              names: dict[int, str] | None = None) -> pd.DataFrame:
    """Mean r at CV-selected alphas per ROI (atlas label, 0 = none) per model/lag set."""
    rows = []
    labels = sorted(int(l) for l in np.unique(roi_of_voxel) if l != 0)
    for res in results:
        valid = _valid(res.fit)
        r = res.fit["r_test_cv"].values
        for label in labels:
            sel = valid & (roi_of_voxel == label)
            rows.append({"model": res.model, "lags": res.label, "roi": label,
                         "roi_name": (names or {}).get(label, str(label)),
                         "n_voxels": int(sel.sum()),
                         "mean_r": float(np.nanmean(r[sel])) if sel.any() else np.nan})
    return pd.DataFrame(rows)


def model_winners(results: Sequence[FitResult], table: pd.DataFrame
                  ) -> tuple[list[FitResult], dict[str, np.ndarray]] | None:
    """Which model predicts each voxel best, among each model's best row of ``table``,
    where it beats every other model significantly (paired block bootstrap from the
    stored ``block_sum_*``, BH-FDR over voxels; :func:`compare.winner_map`).  ``None``
    with fewer than two models or without paired bootstraps."""
    ranked = ranking(table)
    candidates = []
    for model in dict.fromkeys(ranked["model"]):
        lags = ranked[ranked["model"] == model].iloc[0]["lags"]
        candidates.append(next(r for r in results if r.model == model and r.label == lags))
    keys = {_pairing_key(r.fit) for r in candidates}
    if (len(candidates) < 2 or None in keys or len(keys) > 1
            or any(name not in r.fit for r in candidates for name in BLOCK_SUM_VARIABLES)):
        return None
    fit0 = candidates[0].fit
    params, n_test = fit0.attrs["statistics"], int(fit0.attrs["n_test"])
    boundaries = block_boundaries(n_test, int(params["block_length"]))
    counts = bootstrap_counts(n_test, int(params["block_length"]), int(fit0.sizes["resample"]),
                              int(params["seed"]))
    fits = [r.fit for r in candidates]

    def read(cell: int, voxels: slice) -> np.ndarray:
        return np.stack([np.asarray(fits[cell][name][:, voxels].values, np.float32)
                         for name in BLOCK_SUM_VARIABLES])

    data = fit0[BLOCK_SUM_VARIABLES[0]].data
    chunk = int(data.chunksize[-1]) if hasattr(data, "chunksize") else 4096
    winners = compare.winner_map(np.stack([f["r_test_cv"].values for f in fits]),
                                 np.stack([_valid(f) for f in fits]), read, counts,
                                 np.diff(boundaries), chunk=chunk)
    return candidates, winners


