"""The report's static figures, each saved as PNG (for the page) and SVG (for papers).

Every figure has a title; every colour scale a labelled colourbar.  SVG text is kept
as text (``svg.fonttype = "none"``), so labels stay editable and searchable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from voxelflow.pipeline.study.report.tables import FitResult, _valid

__all__ = ["save_figure", "cv_chosen_alpha", "plot_r_vs_alpha", "plot_histogram",
           "plot_brain_map", "plot_label_map", "plot_surface_map", "plot_surface_labels",
           "plot_space_map", "plot_space_bars", "label_colours", "component_label"]

DPI = 110


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, png: Path, tight: bool = False) -> dict[str, Path]:
    """Write ``fig`` as ``png`` and as the same name with ``.svg``; return both paths.
    ``tight``: grow the canvas to what is drawn outside it (nilearn's colourbar label)."""
    import matplotlib

    svg = png.with_suffix(".svg")
    bbox = "tight" if tight else None
    fig.savefig(png, dpi=DPI, bbox_inches=bbox)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(svg, bbox_inches=bbox)
    return {"png": png, "svg": svg}


def cv_chosen_alpha(res: FitResult) -> float:
    """The alpha that cross-validation chose for the most scored voxels (the mode of
    ``best_alpha`` over them; the smallest on a tie); NaN without scored voxels."""
    chosen = np.asarray(res.fit["best_alpha"].values, np.float64)[_valid(res.fit)]
    if chosen.size == 0:
        return float("nan")
    values, counts = np.unique(chosen, return_counts=True)
    return float(values[int(np.argmax(counts))])


def plot_r_vs_alpha(results: Sequence[FitResult], path: Path) -> dict[str, Path]:
    """Mean test r over scored voxels against alpha, one panel per model, one line per
    lag set; a star marks each line's CV-chosen alpha (:func:`cv_chosen_alpha`)."""
    plt = _pyplot()
    models = list(dict.fromkeys(r.model for r in results))
    cols = min(4, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel()[len(models):]:
        ax.axis("off")
    for ax, model in zip(axes.ravel(), models):
        for res in (r for r in results if r.model == model):
            alphas = res.fit["alpha"].values
            valid = _valid(res.fit)
            mean_r = np.nanmean(res.fit["r_test"].values[:, valid], 1) if valid.any() \
                else np.full(alphas.size, np.nan)
            line, = ax.plot(alphas, mean_r, marker="o", ms=3, label=f"lags {res.label}")
            chosen = cv_chosen_alpha(res)
            if np.isfinite(chosen):
                at = int(np.argmin(np.abs(alphas - chosen)))
                ax.plot([alphas[at]], [mean_r[at]], marker="*", ms=13, color=line.get_color(),
                        markeredgecolor="k", linestyle="none")
        ax.plot([], [], marker="*", ms=10, color="w", markeredgecolor="k", linestyle="none",
                label="CV-chosen alpha (most voxels)")
        ax.set_xscale("log")
        ax.set_xlabel("ridge alpha")
        ax.set_ylabel("mean test r (scored voxels)")
        ax.set_title(model)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("Test r versus alpha", fontsize=11)
    fig.tight_layout()
    paths = save_figure(fig, path)
    plt.close(fig)
    return paths


def plot_histogram(res: FitResult, path: Path, threshold: float | None = None
                   ) -> dict[str, Path]:
    """Histogram of the scored voxels' r at CV-selected alphas; ``threshold`` (the FDR
    level of r, when known) drawn as a dashed line."""
    plt = _pyplot()
    r = res.fit["r_test_cv"].values[_valid(res.fit)]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist(r[np.isfinite(r)], bins=50, color="#3b6ea8")
    ax.axvline(0, color="k", lw=0.8)
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="#c0392b", lw=1, ls="--",
                   label=f"FDR q < 0.05: r >= {threshold:.3f}")
        ax.legend(fontsize=7)
    ax.set_xlabel("test r at CV-selected alpha")
    ax.set_ylabel("voxels")
    ax.set_title(f"{res.model}, lags {res.label}: voxel r")
    fig.tight_layout()
    paths = save_figure(fig, path)
    plt.close(fig)
    return paths


def _label_colourbar(display, label: str) -> None:
    """nilearn displays keep their colourbar as ``_cbar`` (no public handle)."""
    cbar = getattr(display, "_cbar", None)
    if cbar is not None:
        cbar.set_label(label, fontsize=9)


def _save_display(display, path: Path) -> dict[str, Path]:
    paths = save_figure(display.frame_axes.figure, path, tight=True)
    display.close()
    return paths


def plot_brain_map(nifti_path: Path, path: Path, title: str, underlay: Path | None = None,
                   threshold: float | None = None) -> dict[str, Path]:
    """Orthogonal slices of an r map over ``underlay`` (the mean EPI; none: its own
    grid), colourbar labelled ``test r``."""
    _pyplot()
    from nilearn import plotting

    display = plotting.plot_stat_map(
        str(nifti_path), title=title, colorbar=True, threshold=threshold,
        display_mode="ortho", draw_cross=False, black_bg=False, cmap="RdBu_r",
        symmetric_cbar=True, bg_img=str(underlay) if underlay is not None else None, dim=0)
    _label_colourbar(display, "test r (CV-selected alpha)")
    return _save_display(display, path)


def plot_label_map(nifti_path: Path, path: Path, title: str, underlay: Path | None = None,
                   names: Sequence[str] = ()) -> dict[str, Path]:
    """Orthogonal slices of an integer label map (nilearn ``plot_roi``); the colourbar
    is labelled with ``names`` (label 1 first) when given."""
    _pyplot()
    from nilearn import plotting

    display = plotting.plot_roi(str(nifti_path), title=title, colorbar=True,
                                bg_img=str(underlay) if underlay is not None else None,
                                display_mode="ortho", draw_cross=False, black_bg=False,
                                cmap="tab10")
    _label_colourbar(display, "model label: " + ", ".join(
        f"{i + 1} {n}" for i, n in enumerate(names)) if names else "label")
    return _save_display(display, path)


def plot_surface_map(fit, values: np.ndarray, mesh_name: str, path: Path, title: str,
                     threshold: float | None = None) -> dict[str, Path]:
    """A surface fit's ``(voxel,)`` r map on nilearn's ``mesh_name`` (fsaverage5 ships
    with nilearn): inflated (lateral) and flat views of each hemisphere present, over
    sulcal depth, one colourbar labelled ``test r``."""
    plt = _pyplot()
    from matplotlib import cm, colors
    from nilearn import plotting

    vmax = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0

    def draw(**panel) -> None:
        plotting.plot_surf_stat_map(stat_map=panel.pop("data"), threshold=threshold,
                                    vmin=-vmax, vmax=vmax, cmap="RdBu_r", colorbar=False,
                                    **panel)

    fig, axes = _surface_figure(fit, values, mesh_name, draw)
    fig.suptitle(title)
    bar = fig.colorbar(cm.ScalarMappable(colors.Normalize(-vmax, vmax), "RdBu_r"),
                       ax=axes.ravel().tolist(), shrink=0.6)
    bar.set_label("test r (CV-selected alpha)")
    paths = save_figure(fig, path)
    plt.close(fig)
    return paths


def plot_surface_labels(fit, labels: np.ndarray, mesh_name: str, path: Path, title: str,
                        names: Sequence[str], what: str = "label") -> dict[str, Path]:
    """A surface fit's ``(voxel,)`` integer labels (1 = ``names[0]``, ..., 0 hidden) on
    ``mesh_name``, views as :func:`plot_surface_map`, colours :func:`label_colours`,
    a legend (titled ``what``) naming each label."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from nilearn import plotting

    cmap = ListedColormap(label_colours(len(names)))

    def draw(**panel) -> None:
        plotting.plot_surf_roi(roi_map=panel.pop("data"), cmap=cmap, vmin=0.5,
                               vmax=len(names) + 0.5, threshold=0.5, colorbar=False, **panel)

    fig, _ = _surface_figure(fit, np.asarray(labels, np.float32), mesh_name, draw)
    fig.suptitle(title)
    _label_legend(fig, names, what)
    paths = save_figure(fig, path)
    plt.close(fig)
    return paths


def _surface_figure(fit, values: np.ndarray, mesh_name: str, draw):
    """The figure and (hemisphere, view) axes of the surface plots: ``draw(**panel)``
    draws ``values`` placed on one mesh (``panel``: surf_mesh, data, hemi, view, bg_map,
    axes, figure, title)."""
    plt = _pyplot()
    from nilearn import datasets
    from nilearn.surface import SurfaceImage

    from voxelflow.pipeline.study.report.viewers import hemisphere_values

    meshes = datasets.load_fsaverage(mesh_name)
    data, present = hemisphere_values(fit, values, meshes["inflated"])
    fig, axes = plt.subplots(len(present), 2, figsize=(8, 3.4 * len(present)),
                             subplot_kw={"projection": "3d"}, squeeze=False)
    for row, part in enumerate(present):
        for col, (kind, view) in enumerate((("inflated", "lateral"), ("flat", "dorsal"))):
            mesh = meshes[kind]
            sulcal = datasets.load_fsaverage_data(mesh_name, mesh_type=kind,
                                                  data_type="sulcal")
            draw(surf_mesh=mesh, data=SurfaceImage(mesh=mesh, data=data), hemi=part,
                 view=view, bg_map=sulcal, axes=axes[row, col], figure=fig,
                 title=f"{part}, {kind}")
            for mesh_patches in axes[row, col].collections:
                # the mesh as an image inside the SVG: its ~20,000 triangles as paths
                # took most of the figure's time (~50 s) and megabytes; text stays text
                mesh_patches.set_rasterized(True)
    return fig, axes


def label_colours(n: int) -> list[tuple]:
    """The colour of labels 1..n (matplotlib's ``tab10``, cycled): the which-space maps
    and the split bars share them."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return [palette[i % len(palette)] for i in range(n)]


def _label_legend(fig, names: Sequence[str], what: str) -> None:
    """A legend below the figure: one colour patch per label, ``1 name``, ..."""
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=f"{i + 1} {n}")
               for i, (c, n) in enumerate(zip(label_colours(len(names)), names))]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 4), fontsize=9,
               title=what, title_fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.02))


def plot_space_map(nifti_path: Path, path: Path, title: str, underlay: Path | None,
                   names: Sequence[str]) -> dict[str, Path]:
    """Orthogonal slices of a which-space label map (1 = ``names[0]``, ..., 0 hidden)
    over ``underlay``, colours :func:`label_colours`, a legend naming the spaces."""
    _pyplot()
    from matplotlib.colors import ListedColormap
    from nilearn import plotting

    display = plotting.plot_roi(str(nifti_path), title=title, colorbar=False,
                                bg_img=str(underlay) if underlay is not None else None,
                                display_mode="ortho", draw_cross=False, black_bg=False,
                                cmap=ListedColormap(label_colours(len(names))), vmin=0.5,
                                vmax=len(names) + 0.5)
    _label_legend(display.frame_axes.figure, names,
                  "space with the largest share of test R² (r2_split)")
    return _save_display(display, path)


def plot_space_bars(rows, path: Path, title: str, spaces: Sequence[str]) -> dict[str, Path]:
    """Stacked bars per ROI of one joint fit's mean parts of test R² (``rows``: its rows of
    :func:`~voxelflow.pipeline.study.report.spaces.split_roi_table`): a panel for
    ``r2_split`` (one segment per space) and, when present, one for ``partition``
    (unique and shared parts). Positive parts stack up from 0, negative ones down; a
    black mark is their sum (the ROI's mean joint R²)."""
    plt = _pyplot()
    measures = list(dict.fromkeys(rows["measure"]))
    rois = list(dict.fromkeys(rows["roi_name"]))
    fig, axes = plt.subplots(1, len(measures), figsize=(1.2 + 3.6 * len(measures)
                                                      + 0.35 * len(rois), 3.8),
                             squeeze=False)
    colours = dict(zip(spaces, label_colours(len(spaces))))
    shared = label_colours(len(spaces) + 4)[len(spaces):]
    for ax, measure in zip(axes[0], measures):
        part = rows[rows["measure"] == measure]
        components = list(dict.fromkeys(part["component"]))
        x = np.arange(len(rois))
        up, down = np.zeros(len(rois)), np.zeros(len(rois))
        for k, component in enumerate(components):
            means = (part[part["component"] == component].set_index("roi_name")["mean"]
                     .reindex(rois).to_numpy(np.float64))
            means = np.nan_to_num(means)
            base = np.where(means >= 0, up, down)
            colour = colours.get(component) or shared[k % len(shared)]
            ax.bar(x, means, 0.7, bottom=base, color=colour,
                   label=component_label(measure, component))
            up, down = up + np.clip(means, 0, None), down + np.clip(means, None, 0)
        ax.plot(x, up + down, "kD", ms=5, label="sum")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, rois, rotation=30 if len(rois) > 3 else 0, ha="right"
                      if len(rois) > 3 else "center", fontsize=8)
        ax.set_ylabel("mean test R² (scored voxels)")
        ax.set_title("R² split (product measure)" if measure == "r2_split"
                     else "variance partitioning", fontsize=10)
        ax.legend(fontsize=7, loc="best")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    paths = save_figure(fig, path)
    plt.close(fig)
    return paths


def component_label(measure: str, component: str) -> str:
    """A legend entry: the space for ``r2_split``; ``unique to a`` / ``shared by a&b``
    for ``partition``."""
    if measure != "partition":
        return str(component)
    return f"shared by {component}" if "&" in str(component) else f"unique to {component}"
