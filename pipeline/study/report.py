"""Tables, plots, brain maps and an HTML page from stored fits (the study's Table 2).

Input: one fit Dataset per (model, lag set) with ``r_test (alpha, voxel)``,
``r_test_cv (voxel)``, ``best_alpha (voxel)``, a ``valid (voxel)`` flag and, from the
fit stage's test-set statistics, ``p_perm``/``q_perm_fdr``/``p_perm_fwe``,
``r2_test_cv``, ``bootstrap_mean_r (resample)``, the ``block_sum_*`` and (with
repeated test runs) ``cc_max``/``cc_norm``; fits made before those existed give NaN.
Output folder ``reports/<experiment>/``: ``table.csv``, ``table.md``, ``r_vs_alpha.png``,
``r_histogram.png``, ``best_model_map.png``, ``maps/<model>_<lags>_r_cv.nii.gz``,
``winner_model.nii.gz``/``winner_model.png`` (two models or more), ``roi_table.csv``
(with an atlas), and ``index.html`` that shows them all.

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

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

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


def table_markdown(table: pd.DataFrame) -> str:
    """GitHub-flavoured Markdown table, r to 3 decimals."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in table.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if isinstance(v, float) and c not in ("best_alpha",):
                cells.append(f"{v:.3f}")
            elif isinstance(v, float):
                cells.append(f"{v:g}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_r_vs_alpha(results: Sequence[FitResult], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for res in results:
            if res.model != model:
                continue
            valid = _valid(res.fit)
            ax.plot(res.fit["alpha"].values, np.nanmean(res.fit["r_test"].values[:, valid], 1),
                    marker="o", ms=3, label=f"lags {res.label}")
        ax.set_xscale("log")
        ax.set_xlabel("alpha")
        ax.set_ylabel("mean test r (valid voxels)")
        ax.set_title(model)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histogram(res: FitResult, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = res.fit["r_test_cv"].values[_valid(res.fit)]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist(r[np.isfinite(r)], bins=50, color="#3b6ea8")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("test r at CV-selected alpha")
    ax.set_ylabel("voxels")
    ax.set_title(f"{res.model}, lags {res.label}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_brain_map(nifti_path: Path, path: Path, title: str) -> None:
    """Orthogonal slices of an r map over its own grid (nilearn)."""
    import matplotlib
    matplotlib.use("Agg")
    from nilearn import plotting

    display = plotting.plot_stat_map(str(nifti_path), title=title, colorbar=True,
                                     threshold=None, display_mode="ortho", draw_cross=False,
                                     black_bg=False, cmap="RdBu_r", bg_img=None)
    display.savefig(str(path), dpi=110)
    display.close()


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


def write_report(results: Sequence[FitResult], out_dir: str | Path, *, experiment: str,
                 write_map: Callable[[FitResult, Path], None] | None = None,
                 roi_of_voxel: np.ndarray | None = None,
                 roi_names: dict[int, str] | None = None,
                 write_values: Callable[[np.ndarray, Path, str], None] | None = None,
                 category_maps: Callable[[FitResult, Path], dict | None] | None = None
                 ) -> dict:
    """Write every report file into ``out_dir``; return their paths, the table, the
    comparisons in words and the fits' warnings.

    ``write_map(result, path)`` writes a result's r_test_cv as NIfTI and
    ``write_values(values, path, description)`` any (voxel,) array (the caller knows
    the brain geometry); without them, no maps or brain plots are made.
    ``category_maps(result, maps_dir)`` writes a result's per-category weight maps
    and returns ``{"lag", "categories", "niftis", "png"}`` (``None``: not a
    categorical model; :mod:`voxelflow.pipeline.study.category_maps`).
    """
    out = Path(out_dir)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    table = summary_table(results)
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(table_markdown(table))
    plot_r_vs_alpha(results, out / "r_vs_alpha.png")
    best_row = ranking(table).iloc[0]
    best = next(r for r in results if r.model == best_row["model"] and r.label == best_row["lags"])
    plot_histogram(best, out / "r_histogram.png")
    files = {"table_csv": out / "table.csv", "table_md": out / "table.md",
             "r_vs_alpha": out / "r_vs_alpha.png", "histogram": out / "r_histogram.png"}
    maps = []
    if write_map is not None:
        for res in results:
            path = out / "maps" / f"{res.model}_lags-{res.label.replace(',', '-')}_r_cv.nii.gz"
            write_map(res, path)
            maps.append(path)
            if res is best:
                files["best_map_nifti"] = path
        plot_brain_map(files["best_map_nifti"], out / "best_model_map.png",
                       f"{best.model}, lags {best.label}: test r (CV alpha)")
        files["brain_map"] = out / "best_model_map.png"
    winners = _write_winners(results, table, out, write_values, files)
    roi = None
    if roi_of_voxel is not None:
        roi = roi_table(results, roi_of_voxel, roi_names)
        roi.to_csv(out / "roi_table.csv", index=False)
        files["roi_table"] = out / "roi_table.csv"
    categories = []
    for res in results if category_maps is not None else []:
        made = category_maps(res, out / "maps")
        if made is not None:
            categories.append({"model": res.model, "lags": res.label, **made})
    notes = {"comparisons": comparison_sentences(table), "winners": winners,
             "warnings": [f"{r.model}, lags {r.label}: {w}" for r in results
                          for w in diagnostics.warnings_of(r.fit, dict(r.fit.attrs))]}
    files["html"] = out / "index.html"
    files["html"].write_text(_html(experiment, table, best, files, maps, roi, out, notes,
                                   extra=_category_html(categories, out)))
    return {"table": table, "best": (best.model, best.label), "files": files, "maps": maps,
            "comparisons": notes["comparisons"], "warnings": notes["warnings"],
            "winners": winners, "category_maps": categories}


def _category_html(categories: list[dict], out: Path) -> str:
    """The section of per-category weight maps (empty without categorical models)."""
    parts = []
    for item in categories:
        links = ", ".join(f"<a href='{html.escape(str(p.relative_to(out)))}'>"
                          f"{html.escape(c)}</a>"
                          for c, p in zip(item["categories"], item["niftis"]))
        parts += [f"<h2>Category weights: {html.escape(item['model'])}, lags "
                  f"{html.escape(item['lags'])} (best lag {item['lag']:g} s)</h2>",
                  f"<img src='{html.escape(str(item['png'].relative_to(out)))}' "
                  f"alt='weight map per category'>",
                  "<p>Weights at each voxel's CV-selected alpha, at the lag with the largest "
                  "mean |weight|; NIfTI: " + links + "</p>"]
    return "\n".join(parts)


def _write_winners(results: Sequence[FitResult], table: pd.DataFrame, out: Path,
                   write_values: Callable | None, files: dict) -> pd.DataFrame | None:
    """The per-voxel winner map (NIfTI + slices) and its counts per model, or None."""
    found = model_winners(results, table)
    if found is None:
        return None
    candidates, winners = found
    counts = pd.DataFrame({
        "label": range(1, len(candidates) + 1),
        "model": [c.model for c in candidates], "lags": [c.label for c in candidates],
        "n_best": [int((winners["best"] == i + 1).sum()) for i in range(len(candidates))],
        "n_significant_winner": [int((winners["winner"] == i + 1).sum())
                                 for i in range(len(candidates))]})
    if write_values is not None:
        path = out / "maps" / "winner_model.nii.gz"
        write_values(winners["winner"], path, "winning model (label), 0: none significant")
        files["winner_nifti"] = path
        plot_label_map(path, out / "winner_model.png",
                       "winning model where significant (labels: see table)")
        files["winner_map"] = out / "winner_model.png"
    return counts


def plot_label_map(nifti_path: Path, path: Path, title: str) -> None:
    """Orthogonal slices of an integer label map (nilearn ``plot_roi``)."""
    import matplotlib
    matplotlib.use("Agg")
    from nilearn import plotting

    display = plotting.plot_roi(str(nifti_path), bg_img=None, title=title, colorbar=True,
                                display_mode="ortho", draw_cross=False, black_bg=False,
                                cmap="tab10")
    display.savefig(str(path), dpi=110)
    display.close()


def _html(experiment: str, table: pd.DataFrame, best: FitResult, files: dict, maps: list[Path],
          roi: pd.DataFrame | None, out: Path, notes: dict, extra: str = "") -> str:
    def rel(p: Path) -> str:
        return html.escape(str(Path(p).relative_to(out)))

    def df_html(df: pd.DataFrame) -> str:
        return df.to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0,
                          classes="tbl")

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>voxelflow report: {html.escape(experiment)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        ".tbl{border-collapse:collapse;font-size:13px}.tbl td,.tbl th{padding:3px 8px;"
        "border-bottom:1px solid #ddd;text-align:right}img{max-width:100%}"
        ".warn{background:#fff3cd;border:1px solid #e0b000;padding:6px 12px}</style>"
        "</head><body>",
        f"<h1>Encoding models: {html.escape(experiment)}</h1>",
    ]
    if notes["warnings"]:
        parts.append("<div class='warn'><b>Warnings</b><ul>" + "".join(
            f"<li>{html.escape(w)}</li>" for w in notes["warnings"]) + "</ul></div>")
    parts += [
        "<h2>Mean test r over scored voxels (model x lag set x alpha)</h2>",
        df_html(table),
        f"<p>Best model by mean r at CV-selected alphas: <b>{html.escape(best.model)}</b>, "
        f"lags <b>{html.escape(best.label)}</b>. Significance: {html.escape(SIGNIFICANCE_METHOD)}."
        f" Intervals: 95 % block bootstrap over test time (the same resamples for every "
        f"row); differences with the best row are paired on those resamples, with "
        f"two-sided bootstrap p-values and Holm's adjustment over the comparisons."
        f" Downloads: <a href='{rel(files['table_csv'])}'>table.csv</a>, "
        f"<a href='{rel(files['table_md'])}'>table.md</a>.</p>",
    ]
    if notes["comparisons"]:
        parts += ["<h2>Which differences are significant</h2>",
                  "<ul>" + "".join(f"<li>{html.escape(line)}</li>"
                                   for line in notes["comparisons"]) + "</ul>"]
    parts += [
        "<h2>Test r versus alpha</h2>",
        f"<img src='{rel(files['r_vs_alpha'])}' alt='r versus alpha'>",
        "<h2>Voxel r, best model</h2>",
        f"<img src='{rel(files['histogram'])}' alt='histogram of voxel r'>",
    ]
    if "brain_map" in files:
        parts += ["<h2>Brain map, best model</h2>",
                  f"<img src='{rel(files['brain_map'])}' alt='brain map of r'>",
                  "<p>NIfTI maps (r at CV-selected alphas): "
                  + ", ".join(f"<a href='{rel(m)}'>{html.escape(m.name)}</a>" for m in maps)
                  + "</p>"]
    if notes["winners"] is not None:
        parts += ["<h2>Which model wins, per voxel</h2>",
                  "<p>Each model at its best lag set; a voxel is labelled with the model of "
                  "highest test r only where that model beats every other one (paired block "
                  "bootstrap, BH-FDR q &lt; 0.05 over voxels); 0 elsewhere.</p>",
                  df_html(notes["winners"])]
        if "winner_map" in files:
            parts += [f"<img src='{rel(files['winner_map'])}' alt='winning model per voxel'>",
                      f"<p>NIfTI: <a href='{rel(files['winner_nifti'])}'>winner_model.nii.gz"
                      f"</a></p>"]
    if roi is not None:
        parts += ["<h2>Mean r per ROI</h2>", df_html(roi)]
    if extra:
        parts.append(extra)
    parts.append("</body></html>")
    return "\n".join(parts)
