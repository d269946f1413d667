"""Scale benchmark: a 7T-sized fit on a local Dask cluster with bounded worker memory.

Generates a problem of (defaults) 200,000 voxels x 4,797 samples (4,497 train + 300
test) x 8,192 features into a workspace, chunk by chunk -- never whole in memory:

* ``/features/scale``: one run, ``features (time, feature)`` float32, i.i.d. Gaussian,
  generated per block of 512 samples from ``seed + block``;
* ``/bold/scale``: one run, ``bold (time, voxel)`` float32 (uncompressed, as the BOLD
  stage stores it), generated per chunk of ``--voxel-block`` voxels from
  ``seed + 10**6 + block``: a planted response to the first 32 features (SNR drawn
  per voxel, a tenth pure noise) plus noise, so alpha selection matters.

Features are sampled at the TR and the fit uses lag 0 s, so every sample is a design
row. Then it runs, in this process, the real command::

    voxelflow fit --features scale --bold scale --lags 0 --test-samples 300 --cv 5
        --workers 2 --memory-limit 3GiB --voxel-block 4096 --no-progress

(the study's 12 alphas) on a ``distributed.LocalCluster`` of 2 single-threaded
process workers, while a sampler thread records every 0.25 s the RSS of each worker
process (found with ``client.run(os.getpid)``, re-read when a worker restarts), its
``VmHWM`` (the kernel's record of the process's peak RSS, so no peak between samples
is missed) and the RSS of this client process. It prints wall times, the peak RSS per worker, the client's peak
RSS (sampled and ``ru_maxrss``), worker restarts (a nanny restarts a worker that
exceeds its memory limit; any restart is reported as a failure) and the load average.

    .venv/bin/python benchmarks/scale.py                                  # full size
    .venv/bin/python benchmarks/scale.py --voxels 8192 --samples 1200 --features 1024
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import psutil
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]

from voxelflow.pipeline.study.config import STUDY_ALPHAS  # noqa: E402
from voxelflow.stores import RunTemplate, Workspace  # noqa: E402

TR = 1.0
FEATURE_BLOCK = 512   # samples of features generated and written at once
SIGNAL_FEATURES = 32  # BOLD responds to the first 32 features
NAME = "scale"
MIB = 2**20


# ------------------------------------------------------------------ data
def feature_block(seed: int, block: int, n_rows: int, n_features: int) -> np.ndarray:
    """float32 (n_rows, n_features) i.i.d. N(0, 1) rows of one time block."""
    rng = np.random.default_rng([seed, block])
    return rng.standard_normal((n_rows, n_features), dtype=np.float32)


def signal_features(seed: int, n_samples: int, n_features: int) -> np.ndarray:
    """float32 (n_samples, SIGNAL_FEATURES): the first features, regenerated block-wise."""
    parts = []
    for block, start in enumerate(range(0, n_samples, FEATURE_BLOCK)):
        rows = min(FEATURE_BLOCK, n_samples - start)
        parts.append(feature_block(seed, block, rows, n_features)[:, :SIGNAL_FEATURES])
    return np.concatenate(parts)


def bold_chunk(seed: int, block: int, signal: np.ndarray, n_voxels: int) -> np.ndarray:
    """float32 (n_samples, n_voxels) BOLD of one voxel chunk: planted response + noise."""
    rng = np.random.default_rng([seed, 10**6 + block])
    weights = rng.standard_normal((signal.shape[1], n_voxels), dtype=np.float32)
    response = signal @ weights
    response /= response.std(axis=0) + 1e-6
    snr = rng.lognormal(-1.0, 0.7, size=n_voxels).astype(np.float32)
    snr[rng.random(n_voxels) < 0.1] = 0.0
    noise = rng.standard_normal(response.shape, dtype=np.float32)
    return (np.sqrt(snr) * response + noise).astype(np.float32)


def _run_coords(n_samples: int) -> dict:
    times = np.arange(n_samples, dtype=np.float64) * TR
    return {"time": ("time", times, {"units": "s"}),
            "run": ("time", np.zeros(n_samples, np.int32))}


def write_problem(ws: Workspace, *, n_voxels: int, n_samples: int, n_features: int,
                  voxel_block: int, seed: int) -> None:
    """Write ``/features/scale`` and ``/bold/scale`` block by block (resumable; a
    complete group with the same parameters is kept as it is)."""
    coords = _run_coords(n_samples)
    fds = xr.Dataset({"features": (("time", "feature"),
                                   da.empty((n_samples, n_features), dtype=np.float32,
                                            chunks=(FEATURE_BLOCK, n_features)))},
                     coords=coords)
    ftemplate = RunTemplate(fds, {"features": {"chunks": (FEATURE_BLOCK, n_features)}},
                            "time", FEATURE_BLOCK)
    writer = ws.start_stage(f"features/{NAME}", {"stage": "scale-benchmark-features",
                                                 "seed": seed, "shape": [n_samples, n_features]},
                            [ftemplate], overwrite=True)
    for b in writer.pending_blocks(0):
        sl = writer.block_slice(0, b)
        writer.write_block(0, b, {"features": feature_block(seed, b, sl.stop - sl.start,
                                                              n_features)})
    writer.finish()

    bds = xr.Dataset({"bold": (("time", "voxel"),
                               da.empty((n_samples, n_voxels), dtype=np.float32,
                                        chunks=(n_samples, voxel_block)))},
                     coords={**coords, "valid": ("voxel", np.ones(n_voxels, bool))})
    btemplate = RunTemplate(bds, {"bold": {"chunks": (n_samples, voxel_block),
                                           "compressors": None}}, "voxel", voxel_block)
    writer = ws.start_stage(f"bold/{NAME}", {"stage": "scale-benchmark-bold", "seed": seed,
                                             "tr": TR, "shape": [n_samples, n_voxels],
                                             "voxel_block": voxel_block},
                            [btemplate], overwrite=True, group_attrs={"tr": TR})
    pending = writer.pending_blocks(0)
    signal = signal_features(seed, n_samples, n_features) if pending else None
    for b in pending:
        sl = writer.block_slice(0, b)
        writer.write_block(0, b, {"bold": bold_chunk(seed, b, signal, sl.stop - sl.start)})
    writer.finish()


# ------------------------------------------------------------------ memory sampler
def _vm_hwm(pid: int) -> int:
    """Peak RSS (bytes) of process ``pid`` over its life so far (``VmHWM``), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class MemorySampler:
    """Samples the RSS (bytes) of this process and of every Dask worker process.

    Worker pids come from ``client.run(os.getpid)`` on the default client (once it
    exists, and again whenever a sampled pid has gone: a restarted worker).
    """

    interval_s: float = 0.25
    client_peak: int = 0
    worker_peak: dict[str, int] = field(default_factory=dict)
    worker_hwm: dict[str, int] = field(default_factory=dict)
    worker_pids: dict[str, set] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _procs: dict = field(default_factory=dict)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, daemon=True, name="memory-sampler")
        thread.start()
        return thread

    def stop(self, thread: threading.Thread) -> None:
        self._stop.set()
        thread.join(timeout=10)

    def _refresh(self) -> None:
        from voxelflow.pipeline.execution.cluster import active_client

        client = active_client()
        if client is None:
            return
        try:
            pids = client.run(os.getpid)
        except Exception:  # noqa: BLE001 - cluster starting or closing
            return
        self._procs = {}
        for worker, pid in pids.items():
            self.worker_pids.setdefault(worker, set()).add(pid)
            try:
                self._procs[worker] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                continue

    def _loop(self) -> None:
        me = psutil.Process()
        last_refresh = 0.0
        while not self._stop.is_set():
            self.client_peak = max(self.client_peak, me.memory_info().rss)
            now = time.monotonic()
            if not self._procs or now - last_refresh > 5.0:
                self._refresh()
                last_refresh = now
            for worker, proc in list(self._procs.items()):
                try:
                    rss = proc.memory_info().rss
                except psutil.NoSuchProcess:
                    self._procs.pop(worker, None)
                    last_refresh = 0.0
                    continue
                self.worker_peak[worker] = max(self.worker_peak.get(worker, 0), rss)
                self.worker_hwm[worker] = max(self.worker_hwm.get(worker, 0),
                                              _vm_hwm(proc.pid))
            self.samples += 1
            self._stop.wait(self.interval_s)

    @property
    def restarts(self) -> int:
        return sum(len(pids) - 1 for pids in self.worker_pids.values())


# ------------------------------------------------------------------ main
def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voxels", type=int, default=200_000)
    p.add_argument("--samples", type=int, default=4_797, help="train + test samples")
    p.add_argument("--test-samples", type=int, default=300)
    p.add_argument("--features", type=int, default=8_192)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="3GiB")
    p.add_argument("--voxel-block", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/voxelflow-scale"),
                   help="workspace parent folder (reused when the problem is the same)")
    p.add_argument("--clean", action="store_true", help="delete the workspace afterwards")
    p.add_argument("--progress", action="store_true", help="show the fit's progress bar")
    args = p.parse_args(argv)
    for name in ("voxels", "samples", "features", "workers", "voxel_block", "test_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.test_samples >= args.samples - 10:
        p.error("--test-samples must leave at least 10 training samples")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from voxelflow import cli
    n_train = args.samples - args.test_samples
    store = args.workdir / "scale.zarr"
    ws = Workspace(store)
    bold_gib = args.voxels * args.samples * 4 / 2**30
    print(f"problem: {args.voxels:,} voxels x {args.samples:,} samples ({n_train:,} train + "
          f"{args.test_samples} test) x {args.features:,} features; BOLD {bold_gib:.2f} GiB, "
          f"features {args.samples * args.features * 4 / 2**30:.2f} GiB (float32)")
    print(f"load at start: {_load()}", flush=True)
    t0 = time.perf_counter()
    write_problem(ws, n_voxels=args.voxels, n_samples=args.samples, n_features=args.features,
                  voxel_block=args.voxel_block, seed=args.seed)
    t_gen = time.perf_counter() - t0
    print(f"generate + write: {t_gen:.1f} s (skipped when already in {store})", flush=True)
    group = f"fits/{NAME}/lags-0"
    if ws.state(group) is not None:
        ws.delete(group)

    sampler = MemorySampler()
    thread = sampler.start()
    argv_fit = ["fit", "--features", NAME, "--bold", NAME, "--lags", "0",
                "--alphas", ",".join(f"{a:g}" for a in STUDY_ALPHAS),
                "--test-samples", str(args.test_samples), "--cv", "5", "--name", NAME,
                "--voxel-block", str(args.voxel_block), "--store", str(store),
                "--workers", str(args.workers), "--memory-limit", args.memory_limit]
    if not args.progress:
        argv_fit.append("--no-progress")
    print("voxelflow " + " ".join(argv_fit), flush=True)
    t0 = time.perf_counter()
    status = cli.main(argv_fit)
    t_fit = time.perf_counter() - t0
    sampler.stop(thread)
    ru_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"fit exit status: {status}")
    print(f"fit wall time: {t_fit:.1f} s ({args.voxels / t_fit:,.0f} voxels/s, "
          f"{args.workers} workers x 1 thread, limit {args.memory_limit} each)")
    for worker, peak in sorted(sampler.worker_peak.items()):
        print(f"peak RSS {worker}: {peak / MIB:,.0f} MiB sampled, "
              f"{sampler.worker_hwm.get(worker, 0) / MIB:,.0f} MiB VmHWM (kernel's peak)")
    if sampler.worker_peak:
        print(f"peak RSS max over workers: {max(sampler.worker_peak.values()) / MIB:,.0f} MiB "
              f"sampled, {max(sampler.worker_hwm.values()) / MIB:,.0f} MiB VmHWM")
    print(f"client peak RSS: {sampler.client_peak / MIB:,.0f} MiB sampled during the fit, "
          f"{ru_max / MIB:,.0f} MiB ru_maxrss (whole process, generation included)")
    print(f"worker restarts: {sampler.restarts}; samples: {sampler.samples}")
    print(f"load at end: {_load()}", flush=True)
    if status == 0:
        done = ws.open_node(group)
        scored = np.isfinite(done["r_test_cv"].values)
        print(f"stored /{group}: {int(scored.sum()):,} of {args.voxels:,} voxels scored, "
              f"mean r_test_cv {float(np.nanmean(done['r_test_cv'].values)):.4f}")
    if args.clean:
        shutil.rmtree(store, ignore_errors=True)
    return 0 if status == 0 and sampler.restarts == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
