"""Fixtures of the storage tests (tests/stores), registered by tests/conftest.py so that
the suite has one module named ``conftest``: two index videos (2-4 frames blocks at
32 px), a BOLD run pair on a 3x3x3 grid, a features group, one forked-CLI helper."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from forked_cli import ForkedCLI
from storage_inputs import N_VOL, TR, bold_args, write_features
from voxelflow.pipeline.synthetic.movies import write_index_video
from voxelflow.stores import Workspace


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """``long``: 600 frames at 24 fps (500 samples at 20 fps: 4 blocks of 128);
    ``a``/``b``: 300 and 200 frames (2 blocks each)."""
    d = tmp_path_factory.mktemp("store-videos")
    made = {"long": 600, "a": 300, "b": 200}
    for name, n in made.items():
        write_index_video(d / f"{name}.mp4", n_frames=n, rate=24)
    return {name: d / f"{name}.mp4" for name in made}


@pytest.fixture(scope="session")
def forked(tmp_path_factory):
    cli = ForkedCLI(tmp_path_factory.mktemp("forked"))
    yield cli
    cli.close()


@pytest.fixture(scope="session")
def bold_runs(tmp_path_factory) -> list[Path]:
    """Two 4D runs of 40 volumes on a 3x3x3 grid (27 voxels: 4 chunks of 8)."""
    d = tmp_path_factory.mktemp("store-bold")
    rng = np.random.default_rng(3)
    paths = []
    for r in range(2):
        vol = (100 + rng.normal(size=(3, 3, 3, N_VOL))).astype(np.float32)
        img = nib.Nifti1Image(vol, np.diag([3.0, 3.0, 3.0, 1.0]))
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = TR
        paths.append(d / f"run{r}.nii.gz")
        nib.save(img, paths[-1])
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.uint8), img.affine), d / "mask.nii.gz")
    return paths


@pytest.fixture(scope="module")
def fit_inputs(tmp_path_factory, bold_runs, forked) -> Path:
    """A store with ``/features/f`` and ``/bold/s`` (made by the CLI, 4 blocks per run)."""
    store = tmp_path_factory.mktemp("fit-inputs") / "ws.zarr"
    write_features(Workspace(store))
    status, _, err = forked.run(*bold_args(bold_runs, store))
    assert status == 0, err
    return store
