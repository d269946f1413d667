"""Tables, plots, brain maps and an HTML page from stored fits (the study's Table 2).

Input: one fit Dataset per (model, lag set) with ``r_test (alpha, voxel)``,
``r_test_cv (voxel)``, ``best_alpha (voxel)`` and a ``valid (voxel)`` flag.
Output folder ``reports/<experiment>/``: ``table.csv``, ``table.md``, ``r_vs_alpha.png``,
``r_histogram.png``, ``best_model_map.png``, ``maps/<model>_<lags>_r_cv.nii.gz``,
``roi_table.csv`` (with an atlas), and ``index.html`` that shows them all.

Significance: per voxel, one-sided test of r_test_cv > 0 with the t statistic
``t = r sqrt((n - 2) / (1 - r^2))`` (n = test samples, Student t with n - 2 df),
Benjamini-Hochberg FDR at q = 0.05 over valid voxels.  Test samples of a BOLD time
series are autocorrelated, so these p-values are optimistic; the count is a summary,
not an inference the study relied on.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

FDR_Q = 0.05
SIGNIFICANCE_METHOD = "one-sided t-test of Pearson r (df = n_test - 2), Benjamini-Hochberg FDR q=0.05"


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
    r = fit["r_test"].values
    valid = fit["valid"].values.astype(bool) if "valid" in fit else np.ones(r.shape[-1], bool)
    return valid & np.isfinite(r).all(axis=0)


def n_significant(r: np.ndarray, n_test: int, q: float = FDR_Q) -> int:
    """Voxels whose r is significantly > 0 (t-test per voxel, BH-FDR over voxels)."""
    r = np.asarray(r, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0 or n_test < 4:
        return 0
    rc = np.clip(r, -0.999999, 0.999999)
    t = rc * np.sqrt((n_test - 2) / (1 - rc ** 2))
    p = stats.t.sf(t, df=n_test - 2)
    adjusted = stats.false_discovery_control(p, method="bh")
    return int((adjusted < q).sum())


def summary_table(results: Sequence[FitResult]) -> pd.DataFrame:
    """Rows model x lag set; columns mean test r per alpha (valid voxels), best alpha,
    mean r at per-voxel CV-selected alphas, significant voxel count, voxel counts."""
    rows = []
    for res in results:
        fit = res.fit
        valid = _valid(fit)
        alphas = fit["alpha"].values
        mean_r = np.nanmean(fit["r_test"].values[:, valid], axis=1)
        row = {"model": res.model, "lags": res.label}
        for a, m in zip(alphas, mean_r):
            row[f"{a:g}"] = float(m)
        best = int(np.nanargmax(mean_r))
        r_cv = fit["r_test_cv"].values[valid]
        row["best_alpha"] = float(alphas[best])
        row["r_best_alpha"] = float(mean_r[best])
        row["r_cv_selected"] = float(np.nanmean(r_cv))
        row["n_significant"] = n_significant(r_cv, int(fit.attrs.get("n_test", 0)))
        row["n_valid_voxels"] = int(valid.sum())
        rows.append(row)
    return pd.DataFrame(rows)


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


def write_report(results: Sequence[FitResult], out_dir: str | Path, *, experiment: str,
                 write_map: Callable[[FitResult, Path], None] | None = None,
                 roi_of_voxel: np.ndarray | None = None,
                 roi_names: dict[int, str] | None = None,
                 category_maps: Callable[[FitResult, Path], dict | None] | None = None
                 ) -> dict:
    """Write every report file into ``out_dir``; return their paths and the table.

    ``write_map(result, path)`` writes a result's r_test_cv as NIfTI (the caller knows
    the brain geometry); without it, no maps or brain plot are made.
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
    files["html"] = out / "index.html"
    files["html"].write_text(_html(experiment, table, best, files, maps, roi, out,
                                   extra=_category_html(categories, out)))
    return {"table": table, "best": (best.model, best.label), "files": files, "maps": maps,
            "category_maps": categories}


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


def _html(experiment: str, table: pd.DataFrame, best: FitResult, files: dict, maps: list[Path],
          roi: pd.DataFrame | None, out: Path, extra: str = "") -> str:
    def rel(p: Path) -> str:
        return html.escape(str(Path(p).relative_to(out)))

    def df_html(df: pd.DataFrame) -> str:
        return df.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0,
                          classes="tbl")

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>voxelflow report: {html.escape(experiment)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        ".tbl{border-collapse:collapse;font-size:13px}.tbl td,.tbl th{padding:3px 8px;"
        "border-bottom:1px solid #ddd;text-align:right}img{max-width:100%}</style></head><body>",
        f"<h1>Encoding models: {html.escape(experiment)}</h1>",
        "<h2>Mean test r over valid voxels (model x lag set x alpha)</h2>",
        df_html(table),
        f"<p>Best model by mean r at CV-selected alphas: <b>{html.escape(best.model)}</b>, "
        f"lags <b>{html.escape(best.label)}</b>. Significance: {html.escape(SIGNIFICANCE_METHOD)}."
        f" Downloads: <a href='{rel(files['table_csv'])}'>table.csv</a>, "
        f"<a href='{rel(files['table_md'])}'>table.md</a>.</p>",
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
    if roi is not None:
        parts += ["<h2>Mean r per ROI</h2>", df_html(roi)]
    if extra:
        parts.append(extra)
    parts.append("</body></html>")
    return "\n".join(parts)
