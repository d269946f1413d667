"""The report's ``index.html``: summary, Table 2, comparisons, plots, maps, in that order.

One file with its CSS and the little JavaScript it needs (sorting the table, the map
menu) inline; images and viewer pages are files next to it, linked by relative paths,
so the folder opens from disk with no network and still works when copied elsewhere.

Table 2 (:func:`table2_html`) fits a 1280 px page with 12 alphas: the per-alpha mean r
are a compact grid coloured by value (one colour scale over the whole grid), the best
alpha of each row outlined, the best cell of the table starred; intervals share a
cell with their estimate; every column sorts on a click of its header.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from voxelflow.pipeline.study.report.tables import (SIGNIFICANCE_METHOD, _is_alpha_column,
                                                    format_alpha, format_number, ranking)

__all__ = ["render_page", "table2_html", "summary_lines"]

CSS = """
body{font-family:system-ui,sans-serif;max-width:1220px;margin:1.5em auto;padding:0 12px;
 color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
.summary{background:#eef4fb;border:1px solid #b8cde6;padding:8px 14px;border-radius:4px}
.warn{background:#fff3cd;border:1px solid #e0b000;padding:6px 12px}
.tablewrap{max-width:100%;overflow-x:auto}
table.t2,table.tbl{border-collapse:collapse;font-size:12px}
.t2 th,.t2 td,.tbl th,.tbl td{padding:2px 5px;border-bottom:1px solid #e3e3e3;text-align:right}
.t2 th{cursor:pointer;font-weight:600;vertical-align:bottom;background:#f6f6f6}
.t2 th:hover{background:#e8eef7}.t2 td.name{text-align:left;overflow-wrap:anywhere;
 min-width:60px;max-width:170px}.t2 td.lags{white-space:nowrap}
.t2 td.grid{white-space:nowrap;font-variant-numeric:tabular-nums}
.t2 td.rowbest{outline:2px solid #222;outline-offset:-2px;font-weight:700}
.t2 td.best::after{content:"\\2605";font-size:9px;vertical-align:super}.t2 small{color:#555}
img{max-width:100%}figure{margin:0 0 1em 0}figcaption{font-size:13px;color:#444}
.viewer{width:100%;height:520px;border:1px solid #ccc}
select{font-size:14px;padding:3px;max-width:100%}
"""

SORT_JS = """
function sortTable(th){const table=th.closest('table'),body=table.tBodies[0];
 const i=Array.from(th.parentNode.children).indexOf(th);const up=th.dataset.dir!=='asc';
 th.dataset.dir=up?'asc':'desc';const key=r=>{const c=r.children[i];const v=c.dataset.v;
 const n=parseFloat(v);return isNaN(n)?(v===undefined?c.textContent:v):n;};
 Array.from(body.rows).sort((a,b)=>{const x=key(a),y=key(b);
 if(typeof x==='number'&&typeof y==='number')return up?x-y:y-x;
 return up?String(x).localeCompare(String(y)):String(y).localeCompare(String(x));})
 .forEach(r=>body.appendChild(r));}
function showMap(select){const o=select.options[select.selectedIndex];
 document.getElementById('map-viewer').src=o.value;
 document.getElementById('map-note').textContent=o.dataset.note;
 const a=document.getElementById('map-nifti');a.href=o.dataset.nifti||'';
 a.style.display=o.dataset.nifti?'':'none';}
"""

#: (column, header, tooltip) of Table 2 after the alpha grid; absent columns are left out.
SUMMARY_COLUMNS = [
    ("best_alpha", "best &alpha;", "alpha of the highest mean r"),
    ("r_cv_selected", "r (CV &alpha;) [95% CI]",
     "mean r at per-voxel CV-selected alphas, 95 % block-bootstrap interval"),
    ("diff_vs_best", "&Delta; vs best [95% CI]", "paired difference with the best row"),
    ("p_vs_best_holm", "p vs best (Holm)", "two-sided paired bootstrap p, Holm-adjusted"),
    ("r2_cv_selected", "R&sup2;", "mean R² at CV-selected alphas"),
    ("cc_norm_mean", "cc<sub>norm</sub>", "mean r / noise ceiling (test repeats)"),
    ("n_sig_perm_fdr", "sig. FDR", "voxels r > 0, block permutation, BH-FDR q < 0.05"),
    ("n_sig_perm_fwe", "sig. FWE", "voxels r > 0, max-statistic FWE p < 0.05"),
    ("n_sig_parametric", "sig. param.", "parametric t-test, BH-FDR (optimistic for BOLD)"),
    ("n_valid_voxels", "scored voxels", "valid voxels with finite scores (NaN voxels)"),
]


def _heat(value: float, low: float, high: float) -> str:
    """A cell's background (YlOrRd over [low, high]) and a text colour that reads on it."""
    from matplotlib import colormaps

    if not np.isfinite(value):
        return "background:#f0f0f0;color:#888"
    t = 0.5 if high <= low else (value - low) / (high - low)
    r, g, b, _ = colormaps["YlOrRd"](0.05 + 0.8 * float(np.clip(t, 0, 1)))
    text = "#fff" if 0.299 * r + 0.587 * g + 0.114 * b < 0.55 else "#111"
    return f"background:rgb({r * 255:.0f},{g * 255:.0f},{b * 255:.0f});color:{text}"


def _interval(row: pd.Series, value: str, low: str, high: str) -> str:
    text = format_number(row[value], value)
    if low in row and pd.notna(row[low]) and pd.notna(row[high]):
        text += (f" <small>[{format_number(row[low], low)}, "
                 f"{format_number(row[high], high)}]</small>")
    return text


def _summary_cell(row: pd.Series, column: str) -> str:
    value = row[column]
    sort = "" if pd.isna(value) else f"{float(value):.6g}"
    if column == "r_cv_selected":
        text = _interval(row, column, "ci_low", "ci_high")
    elif column == "diff_vs_best":
        text = _interval(row, column, "diff_ci_low", "diff_ci_high")
    elif column == "n_valid_voxels" and "n_nan_voxels" in row and row["n_nan_voxels"]:
        text = f"{format_number(value, column)} <small>({int(row['n_nan_voxels'])} NaN)</small>"
    else:
        text = html.escape(format_number(value, column))
    return f"<td data-v='{sort}'>{text}</td>"


def table2_html(table: pd.DataFrame) -> str:
    """Table 2 as HTML (module docstring); rows in ``table``'s order."""
    alphas = [c for c in table.columns if _is_alpha_column(c)]
    grid = table[alphas].to_numpy(np.float64) if alphas else np.zeros((len(table), 0))
    finite = grid[np.isfinite(grid)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    overall = np.unravel_index(np.nanargmax(grid), grid.shape) if finite.size else None
    columns = [c for c in SUMMARY_COLUMNS if c[0] in table.columns]
    head = ["<th onclick='sortTable(this)' title='feature space'>model</th>",
            "<th onclick='sortTable(this)' title='lags in seconds'>lags (s)</th>"]
    head += [f"<th onclick='sortTable(this)' title='mean test r at alpha {a}'>"
             f"&alpha;={format_alpha(float(a))}</th>" for a in alphas]
    head += [f"<th onclick='sortTable(this)' title='{html.escape(tip)}'>{label}</th>"
             for _, label, tip in columns]
    rows = []
    for i, (_, row) in enumerate(table.iterrows()):
        cells = [f"<td class='name'>{html.escape(str(row['model']))}</td>",
                 f"<td class='name lags' data-v='{html.escape(str(row['lags']))}'>"
                 f"{html.escape(str(row['lags']))}</td>"]
        row_best = int(np.nanargmax(grid[i])) if np.isfinite(grid[i]).any() else -1
        for j, value in enumerate(grid[i]):
            marks = ["grid"] + (["rowbest"] if j == row_best else []) + (
                ["best"] if overall is not None and (i, j) == tuple(overall) else [])
            sort = "" if not np.isfinite(value) else f"{value:.6g}"
            cells.append(f"<td class='{' '.join(marks)}' style='{_heat(value, low, high)}' "
                         f"data-v='{sort}'>{format_number(value, alphas[j])}</td>")
        cells += [_summary_cell(row, c) for c, _, _ in columns]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ("<div class='tablewrap'><table class='t2' id='table2'><thead><tr>"
            + "".join(head) + "</tr></thead><tbody>\n" + "\n".join(rows)
            + "</tbody></table></div>")


def summary_lines(table: pd.DataFrame) -> list[str]:
    """The summary's sentences (HTML-escaped): best cell with its interval, significant
    voxels, noise ceiling."""
    best = ranking(table).iloc[0]
    name = f"{best['model']}, lags {best['lags']} s"
    ci = ""
    if pd.notna(best.get("ci_low", np.nan)):
        ci = f" (95 % CI {best['ci_low']:.3f} to {best['ci_high']:.3f})"
    lines = [f"Best model and lag set: <b>{html.escape(name)}</b>, mean test r "
             f"{best['r_cv_selected']:.3f}{ci} at per-voxel CV-selected alphas, over "
             f"{int(best['n_valid_voxels'])} scored voxels."]
    if pd.notna(best.get("n_sig_perm_fdr", np.nan)):
        lines.append(f"Significant voxels (r &gt; 0, block permutation, BH-FDR q &lt; 0.05): "
                     f"<b>{int(best['n_sig_perm_fdr'])}</b>; family-wise (max statistic): "
                     f"{format_number(best['n_sig_perm_fwe'], 'n_sig_perm_fwe')}.")
    else:
        lines.append(f"No permutation statistics in these fits; the parametric t-test "
                     f"(optimistic for BOLD) finds {int(best['n_sig_parametric'])} voxels.")
    if "cc_max_mean" in table and pd.notna(best.get("cc_max_mean", np.nan)):
        lines.append(f"Noise ceiling (test repeats): mean cc<sub>max</sub> "
                     f"{best['cc_max_mean']:.3f}; mean r / ceiling (cc<sub>norm</sub>) "
                     f"{best['cc_norm_mean']:.3f}.")
    return lines


def _figure(files: dict, key: str, out: Path, alt: str, caption: str) -> str:
    png = files[key]
    rel = html.escape(str(Path(png).relative_to(out)))
    svg = html.escape(str(Path(png).with_suffix(".svg").relative_to(out)))
    return (f"<figure><img src='{rel}' alt='{html.escape(alt)}'><figcaption>"
            f"{caption} (<a href='{svg}'>SVG</a>)</figcaption></figure>")


def maps_html(maps: list[dict], out: Path) -> str:
    """The menu of viewers (one option per model x lag set) and the frame showing one."""
    shown = [m for m in maps if m.get("viewer") is not None]
    if not shown:
        return "".join(f"<p>{html.escape(m['title'])}: {html.escape(m['note'])}</p>"
                       for m in maps)

    def rel(p) -> str:
        return html.escape(str(Path(p).relative_to(out))) if p is not None else ""

    options = "".join(
        f"<option value='{rel(m['viewer'])}' data-note='{html.escape(m['note'])}' "
        f"data-nifti='{rel(m.get('nifti'))}'>{html.escape(m['title'])}</option>"
        for m in shown)
    first = shown[0]
    missing = [m for m in maps if m.get("viewer") is None]
    hidden = "" if first.get("nifti") else " style='display:none'"
    return (f"<p><label for='map-menu'>Map: </label><select id='map-menu' "
            f"onchange='showMap(this)'>{options}</select> "
            f"<a id='map-nifti' href='{rel(first.get('nifti'))}'"
            f"{hidden}>NIfTI</a></p>"
            f"<p id='map-note'>{html.escape(first['note'])}</p>"
            f"<iframe id='map-viewer' class='viewer' title='brain map viewer' "
            f"src='{rel(first['viewer'])}'></iframe>"
            + "".join(f"<p>{html.escape(m['title'])}: {html.escape(m['note'])}</p>"
                      for m in missing))


def _df_html(df: pd.DataFrame) -> str:
    return ("<div class='tablewrap'>" + df.to_html(
        index=False, border=0, classes="tbl", na_rep="-",
        float_format=lambda v: f"{v:.3g}") + "</div>")


def render_page(experiment: str, table: pd.DataFrame, files: dict, notes: dict,
                maps: list[dict], out: Path, *, roi: pd.DataFrame | None = None,
                extra: str = "") -> str:
    """The whole ``index.html``; ``notes`` holds ``warnings``, ``comparisons``,
    ``winners`` (a table or None); ``files`` the figure paths by key."""
    def rel(key: str) -> str:
        return html.escape(str(Path(files[key]).relative_to(out)))

    title = html.escape(experiment)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>voxelflow report: {title}</title><style>{CSS}</style>"
             f"<script>{SORT_JS}</script></head><body>",
             f"<h1>Encoding models: {title}</h1>",
             "<div class='summary'>" + "".join(f"<p>{line}</p>"
                                              for line in summary_lines(table)) + "</div>"]
    if notes["warnings"]:
        parts.append("<div class='warn'><b>Warnings</b><ul>" + "".join(
            f"<li>{html.escape(w)}</li>" for w in notes["warnings"]) + "</ul></div>")
    parts += ["<h2>Table 2: mean test r over scored voxels (model x lag set x alpha)</h2>",
              table2_html(ranking(table)),
              f"<p><small>Grid: mean r per alpha, coloured on one scale; outlined: the best "
              f"alpha of the row; &#9733;: the best cell. Click a header to sort. "
              f"Significance: {html.escape(SIGNIFICANCE_METHOD)}. Intervals: 95 % block "
              f"bootstrap over test time; differences with the best row paired on the same "
              f"resamples, Holm-adjusted. Downloads: <a href='{rel('table_csv')}'>table.csv"
              f"</a>, <a href='{rel('table_md')}'>table.md</a>.</small></p>"]
    if notes["comparisons"]:
        parts += ["<h2>Which differences are significant</h2>", "<ul>" + "".join(
            f"<li>{html.escape(line)}</li>" for line in notes["comparisons"]) + "</ul>"]
    parts += ["<h2>Plots</h2>",
              _figure(files, "r_vs_alpha", out, "test r versus alpha",
                      "Mean test r against alpha; stars: the alpha CV chose for most voxels"),
              _figure(files, "histogram", out, "histogram of voxel r",
                      "Voxel r of the best model at CV-selected alphas")]
    parts += ["<h2>Brain maps</h2>", maps_html(maps, out)]
    if "brain_map" in files:
        parts.append(_figure(files, "brain_map", out, "brain map of r",
                             "Best model, static slices over the mean EPI"))
    if notes["winners"] is not None:
        parts += ["<h2>Which model wins, per voxel</h2>",
                  "<p>Each model at its best lag set; a voxel is labelled with the model of "
                  "highest test r only where that model beats every other one (paired block "
                  "bootstrap, BH-FDR q &lt; 0.05 over voxels); 0 elsewhere.</p>",
                  _df_html(notes["winners"])]
        if "winner_map" in files:
            parts += [_figure(files, "winner_map", out, "winning model per voxel",
                              "Winning model per voxel"),
                      f"<p>NIfTI: <a href='{rel('winner_nifti')}'>winner_model.nii.gz</a></p>"]
    if roi is not None:
        parts += ["<h2>Mean r per ROI</h2>", _df_html(roi)]
    if extra:
        parts.append(extra)
    parts.append("</body></html>")
    return "\n".join(parts)
