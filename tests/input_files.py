"""Small input files for the refusal tests: a 40 s video and a matching 20-volume BOLD
run (TR 2 s) with a mask, and the bad inputs of issue 12 (a NaN run, a one-volume run,
a constant run, a JPEG named .mp4, a video half as long)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from voxelflow.pipeline.synthetic.movies import write_moving_video

GRID = (4, 4, 3)
N_VOLUMES = 20
TR = 2.0


def _nifti(path: Path, data: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_xyzt_units("mm", "sec")
    if data.ndim == 4:
        img.header["pixdim"][4] = TR
    nib.save(img, str(path))
    return path


def write_inputs(folder: Path) -> Path:
    """Write every input into ``folder``; returns it."""
    from PIL import Image

    write_moving_video(folder / "movie.mp4", 40, rate=8, size=(32, 32), seed=1)
    write_moving_video(folder / "short.mp4", 20, rate=8, size=(32, 32), seed=2)
    rng = np.random.default_rng(0)
    _nifti(folder / "bold.nii.gz",
           rng.normal(100, 5, size=GRID + (N_VOLUMES,)).astype(np.float32))
    _nifti(folder / "nan.nii.gz", np.full(GRID + (N_VOLUMES,), np.nan, np.float32))
    _nifti(folder / "constant.nii.gz", np.full(GRID + (N_VOLUMES,), 7.0, np.float32))
    _nifti(folder / "one.nii.gz", rng.normal(100, 5, size=GRID + (1,)).astype(np.float32))
    _nifti(folder / "mask.nii.gz", np.ones(GRID, np.uint8))
    picture = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(folder / "still.mp4", format="JPEG")
    return folder
