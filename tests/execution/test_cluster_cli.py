"""`voxelflow fit --scheduler ADDRESS` against a real `dask scheduler` + `dask worker`
pair started as separate processes on loopback: the stored outputs equal a local fit;
bad scheduler addresses are one-line errors (exit 2)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from conftest import cli_here
from voxelflow.stores import RunTemplate, Workspace

DASK = Path(sys.executable).with_name("dask")
TR = 1.0
N_TIME = 120          # BOLD samples per run (and feature rows: one per TR)
N_VOXELS = 300
VOXEL_BLOCK = 64     # -> 5 blocks, the last one partial
N_FEATURES = 40
OUTPUTS = ("r_test", "r_cv", "best_alpha", "r_test_cv", "weights", "predictions")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_problem(path: Path, seed: int = 0) -> None:
    """Two runs of features (time, feature) at the TR and BOLD (time, voxel) with a
    planted linear response, an invalid voxel and a voxel with a NaN sample."""
    rng = np.random.default_rng(seed)
    ws = Workspace(path)
    weights = rng.normal(size=(N_FEATURES, N_VOXELS))
    feats, bolds = [], []
    for _ in range(2):
        f = rng.normal(size=(N_TIME, N_FEATURES)).astype(np.float32)
        shifted = np.vstack([np.zeros((2, N_FEATURES)), f[:-2]])  # response at lag 2 s
        feats.append(f)
        bolds.append((shifted @ weights + 3 * rng.normal(size=(N_TIME, N_VOXELS)))
                     .astype(np.float32))
    bolds[1][7, 11] = np.nan
    times = np.arange(N_TIME) * TR
    valid = np.ones(N_VOXELS, bool)
    valid[5] = False
    f_templates, b_templates = [], []
    for r in range(2):
        fds = xr.Dataset({"features": (("time", "feature"),
                                       da.empty((N_TIME, N_FEATURES), dtype=np.float32))},
                         coords={"time": ("time", times), "run": ("time", np.full(N_TIME, r))})
        f_templates.append(RunTemplate(fds, {"features": {"chunks": (N_TIME, N_FEATURES)}},
                                       "time", N_TIME))
        bds = xr.Dataset({"bold": (("time", "voxel"),
                                   da.empty((N_TIME, N_VOXELS), dtype=np.float32,
                                            chunks=(N_TIME, VOXEL_BLOCK)))},
                         coords={"time": ("time", times), "valid": ("voxel", valid)})
        b_templates.append(RunTemplate(bds, {"bold": {"chunks": (N_TIME, VOXEL_BLOCK)}},
                                       "voxel", VOXEL_BLOCK))
    writer = ws.start_stage("features/f", {"stage": "test-features"}, f_templates)
    for r in range(2):
        writer.write_block(r, 0, {"features": feats[r]})
    writer.finish()
    writer = ws.start_stage("bold/s", {"stage": "test-bold", "tr": TR}, b_templates,
                            group_attrs={"tr": TR})
    for r in range(2):
        for b in writer.pending_blocks(r):
            writer.write_block(r, b, {"bold": bolds[r][:, writer.block_slice(r, b)]})
    writer.finish()


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """A dask CLI process in its own session (so its children are stopped with it)."""
    env = dict(os.environ)
    return subprocess.Popen([str(DASK), *args], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=env, cwd=log.parent, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it after 10 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_for_workers(address: str, n: int, procs: list[subprocess.Popen],
                      timeout: float = 45.0) -> None:
    from distributed import Client

    deadline = time.monotonic() + timeout
    while True:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a dask process exited during start-up")
        try:
            with Client(address, timeout="5s", set_as_default=False) as client:
                client.wait_for_workers(n, timeout=max(1.0, deadline - time.monotonic()))
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _scheduler_task_prefixes(address: str) -> list[str]:
    """Names of the task prefixes the scheduler has seen (proves the blocks ran there)."""
    from distributed import Client

    with Client(address, timeout="10s", set_as_default=False) as client:
        return client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))


def _fit(store: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    """``voxelflow fit`` through the CLI's entry point in this process (the client of
    ``--scheduler``; the scheduler and workers are separate processes)."""
    return cli_here("fit", "--features", "f", "--bold", "s", "--lags", "2", "--alphas",
                   "0.1,10,1000,1e5", "--test-samples", "40", "--cv", "4", "--save-weights",
                   "--save-predictions", "--voxel-block", str(VOXEL_BLOCK), "--store",
                   str(store), "--name", name, "--no-progress", *extra)


def test_fit_on_separate_scheduler_and_workers_equals_local(tmp_path):
    store = tmp_path / "ws.zarr"
    _write_problem(store)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [_start(["scheduler", "--host", "127.0.0.1", "--port", str(port),
                     "--no-dashboard"], tmp_path / "scheduler.log")]
    try:
        procs.append(_start(["worker", address, "--nworkers", "2", "--nthreads", "1",
                             "--no-dashboard", "--memory-limit", "2GiB",
                             "--local-directory", str(tmp_path / "dask-worker")],
                            tmp_path / "worker.log"))
        _wait_for_workers(address, 2, procs)
        remote = _fit(store, "cluster", "--scheduler", address)
        assert remote.returncode == 0, remote.stderr
        assert "/fits/cluster/lags-2" in remote.stdout
        prefixes = _scheduler_task_prefixes(address)
        # the block tasks (keys voxelflow-_block_task-...) and the scattered work
        # object holding the factors (FitWork)
        assert {"voxelflow", "FitWork"} <= set(prefixes), prefixes
    finally:
        for proc in reversed(procs):
            _stop(proc)
    assert all(p.poll() is not None for p in procs)
    local = _fit(store, "local")
    assert local.returncode == 0, local.stderr
    ws = Workspace(store)
    assert ws.state("fits/cluster/lags-2") == "complete"
    a, b = ws.open_node("fits/local/lags-2").load(), ws.open_node("fits/cluster/lags-2").load()
    done = zarr.open_group(store, mode="r")["fits/cluster/lags-2/block_done"][:]
    assert done.tolist() == [1] * -(-N_VOXELS // VOXEL_BLOCK)
    for var in OUTPUTS:
        assert a[var].shape == b[var].shape
        np.testing.assert_allclose(b[var].values, a[var].values, rtol=0, atol=1e-6,
                                   equal_nan=True, err_msg=var)
    # masking travelled with the tasks: the invalid and the NaN voxel are not scored
    assert np.isnan(b["r_test"].values[:, [5, 11]]).all()
    assert np.isfinite(b["r_test"].values[:, 12:]).all()
    # the printed tables agree (same means)
    assert remote.stdout.split("\n", 1)[1] == local.stdout.split("\n", 1)[1]


@pytest.mark.parametrize("address", ["unreachable", "bogus://host:1"])
def test_unreachable_or_malformed_scheduler_is_a_one_line_error(tmp_path, address):
    if address == "unreachable":  # nothing listens there: refused until the 20 s timeout
        address = f"tcp://127.0.0.1:{_free_port()}"
    res = cli_here("fit", "--features", "f", "--bold", "s", "--lags", "2", "--test-samples",
                   "40", "--store", str(tmp_path / "ws.zarr"), "--scheduler", address)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxelflow: error: --scheduler "), res.stderr


def _cuda_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device
        return False


def test_factors_copied_array_by_array_give_the_same_blocks():
    """The cluster's --device cuda path ships host copies of the factors and maps them
    to the worker's device array by array: every nested array is reached (primal and
    dual), and the copies compute the same outputs."""
    from voxelflow.pipeline import ridge
    from voxelflow.pipeline.stages._fit_work import _map_arrays
    from voxelflow.pipeline.ridge.scoring import contiguous_folds

    rng = np.random.default_rng(1)
    Y = rng.normal(size=(90, 17)).astype(np.float32)
    for n_features in (12, 150):  # primal, dual
        X = rng.normal(size=(90, n_features)).astype(np.float32)
        factors = ridge.factorize_ridge(X[:70], X[70:], [1.0, 100.0], contiguous_folds(70, 3),
                                        keep_weight_factors=True)
        seen: list[int] = []
        copied = _map_arrays(factors, lambda a: seen.append(id(a)) or np.array(a, copy=True))
        assert copied.folds[0].operator is not factors.folds[0].operator
        assert copied.test.dense is not factors.test.dense and copied.basis is not factors.basis
        assert id(factors.alphas) not in seen and isinstance(copied.dtype, np.dtype)
        a = ridge.ridge_chunk(factors, Y[:70], Y[70:], return_weights=True)
        b = ridge.ridge_chunk(copied, Y[:70], Y[70:], return_weights=True)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.skipif(not _cuda_available(), reason="needs CuPy and a CUDA GPU")
def test_fit_with_cuda_on_local_cluster_equals_cuda_and_cpu_here(tmp_path):
    store = tmp_path / "ws.zarr"
    _write_problem(store)
    runs = {"gpu-cluster": _fit(store, "gpu-cluster", "--device", "cuda", "--workers", "2"),
            "gpu-here": _fit(store, "gpu-here", "--device", "cuda"),
            "cpu-here": _fit(store, "cpu-here")}
    for name, res in runs.items():
        assert res.returncode == 0, (name, res.stderr)
    ws = Workspace(store)
    out = {name: ws.open_node(f"fits/{name}/lags-2").load() for name in runs}
    for var in ("r_test", "r_cv", "r_test_cv"):
        np.testing.assert_allclose(out["gpu-cluster"][var].values, out["gpu-here"][var].values,
                                   rtol=0, atol=1e-6, equal_nan=True, err_msg=var)
        np.testing.assert_allclose(out["gpu-cluster"][var].values, out["cpu-here"][var].values,
                                   rtol=0, atol=1e-4, equal_nan=True, err_msg=var)


def test_a_failed_scheduler_connection_leaves_no_default_client(tmp_path):
    """distributed registers a Client as the default before it connects; the failed
    one must not stay registered (a later compute() in the process would hang)."""
    import dask

    from voxelflow.pipeline.execution.cluster import active_client
    res = cli_here("fit", "--features", "f", "--bold", "s", "--lags", "2", "--test-samples",
                   "40", "--store", str(tmp_path / "ws.zarr"), "--scheduler",
                   "bogus://host:1")
    assert res.returncode == 2, res.stderr
    assert active_client() is None
    assert dask.config.get("scheduler", None) != "dask.distributed"
