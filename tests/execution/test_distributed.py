"""Stages on a real Dask cluster (2 process workers): identical to the threaded run,
one model load per worker, and a SIGKILLed worker loses nothing.

Torch's CPU kernels (oneDNN) may sum in another order with another number of intra-op
threads (seen: resnet50 trunk at 64 px, 2e-6 apart between 1 and 2 threads), so the
threaded runs here use the workers' thread count (1: Dask's nanny sets
OMP_NUM_THREADS=1): the cluster must then give the same bits, by construction.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from torch_threads import one_torch_thread  # noqa: F401 - autouse: as each worker
from voxelflow.pipeline.stages.bold import run_bold_stage
from voxelflow.pipeline.study.demo import run_demo
from voxelflow.pipeline.models.extractor import worker_extractor
from voxelflow.pipeline.stages.features import run_features_stage
from voxelflow.pipeline.stages.frames import run_frames_stage
from voxelflow.pipeline.synthetic.movies import write_scene_movie
from voxelflow.stores import Workspace
from voxelflow.stores.workspace import StageWriter

distributed = pytest.importorskip("distributed")

# The small demo (see test_experiment.py), shortened: 40 frames, 40 volumes, 200 voxels;
# its movie generated at 2 frames/s (sampled at 1 fps) and MobileNet-V3-Small as the
# random-weight distractor (a ninth of ResNet-50's CPU time), and two of its four lag sets
# (whole-TR and sub-TR lags: the other two only repeat the first's code path): every
# stage still runs, 2 models x 2 lag sets = 4 fits.
DEMO = dict(seconds=40.0, fps=1.0, n_voxels=200, progress=False, report=False,
            movie_rate=2, distractor="mobilenet_v3_small",
            lag_sets=[[4.0, 5.0, 6.0, 7.0], [4.0, 4.5, 5.0, 5.5]])


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 single-threaded process workers; *not* the default client, so
    that a stage only sees it inside ``with client.as_current():``."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=50)
    c = distributed.Client(cluster, set_as_default=False)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


@pytest.fixture(scope="module")
def movie(tmp_path_factory) -> Path:
    """A 20 s generated H.264 movie (hard cuts every second)."""
    path = tmp_path_factory.mktemp("movie") / "movie.mp4"
    write_scene_movie(path, 20.0, seed=3, scene_seconds=1.0)
    return path


def stored_arrays(store: Path, prefix: str = "") -> dict[str, np.ndarray]:
    """Every array of a workspace (path -> values), optionally under ``prefix`` only."""
    root = zarr.open_group(store, mode="r", use_consolidated=False)
    return {name: np.asarray(node[...]) for name, node in root.members(max_depth=None)
            if isinstance(node, zarr.Array) and name.startswith(prefix)}


def assert_same_arrays(a: Path, b: Path, prefix: str = "", *, atol_fits: float = 1e-6) -> int:
    """Same array paths; the same bytes (NaN and -0.0 included), ``/fits`` within ``atol_fits``.
    Returns the number of arrays compared."""
    left, right = stored_arrays(a, prefix), stored_arrays(b, prefix)
    assert sorted(left) == sorted(right)
    assert left, f"no arrays under {prefix!r}"
    for name, x in left.items():
        y = right[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if name.startswith("fits/") and x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=0, atol=atol_fits, equal_nan=True,
                                       err_msg=name)
        elif x.dtype.kind in "OTSU":  # strings: no fixed bytes to compare
            assert x.tolist() == y.tolist(), name
        else:
            assert np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes(), name
    return len(left)


# ------------------------------------------------------------------ 1. the whole demo
def test_demo_experiment_on_cluster_equals_threaded_run(client, tmp_path):
    """Every stage (frames, features, bold, fit) of the demo on 2 process workers: every
    stored array equals the threaded run (bitwise; fits within 1e-6). No report: it
    reads the same arrays (test_experiment.py checks it)."""
    local, remote = tmp_path / "threaded", tmp_path / "cluster"
    run_demo(local, log=lambda *_: None, **DEMO)
    remote.mkdir()
    shutil.copy(local / "movie.mp4", remote / "movie.mp4")  # same input bytes
    with client.as_current():
        run_demo(remote, log=lambda *_: None, **DEMO)
    n = assert_same_arrays(local / "voxelflow.zarr", remote / "voxelflow.zarr")
    assert n > 40
    for kind in ("frames", "features", "bold", "fits"):
        assert stored_arrays(remote / "voxelflow.zarr", kind + "/"), kind
    assert not (remote / "voxelflow.zarr" / ".scratch").exists()


# ------------------------------------------------- 2. each stage with several blocks
def test_frames_blocks_on_cluster_equal_threaded(client, movie, tmp_path):
    """320 samples = 3 frames blocks (the last one short), decoded by seeking per task."""
    local, remote = Workspace(tmp_path / "a.zarr"), Workspace(tmp_path / "b.zarr")
    run_frames_stage(local, [movie], "clip", fps=16, size=32, progress=False)
    with client.as_current():
        out = run_frames_stage(remote, [movie, movie], "clip", fps=16, size=32,
                               progress=False)
    assert out["blocks_written"] == 6 and out["frames"] == [320, 320]
    a = stored_arrays(local.path, "frames/clip/run-000/")
    b = stored_arrays(remote.path, "frames/clip/run-000/")
    c = stored_arrays(remote.path, "frames/clip/run-001/")
    assert {"frames/clip/run-000/frames", "frames/clip/run-000/time"} <= set(a)
    assert sorted(a) == sorted(b) == sorted(n.replace("run-001", "run-000") for n in c)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
        if name != "frames/clip/run-000/run":
            assert np.array_equal(a[name], c[name.replace("run-000", "run-001")]), name
    assert remote.state("frames/clip") == "complete"


FEATURE_BLOCK = 144  # 320 frames: 3 blocks of 144, 144 and 32


def _features(ws: Workspace, block_size: int) -> dict:
    """resnet18 (random weights), two layers, batches of 8, on the 320 frames of 64 px."""
    return run_features_stage(ws, "clip", "resnet18", layers=["avgpool", "layer4.1.relu_1"],
                              weights="random:0", name="r18", pool="avg",
                              block_size=block_size, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def frames_only(movie, tmp_path_factory) -> Path:
    """A workspace with 320 frames of 64 px (copied, never written to)."""
    ws = Workspace(tmp_path_factory.mktemp("frames") / "frames.zarr")
    run_frames_stage(ws, [movie], "clip", fps=16, size=64, progress=False)
    return ws.path


@pytest.fixture(scope="module")
def threaded_features(frames_only, tmp_path_factory) -> Workspace:
    """The threaded reference: :func:`_features` in blocks of 144 on a copy of
    ``frames_only``, shared by the cluster runs below (never written to)."""
    ws = Workspace(shutil.copytree(frames_only, tmp_path_factory.mktemp("ref") / "a.zarr"))
    _features(ws, FEATURE_BLOCK)
    return ws


@pytest.fixture
def frames_copy(frames_only, tmp_path) -> Workspace:
    """A fresh copy of ``frames_only`` for one cluster run to write its features into."""
    return Workspace(shutil.copytree(frames_only, tmp_path / "b.zarr"))


def test_features_blocks_on_cluster_equal_threaded_one_load_per_worker(
        client, threaded_features, frames_copy):
    """Two layers x 3 blocks of 144, 144 and 32 frames (a task reads a block in pieces
    of 128): bitwise equal; each worker built the model once for all its tasks."""
    local, remote = threaded_features, frames_copy
    client.run(worker_extractor.cache_clear)
    with client.as_current():
        out = _features(remote, FEATURE_BLOCK)
    assert out["blocks_written"] == 3
    assert_same_arrays(local.path, remote.path, "features/")
    info = client.run(worker_extractor.cache_info)
    assert sum(i.misses for i in info.values()) <= len(info)
    assert sum(i.hits + i.misses for i in info.values()) == 3


def _bold_runs(folder: Path) -> tuple[list[Path], Path]:
    """Two runs on a 7x6x5 grid (23 volumes): int16 with scl_slope as ``.nii``, float32
    with a NaN and a constant voxel as ``.nii.gz``; and a mask of ~150 voxels."""
    rng = np.random.default_rng(7)
    shape, affine = (7, 6, 5), np.diag([2.0, 2.0, 2.0, 1.0])
    mask = (rng.random(shape) < 0.75).astype(np.uint8)
    ints = rng.integers(-3000, 3000, size=shape + (23,), dtype=np.int16)
    img = nib.Nifti1Image(ints, affine)
    img.header.set_slope_inter(0.25, 10.0)
    floats = rng.normal(100, 5, size=shape + (23,)).astype(np.float32)
    idx = np.argwhere(mask)
    floats[tuple(idx[3])][5] = np.nan
    floats[tuple(idx[40])] = 4.0
    paths = [folder / "run1.nii", folder / "run2.nii.gz"]
    for path, image in zip(paths, [img, nib.Nifti1Image(floats, affine)]):
        image.header["pixdim"][4] = 2.0
        nib.save(image, str(path))
    nib.save(nib.Nifti1Image(mask, affine), str(folder / "mask.nii.gz"))
    return paths, folder / "mask.nii.gz"


@pytest.mark.parametrize("detrend", ["none", "linear"])
def test_bold_chunks_and_time_blocks_on_cluster_equal_threaded(client, tmp_path, detrend):
    """Pass 1 per time block (.nii) / per run (.nii.gz), pass 2 per 32-voxel chunk."""
    runs, mask = _bold_runs(tmp_path)
    kw = dict(mask=mask, detrend=detrend, chunk_voxels=32, time_block=5, progress=False)
    local, remote = Workspace(tmp_path / "a.zarr"), Workspace(tmp_path / "b.zarr")
    first = run_bold_stage(local, runs, "s1", **kw)
    with client.as_current():
        second = run_bold_stage(remote, runs, "s1", **kw)
    assert second["blocks_written"] == first["blocks_written"] >= 8
    assert second["invalid"] == first["invalid"] >= 2
    assert_same_arrays(local.path, remote.path, "bold/")
    assert not (remote.path / ".scratch").exists()


# ------------------------------------------------------------ 3. a worker is killed
def _is_dead(pid: int) -> bool:
    """True when ``pid`` is gone or a zombie (killed, not yet reaped by its parent, the
    nanny): ``os.kill(pid, 0)`` succeeds on a zombie and would call it alive."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sigkill_of_a_worker_mid_features_stage_loses_nothing(client, threaded_features,
                                                               frames_copy, monkeypatch):
    """SIGKILL one worker process as soon as the first block is marked done: the stage
    still completes (Dask reruns the lost tasks on the other / restarted worker), or a
    rerun finishes it; the result is bitwise the uninterrupted threaded run."""
    local, remote = threaded_features, frames_copy
    before = client.run(os.getpid)
    killed: list[int] = []
    mark_done = StageWriter.mark_done

    def kill_on_first(self, run, block):
        if not killed:
            busy = [w for w, keys in client.processing().items() if keys and w in before]
            victim = before[busy[0]] if busy else next(iter(before.values()))
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
        mark_done(self, run, block)

    monkeypatch.setattr(StageWriter, "mark_done", kill_on_first)
    with client.as_current():
        try:
            _features(remote, FEATURE_BLOCK)
        except Exception:  # noqa: BLE001 - e.g. KilledWorker: a rerun must finish it
            assert Workspace(remote.path).state("features/r18.avgpool") == "writing"
            _features(remote, FEATURE_BLOCK)
    assert killed
    assert _is_dead(killed[0])
    assert remote.state("features/r18.avgpool") == "complete"
    assert remote.state("features/r18.layer4.1.relu_1") == "complete"
    assert_same_arrays(local.path, remote.path, "features/")
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker
