"""Interactive brain viewers of a fit's ``r_test_cv``: nilearn ``view_img`` (brainsprite
slices) for volume results, ``view_surf`` (plotly) for results on a cortical surface.

:func:`map_geometry` says which a fit is: a fit whose voxel axis carries ``hemi`` and
``vertex`` coordinates is on a surface, any other on the BOLD grid.
:func:`write_viewer` writes one self-contained HTML page per fit: nilearn inlines its
JavaScript (jQuery, brainsprite, plotly) and the images as base64, and the one remote
reference it emits (a favicon link) is removed, so the page opens from disk offline.

**Threshold at the FDR level** (:func:`displayed_values`): with the permutation
statistics (``q_perm_fdr``), the map shows r only at the scored voxels with q < 0.05
and r > 0 (the one-sided test), everything else 0 and hidden; the threshold is the
smallest significant r.  Without them (or with no significant voxel), the
unthresholded r of the scored voxels.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from voxelflow.pipeline.study.report.tables import FDR_Q, _valid

__all__ = ["MapDisplay", "map_geometry", "displayed_values", "volume_viewer_html",
           "surface_viewer_html", "write_viewer", "OFFLINE_SURFACE_MESHES"]

#: Meshes nilearn ships (no download): name -> vertices per hemisphere.
OFFLINE_SURFACE_MESHES = {"fsaverage5": 10242}
_REMOTE_LINK = re.compile(r"<link[^>]*href=[\"']https?://[^>]*>", re.IGNORECASE | re.DOTALL)


@dataclass
class MapDisplay:
    """What a viewer shows: ``values (voxel,)``, the ``threshold`` (None: none) and a
    sentence saying so."""

    values: np.ndarray
    threshold: float | None
    note: str
    n_significant: int | None


def map_geometry(fit: xr.Dataset) -> str:
    """``"surface"`` when the voxel axis has ``hemi`` and ``vertex`` coordinates, else
    ``"volume"``."""
    coords = {name for name, c in fit.coords.items() if c.dims == ("voxel",)}
    return "surface" if {"hemi", "vertex"} <= coords else "volume"


def displayed_values(fit: xr.Dataset, q: float = FDR_Q) -> MapDisplay:
    """The r map a viewer shows, thresholded at the FDR level when the fit has
    permutation statistics (module docstring)."""
    r = np.asarray(fit["r_test_cv"].values, np.float64)
    scored = _valid(fit)
    shown = np.where(scored, np.nan_to_num(r), 0.0)
    if "q_perm_fdr" in fit:
        qv = np.asarray(fit["q_perm_fdr"].values, np.float64)
        significant = scored & (qv < q) & (r > 0)
        count = int(significant.sum())
        if count:
            level = float(r[significant].min())
            return MapDisplay(np.where(significant, r, 0.0), level * (1 - 1e-6),
                              f"{count} voxels significant (permutation, BH-FDR q < {q:g}); "
                              f"shown where significant: r >= {level:.3f}", count)
        return MapDisplay(shown, None, f"no voxel significant at BH-FDR q < {q:g} "
                                       f"(permutation); unthresholded r shown", 0)
    return MapDisplay(shown, None, "no permutation statistics in this fit; unthresholded r "
                                   "shown", None)


def _vmax(values: np.ndarray) -> float:
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    return peak if peak > 0 else 1.0


def volume_viewer_html(nifti: Path, underlay: Path | None, display: MapDisplay,
                       title: str) -> str:
    """A ``view_img`` page of the volume ``nifti`` (the displayed values on the BOLD
    grid) over ``underlay`` (mean EPI; None: no background)."""
    from nilearn import plotting

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn warns on maps with no value below threshold
        view = plotting.view_img(
            str(nifti), bg_img=str(underlay) if underlay is not None else False,
            threshold=display.threshold if display.threshold is not None else 1e-6,
            vmax=_vmax(display.values), symmetric_cmap=True, cmap="RdBu_r", title=title,
            black_bg=False, draw_cross=False, dim=0, width_view=560)
    return view.get_standalone()


def _hemisphere(name) -> str:
    """``L``/``left``/``lh``/``CORTEX_LEFT`` -> ``left``; likewise right."""
    text = str(name).lower()
    if text in ("l", "lh") or "left" in text:
        return "left"
    if text in ("r", "rh") or "right" in text:
        return "right"
    raise ValueError(f"hemisphere {name!r} is neither left nor right")


def surface_mesh_name(fit: xr.Dataset) -> str | None:
    """The fit's mesh: its ``surface_mesh`` attr, else the offline mesh that has enough
    vertices per hemisphere; None when nilearn ships none that fits."""
    named = fit.attrs.get("surface_mesh")
    if named:
        return str(named) if str(named) in OFFLINE_SURFACE_MESHES else None
    n = int(np.max(fit["vertex"].values)) + 1 if fit.sizes["voxel"] else 0
    return next((m for m, size in OFFLINE_SURFACE_MESHES.items() if n <= size), None)


def hemisphere_values(fit: xr.Dataset, values: np.ndarray, mesh) -> tuple[dict, list[str]]:
    """``({"left": (n_vertices,), "right": ...}, hemispheres present)``: the fit's
    ``(voxel,)`` ``values`` placed on ``mesh``'s vertices by the ``hemi`` and ``vertex``
    coordinates (0 on vertices the fit does not hold)."""
    hemis = np.array([_hemisphere(h) for h in fit["hemi"].values])
    vertices = np.asarray(fit["vertex"].values, np.int64)
    data = {}
    for part in ("left", "right"):
        placed = np.zeros(mesh.parts[part].n_vertices, np.float32)
        on = hemis == part
        placed[vertices[on]] = values[on]
        data[part] = placed
    return data, sorted(set(hemis))


def surface_viewer_html(fit: xr.Dataset, display: MapDisplay, title: str,
                        mesh_name: str) -> str:
    """A ``view_surf`` page of the displayed values on the inflated ``mesh_name``
    (both hemispheres when the fit has both), sulcal depth as background."""
    from nilearn import datasets, plotting
    from nilearn.surface import SurfaceImage

    meshes = datasets.load_fsaverage(mesh_name)
    sulcal = datasets.load_fsaverage_data(mesh_name, mesh_type="inflated",
                                          data_type="sulcal")
    mesh = meshes["inflated"]
    data, present = hemisphere_values(fit, display.values, mesh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        view = plotting.view_surf(
            mesh, SurfaceImage(mesh=mesh, data=data), bg_map=sulcal,
            hemi="both" if len(present) == 2 else present[0], threshold=display.threshold,
            vmax=_vmax(display.values), symmetric_cmap=True, cmap="RdBu_r", title=title,
            title_fontsize=16, colorbar=True, colorbar_fontsize=12)
    return view.get_standalone()


def write_viewer(fit: xr.Dataset, path: Path, display: MapDisplay, title: str, *,
                 volume_nifti: Path | None = None, underlay: Path | None = None) -> str | None:
    """Write the fit's viewer page to ``path``, choosing ``view_surf`` or ``view_img``
    by :func:`map_geometry`; return None when written, else why not (one line)."""
    if map_geometry(fit) == "surface":
        mesh = surface_mesh_name(fit)
        if mesh is None:
            return (f"no viewer: nilearn ships no surface mesh for this fit offline "
                    f"(offline: {', '.join(OFFLINE_SURFACE_MESHES)})")
        page = surface_viewer_html(fit, display, title, mesh)
    elif volume_nifti is None:
        return "no viewer: the fit's voxels could not be placed on a grid"
    else:
        page = volume_viewer_html(volume_nifti, underlay, display, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_REMOTE_LINK.sub("", page), encoding="utf-8")
    return None
