"""Cortical surfaces in and out: CIFTI-2 ``*.dtseries.nii`` and GIFTI ``*.func.gii`` runs.

The BOLD stage's "voxel" axis becomes the grayordinate / vertex axis.  Every element
has coordinates ``structure`` (CIFTI structure name, e.g. ``CIFTI_STRUCTURE_CORTEX_LEFT``),
``vertex`` (index on its surface mesh, -1 for a subcortical voxel), ``i, j, k`` (voxel
indices for subcortical voxels, -1 on a surface) and ``hemi`` (``L``, ``R`` or ``""``).

Reading (the same block interface as :mod:`~voxelflow.pipeline.stages.nifti`):

* CIFTI (:class:`CiftiColumns`): NIfTI-2 stores ``(time, grayordinate)`` with time
  fastest, so all time points of a range of grayordinates are one contiguous read:
  pass 2 reads each output chunk straight from the file (no scratch; memory: one
  chunk, whatever the run's length);
* GIFTI (:class:`GiftiReader`): XML with base64 data arrays, which nibabel can only
  parse whole: a run (both hemisphere files) is held in memory once, in pass 1, then
  streamed through the scratch like a NIfTI run (10,242 x 1,000 x 4 B = 41 MB per
  fsaverage5 hemisphere; 130 MB for fsLR 32k).

Writing: :func:`write_cifti` (``dscalar`` / ``dtseries`` with the input's brain-model
axis rebuilt from the stored coordinates) and :func:`write_gifti` (one file per
hemisphere, one data array per map), both renamed into place when complete.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.cifti2 import cifti2_axes

from voxelflow.pipeline.errors import InputError, exception_reason

__all__ = ["CiftiColumns", "GiftiReader", "SurfaceLayout", "SurfaceRun", "is_surface",
           "probe_surface_runs", "write_cifti", "write_gifti"]

CIFTI_SUFFIX = ".dtseries.nii"
GIFTI_SUFFIX = ".func.gii"
HEMI_STRUCTURE = {"L": "CIFTI_STRUCTURE_CORTEX_LEFT", "R": "CIFTI_STRUCTURE_CORTEX_RIGHT"}
GIFTI_PRIMARY = {"L": "CortexLeft", "R": "CortexRight"}


def is_surface(path: str | Path | Sequence) -> bool:
    """Whether a run is a CIFTI dtseries or GIFTI func file (or a pair of them)."""
    if isinstance(path, (list, tuple)):
        return True
    return str(path).endswith((CIFTI_SUFFIX, GIFTI_SUFFIX))


@dataclass(frozen=True)
class SurfaceRun:
    """One surface run: its file(s) (two for a GIFTI L/R pair), volumes and header TR."""

    files: tuple[str, ...]
    n_volumes: int
    tr_header: float | None
    dtype: str

    @property
    def path(self) -> Path:
        return Path(self.files[0])


@dataclass
class SurfaceLayout:
    """The vertex axis: per-element coordinates and ``index`` into the run's columns."""

    kind: str  # "cifti" | "gifti"
    structure: np.ndarray
    vertex: np.ndarray
    ijk: np.ndarray  # (n, 3) int32, -1 on surfaces
    hemi: np.ndarray
    index: np.ndarray  # (n,) int64 columns of the file (GIFTI: of L then R)
    attrs: dict = field(default_factory=dict)  # nvertices, affine, volume_shape

    @property
    def size(self) -> int:
        return int(self.index.size)


# ==================================================================== CIFTI
def _load_cifti(path: Path):
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    try:
        img = nib.load(str(path))
        series, models = img.header.get_axis(0), img.header.get_axis(1)
    except Exception as exc:
        raise InputError(f"{path}: not a readable CIFTI-2 dtseries ({exception_reason(exc)})"
                         f"; give a .dtseries.nii file") from None
    if not isinstance(series, cifti2_axes.SeriesAxis) or not isinstance(
            models, cifti2_axes.BrainModelAxis):
        raise InputError(f"{path}: CIFTI axes are {type(series).__name__} x "
                         f"{type(models).__name__}, not series x brain models; give a "
                         f"dtseries file")
    return img, series, models


def _structure_names(models: cifti2_axes.BrainModelAxis, wanted: Sequence[str] | None,
                     path: Path) -> list[str]:
    present = [name for name, _, _ in models.iter_structures()]
    if not wanted:
        return present
    chosen = []
    for text in wanted:
        try:
            name = cifti2_axes.BrainModelAxis.to_cifti_brain_structure_name(text.strip())
        except ValueError:
            name = "CIFTI_STRUCTURE_" + text.strip().upper()
        if name not in present:
            shown = ", ".join(p.replace("CIFTI_STRUCTURE_", "") for p in present)
            raise InputError(f"{path}: --structures {text}: no such brain model (present: "
                             f"{shown})")
        chosen.append(name)
    return chosen


def _cifti_layout(models: cifti2_axes.BrainModelAxis, names: list[str]) -> SurfaceLayout:
    index = np.concatenate([np.arange(len(models))[sl] for name, sl, _ in
                            models.iter_structures() if name in names]).astype(np.int64)
    index.sort()
    structure = np.asarray(models.name[index]).astype(str)
    hemi = np.array(["L" if s.endswith("_LEFT") else "R" if s.endswith("_RIGHT") else ""
                     for s in structure])
    return SurfaceLayout(
        "cifti", structure, models.vertex[index].astype(np.int32),
        models.voxel[index].astype(np.int32), hemi, index,
        {"nvertices": {str(k): int(v) for k, v in models.nvertices.items()},
         "affine": None if models.affine is None else np.asarray(models.affine).tolist(),
         "volume_shape": None if models.volume_shape is None else list(models.volume_shape)})


def _probe_cifti(paths: Sequence[Path], structures: Sequence[str] | None
                 ) -> tuple[list[SurfaceRun], SurfaceLayout]:
    runs, first_models = [], None
    for path in paths:
        img, series, models = _load_cifti(path)
        if first_models is None:
            first_models = models
        elif models != first_models:
            raise InputError(f"{path}: brain models differ from {paths[0]}; all runs must "
                             f"share one set of grayordinates")
        unit = str(series.unit).upper()
        tr = float(series.step) if unit == "SECOND" and series.step > 0 else None
        runs.append(SurfaceRun((str(path),), len(series), tr, str(img.nifti_header.get_data_dtype())))
    names = _structure_names(first_models, structures, paths[0])
    return runs, _cifti_layout(first_models, names)


class CiftiColumns:
    """Pass 2 straight from a CIFTI file: :meth:`read_voxels` as the scratch's.

    Duck-types :class:`~voxelflow.pipeline.stages._bold_passes.ScratchSpec` (``open``,
    ``n_time``, ``remove``), so :class:`ChunkWork` reads chunks from the file.
    """

    def __init__(self, path: str, n_time: int, index: np.ndarray) -> None:
        self.path, self.n_time, self.index = str(path), int(n_time), np.asarray(index)
        self.n_voxel = int(self.index.size)

    def open(self) -> "CiftiColumns":
        return self

    def remove(self) -> None:
        """Nothing to remove: there is no scratch."""

    def read_voxels(self, region: slice, out: np.ndarray | None = None) -> np.ndarray:
        """All time points of elements ``region`` (time, n) float32, one contiguous read."""
        cols = self.index[region]
        lo, hi = int(cols.min()), int(cols.max()) + 1
        block = np.asarray(nib.load(self.path).dataobj[:, lo:hi], dtype=np.float32)
        if out is None:
            out = np.empty((self.n_time, cols.size), dtype=np.float32)
        out = out[:, :cols.size]
        np.take(block, cols - lo, axis=1, out=out)
        return out


# ==================================================================== GIFTI
def _gifti_tr(img, path: Path) -> float | None:
    """TR in seconds from a ``TimeStep`` entry (milliseconds, Connectome Workbench)."""
    for meta in [img.meta] + [d.meta for d in img.darrays[:1]]:
        value = dict(meta or {}).get("TimeStep")
        if value is not None:
            try:
                step = float(value) / 1000.0
            except ValueError:
                raise InputError(f"{path}: TimeStep metadata {value!r} is not a number; pass "
                                 f"--tr SECONDS") from None
            return step if math.isfinite(step) and step > 0 else None
    return None


def _load_gifti(path: Path) -> tuple[np.ndarray, float | None]:
    """(n_time, n_vertices) float32 of one func.gii, and its TR (or None)."""
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.agg_data(), dtype=np.float32)
    except Exception as exc:
        raise InputError(f"{path}: not a readable GIFTI file ({exception_reason(exc)}); give "
                         f"a .func.gii file") from None
    if data.ndim == 1:
        data = data[:, None]
    return np.ascontiguousarray(data.T), _gifti_tr(img, path)


def _probe_gifti(groups: Sequence[tuple[Path, ...]], hemis: Sequence[str]
                 ) -> tuple[list[SurfaceRun], SurfaceLayout]:
    runs, sizes = [], None
    for files in groups:
        loaded = [_load_gifti(f) for f in files]
        n_vert = [d.shape[1] for d, _ in loaded]
        n_time = {d.shape[0] for d, _ in loaded}
        if len(n_time) != 1:
            raise InputError(f"{files[0]}: hemisphere files of one run have different "
                             f"numbers of volumes ({sorted(n_time)})")
        if sizes is None:
            sizes = n_vert
        elif n_vert != sizes:
            raise InputError(f"{files[0]}: {n_vert} vertices, but the first run has {sizes}; "
                             f"all runs must be on one mesh")
        trs = {tr for _, tr in loaded}
        runs.append(SurfaceRun(tuple(str(f) for f in files), n_time.pop(),
                               trs.pop() if len(trs) == 1 else None, "float32"))
    hemi = np.concatenate([np.full(n, h) for h, n in zip(hemis, sizes)])
    vertex = np.concatenate([np.arange(n, dtype=np.int32) for n in sizes])
    layout = SurfaceLayout(
        "gifti", np.array([HEMI_STRUCTURE[h] for h in hemi]), vertex,
        np.full((vertex.size, 3), -1, dtype=np.int32), hemi,
        np.arange(vertex.size, dtype=np.int64),
        {"nvertices": {HEMI_STRUCTURE[h]: int(n) for h, n in zip(hemis, sizes)}})
    return runs, layout


class GiftiReader:
    """A GIFTI run (one file per hemisphere) in memory, read like a NIfTI run's blocks."""

    def __init__(self, files: Sequence[str]) -> None:
        self.data = np.concatenate([_load_gifti(Path(f))[0] for f in files], axis=1)
        self.n_volumes = self.data.shape[0]

    def read_masked(self, flat_index: np.ndarray, start: int, stop: int,
                    out: np.ndarray | None = None) -> np.ndarray:
        """Volumes ``start:stop`` of the elements ``flat_index`` (time, n) float32."""
        if out is None:
            out = np.empty((stop - start, flat_index.size), dtype=np.float32)
        out = out[:stop - start]
        np.take(self.data[start:stop], flat_index, axis=1, out=out)
        return out


# ==================================================================== probing
def probe_surface_runs(runs: Sequence, hemis: Sequence[str] | None,
                       structures: Sequence[str] | None
                       ) -> tuple[list[SurfaceRun], SurfaceLayout]:
    """Check surface runs (CIFTI files, or GIFTI files grouped by ``hemis``)."""
    items = [tuple(Path(p) for p in r) if isinstance(r, (list, tuple)) else (Path(r),)
             for r in runs]
    flat = [p for group in items for p in group]
    if all(str(p).endswith(CIFTI_SUFFIX) for p in flat):
        if hemis:
            raise InputError("--hemi is for GIFTI runs; a CIFTI run holds both hemispheres "
                             "(choose brain models with --structures)")
        return _probe_cifti(flat, structures)
    if not all(str(p).endswith(GIFTI_SUFFIX) for p in flat):
        raise InputError(f"{flat[0]}: runs mix file formats; give only NIfTI, only "
                         f"{CIFTI_SUFFIX} or only {GIFTI_SUFFIX} runs")
    if structures:
        raise InputError("--structures is for CIFTI runs; GIFTI runs choose hemispheres "
                         "with --hemi")
    if all(len(g) == 1 for g in items):
        if not hemis or any(h not in HEMI_STRUCTURE for h in hemis) or len(
                set(hemis)) != len(hemis):
            raise InputError(f"{flat[0]}: GIFTI runs need --hemi L R (files given L, R, L, "
                             f"R, ... one pair per run) or --hemi L / --hemi R")
        if len(flat) % len(hemis):
            raise InputError(f"{len(flat)} GIFTI files cannot be grouped by --hemi "
                             f"{' '.join(hemis)}; give {len(hemis)} file(s) per run")
        items = [tuple(flat[n:n + len(hemis)]) for n in range(0, len(flat), len(hemis))]
    return _probe_gifti(items, list(hemis or ["L", "R"][:len(items[0])]))


def check_surface_tr(runs: Sequence[SurfaceRun], tr: float | None) -> tuple[float, str]:
    """TR from ``--tr`` / BIDS, or the CIFTI series step / GIFTI TimeStep (all equal)."""
    if tr is not None:
        return float(tr), "--tr"
    trs = {r.tr_header for r in runs}
    if None in trs:
        missing = next(r for r in runs if r.tr_header is None)
        raise InputError(f"{missing.path}: no TR in the file (CIFTI series step in seconds "
                         f"or GIFTI TimeStep); pass --tr SECONDS")
    if max(trs) - min(trs) > 1e-6 * max(trs):
        raise InputError(f"{runs[0].path}: runs have different TRs ({sorted(trs)}); ingest "
                         f"them as separate subjects")
    return float(runs[0].tr_header), ("CIFTI series step" if runs[0].files[0].endswith(
        CIFTI_SUFFIX) else "GIFTI TimeStep")


# ==================================================================== writing
def brain_model_axis(structure, vertex, ijk, attrs: dict) -> cifti2_axes.BrainModelAxis:
    """The brain-model axis of the stored elements (as the input file had them)."""
    affine = attrs.get("affine")
    shape = attrs.get("volume_shape")
    return cifti2_axes.BrainModelAxis(
        name=np.asarray(structure).astype(str), voxel=np.asarray(ijk, dtype=np.int64),
        vertex=np.asarray(vertex, dtype=np.int64),
        affine=None if affine is None else np.asarray(affine, dtype=np.float64),
        volume_shape=None if shape is None else tuple(shape),
        nvertices={str(k): int(v) for k, v in attrs.get("nvertices", {}).items()})


def _replace_into(path: Path, save) -> None:
    tmp = path.with_name(".partial-" + path.name)
    try:
        save(str(tmp))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write here ({exc.strerror or exc}); choose another "
                         f"output path") from None
    os.replace(tmp, path)


def write_cifti(path: str | Path, values: np.ndarray, models: cifti2_axes.BrainModelAxis,
                labels: Sequence[str] | None = None, step: float | None = None) -> None:
    """``values`` (n, grayordinate) -> ``dscalar`` (map names ``labels``) or, with
    ``step`` seconds, ``dtseries``."""
    values = np.asarray(values)
    if step is not None:
        first = cifti2_axes.SeriesAxis(0.0, float(step), values.shape[0], unit="SECOND")
    else:
        first = cifti2_axes.ScalarAxis([str(v) for v in (labels or range(values.shape[0]))])
    img = nib.Cifti2Image(values, header=(first, models))
    img.nifti_header.set_intent("ConnDenseSeries" if step is not None else "ConnDenseScalar")
    _replace_into(Path(path), img.to_filename)


def write_gifti(path: str | Path, values: np.ndarray, hemi: str,
                labels: Sequence[str] | None = None) -> None:
    """``values`` (n, vertex) of one hemisphere -> a GIFTI file, one data array per row."""
    values = np.asarray(values)
    arrays = []
    for n, row in enumerate(values):
        meta = {"Name": str(labels[n])} if labels is not None else {}
        arrays.append(nib.gifti.GiftiDataArray(
            np.ascontiguousarray(row), intent="NIFTI_INTENT_NONE",
            datatype=nib.nifti1.data_type_codes.code[row.dtype.type],
            meta=nib.gifti.GiftiMetaData(meta)))
    img = nib.gifti.GiftiImage(darrays=arrays, meta=nib.gifti.GiftiMetaData(
        {"AnatomicalStructurePrimary": GIFTI_PRIMARY[hemi]}))
    _replace_into(Path(path), lambda name: nib.save(img, name))
