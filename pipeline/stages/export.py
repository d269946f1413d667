"""Per-voxel results of the workspace -> 3D / 4D NIfTI maps (``voxelflow export``).

:func:`export_variable` writes any ``(voxel,)`` or ``(n, voxel)`` variable of the
workspace (a bold group's ``mean``, a fit's ``r_test (alpha, voxel)``, ...) to a NIfTI
file on the original grid and affine, zeros outside the voxels.  Where the voxels sit
(:class:`Geometry`: ``i, j, k`` on a grid) comes from the variable's own coordinates,
its parents' attrs, or the bold group a ``bold_group`` attr names
(:func:`find_geometry`).  :func:`write_nifti` streams one volume (or a memory-bounded
group of ``EXPORT_BUDGET`` bytes of volumes) at a time and renames the file into place
at the end, so a killed export leaves no half file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np
import xarray as xr

from voxelflow.pipeline.errors import InputError
from voxelflow.stores.names import check_name
from voxelflow.stores.workspace import Workspace

__all__ = ["Geometry", "describe_export", "export_variable", "find_geometry", "output_dtype",
           "parse_selection", "select", "to_volume", "write_nifti"]

EXPORT_BUDGET = 64 * 2**20  # bytes of output volumes assembled at once by the exporter
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Geometry:
    """Where the voxels of a variable sit: ``i, j, k`` on a grid of ``shape``/``affine``."""

    i: np.ndarray
    j: np.ndarray
    k: np.ndarray
    shape: tuple[int, int, int]
    affine: np.ndarray
    xform_code: int = 1
    space_unit: str = "mm"
    sources: list[str] = field(default_factory=list)


def _ancestors(node: str) -> list[str]:
    parts = node.strip("/").split("/")
    return ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]


def _attrs_chain(workspace: Workspace, node: str) -> list[tuple[str, dict]]:
    """Attrs of ``node``, its parents, then of the bold group a ``bold_group`` attr names."""
    chain = [(n, workspace.attrs(n)) for n in _ancestors(node)]
    bold = next((a["bold_group"] for _, a in chain if a.get("bold_group")), None)
    if bold:
        bold = str(bold).strip("/")
        chain.append((bold, workspace.attrs(bold)))
    return chain


def find_geometry(workspace: Workspace, node: str, var: xr.DataArray,
                  need_voxels: bool = True) -> Geometry:
    """Find ``i, j, k`` and the grid of ``var`` from its own coords/attrs, its parents'
    attrs, or the bold group named by a ``bold_group`` attr."""
    chain = _attrs_chain(workspace, node)
    ijk, ijk_source = (np.zeros(0, np.int64),) * 3, ""
    if need_voxels:
        ijk = None
        if all(c in var.coords for c in "ijk"):
            ijk = tuple(np.asarray(var.coords[c].values, dtype=np.int64) for c in "ijk")
            ijk_source = f"/{node}"
        else:
            for n, _ in chain:
                if n != node and all(workspace.has_array(n, c) for c in "ijk"):
                    ijk = tuple(workspace.read_array(n, c).astype(np.int64) for c in "ijk")
                    ijk_source = f"/{n}"
                    break
    grid = next(((n, a) for n, a in chain if "affine" in a and "volume_shape" in a), None)
    if ijk is None or grid is None:
        missing = "i, j, k coordinates" if ijk is None else "affine/volume_shape attrs"
        raise InputError(
            f"{workspace.path}: /{node} has no {missing} for {var.name!r} and names no "
            f"bold group that has them; give the group a 'bold_group' attr (e.g. "
            f"'bold/SUBJECT') or export from the bold group itself")
    grid_attrs = grid[1]
    if need_voxels and ijk[0].size != var.sizes["voxel"]:
        raise InputError(
            f"{workspace.path}: /{node}/{var.name} has {var.sizes['voxel']} voxels but "
            f"{ijk_source} places {ijk[0].size}; the result was not made from that bold group")
    return Geometry(*ijk, shape=tuple(int(n) for n in grid_attrs["volume_shape"]),
                    affine=np.asarray(grid_attrs["affine"], dtype=np.float64),
                    xform_code=int(grid_attrs.get("xform_code", 1) or 1),
                    space_unit=str(grid_attrs.get("space_unit", "mm")),
                    sources=[ijk_source or "its own grid", f"/{grid[0]}"])


def _stage_group(workspace: Workspace, node: str) -> str:
    """The nearest ancestor of ``node`` that is a stage group (has a voxelflow state)."""
    for n in _ancestors(node):
        if workspace.state(n) is not None:
            return n
    return node


def output_dtype(dtype: np.dtype) -> np.dtype:
    """NIfTI dtype for a variable: uint8 for bool, small integers as they are, other
    integers int32, anything else float32."""
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if dtype.kind in "iu":
        return np.dtype(dtype) if dtype.itemsize <= 2 else np.dtype(np.int32)
    return np.dtype(np.float32)


def to_volume(values: np.ndarray, geometry: Geometry, dtype=np.float32) -> np.ndarray:
    """``(voxel,)`` values -> 3D volume (zeros outside the voxels)."""
    vol = np.zeros(geometry.shape, dtype=dtype)
    vol[geometry.i, geometry.j, geometry.k] = values
    return vol


def write_nifti(path: str | Path, volumes: Iterator[np.ndarray], shape: tuple[int, ...],
                dtype: np.dtype, geometry: Geometry, step: float = 1.0,
                time_unit: str = "unknown", description: str = "") -> None:
    """Write a 3D or 4D NIfTI-1 file one volume at a time (``.nii`` or ``.nii.gz``).

    ``volumes`` yields ``shape[3]`` (or one, for 3D) arrays of ``shape[:3]``; the file
    is written in the order NIfTI stores them (Fortran order, volume after volume), so
    memory holds one volume, never the whole image.
    """
    from nibabel.openers import ImageOpener

    path = Path(path)
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_sform(geometry.affine, code=geometry.xform_code)
    header.set_qform(geometry.affine, code=geometry.xform_code)
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    header.set_zooms(zooms + ((float(step),) if len(shape) == 4 else ()))
    unit = geometry.space_unit if geometry.space_unit in ("mm", "meter", "micron") else "mm"
    header.set_xyzt_units(unit, time_unit if len(shape) == 4 else "unknown")
    header["descrip"] = description[:79].encode("ascii", "replace")
    header.set_data_offset(352)
    n_expected = shape[3] if len(shape) == 4 else 1
    # Write to a temp name in the same folder (same suffix, so ImageOpener gzips a
    # .nii.gz) and rename at the end: a killed export leaves no half file under `path`.
    tmp = path.with_name(".partial-" + path.name)
    written = 0
    try:
        with ImageOpener(str(tmp), "wb") as fh:
            header.write_to(fh)  # 348 bytes + 4 bytes of "no extension"
            fh.write(b"\x00" * max(0, 352 - fh.tell()))
            for vol in volumes:
                fh.write(np.asarray(vol, dtype=dtype).tobytes(order="F"))
                written += 1
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write here ({exc.strerror or exc}); choose another "
                         f"output path") from None
    if written != n_expected:
        tmp.unlink(missing_ok=True)
        raise AssertionError(f"wrote {written} volumes, expected {n_expected}")
    os.replace(tmp, path)


def parse_selection(texts: Sequence[str] | None) -> dict[str, str]:
    """``["feature=face,lag=5"]`` (``--sel``, repeatable) -> ``{"feature": "face", "lag": "5"}``."""
    selection: dict[str, str] = {}
    for text in texts or []:
        for item in text.split(","):
            dim, sep, value = item.partition("=")
            if not sep or not dim.strip() or not value.strip():
                raise InputError(f"--sel must be DIM=VALUE[,DIM=VALUE...], e.g. "
                                 f"feature=face,lag=5 (got {text!r})")
            selection[dim.strip()] = value.strip()
    return selection


def select(var: xr.DataArray, selection: Mapping[str, Any], where: str) -> xr.DataArray:
    """``var`` with one value chosen along each dimension of ``selection`` (the
    dimension is dropped): by coordinate value (numbers compared to 1e-6 relative,
    so ``lag=5`` finds 5.0), or by position where the dimension has no coordinate."""
    for dim, value in selection.items():
        if dim not in var.dims or dim == "voxel":
            others = [d for d in var.dims if d != "voxel"]
            raise InputError(f"{where}: --sel {dim}: not a dimension to select on "
                             f"(dims: {', '.join(others) or 'none'})")
        labels = (np.asarray(var[dim].values) if dim in var.coords
                  else np.arange(var.sizes[dim]))
        if labels.dtype.kind in "iuf":
            try:
                number = float(value)
            except ValueError:
                raise InputError(f"{where}: --sel {dim}={value}: {dim} is numeric") from None
            hits = np.flatnonzero(np.isclose(labels.astype(np.float64), number, rtol=1e-6,
                                             atol=1e-9))
        else:
            hits = np.flatnonzero([str(v) == str(value) for v in labels])
        if hits.size != 1:
            shown = ", ".join(str(v) for v in labels[:12]) + (", ..." if labels.size > 12
                                                             else "")
            raise InputError(f"{where}: --sel {dim}={value}: "
                             f"{'no such' if not hits.size else 'several'} {dim} "
                             f"(values: {shown})")
        var = var.isel({dim: int(hits[0])})
    return var


def export_variable(workspace: Workspace, node: str, name: str, out: str | Path,
                    sel: Mapping[str, Any] | None = None) -> dict:
    """Write variable ``name`` of workspace node ``node`` to the NIfTI file ``out``.

    ``(voxel,)`` -> 3D, ``(n, voxel)`` -> 4D with ``n`` volumes (e.g. one per alpha);
    zeros outside the voxels; affine and grid of the bold data it came from.  A 3D
    variable already on the grid (the bold group's ``mask``) is written as it is.
    ``sel`` picks one value along some dimensions first (:func:`select`), e.g.
    ``{"feature": "face", "lag": 5}`` on a fit's ``weights (lag, feature, voxel)``
    (older ``weights (lag_feature, voxel)`` are read as that layout).
    Returns a summary for :func:`describe_export`.
    """
    out = Path(out)
    node = check_name(node.strip("/"), "GROUP", nested=True)
    stage, ds = _open_request(workspace, node, name, out)
    var = ds[name]
    if name == "weights" and "lag_feature" in var.dims:
        from voxelflow.pipeline.stages.fit import fit_weights

        var = fit_weights(ds, workspace.attrs(stage))
    if sel:
        var = select(var, sel, f"{workspace.path}: /{node}/{name}")
    dtype = output_dtype(var.dtype)
    extra_dim, n_rows = None, 1
    if "voxel" not in var.dims:
        return _export_on_grid(workspace, node, var, out, dtype,
                               sorted(v for v in ds.variables if "voxel" in ds[v].dims))
    if var.ndim > 2:
        others = [d for d in var.dims if d != "voxel"]
        raise InputError(f"{workspace.path}: /{node}/{name} has dims {var.dims}; select down "
                         f"to (voxel,) or (n, voxel) first, e.g. --sel "
                         + ",".join(f"{d}=..." for d in others[:-1]))
    geometry = find_geometry(workspace, node, var)
    if var.ndim == 1:
        values = np.asarray(var.values)
        if dtype.kind != "f":
            values = np.nan_to_num(values)
        write_nifti(out, iter([to_volume(values, geometry, dtype)]), geometry.shape, dtype,
                    geometry, description=f"voxelflow /{node}/{name}")
    else:
        extra_dim = next(d for d in var.dims if d != "voxel")
        var = var.transpose(extra_dim, "voxel")
        n_rows = int(var.sizes[extra_dim])
        step, unit = 1.0, "unknown"
        if extra_dim == "time":
            step, unit = float(workspace.attrs(stage).get("tr", 1.0)), "sec"
        write_nifti(out, _iter_volumes(var, geometry, dtype), geometry.shape + (n_rows,),
                    dtype, geometry, step=step, time_unit=unit,
                    description=f"voxelflow /{node}/{name} over {extra_dim}")
    labels = None
    if extra_dim is not None and extra_dim in var.coords:
        labels = [v.item() if hasattr(v, "item") else v for v in var.coords[extra_dim].values]
    return {"file": str(out), "shape": list(geometry.shape) + ([n_rows] if extra_dim else []),
            "voxels": int(geometry.i.size), "dim": extra_dim, "labels": labels,
            "dtype": str(dtype), "sources": geometry.sources,
            "sel": {str(k): str(v) for k, v in (sel or {}).items()}}


def _open_request(workspace: Workspace, node: str, name: str, out: Path
                  ) -> tuple[str, xr.Dataset]:
    """Check the output path, that the node's stage group is complete and holds
    ``name``; return the stage group and the node's (lazy) dataset."""
    if not str(out).endswith(NIFTI_SUFFIXES):
        raise InputError(f"{out}: output must end in .nii or .nii.gz")
    if not out.parent.exists():
        raise InputError(f"{out}: folder {out.parent} does not exist; create it first")
    if not workspace.path.exists():
        raise InputError(f"{workspace.path}: no workspace here; pass --store PATH")
    stage = _stage_group(workspace, node)
    kind, _, subject = stage.partition("/")
    hint = (f"voxelflow bold RUN.nii.gz [RUN ...] --subject {subject or 'NAME'} --mask MASK"
            if kind == "bold" else f"the voxelflow command that writes /{kind}")
    workspace.require_complete(stage, hint)
    ds = workspace.open_node(node)
    if name not in ds.variables:
        per_voxel = sorted(v for v in ds.variables if "voxel" in ds[v].dims)
        raise InputError(f"{workspace.path}: /{node} has no variable {name!r} (variables "
                         f"with a voxel dimension: {', '.join(per_voxel) or 'none'})")
    return stage, ds


def _export_on_grid(workspace: Workspace, node: str, var: xr.DataArray, out: Path,
                    dtype: np.dtype, per_voxel: list[str]) -> dict:
    """A variable without a voxel dimension: only a 3D volume already on the grid (e.g.
    the bold group's ``mask``) can be written, as it is."""
    grid = find_geometry(workspace, node, var, need_voxels=False)
    if var.ndim != 3 or tuple(var.shape) != grid.shape:
        raise InputError(
            f"{workspace.path}: /{node}/{var.name} has dims {var.dims}, no 'voxel' "
            f"dimension; export one of: {', '.join(per_voxel) or 'none'}")
    write_nifti(out, iter([np.nan_to_num(np.asarray(var.values)) if dtype.kind != "f"
                           else np.asarray(var.values)]),
                grid.shape, dtype, grid, description=f"voxelflow /{node}/{var.name}")
    return {"file": str(out), "shape": list(grid.shape), "voxels": int(np.prod(grid.shape)),
            "dim": None, "labels": None, "dtype": str(dtype), "sources": grid.sources}


def _iter_volumes(var: xr.DataArray, geometry: Geometry, dtype: np.dtype
                  ) -> Iterator[np.ndarray]:
    """Volumes of an ``(n, voxel)`` variable, assembling a bounded group of rows at once."""
    n_rows, n_vox = var.shape
    vol_bytes = int(np.prod(geometry.shape)) * np.dtype(dtype).itemsize
    rows_at_once = int(max(1, min(n_rows, EXPORT_BUDGET // max(vol_bytes, 1))))
    voxel_step = _voxel_chunk(var) or 65536
    for r0 in range(0, n_rows, rows_at_once):
        r1 = min(r0 + rows_at_once, n_rows)
        vols = np.zeros((r1 - r0,) + geometry.shape, dtype=dtype)
        for v0 in range(0, n_vox, voxel_step):
            v1 = min(v0 + voxel_step, n_vox)
            block = np.asarray(var[r0:r1, v0:v1].values)
            if dtype.kind != "f":
                block = np.nan_to_num(block)
            vols[:, geometry.i[v0:v1], geometry.j[v0:v1], geometry.k[v0:v1]] = block
        for vol in vols:
            yield vol
        del vols


def _voxel_chunk(var: xr.DataArray) -> int | None:
    chunks = var.encoding.get("chunks") or var.encoding.get("preferred_chunks")
    if isinstance(chunks, dict):
        return int(chunks.get("voxel", 0)) or None
    if chunks:
        return int(chunks[var.dims.index("voxel")])
    return None


def describe_export(summary: dict) -> str:
    """One line for the CLI."""
    shape = "x".join(map(str, summary["shape"]))
    kind = "4D" if summary["dim"] else "3D"
    extra = ""
    if summary["dim"]:
        labels = summary["labels"]
        if labels is not None:
            shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in labels[:6])
            more = ", ..." if len(labels) > 6 else ""
            extra = f"; volume n = {summary['dim']}[n] ({shown}{more})"
        else:
            extra = f"; volume n = {summary['dim']} n"
    if summary.get("sel"):
        extra += "; selected " + ", ".join(f"{k}={v}" for k, v in summary["sel"].items())
    if summary["sources"][0] == "its own grid":
        return (f"wrote {summary['file']}: {kind} NIfTI {shape} {summary['dtype']}, "
                f"affine from {summary['sources'][1]}")
    return (f"wrote {summary['file']}: {kind} NIfTI {shape} {summary['dtype']}, "
            f"{summary['voxels']} voxels (zeros elsewhere), voxels from "
            f"{summary['sources'][0]}, affine from {summary['sources'][1]}{extra}")
