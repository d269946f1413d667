"""Reading 4D NIfTI runs and masks for the BOLD stage: headers, blocks of volumes, masks.

* :func:`probe_run` reads one run's header (:class:`RunInfo`: grid, volumes, TR) and
  :func:`check_runs` checks that all runs share one grid and one TR;
* :class:`RunReader` reads blocks of a few volumes as stored (no float64 copies of
  whole volumes) and scales only the masked voxels;
* :func:`load_mask` reads a mask file on the BOLD grid (``value != 0``; NaN outside),
  :func:`epi_mask` computes one from :func:`mean_volume` when none is given, and
  :func:`mask_voxels` gives the voxel order every stored array follows: the C order of
  ``np.nonzero(mask)``, so ``bold[:, v]`` is ``volume[i[v], j[v], k[v]]``.

Nothing here writes to the workspace.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from tqdm.auto import tqdm

from voxelflow.pipeline.errors import InputError, exception_reason

__all__ = ["RunInfo", "RunReader", "check_runs", "check_usable_voxels", "epi_mask", "load_mask",
           "mask_voxels", "mean_volume", "probe_run"]

READ_BUDGET = 4 * 2**20  # bytes of volumes (as stored) read from a NIfTI at once
TIME_UNIT_SECONDS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
GRID_ATOL = 1e-3  # affine entries (mm) that differ by less are the same grid
MIN_VOLUMES = 2  # fewer is no time series (z-scoring would make every voxel constant)


@dataclass(frozen=True)
class RunInfo:
    """What the header of one 4D run says (nothing of the data is read)."""

    path: Path
    shape: tuple[int, int, int]
    n_volumes: int
    affine: np.ndarray
    tr_header: float | None  # seconds, None when pixdim[4] is 0 / not a time
    tr_raw: float
    time_unit: str
    dtype: str
    xform_code: int
    space_unit: str


def _load(path: Path, what: str = "run") -> nib.spatialimages.SpatialImage:
    """Open a NIfTI file lazily (header only) or raise a one-line :class:`InputError`."""
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a NIfTI file; give a .nii or .nii.gz "
                         f"{what}")
    try:
        img = nib.load(str(path), mmap=False, keep_file_open=True)
    except Exception as exc:  # nibabel raises ImageFileError, OSError, ValueError, ...
        reason = exception_reason(exc)
        raise InputError(f"{path}: not a readable NIfTI file ({reason}); give a .nii or "
                         f".nii.gz {what}") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI file (nibabel reads it as "
                         f"{type(img).__name__}); convert it to .nii/.nii.gz (e.g. with "
                         f"dcm2niix or nibabel) first")
    return img


def probe_run(path: str | Path) -> RunInfo:
    """Read and check the header of one run: it must be a 4D NIfTI."""
    path = Path(path)
    img = _load(path, "run")
    shape = tuple(int(n) for n in img.shape)
    # (x, y, z, 1, ..., 1, t) is not a layout scanners write; trailing 1s after t are.
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 4:
        raise InputError(
            f"{path}: is a {len(shape)}D image (shape {'x'.join(map(str, shape))}), not a 4D time "
            f"series; give one 4D file per run (merge single volumes first, e.g. "
            f"nilearn.image.concat_imgs or fslmerge -t)")
    if shape[3] < MIN_VOLUMES:
        raise InputError(f"{path}: holds {shape[3]} volume(s) (shape "
                         f"{'x'.join(map(str, shape))}); a run is a time series of at least "
                         f"{MIN_VOLUMES} volumes: give the whole run")
    header = img.header
    space_unit, time_unit = header.get_xyzt_units()
    tr_raw = float(header["pixdim"][4])
    factor = TIME_UNIT_SECONDS.get(time_unit)
    if time_unit == "unknown":
        factor = 1.0  # many tools leave the unit unset; pixdim[4] is then seconds
    tr_header = tr_raw * factor if factor is not None and tr_raw > 0 else None
    scode = header.get_sform(coded=True)[1]
    qcode = header.get_qform(coded=True)[1]
    xform_code = int(scode) if scode else int(qcode or 0)
    return RunInfo(path=path, shape=shape[:3], n_volumes=shape[3],
                   affine=np.asarray(img.affine, dtype=np.float64), tr_header=tr_header,
                   tr_raw=tr_raw, time_unit=str(time_unit), dtype=str(header.get_data_dtype()),
                   xform_code=xform_code, space_unit=str(space_unit))


def check_runs(infos: Sequence[RunInfo], tr: float | None) -> tuple[float, str]:
    """Check that all runs share one grid and one TR; return ``(tr_seconds, source)``."""
    first = infos[0]
    for info in infos[1:]:
        if info.shape != first.shape or not np.allclose(info.affine, first.affine,
                                                        atol=GRID_ATOL):
            raise InputError(
                f"{info.path}: grid {_grid(info)} differs from {first.path} "
                f"({_grid(first)}); all runs must share one grid: resample them first "
                f"(e.g. nilearn.image.resample_to_img) or ingest them as another --subject")
    if tr is not None:
        if not math.isfinite(tr) or tr <= 0:
            raise InputError(f"--tr must be a positive number of seconds (got {tr})")
        return float(tr), "--tr"
    for info in infos:
        if info.tr_header is None:
            raise InputError(
                f"{info.path}: header gives no usable TR (pixdim[4] = {info.tr_raw:g}, time "
                f"unit {info.time_unit}); pass --tr SECONDS")
    for info in infos[1:]:
        if not math.isclose(info.tr_header, first.tr_header, rel_tol=1e-6, abs_tol=1e-9):
            raise InputError(
                f"{info.path}: TR {info.tr_header:g} s differs from {first.path} "
                f"({first.tr_header:g} s); ingest runs with different TRs as separate "
                f"subjects, or pass --tr if the headers are wrong")
    return float(first.tr_header), f"header pixdim[4] ({first.time_unit})"


def _grid(info: RunInfo) -> str:
    origin = ", ".join(f"{v:g}" for v in np.round(info.affine[:3, 3], 3))
    zooms = ", ".join(f"{v:g}" for v in np.round(np.linalg.norm(info.affine[:3, :3], axis=0), 3))
    return f"{'x'.join(map(str, info.shape))} voxels of ({zooms}) mm, origin ({origin})"



def load_mask(path: str | Path, grid: RunInfo) -> np.ndarray:
    """The mask file as a 3D bool array on ``grid``: ``value != 0`` (NaN: outside)."""
    path = Path(path)
    img = _load(path, "mask")
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if shape != grid.shape:
        raise InputError(
            f"{path}: mask shape {'x'.join(map(str, shape))} differs from the BOLD grid "
            f"{'x'.join(map(str, grid.shape))} of {grid.path}; give a mask on the BOLD grid "
            f"(e.g. nilearn.image.resample_to_img(mask, bold, interpolation='nearest'))")
    if not np.allclose(img.affine, grid.affine, atol=GRID_ATOL):
        raise InputError(
            f"{path}: mask affine differs from the BOLD affine of {grid.path}; give a mask "
            f"on the BOLD grid (e.g. nilearn.image.resample_to_img(mask, bold, "
            f"interpolation='nearest'))")
    try:
        values = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as exc:
        raise InputError(f"{path}: mask data could not be read ({exc}); re-export the "
                         f"mask") from None
    mask = np.zeros(shape, dtype=bool)
    np.not_equal(values, 0, out=mask)
    if values.dtype.kind == "f":
        mask &= np.isfinite(values)
    if not mask.any():
        raise InputError(f"{path}: mask is empty (no voxel != 0); give a mask with at least "
                         f"one voxel, or leave out --mask to compute one from the data")
    return mask


class RunReader:
    """Blocks of volumes of one run, read as stored and scaled after masking.

    nibabel's ``dataobj`` slicing would scale every voxel of every volume to float64
    (5.3 MB per 96x96x72 volume); here the same slicing runs on an unscaled
    ``ArrayProxy`` of the same file (same offset, dtype and order) and
    ``scl_slope``/``scl_inter`` (nibabel's sanitised values) are applied in float64 to
    the masked voxels only, which is what ``get_fdata()`` computes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        img = _load(self.path)
        proxy = img.dataobj
        self.shape = tuple(int(n) for n in proxy.shape[:3])
        # (x, y, z, t, 1, ...) holds the same bytes as (x, y, z, t) in Fortran order
        self.n_volumes = int(np.prod(proxy.shape[3:])) if len(proxy.shape) > 3 else 1
        self.slope = float(getattr(proxy, "slope", 1.0))
        self.inter = float(getattr(proxy, "inter", 0.0))
        if isinstance(proxy, ArrayProxy) and proxy.order == "F":
            spec = (self.shape + (self.n_volumes,), proxy.dtype, proxy.offset, 1.0, 0.0)
            self._proxy = ArrayProxy(str(self.path), spec, mmap=False, keep_file_open=True)
            self.dtype = np.dtype(proxy.dtype)
        else:  # not expected for NIfTI; fall back on nibabel's own scaling
            self._proxy, self.slope, self.inter = proxy, 1.0, 0.0
            self.dtype = np.dtype(np.float64)

    def volumes_per_read(self) -> int:
        """How many volumes one read may hold (``READ_BUDGET`` bytes as stored)."""
        per_volume = int(np.prod(self.shape)) * max(self.dtype.itemsize, 2)
        return int(max(1, min(self.n_volumes, READ_BUDGET // per_volume)))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Volumes ``start:stop`` as stored (unscaled), shape ``(x, y, z, n)``, F order."""
        try:
            data = np.asanyarray(self._proxy[..., start:stop])
        except (EOFError, OSError, ValueError, zlib.error) as exc:
            reason = exception_reason(exc)
            raise InputError(
                f"{self.path}: could not read volumes {start}-{stop - 1} ({reason}); the file "
                f"looks truncated or corrupt: re-download or re-export it") from None
        return data.reshape(self.shape + (stop - start,), order="F")

    def scale(self, values: np.ndarray) -> np.ndarray:
        """Stored values -> float64 data values (``x * scl_slope + scl_inter``)."""
        out = values.astype(np.float64)
        if self.slope != 1.0:
            out *= self.slope
        if self.inter != 0.0:
            out += self.inter
        return out

    def iter_masked(self, flat_index: np.ndarray, start: int, stop: int
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_volume, (n, voxel) float64)`` for volumes ``start:stop``."""
        step = self.volumes_per_read()
        for a in range(start, stop, step):
            b = min(a + step, stop)
            vols = self.read(a, b)
            flat = vols.reshape(-1, b - a, order="F")  # a view of the Fortran-order block
            picked = flat[flat_index]  # (voxel, n), as stored
            del vols, flat
            yield a, self.scale(picked).T

    def read_masked(self, flat_index: np.ndarray, start: int, stop: int,
                    out: np.ndarray) -> np.ndarray:
        """Volumes ``start:stop`` of the voxels ``flat_index`` into ``out[:stop - start]``
        (``(>= n, voxel)``, e.g. float32: values are cast from float64); returns that view."""
        out = out[: stop - start]
        for first, values in self.iter_masked(flat_index, start, stop):
            out[first - start:first - start + values.shape[0]] = values
        return out

    def sum_volumes(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-voxel sum of the scaled data over all volumes and count of finite samples."""
        total = np.zeros(self.shape, dtype=np.float64)
        count = np.zeros(self.shape, dtype=np.int64)
        step = self.volumes_per_read()
        for a in range(0, self.n_volumes, step):
            b = min(a + step, self.n_volumes)
            vols = self.read(a, b)
            if vols.dtype.kind == "f":
                finite = np.isfinite(vols)
                total += np.where(finite, vols, 0).sum(axis=3, dtype=np.float64)
                count += finite.sum(axis=3)
                del finite
            else:
                total += vols.sum(axis=3, dtype=np.float64)
                count += b - a
            del vols
        # scaling is affine, so it applies to the sum: sum(x * s + c) = s * sum(x) + n * c
        return total * self.slope + count * self.inter, count


def check_usable_voxels(infos: Sequence[RunInfo], flat_index: np.ndarray | None,
                        mask_source: str) -> None:
    """Refuse data with no usable voxel, reading one volume per run.

    A voxel is usable only if every sample of every run is finite, so when the first
    volume of the runs has no voxel finite in all of them (inside the mask:
    ``flat_index``, Fortran-order flat indices; None: the whole grid), nothing can be
    scored: a NaN-filled run, for example.  Cheap: one volume per run.
    """
    usable: np.ndarray | None = None
    for info in infos:
        reader = RunReader(info.path)
        first = reader.read(0, 1).reshape(-1, order="F")
        values = first if flat_index is None else first[flat_index]
        finite = np.isfinite(reader.scale(values)) if values.dtype.kind in "fc" else (
            np.ones(values.shape, bool))
        usable = finite if usable is None else usable & finite
    if usable is not None and not usable.any():
        where = f"inside {mask_source}" if flat_index is not None else "of the grid"
        raise InputError(
            f"{infos[0].path}: no usable voxel: no voxel {where} is finite in the first "
            f"volume of every run (NaN or infinite data); check the runs")


def mean_volume(infos: Sequence[RunInfo], progress: bool = False) -> np.ndarray:
    """Mean over all volumes of all runs (3D float64; non-finite samples ignored)."""
    total = np.zeros(infos[0].shape, dtype=np.float64)
    count = np.zeros(infos[0].shape, dtype=np.int64)
    for info in tqdm(infos, unit="run", desc="mean volume", disable=not progress,
                     dynamic_ncols=True):
        run_total, run_count = RunReader(info.path).sum_volumes()
        total += run_total
        count += run_count
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def epi_mask(mean: np.ndarray, affine: np.ndarray, source: str) -> np.ndarray:
    """Brain mask from a mean EPI volume with nilearn's ``compute_epi_mask``."""
    from nilearn.masking import compute_epi_mask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = compute_epi_mask(nib.Nifti1Image(mean.astype(np.float32), affine))
    mask = np.asanyarray(img.dataobj) != 0
    if not mask.any():
        raise InputError(f"{source}: nilearn's compute_epi_mask found no brain in the mean "
                         f"volume of the runs (image too small or too uniform); pass --mask "
                         f"MASK.nii.gz")
    return mask


def mask_voxels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``i, j, k`` (voxel,) int32 in C order of the mask, and their Fortran-order flat
    index (voxel,) int64 into one stored volume (what :meth:`RunReader.iter_masked` takes)."""
    i, j, k = (a.astype(np.int32) for a in np.nonzero(mask))
    flat = np.ravel_multi_index((i, j, k), mask.shape, order="F")
    return i, j, k, flat
