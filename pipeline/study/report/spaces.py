"""Joint (banded ridge) fits in the report: which feature space explains which voxels.

A joint fit (``voxelflow fit --features A B ...``, ``[[fit.joint]]``) stores
``r2_split (space, voxel)``, each space's share of the test R^2 (himalaya's product
measure), and with ``--partition`` ``partition (part, voxel)``, the test R^2 unique to
each space and shared by each set of spaces (definitions: ``docs/statistics.md``,
"Several feature spaces").  For every joint fit the report adds:

- the **which-space map** (:func:`which_space`): per voxel, ``1 +`` the index of the
  space with the largest ``r2_split``, at the voxels where the joint model predicts
  (scored, ``r_test_cv > 0`` and, with permutation statistics, BH-FDR ``q < 0.05``:
  the voxels the report's r maps show); 0 elsewhere.  Volume fits:
  ``maps/<stem>_which_space.nii.gz`` and slices ``<stem>_which_space.png``; surface
  fits: the labels on fsaverage5, ``<stem>_which_space.png``;
- the **split per ROI** (:func:`split_roi_table`): the mean of each space's
  ``r2_split`` and of each ``partition`` part over the scored voxels of each ROI (the
  whole mask without an atlas), all joint fits in ``space_split.csv`` (long: one row
  per fit, ROI, measure and component) and a stacked bar ``<stem>_space_split.png``.

``<stem>`` is ``<model>_lags-<lags>``, as for the r maps.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from voxelflow.pipeline.study.report import figures, viewers
from voxelflow.pipeline.study.report.page import _df_html, _figure
from voxelflow.pipeline.study.report.tables import FDR_Q, FitResult, _valid

__all__ = ["SpaceMap", "is_joint", "which_space", "split_roi_table", "write_joint_pieces",
           "joint_html", "SPLIT_MEASURES", "WHOLE_MASK"]

#: The stored (component, voxel) variables averaged per ROI, in this order.
SPLIT_MEASURES = ("r2_split", "partition")
#: The ROI name of the one bar drawn without an atlas.
WHOLE_MASK = "whole mask"

WriteValues = Callable[[np.ndarray, Path, str], None]


@dataclass
class SpaceMap:
    """One joint fit's which-space map: ``labels`` int16 (voxel,) (0: not shown,
    ``k``: ``spaces[k - 1]`` has the largest ``r2_split``), the voxels ``shown``
    (bool (voxel,)) and a sentence saying which voxels those are."""

    labels: np.ndarray
    spaces: list[str]
    shown: np.ndarray
    note: str

    def counts(self) -> pd.DataFrame:
        """Voxels per label: columns ``label``, ``space``, ``n_voxels``."""
        return pd.DataFrame({"label": range(1, len(self.spaces) + 1), "space": self.spaces,
                             "n_voxels": [int((self.labels == k + 1).sum())
                                          for k in range(len(self.spaces))]})


def is_joint(fit: xr.Dataset) -> bool:
    """A fit with ``r2_split (space, voxel)``: a joint fit of several spaces."""
    return "r2_split" in fit and "space" in fit["r2_split"].dims


def _split(fit: xr.Dataset, name: str) -> np.ndarray:
    """A stored (component, voxel) variable as float64."""
    return np.asarray(fit[name].values, np.float64)


def which_space(fit: xr.Dataset, q: float = FDR_Q) -> SpaceMap:
    """The which-space map of a joint fit (module docstring)."""
    split = _split(fit, "r2_split")
    r = np.asarray(fit["r_test_cv"].values, np.float64)
    shown = _valid(fit) & np.isfinite(split).all(axis=0) & (r > 0)
    if "q_perm_fdr" in fit:
        shown &= np.asarray(fit["q_perm_fdr"].values, np.float64) < q
        note = (f"voxels where the joint model's r > 0 is significant (block permutation, "
                f"BH-FDR q < {q:g})")
    else:
        note = "voxels where the joint model's test r > 0 (no permutation statistics)"
    best = np.argmax(np.where(np.isfinite(split), split, -np.inf), axis=0)
    labels = np.where(shown, best + 1, 0).astype(np.int16)
    return SpaceMap(labels, [str(s) for s in fit["space"].values], shown,
                    f"{int(shown.sum())} {note}; 0 elsewhere")


def _roi_masks(roi_of_voxel: np.ndarray | None, names: dict[int, str] | None,
               n_voxels: int) -> list[tuple[int, str, np.ndarray]]:
    """``(label, name, bool (voxel,))`` per ROI (atlas label != 0); without an atlas one
    entry, label 0, :data:`WHOLE_MASK`, every voxel."""
    if roi_of_voxel is None:
        return [(0, WHOLE_MASK, np.ones(n_voxels, bool))]
    roi = np.asarray(roi_of_voxel)
    return [(int(label), (names or {}).get(int(label), str(int(label))), roi == label)
            for label in sorted(int(l) for l in np.unique(roi) if l != 0)]


def split_roi_table(res: FitResult, roi_of_voxel: np.ndarray | None = None,
                    roi_names: dict[int, str] | None = None) -> pd.DataFrame:
    """Per ROI, the mean over its scored voxels (finite in every component) of each
    component of ``r2_split`` (the spaces) and of ``partition`` (its parts) when stored.

    Returns
    -------
    DataFrame, one row per (ROI, measure, component): ``model``, ``lags``, ``roi``,
    ``roi_name``, ``measure`` (``r2_split``/``partition``), ``component`` (space or
    part name), ``n_voxels``, ``mean`` (R^2, NaN when the ROI has no such voxel).
    """
    fit = res.fit
    scored = _valid(fit)
    rows = []
    for label, name, mask in _roi_masks(roi_of_voxel, roi_names, fit.sizes["voxel"]):
        for measure in (m for m in SPLIT_MEASURES if m in fit):
            values = _split(fit, measure)
            sel = scored & mask & np.isfinite(values).all(axis=0)
            components = fit[measure].dims[0]
            for component, row in zip(fit[components].values, values):
                rows.append({"model": res.model, "lags": res.label, "roi": label,
                             "roi_name": name, "measure": measure,
                             "component": str(component), "n_voxels": int(sel.sum()),
                             "mean": float(row[sel].mean()) if sel.any() else np.nan})
    return pd.DataFrame(rows)


def write_joint_pieces(results: Sequence[FitResult], out: Path, *,
                       roi_of_voxel: np.ndarray | None = None,
                       roi_names: dict[int, str] | None = None,
                       write_values: WriteValues | None = None,
                       underlay: Path | None = None) -> dict:
    """The which-space map and split bars of every joint fit in ``results`` into
    ``out``, and ``space_split.csv``; returns ``{"items": [...], "csv": path or None}``,
    one item per joint fit: ``model``, ``lags``, ``map`` (:class:`SpaceMap`),
    ``split`` (its :func:`split_roi_table`) and ``files`` (``which_png``,
    ``which_nifti`` (volume fits with ``write_values``), ``bars_png``)."""
    items = []
    for res in (r for r in results if is_joint(r.fit)):
        stem = f"{res.model}_lags-{res.label.replace(',', '-')}"
        space_map, split = which_space(res.fit), split_roi_table(res, roi_of_voxel, roi_names)
        title = f"{res.model}, lags {res.label}"
        files = {"bars_png": figures.plot_space_bars(
            split, out / f"{stem}_space_split.png",
            f"{title}: test R² per ROI, by space", space_map.spaces)["png"]}
        files.update(_write_space_map(res, space_map, out, stem, title, write_values,
                                      underlay))
        items.append({"model": res.model, "lags": res.label, "map": space_map,
                      "split": split, "files": files})
    csv = None
    if items:
        csv = out / "space_split.csv"
        pd.concat([i["split"] for i in items], ignore_index=True).to_csv(csv, index=False)
    return {"items": items, "csv": csv}


def _write_space_map(res: FitResult, space_map: SpaceMap, out: Path, stem: str, title: str,
                     write_values: WriteValues | None, underlay: Path | None) -> dict:
    """The which-space figure (and NIfTI for volume fits) when the geometry allows."""
    png = out / f"{stem}_which_space.png"
    heading = f"{title}: space with the largest share of test R²"
    if viewers.map_geometry(res.fit) == "surface":
        mesh = viewers.surface_mesh_name(res.fit)
        if mesh is None:
            return {}
        return {"which_png": figures.plot_surface_labels(
            res.fit, space_map.labels, mesh, png, heading, space_map.spaces,
            "space with the largest share of test R² (r2_split)")["png"]}
    if write_values is None:
        return {}
    nifti = out / "maps" / f"{stem}_which_space.nii.gz"
    write_values(space_map.labels, nifti,
                 "space with the largest r2_split (label), 0: not shown")
    return {"which_nifti": nifti, "which_png": figures.plot_space_map(
        nifti, png, heading, underlay, space_map.spaces)["png"]}


EXPLANATION = (
    "<p>A joint model predicts each voxel from several feature spaces at once (banded "
    "ridge: one penalty per space), so its prediction is a sum of one part per space, "
    "&#375; = &Sigma;<sub>i</sub> p<sub>i</sub> + intercept. <b>R&sup2; split</b> "
    "(<code>r2_split</code>, the product measure of himalaya's "
    "<code>r2_score_split</code>) shares the test R&sup2; between the spaces: with y "
    "and every p<sub>i</sub> centred over the test samples, "
    "r2<sub>i</sub> = &Sigma;<sub>t</sub> (2 y<sub>t</sub> &minus; &Sigma;<sub>j</sub> "
    "p<sub>jt</sub>) p<sub>it</sub> / &Sigma;<sub>t</sub> y<sub>t</sub>&sup2;; the parts "
    "sum to the joint R&sup2; (once the prediction's mean offset is removed) and can be "
    "negative. <b>Variance partitioning</b> (<code>partition</code>, with "
    "<code>--partition</code>): with f(S) the test R&sup2; of the model fitted on the "
    "spaces in S, unique to A = f(AB) &minus; f(B), shared by A and B = f(A) + f(B) "
    "&minus; f(AB) (three spaces: the seven parts of the Venn diagram); the parts sum "
    "to the joint R&sup2; and are not clipped at 0. Definitions: "
    "<code>docs/statistics.md</code>, section &ldquo;Several feature spaces: the split "
    "and variance partitioning&rdquo;.</p>")


def _wide(split: pd.DataFrame) -> pd.DataFrame:
    """One fit's split rows as one row per ROI: ``roi_name``, ``n_voxels``, then a
    column per component (``r2_split: a``, ``unique to a``, ``shared by a&b``)."""
    table = split.assign(column=[
        f"r2_split: {c}" if m == "r2_split" else figures.component_label(m, c)
        for m, c in zip(split["measure"], split["component"])])
    wide = table.pivot(index=["roi", "roi_name"], columns="column", values="mean")[
        list(dict.fromkeys(table["column"]))]
    voxels = table[table["measure"] == "r2_split"].groupby(["roi", "roi_name"],
                                                           sort=False)["n_voxels"].first()
    wide.insert(0, "n_voxels", voxels)
    return wide.reset_index().drop(columns="roi").rename_axis(columns=None)


def joint_html(pieces: dict, out: Path) -> str:
    """The page's section on joint models (empty without any): the explanation, then per
    joint fit its which-space counts and figure, the split table per ROI and the
    stacked bars (``pieces``: :func:`write_joint_pieces`'s result)."""
    if not pieces["items"]:
        return ""
    csv = html.escape(str(Path(pieces["csv"]).relative_to(out)))
    parts = ["<h2 id='joint-models'>Joint models: which space explains which voxels</h2>",
             EXPLANATION,
             f"<p>Numbers of every joint fit: <a href='{csv}'>space_split.csv</a> (mean "
             f"over each ROI's scored voxels).</p>"]
    for item in pieces["items"]:
        name = html.escape(f"{item['model']}, lags {item['lags']} s")
        files, space_map = item["files"], item["map"]
        parts += [f"<h3>{name}</h3>",
                  f"<p>Which space: each voxel labelled with the space of largest "
                  f"r2_split, at {html.escape(space_map.note)}.</p>",
                  _df_html(space_map.counts())]
        if "which_png" in files:
            parts.append(_figure(files, "which_png", out, "space with the largest share "
                                 "per voxel", "Space with the largest share of test R² per "
                                 "voxel"))
        if "which_nifti" in files:
            rel = html.escape(str(Path(files["which_nifti"]).relative_to(out)))
            parts.append(f"<p>NIfTI: <a href='{rel}'>{html.escape(Path(rel).name)}</a></p>")
        parts += ["<p>Mean test R² per ROI by space (r2_split) and, with --partition, "
                  "its unique and shared parts:</p>",
                  _df_html(_wide(item["split"])),
                  _figure(files, "bars_png", out, "stacked bars of the R² split per ROI",
                          "Stacked bars: mean parts of test R² per ROI; black mark: their "
                          "sum")]
    return "\n".join(parts)
