"""Write the report folder ``reports/<experiment>/`` from fit results.

Files: ``table.csv``, ``table.md``; ``r_vs_alpha``, ``r_histogram``,
``best_model_map``, ``winner_model`` (two models or more) and the category maps as
``.png`` + ``.svg``; ``maps/<model>_lags-<lags>_r_cv.nii.gz`` (volume fits),
``maps/<model>_lags-<lags>_r_cv_fdr.nii.gz`` (r where significant, with permutation
statistics), ``maps/winner_model.nii.gz``; one interactive viewer page per model x lag
set, ``viewers/<model>_lags-<lags>.html`` (:mod:`.viewers`); ``roi_table.csv`` (with an
atlas); for joint fits (several feature spaces) the which-space maps, split bars and
``space_split.csv`` (:mod:`.spaces`); and ``index.html`` (:mod:`.page`) showing them
all.  Every path inside the
folder is relative and nothing is fetched from the network.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from voxelflow.pipeline.stats import diagnostics
from voxelflow.pipeline.study.report import figures, page, spaces, viewers
from voxelflow.pipeline.study.report.tables import (FitResult, comparison_sentences,
                                                    model_winners, ranking, roi_table,
                                                    summary_table, table_markdown)

__all__ = ["write_report"]

WriteValues = Callable[[np.ndarray, Path, str], None]


def write_report(results: Sequence[FitResult], out_dir: str | Path, *, experiment: str,
                 write_map: Callable[[FitResult, Path], None] | None = None,
                 roi_of_voxel: np.ndarray | None = None,
                 roi_names: dict[int, str] | None = None,
                 write_values: WriteValues | None = None,
                 category_maps: Callable[[FitResult, Path], dict | None] | None = None,
                 underlay: Path | None = None) -> dict:
    """Write every report file into ``out_dir``; return their paths, the table, the
    comparisons in words, the fits' warnings and the viewers.

    ``write_map(result, path)`` writes a volume result's r_test_cv as NIfTI and
    ``write_values(values, path, description)`` any (voxel,) array on that grid (the
    caller knows the brain geometry); without them, volume results get no maps.
    Surface results (:func:`viewers.map_geometry`) get a ``view_surf`` viewer from the
    fit's own ``hemi``/``vertex`` coordinates.  ``underlay``: a NIfTI on the BOLD grid
    (the mean EPI) under the volume maps.  ``category_maps(result, maps_dir)`` writes a
    result's per-category weight maps and returns ``{"lag", "categories", "niftis",
    "png"}`` (``None``: not a categorical model).
    """
    out = Path(out_dir)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    table = summary_table(results)
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(table_markdown(table))
    best_row = ranking(table).iloc[0]
    best = next(r for r in results if r.model == best_row["model"] and r.label == best_row["lags"])
    files = {"table_csv": out / "table.csv", "table_md": out / "table.md",
             "r_vs_alpha": figures.plot_r_vs_alpha(results, out / "r_vs_alpha.png")["png"],
             "histogram": figures.plot_histogram(best, out / "r_histogram.png",
                                                 viewers.displayed_values(best.fit).threshold
                                                 )["png"]}
    maps = [_write_map_views(res, out, write_map, write_values, underlay) for res in results]
    best_map = maps[list(results).index(best)]
    if best_map.get("nifti") is not None:
        files["best_map_nifti"] = best_map["nifti"]
        files["brain_map"] = figures.plot_brain_map(
            best_map["shown"], out / "best_model_map.png",
            f"{best.model}, lags {best.label}: test r (CV alpha)", underlay,
            best_map["threshold"])["png"]
    elif viewers.map_geometry(best.fit) == "surface" and viewers.surface_mesh_name(best.fit):
        shown = viewers.displayed_values(best.fit)
        files["brain_map"] = figures.plot_surface_map(
            best.fit, shown.values, viewers.surface_mesh_name(best.fit),
            out / "best_model_map.png", f"{best.model}, lags {best.label}: test r (CV alpha)",
            shown.threshold)["png"]
    winners = _write_winners(results, table, out, write_values, files, underlay)
    roi = None
    if roi_of_voxel is not None:
        roi = roi_table(results, roi_of_voxel, roi_names)
        roi.to_csv(out / "roi_table.csv", index=False)
        files["roi_table"] = out / "roi_table.csv"
    joint = spaces.write_joint_pieces(results, out, roi_of_voxel=roi_of_voxel,
                                      roi_names=roi_names, write_values=write_values,
                                      underlay=underlay)
    if joint["csv"] is not None:
        files["space_split"] = joint["csv"]
    categories = []
    for res in results if category_maps is not None else []:
        made = category_maps(res, out / "maps")
        if made is not None:
            categories.append({"model": res.model, "lags": res.label, **made})
    notes = {"comparisons": comparison_sentences(table), "winners": winners,
             "warnings": [f"{r.model}, lags {r.label}: {w}" for r in results
                          for w in diagnostics.warnings_of(r.fit, dict(r.fit.attrs))]}
    files["html"] = out / "index.html"
    files["html"].write_text(page.render_page(experiment, table, files, notes, maps, out, roi=roi,
                                              extra=_category_html(categories, out)
                                              + spaces.joint_html(joint, out)),
                             encoding="utf-8")
    return {"table": table, "best": (best.model, best.label), "files": files,
            "maps": [m["nifti"] for m in maps if m.get("nifti") is not None],
            "viewers": maps, "comparisons": notes["comparisons"],
            "warnings": notes["warnings"], "winners": winners, "category_maps": categories,
            "joint": joint["items"]}


def _write_map_views(res: FitResult, out: Path, write_map: Callable | None,
                     write_values: WriteValues | None, underlay: Path | None) -> dict:
    """A result's r map (NIfTI for volume fits), its FDR-thresholded version and its
    viewer page; returns ``{"title", "nifti", "shown", "threshold", "viewer", "note"}``
    (``viewer`` None with the reason in ``note`` when none could be made)."""
    stem = f"{res.model}_lags-{res.label.replace(',', '-')}"
    title = f"{res.model[:24]}, lags {res.label}"  # brainsprite clips long titles
    display = viewers.displayed_values(res.fit)
    item = {"title": f"{res.model}, lags {res.label} s", "nifti": None, "shown": None,
            "threshold": display.threshold, "viewer": None, "note": display.note}
    if viewers.map_geometry(res.fit) == "volume" and write_map is not None:
        item["nifti"] = item["shown"] = out / "maps" / f"{stem}_r_cv.nii.gz"
        write_map(res, item["nifti"])
        if display.threshold is not None and write_values is not None:
            item["shown"] = out / "maps" / f"{stem}_r_cv_fdr.nii.gz"
            write_values(display.values.astype(np.float32), item["shown"],
                         "r_test_cv where significant (BH-FDR), 0 elsewhere")
    viewer = out / "viewers" / f"{stem}.html"
    why_not = viewers.write_viewer(res.fit, viewer, display, title,
                                   volume_nifti=item["shown"], underlay=underlay)
    if why_not is None:
        item["viewer"] = viewer
    else:
        item["note"] = f"{display.note}; {why_not}"
    return item


def _category_html(categories: list[dict], out: Path) -> str:
    """The section of per-category weight maps (empty without categorical models)."""
    parts = []
    for item in categories:
        links = ", ".join(f"<a href='{html.escape(str(p.relative_to(out)))}'>"
                          f"{html.escape(c)}</a>"
                          for c, p in zip(item["categories"], item["niftis"]))
        png = Path(item["png"])
        parts += [f"<h2>Category weights: {html.escape(item['model'])}, lags "
                  f"{html.escape(item['lags'])} (best lag {item['lag']:g} s)</h2>",
                  f"<img src='{html.escape(str(png.relative_to(out)))}' "
                  f"alt='weight map per category'>",
                  "<p>Weights at each voxel's CV-selected alpha, at the lag with the largest "
                  f"mean |weight| (<a href='{html.escape(str(png.with_suffix('.svg').relative_to(out)))}'>"
                  "SVG</a>); NIfTI: " + links + "</p>"]
    return "\n".join(parts)


def _write_winners(results: Sequence[FitResult], table: pd.DataFrame, out: Path,
                   write_values: WriteValues | None, files: dict,
                   underlay: Path | None) -> pd.DataFrame | None:
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
    if write_values is not None and viewers.map_geometry(candidates[0].fit) == "volume":
        path = out / "maps" / "winner_model.nii.gz"
        write_values(winners["winner"], path, "winning model (label), 0: none significant")
        files["winner_nifti"] = path
        files["winner_map"] = figures.plot_label_map(
            path, out / "winner_model.png", "Winning model where significant", underlay,
            [c.model for c in candidates])["png"]
    return counts
