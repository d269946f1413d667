"""Arguments and inputs shared by the storage tests (the fixtures are in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from voxelflow import cli
from voxelflow.stores import RunTemplate, Workspace

N_VOL = 40
TR = 1.0
FPS = 4.0


def frames_args(video: Path, store: Path, fps: float = 20.0) -> list[str]:
    return ["frames", str(video), "--name", "c", "--fps", f"{fps:g}", "--size", "32",
            "--store", str(store), "--no-progress"]


def bold_args(runs: list[Path], store: Path) -> list[str]:
    mask = runs[0].parent / "mask.nii.gz"
    return ["bold", *map(str, runs), "--subject", "s", "--mask", str(mask),
            "--chunk-voxels", "8", "--store", str(store), "--no-progress"]


def fit_args(store: Path, alphas: str = "1,10,100") -> list[str]:
    return ["fit", "--features", "f", "--bold", "s", "--lags", "2", "--alphas", alphas,
            "--test-samples", "10", "--cv", "2", "--voxel-block", "8", "--name", "k",
            "--store", str(store), "--no-progress"]


def write_features(ws: Workspace, seed: int = 0) -> None:
    """``/features/f``: two runs of (160, 6) float32 at 4 fps (the fit's input)."""
    rng = np.random.default_rng(seed)
    templates, data = [], []
    for r in range(2):
        f = rng.normal(size=(int(N_VOL * TR * FPS), 6)).astype(np.float32)
        t = np.arange(f.shape[0]) / FPS
        ds = xr.Dataset({"features": (("time", "feature"), da.empty(f.shape, np.float32,
                                                                     chunks=f.shape))},
                        coords={"time": ("time", t, {"units": "s"}),
                                "run": ("time", np.full(t.size, r, np.int32))})
        templates.append(RunTemplate(ds, {"features": {"chunks": f.shape}}, "time",
                                     f.shape[0]))
        data.append(f)
    writer = ws.start_stage("features/f", {"stage": "test-features"}, templates)
    for r, f in enumerate(data):
        writer.write_block(r, 0, {"features": f})
    writer.finish()


def refused(capsys, *argv: str) -> str:
    """``voxelflow ARGV`` in process must exit 2 with one ``voxelflow: error:`` line."""
    status = cli.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("voxelflow: error: "), err
    return err[0]


def build_frames(base: Path, videos: dict[str, Path], keys: tuple[str, ...]) -> dict[str, Path]:
    """``{key: store}``: an uninterrupted ``frames`` build of ``videos[key]`` per key."""
    from voxelflow import cli

    stores = {}
    for key in keys:
        stores[key] = base / f"{key}.zarr"
        assert cli.main(frames_args(videos[key], stores[key])) == 0
    return stores
