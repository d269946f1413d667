"""NIfTI runs -> masked ``(time, voxel)`` BOLD, streamed; per-voxel results -> NIfTI.

Ingestion (:func:`run_bold_stage`) never holds a 4D run in memory:

* **pass 1** reads each run in blocks of a few volumes (nibabel ``ArrayProxy``
  slicing of the stored values; ``scl_slope``/``scl_inter`` applied to the masked
  voxels, see :class:`RunReader`), keeps the voxels of the mask and writes
  ``(time_block, voxel)`` float32 blocks into a scratch file (``stores/scratch.py``);
* **pass 2** reads the scratch back one output chunk at a time (all time points x
  ``chunk_voxels`` voxels), detrends / z-scores it per run and writes it to
  ``/bold/<subject>/run-NNN/bold``, then sets the block's done flag.  When every
  block is done, ``valid`` and ``mean`` are combined from the per-run statistics.

Memory: one read block (<= ``READ_BUDGET`` bytes as stored), one masked time block
(<= ``SCRATCH_BUDGET`` bytes) and one output chunk (n_time x chunk_voxels x 4 B, 19.7 MB
for 1,200 volumes), whatever the number of voxels or volumes; the output buffer is
reused from chunk to chunk (``benchmarks/bold.py`` measures it).

Conventions (the test's independent NumPy reference follows them):

* voxel order: C order of ``np.nonzero(mask)`` (the order of ``vol[mask]``), so
  ``bold[:, v]`` is ``volume[i[v], j[v], k[v]]``; a mask is ``value != 0`` (NaN counts
  as outside), whatever its dtype.
* z-score per run and voxel: ``(x - mean) / std`` with ``ddof=0`` over that run's time
  points (after the linear detrend when ``detrend="linear"``, which removes the
  least-squares line ``a + b t`` like ``scipy.signal.detrend``).  A voxel constant in a
  run is stored as 0 there.  Non-finite samples (NaN, +-inf) are stored as NaN and the
  statistics of their voxel use the finite samples only.  With neither z-score nor
  detrend the raw values are stored unchanged.
* ``valid (voxel)``: False where the voxel is constant or has a non-finite sample in
  at least one run; such voxels are kept and must be excluded downstream.

Export (:func:`export_variable`) writes any ``(voxel,)`` or ``(n, voxel)`` variable of
the workspace to a 3D / 4D NIfTI on the original grid and affine (zeros outside the
mask), streaming one volume (or a memory-bounded group of volumes) at a time.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import dask.array as da
import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
import xarray as xr
from tqdm.auto import tqdm

from voxelflow.pipeline.execution.cluster import active_client, require_shared_path, run_block_tasks
from voxelflow.pipeline.errors import InputError, exception_reason
from voxelflow.stores.scratch import TransposeScratch
from voxelflow.stores.workspace import RunTemplate, StageWriter, Workspace

CHUNK_VOXELS = 4096  # voxels per Zarr chunk (all time points) == voxels per resumable block
READ_BUDGET = 4 * 2**20  # bytes of volumes (as stored) read from a NIfTI at once
SCRATCH_BUDGET = 8 * 2**20  # bytes of one masked (time_block, voxel) float32 block
FLOAT64_COLUMNS = 256  # voxels standardised at once in float64 inside an output chunk
EXPORT_BUDGET = 64 * 2**20  # bytes of output volumes assembled at once by the exporter
DETRENDS = ("none", "linear")
TIME_UNIT_SECONDS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
GRID_ATOL = 1e-3  # affine entries (mm) that differ by less are the same grid
EPI_MASK_METHOD = "nilearn.masking.compute_epi_mask on the mean volume of all runs"
NIFTI_SUFFIXES = (".nii", ".nii.gz")


# ==================================================================== reading NIfTI
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
    if shape[3] < 1:
        raise InputError(f"{path}: holds no volumes (shape {'x'.join(map(str, shape))}); "
                         f"give a 4D run with at least one volume")
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


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


# ==================================================================== the maths
def mask_voxels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``i, j, k`` (C order of the mask) and their Fortran-order flat index."""
    i, j, k = (a.astype(np.int32) for a in np.nonzero(mask))
    flat = np.ravel_multi_index((i, j, k), mask.shape, order="F")
    return i, j, k, flat


def standardize(x: np.ndarray, zscore: bool, detrend: str,
                columns: int = FLOAT64_COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """Detrend / z-score ``x`` (time, voxel) float32 *in place*, per voxel.

    Returns the raw per-voxel ``mean`` and ``std`` (float32, ``ddof=0``, before any
    change) with NaN where the voxel has a non-finite sample and ``std`` exactly 0
    where the voxel is constant.  Work is done in float64, ``columns`` voxels at a time.
    """
    n_time, n_vox = x.shape
    raw_mean = np.empty(n_vox, dtype=np.float32)
    raw_std = np.empty(n_vox, dtype=np.float32)
    t = np.arange(n_time, dtype=np.float64)
    for c0 in range(0, n_vox, columns):
        c1 = min(c0 + columns, n_vox)
        xs = x[:, c0:c1].astype(np.float64)
        finite = np.isfinite(xs)
        all_finite = finite.all(axis=0)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            constant = all_finite & (xs.max(axis=0) == xs.min(axis=0))
            mean = xs.mean(axis=0)
            std = xs.std(axis=0)
            std[constant] = 0.0
            raw_mean[c0:c1] = mean
            raw_std[c0:c1] = std
            if not zscore and detrend == "none":
                continue
            if all_finite.all():
                weight = None
                n = np.full(c1 - c0, n_time, dtype=np.float64)
                centre = mean
            else:
                xs[~finite] = np.nan  # +-inf too: a z-score of inf means nothing
                weight = finite.astype(np.float64)
                n = weight.sum(axis=0)
                centre = np.where(finite, xs, 0.0).sum(axis=0) / n
            xs -= centre
            if detrend == "linear":
                if weight is None:
                    tdev = (t - t.mean())[:, None]
                    slope = (tdev * xs).sum(axis=0) / (tdev ** 2).sum()
                else:
                    t_mean = (weight * t[:, None]).sum(axis=0) / n
                    tdev = (t[:, None] - t_mean) * weight
                    slope = np.where(finite, tdev * xs, 0.0).sum(axis=0) / (tdev ** 2).sum(axis=0)
                    tdev = t[:, None] - t_mean
                slope = np.where(np.isfinite(slope), slope, 0.0)
                xs -= tdev * slope
            flat = constant.copy()
            if zscore:
                if weight is None:
                    scale = np.sqrt((xs ** 2).mean(axis=0))
                else:
                    scale = np.sqrt(np.where(finite, xs ** 2, 0.0).sum(axis=0) / n)
                flat |= ~(scale > 0)
                xs /= np.where(flat, 1.0, scale)
            if flat.any():
                # constant in this run: exactly 0 (not rounding noise), NaN samples kept
                xs[:, flat] = np.where(finite[:, flat], 0.0, xs[:, flat])
        x[:, c0:c1] = xs
        del xs, finite
    return raw_mean, raw_std


def run_validity(raw_std: np.ndarray) -> np.ndarray:
    """Per-run usable voxels: every sample finite and not constant."""
    return np.isfinite(raw_std) & (raw_std > 0)


# ==================================================================== the stage
def bold_group(subject: str) -> str:
    return f"bold/{subject}"


def _validate_subject(subject: str) -> None:
    if not subject or "/" in subject or subject.startswith(".") or subject.strip() != subject:
        raise InputError(f"--subject must be a plain name without '/' (got {subject!r})")


def bold_template(info: RunInfo, run: int, tr: float, i: np.ndarray, j: np.ndarray,
                  k: np.ndarray, chunk_voxels: int) -> RunTemplate:
    """One run: ``bold (time, voxel) float32`` + time/run and per-voxel i/j/k/valid coords."""
    n_time, n_vox = info.n_volumes, i.size
    chunk = (n_time, min(chunk_voxels, n_vox))
    times = np.arange(n_time, dtype=np.float64) * tr
    ds = xr.Dataset(
        {"bold": (("time", "voxel"), da.empty((n_time, n_vox), dtype=np.float32, chunks=chunk),
                  {"long_name": "BOLD signal of the voxels in the mask"})},
        coords=_voxel_coords(i, j, k) | {
            "time": ("time", times, {"units": "s", "long_name": "time from run onset"}),
            "run": ("time", np.full(n_time, run, dtype=np.int32), {"long_name": "run index"}),
        },
        attrs={"source": str(info.path), "n_volumes": n_time, "tr": tr,
               "source_dtype": info.dtype},
    )
    voxel_enc = {"chunks": (n_vox,)}
    # No compressor: z-scored float32 BOLD is noise down to the last mantissa bits (zstd
    # saves ~8 %), and the codec's buffers would double the memory of a chunk.
    encoding = {"bold": {"chunks": chunk, "compressors": None}, "time": {"chunks": (n_time,)},
                "run": {"chunks": (n_time,)}, "i": voxel_enc, "j": voxel_enc, "k": voxel_enc,
                "valid": voxel_enc}
    return RunTemplate(ds, encoding, block_dim="voxel", block_size=chunk[1])


def _voxel_coords(i, j, k, valid: np.ndarray | None = None) -> dict:
    valid = np.zeros(i.size, dtype=bool) if valid is None else valid
    return {
        "i": ("voxel", i, {"long_name": "voxel index along the 1st NIfTI axis"}),
        "j": ("voxel", j, {"long_name": "voxel index along the 2nd NIfTI axis"}),
        "k": ("voxel", k, {"long_name": "voxel index along the 3rd NIfTI axis"}),
        "valid": ("voxel", valid, {"long_name": "finite and not constant in every run; "
                                                "exclude invalid voxels from scoring"}),
    }


def group_variables(mask: np.ndarray, i, j, k, n_runs: int, chunk_voxels: int
                    ) -> tuple[xr.Dataset, dict]:
    """Group-level arrays: coords i/j/k/valid, ``mask``, ``mean`` and per-run raw stats."""
    n_vox = i.size
    chunk = min(chunk_voxels, n_vox)
    stats = {"long_name": "", "note": "of the raw signal before detrend/z-scoring; NaN where "
                                      "a sample is non-finite"}
    ds = xr.Dataset(
        {
            "mask": (("mask_i", "mask_j", "mask_k"), mask.astype(np.uint8),
                     {"long_name": "voxels ingested (1) on the NIfTI grid"}),
            "mean": ("voxel", da.empty(n_vox, dtype=np.float32, chunks=chunk),
                     {**stats, "long_name": "mean over all volumes of all runs"}),
            "raw_mean": (("run_index", "voxel"),
                         da.empty((n_runs, n_vox), dtype=np.float32, chunks=(1, chunk)),
                         {**stats, "long_name": "mean over each run's volumes"}),
            "raw_std": (("run_index", "voxel"),
                        da.empty((n_runs, n_vox), dtype=np.float32, chunks=(1, chunk)),
                        {**stats, "long_name": "standard deviation (ddof=0) over each run's "
                                               "volumes; 0 where constant"}),
        },
        coords=_voxel_coords(i, j, k),
    )
    voxel_enc = {"chunks": (n_vox,)}
    encoding = {"mask": {"chunks": mask.shape}, "mean": {"chunks": (chunk,)},
                "raw_mean": {"chunks": (1, chunk)}, "raw_std": {"chunks": (1, chunk)},
                "i": voxel_enc, "j": voxel_enc, "k": voxel_enc, "valid": voxel_enc}
    return ds, encoding


def _scratch_token(params: dict, run: int, time_block: int) -> str:
    import json

    text = json.dumps({"params": params, "run": run, "time_block": time_block},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def scratch_time_block(n_time: int, n_vox: int) -> int:
    """Volumes per scratch block: one masked block stays under ``SCRATCH_BUDGET``."""
    return int(max(1, min(n_time, SCRATCH_BUDGET // (4 * max(n_vox, 1)))))


def run_bold_stage(workspace: Workspace, runs: Sequence[str | Path], subject: str, *,
                   mask: str | Path | None = None, tr: float | None = None,
                   zscore: bool = True, detrend: str = "none",
                   chunk_voxels: int = CHUNK_VOXELS, time_block: int | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Ingest 4D NIfTI ``runs`` (one run each) into ``/bold/<subject>``; resume if interrupted.

    Returns a summary: group, runs, volumes per run, voxels, invalid voxels, TR and its
    source, mask source, blocks written / skipped.
    """
    _validate_subject(subject)
    if detrend not in DETRENDS:
        raise InputError(f"--detrend must be one of {', '.join(DETRENDS)} (got {detrend!r})")
    if chunk_voxels <= 0:
        raise InputError(f"--chunk-voxels must be a positive number (got {chunk_voxels})")
    if not runs:
        raise InputError("give at least one 4D NIfTI run")
    paths = [Path(r) for r in runs]
    infos = [probe_run(p) for p in paths]
    tr_s, tr_source = check_runs(infos, tr)
    grid = infos[0]
    group = bold_group(subject)

    if mask is not None:
        mask_path = Path(mask)
        mask_arr = load_mask(mask_path, grid)
        mask_spec = {"file": os.path.abspath(mask_path), "sha256": _sha256(mask_path)}
    else:
        mask_path, mask_arr = None, None
        mask_spec = {"computed": EPI_MASK_METHOD}
    params = {
        "stage": "bold",
        "runs": [{"file": os.path.abspath(i.path), "bytes": i.path.stat().st_size}
                 for i in infos],
        "mask": mask_spec, "tr": tr_s, "zscore": bool(zscore), "detrend": detrend,
        "chunk_voxels": int(chunk_voxels),
    }
    workspace.check_params(group, params, overwrite=overwrite)
    if mask_arr is None:
        if (not overwrite and workspace.params(group) is not None
                and workspace.has_array(group, "mask")):
            mask_arr = workspace.read_array(group, "mask").astype(bool)  # resume: reuse it
        else:
            source = str(grid.path) + (f" and {len(infos) - 1} more run(s)"
                                       if len(infos) > 1 else "")
            mask_arr = epi_mask(mean_volume(infos, progress), grid.affine, source)
    i, j, k, flat_index = mask_voxels(mask_arr)
    n_vox = int(i.size)

    templates = [bold_template(info, r, tr_s, i, j, k, chunk_voxels)
                 for r, info in enumerate(infos)]
    attrs = {
        "subject": subject, "tr": tr_s, "tr_source": tr_source,
        "affine": grid.affine.tolist(), "volume_shape": list(grid.shape),
        "xform_code": grid.xform_code, "space_unit": grid.space_unit,
        "mask_file": str(mask_path) if mask_path else "",
        "mask_sha256": mask_spec.get("sha256", _array_sha256(mask_arr)),
        "mask_method": "file (voxel != 0)" if mask_path else EPI_MASK_METHOD,
        "runs": [str(p) for p in paths], "n_volumes": [i_.n_volumes for i_ in infos],
        "n_voxels": n_vox, "zscore": bool(zscore), "detrend": detrend,
        "zscore_ddof": 0, "chunk_voxels": int(chunk_voxels),
        "voxel_order": "C order of np.nonzero(mask): bold[:, v] is volume[i[v], j[v], k[v]]",
    }
    writer = workspace.start_stage(group, params, templates, overwrite=overwrite,
                                   group_attrs=attrs)
    if not workspace.attrs(group).get("bold_layout"):
        ds, enc = group_variables(mask_arr, i, j, k, len(infos), chunk_voxels)
        workspace.add_variables(group, ds, encoding=enc)
        workspace.update_attrs(group, {"bold_layout": "ready"})
    total_blocks = sum(t.n_blocks for t in templates)
    skipped = total_blocks - writer.n_pending()

    bar = tqdm(total=writer.n_pending(), unit="chunk", desc=group, disable=not progress,
               dynamic_ncols=True)
    written = 0
    client = active_client()
    if client is not None:
        written = _bold_on_cluster(client, workspace, writer, infos, params, flat_index,
                                   time_block, zscore, detrend, bar, progress)
    else:
        for run, info in enumerate(infos):
            blocks = writer.pending_blocks(run)
            if not blocks:
                continue
            tb = time_block or scratch_time_block(info.n_volumes, n_vox)
            scratch = workspace.scratch(group, run, info.n_volumes, n_vox, tb,
                                        templates[run].block_size, _scratch_token(params, run, tb))
            _fill_scratch(scratch, info, flat_index, progress)
            width = templates[run].block_size
            buffer = np.empty((info.n_volumes, width), dtype=np.float32)  # reused by every chunk
            for block in blocks:
                region = writer.block_slice(run, block)
                if region.stop - region.start < width:
                    # The last, partial chunk: Zarr pads it to a whole chunk, so give back
                    # the full-width buffer first and read these few voxels on their own.
                    buffer = None
                x = scratch.read_voxels(region, out=buffer)  # a view of `buffer` when given
                raw_mean, raw_std = standardize(x, zscore, detrend)
                workspace.write_array(group, "raw_mean", raw_mean, (run, region))
                workspace.write_array(group, "raw_std", raw_std, (run, region))
                with workspace.dense_writes():
                    writer.write_block(run, block, {"bold": x})
                written += 1
                bar.update(1)
                del x
            del buffer
            scratch.remove()
    bar.close()

    n_invalid = _finish_group(workspace, group, writer, infos, n_vox)
    workspace.remove_scratch(group)
    return {"group": group, "runs": len(infos), "volumes": [i_.n_volumes for i_ in infos],
            "voxels": n_vox, "invalid": n_invalid, "tr": tr_s, "tr_source": tr_source,
            "mask": str(mask_path) if mask_path else "computed (EPI mask of the mean volume)",
            "blocks_written": written, "blocks_skipped": skipped}


def _array_sha256(mask: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(mask.astype(np.uint8)).tobytes()).hexdigest()


def _fill_scratch(scratch, info: RunInfo, flat_index: np.ndarray, progress: bool) -> None:
    """Pass 1: masked time blocks of one run into its scratch array (resumable)."""
    pending = scratch.pending_blocks()
    if not pending:
        return
    reader = RunReader(info.path)
    bar = tqdm(total=len(pending) * scratch.time_block, unit="vol",
               desc=f"read {info.path.name}", disable=not progress, dynamic_ncols=True,
               leave=False)
    _fill_blocks(scratch, reader, flat_index, pending, bar.update)
    bar.close()


def _fill_blocks(scratch: TransposeScratch, reader: RunReader, flat_index: np.ndarray,
                 blocks: Sequence[int], on_block: Callable[[int], object] | None = None
                 ) -> int:
    """Read time blocks ``blocks`` of a run, keep the voxels of ``flat_index`` ((voxel,)
    Fortran-order flat indices) and write each ``(time_block, voxel)`` float32 block
    into ``scratch`` (its tiles, then its flag).  One buffer is reused for all blocks;
    ``on_block(volumes)`` is called after each.  Returns the number of volumes read."""
    buffer = np.empty((scratch.time_block, flat_index.size), dtype=np.float32)  # reused
    volumes = 0
    for block in blocks:
        region = scratch.block_slice(block)
        out = buffer[: region.stop - region.start]
        for first, values in reader.iter_masked(flat_index, region.start, region.stop):
            out[first - region.start:first - region.start + values.shape[0]] = values
        scratch.write_block(block, out)
        volumes += out.shape[0]
        if on_block is not None:
            on_block(out.shape[0])
    return volumes


# ==================================================================== on a Dask cluster
@dataclass(frozen=True)
class ScratchSpec:
    """How any process reopens the transpose scratch of one run (see :meth:`open`)."""

    store: str  # absolute path of the workspace
    group: str
    run: int
    n_time: int
    n_voxel: int
    time_block: int
    voxel_chunk: int
    token: str

    def open(self) -> TransposeScratch:
        """The scratch as the client created it (same parameters, so never recreated)."""
        return Workspace(self.store).scratch(self.group, self.run, self.n_time, self.n_voxel,
                                             self.time_block, self.voxel_chunk, self.token)


def scratch_blocks_task(spec: ScratchSpec, run_file: str, blocks: list[int],
                        flat_index: np.ndarray) -> int:
    """Pass 1 as a Dask task: read time blocks ``blocks`` of a run into its scratch.

    ``flat_index`` (voxel,) int64 is the Fortran-order flat index of the mask's voxels.
    Each block is ``(time_block, voxel)`` float32, written as its tiles and then flagged
    in the scratch's own ``done`` file (one byte per block, so concurrent tasks never
    touch the same bytes).  Returns the number of volumes read.
    """
    return _fill_blocks(spec.open(), RunReader(run_file), flat_index, blocks)


def bold_chunk_task(spec: ScratchSpec, run_node: str, start: int, stop: int, zscore: bool,
                    detrend: str) -> int:
    """Pass 2 as a Dask task: standardise voxels ``start:stop`` of one run and write them.

    Reads the ``(n_time, stop - start)`` float32 block from the scratch, detrends /
    z-scores it (:func:`standardize`), writes the raw per-voxel ``raw_mean``/``raw_std``
    of the run into the group and the block into ``run_node/bold``.  The region is one
    whole output chunk, so concurrent tasks never share a file.  Returns the voxels.
    """
    workspace = Workspace(spec.store)
    region = slice(start, stop)
    x = spec.open().read_voxels(region)
    raw_mean, raw_std = standardize(x, zscore, detrend)
    workspace.write_array(spec.group, "raw_mean", raw_mean, (spec.run, region))
    workspace.write_array(spec.group, "raw_std", raw_std, (spec.run, region))
    with workspace.dense_writes():
        workspace.write_array(run_node, "bold", x, (slice(None), region))
    return stop - start


def _scratch_task_blocks(run_file: Path, pending: list[int]) -> list[list[int]]:
    """Pass-1 tasks of one run: a time block each, or all of them in one task for a
    gzip file (reading volume ``t`` of a ``.nii.gz`` decompresses everything before it,
    so only one sequential reader per file is efficient)."""
    if str(run_file).endswith(".gz"):
        return [list(pending)] if pending else []
    return [[block] for block in pending]


def _bold_on_cluster(client, workspace: Workspace, writer: StageWriter,
                     infos: Sequence[RunInfo], params: dict, flat_index: np.ndarray,
                     time_block: int | None, zscore: bool, detrend: str, bar,
                     progress: bool) -> int:
    """Both passes on the cluster, run after run (so one run's scratch exists at a time).

    Pass 1: :func:`scratch_blocks_task` per time block (per run for a gzip file); each
    task carries ``flat_index`` itself (8 bytes a voxel) rather than a scattered copy,
    so a task rerun after its worker died never depends on data that died with it.
    Pass 2: :func:`bold_chunk_task` per pending voxel chunk; the client marks each chunk
    done as it completes.  Returns the chunks written.
    """
    store = os.path.abspath(workspace.path)
    require_shared_path(client, store)
    group = writer.group
    n_vox = int(flat_index.size)
    written = 0
    for run, info in enumerate(infos):
        blocks = writer.pending_blocks(run)
        if not blocks:
            continue
        run_file = os.path.abspath(info.path)
        require_shared_path(client, run_file)
        tb = time_block or scratch_time_block(info.n_volumes, n_vox)
        spec = ScratchSpec(store, group, run, info.n_volumes, n_vox, tb,
                           writer.templates[run].block_size, _scratch_token(params, run, tb))
        scratch = spec.open()  # created here, before any task reopens it
        groups = _scratch_task_blocks(info.path, scratch.pending_blocks())
        tasks = [(b[0], (spec, run_file, b, flat_index)) for b in groups]
        read_bar = tqdm(total=sum(map(len, groups)) * scratch.time_block, unit="vol",
                        desc=f"read {info.path.name}", disable=not progress or not tasks,
                        dynamic_ncols=True, leave=False)
        for _, volumes in run_block_tasks(client, scratch_blocks_task, tasks):
            read_bar.update(volumes)
        read_bar.close()
        if not spec.open().complete:
            raise AssertionError(f"{scratch.path}: pass 1 finished with blocks missing")
        chunk_tasks = []
        for block in blocks:
            region = writer.block_slice(run, block)
            chunk_tasks.append((block, (spec, writer.run_path(run), region.start, region.stop,
                                        bool(zscore), detrend)))
        for block, _ in run_block_tasks(client, bold_chunk_task, chunk_tasks):
            writer.mark_done(run, block)
            written += 1
            bar.update(1)
        scratch.remove()
    return written


def _finish_group(workspace: Workspace, group: str, writer, infos: Sequence[RunInfo],
                  n_vox: int) -> int:
    """Combine per-run statistics into ``valid`` and ``mean``; mark the group complete."""
    if workspace.state(group) == "complete":
        return int(workspace.attrs(group).get("n_invalid", 0))
    valid = np.ones(n_vox, dtype=bool)
    total = np.zeros(n_vox, dtype=np.float64)
    n_total = 0
    for run, info in enumerate(infos):
        raw_mean = workspace.read_array(group, "raw_mean", run).astype(np.float64)
        raw_std = workspace.read_array(group, "raw_std", run)
        valid &= run_validity(raw_std)
        total += raw_mean * info.n_volumes
        n_total += info.n_volumes
    mean = (total / n_total).astype(np.float32)
    workspace.write_array(group, "mean", mean)
    workspace.write_array(group, "valid", valid)
    for run in range(len(infos)):
        workspace.write_array(writer.run_path(run), "valid", valid)
    n_invalid = int(n_vox - valid.sum())
    writer.finish({"n_invalid": n_invalid})
    return n_invalid


# ==================================================================== export
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


def export_variable(workspace: Workspace, node: str, name: str, out: str | Path) -> dict:
    """Write variable ``name`` of workspace node ``node`` to the NIfTI file ``out``.

    ``(voxel,)`` -> 3D, ``(n, voxel)`` -> 4D with ``n`` volumes (e.g. one per alpha);
    zeros outside the voxels; affine and grid of the bold data it came from.  A 3D
    variable already on the grid (the bold group's ``mask``) is written as it is.
    """
    out = Path(out)
    if not str(out).endswith(NIFTI_SUFFIXES):
        raise InputError(f"{out}: output must end in .nii or .nii.gz")
    if not out.parent.exists():
        raise InputError(f"{out}: folder {out.parent} does not exist; create it first")
    node = node.strip("/")
    if not workspace.path.exists():
        raise InputError(f"{workspace.path}: no workspace here; pass --store PATH")
    stage = _stage_group(workspace, node)
    kind, _, subject = stage.partition("/")
    hint = (f"voxelflow bold RUN.nii.gz [RUN ...] --subject {subject or 'NAME'} --mask MASK"
            if kind == "bold" else f"the voxelflow command that writes /{kind}")
    workspace.require_complete(stage, hint)
    ds = workspace.open_node(node)
    per_voxel = sorted(v for v in ds.variables if "voxel" in ds[v].dims)
    if name not in ds.variables:
        raise InputError(f"{workspace.path}: /{node} has no variable {name!r} (variables "
                         f"with a voxel dimension: {', '.join(per_voxel) or 'none'})")
    var = ds[name]
    dtype = output_dtype(var.dtype)
    extra_dim, n_rows = None, 1
    if "voxel" not in var.dims:
        # A volume already on the grid (e.g. the bold group's `mask`) is written as is.
        grid = find_geometry(workspace, node, var, need_voxels=False)
        if var.ndim != 3 or tuple(var.shape) != grid.shape:
            raise InputError(
                f"{workspace.path}: /{node}/{name} has dims {var.dims}, no 'voxel' "
                f"dimension; export one of: {', '.join(per_voxel) or 'none'}")
        write_nifti(out, iter([np.nan_to_num(np.asarray(var.values)) if dtype.kind != "f"
                               else np.asarray(var.values)]),
                    grid.shape, dtype, grid, description=f"voxelflow /{node}/{name}")
        return {"file": str(out), "shape": list(grid.shape), "voxels": int(np.prod(grid.shape)),
                "dim": None, "labels": None, "dtype": str(dtype), "sources": grid.sources}
    if var.ndim > 2:
        raise InputError(f"{workspace.path}: /{node}/{name} has dims {var.dims}; select down "
                         f"to (voxel,) or (n, voxel) first")
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
            "dtype": str(dtype), "sources": geometry.sources}


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
    if summary["sources"][0] == "its own grid":
        return (f"wrote {summary['file']}: {kind} NIfTI {shape} {summary['dtype']}, "
                f"affine from {summary['sources'][1]}")
    return (f"wrote {summary['file']}: {kind} NIfTI {shape} {summary['dtype']}, "
            f"{summary['voxels']} voxels (zeros elsewhere), voxels from "
            f"{summary['sources'][0]}, affine from {summary['sources'][1]}{extra}")
