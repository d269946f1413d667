"""NIfTI inputs shared by the BOLD and export tests: small 4D runs and masks written
with chosen dtype / scaling / TR unit, the real Haxby runs, byte snapshots of a store."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from conftest import cli_main  # noqa: F401 - imported from here by the BOLD tests


def haxby_runs(haxby_dir: Path) -> list[Path]:
    runs = sorted(haxby_dir.glob("run*/bold_25mm.nii.gz"))
    assert len(runs) == 12
    return runs


def mask_of(path: Path) -> np.ndarray:
    """Independent reading of a mask: nibabel's data, voxel != 0."""
    return nib.load(str(path)).get_fdata() != 0


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None,
                tr: float = 2.0, time_unit: str = "sec", dtype=None,
                slope: float | None = None, inter: float = 0.0) -> Path:
    """Save ``data``; with ``slope``, store ``(data - inter) / slope`` as ``dtype`` and put
    that scl_slope/scl_inter in the header (nibabel would choose its own scaling)."""
    affine = np.eye(4) if affine is None else affine
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype or data.dtype)
    header.set_data_shape(data.shape)
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    if data.ndim == 4:
        header.set_zooms(header.get_zooms()[:3] + (tr,))
    header.set_xyzt_units("mm", time_unit)
    if slope is None:
        nib.save(nib.Nifti1Image(data, affine, header), str(path))
        return path
    header.set_slope_inter(slope, inter)
    header.set_data_offset(352)
    stored = np.round((data - inter) / slope).astype(dtype)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        header.write_to(fh)
        fh.write(stored.tobytes(order="F"))
    return path


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def make_synthetic(d: Path) -> dict:
    """Two small float32 runs (10x8x6, 50 and 40 volumes) on a shared grid with a mask."""
    rng = np.random.default_rng(3)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10, -8, -9]
    runs, data = [], []
    for r, n in enumerate((50, 40)):
        x = (1000 + 50 * rng.standard_normal((10, 8, 6, n))
             + np.linspace(0, 30, n)).astype(np.float32)
        runs.append(write_nifti(d / f"run{r}.nii.gz", x, affine, tr=2.0))
        data.append(x)
    mask = np.zeros((10, 8, 6), np.uint8)
    mask[1:9, 1:7, 1:5] = 1
    write_nifti(d / "mask.nii.gz", mask, affine)
    return {"dir": d, "runs": runs, "data": data, "mask": d / "mask.nii.gz",
            "mask_bool": mask != 0, "affine": affine}
