"""The report's weight maps of categorical event models: one map per category.

For a fit of a categorical events model (``[[models]] source = "events"`` without
``amplitude``), the fit stores ``weights (lag, feature, voxel)`` at each voxel's
CV-selected alpha (the weights of the centred design: the BOLD change, in the BOLD's
units -- z-scores by default -- per unit of the category's boxcar at that lag).

**Best lag** (one per fit, shared by every category so that the maps compare): the
lag ``L`` whose weights have the largest mean absolute value over the valid voxels
and all categories, ``argmax_L mean_{c, v valid} |w[L, c, v]|`` (the first on a
tie).  The map of category ``c`` is ``w[L, c, :]`` on the BOLD grid (zeros outside
the mask, NaN at invalid voxels), written as
``maps/<model>_lags-<lags>_weights_<category>.nii.gz`` by
:func:`~voxelflow.pipeline.stages.export.export_variable` with ``sel = {feature: c,
lag: L}``, and drawn together in ``<model>_lags-<lags>_categories.png``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import xarray as xr

__all__ = ["best_lag", "category_maps", "plot_category_maps"]


def best_lag(weights: xr.DataArray, valid: np.ndarray) -> float:
    """The lag of ``weights (lag, feature, voxel)`` with the largest mean ``|w|`` over
    ``valid`` voxels and all features."""
    w = np.abs(np.asarray(weights.transpose("lag", "feature", "voxel").values,
                          dtype=np.float64)[:, :, valid])
    means = np.nanmean(w.reshape(w.shape[0], -1), axis=1) if w.size else np.zeros(w.shape[0])
    return float(weights["lag"].values[int(np.nanargmax(np.nan_to_num(means, nan=-1.0)))])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def category_maps(fit: xr.Dataset, stem: str, out_dir: Path,
                  export: Callable[[dict, Path], None], title: str) -> dict:
    """Write one NIfTI per category at the fit's best lag and a PNG of them all.

    ``fit`` holds ``weights (lag, feature, voxel)`` and ``valid``; ``export(sel, path)``
    writes ``weights`` selected by ``sel`` to ``path``.  Returns ``{"lag", "categories",
    "niftis", "png"}``.
    """
    weights = fit["weights"]
    valid = (np.asarray(fit["valid"].values, bool) if "valid" in fit.coords
             else np.ones(weights.sizes["voxel"], bool))
    lag = best_lag(weights, valid)
    categories = [str(c) for c in weights["feature"].values]
    niftis = []
    for category in categories:
        path = out_dir / f"{stem}_weights_{_safe(category)}.nii.gz"
        export({"feature": category, "lag": lag}, path)
        niftis.append(path)
    png = out_dir.parent / f"{stem}_categories.png"
    plot_category_maps(niftis, categories, png, f"{title}: weights at lag {lag:g} s")
    return {"lag": lag, "categories": categories, "niftis": niftis, "png": png}


def plot_category_maps(niftis: list[Path], categories: list[str], path: Path,
                       title: str) -> None:
    """One axial stat-map panel per category (nilearn), on a shared colour scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from nilearn import plotting

    vmax = max(float(np.nanmax(np.abs(np.asarray(nib.load(str(p)).dataobj)))) for p in niftis)
    cols = min(4, len(niftis))
    rows = -(-len(niftis) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(niftis):]:
        ax.axis("off")
    for ax, nifti, category in zip(axes.ravel(), niftis, categories):
        plotting.plot_stat_map(str(nifti), axes=ax, title=category, display_mode="z",
                               cut_coords=1, colorbar=False, vmax=vmax or 1.0,
                               cmap="RdBu_r", bg_img=None, black_bg=False, draw_cross=False,
                               annotate=False)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
