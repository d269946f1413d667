"""BOLD ingestion benchmark: out-of-core memory and volumes/s on a realistic run.

Generates (once, on disk, volume by volume) a 96 x 96 x 72 x 1,200-volume int16 run
with a scale factor (uncompressed .nii, 1.6 GB) and a 65,665-voxel mask, then in fresh
subprocesses so that each peak RSS is that step's alone:

1. baseline: the stage's own NIfTI block reads + masking, nothing written (volumes/s);
2. ingest: ``run_bold_stage`` (both passes, z-score, Zarr writes) into a new workspace.

For the ingest it prints the RSS after the imports (baseline: Python, NumPy, xarray,
Zarr, dask, nibabel and voxelflow loaded), the absolute peak RSS, and peak minus
baseline, against the target: a quarter of the masked data (65,665 x 1,200 x 4 B).

    .venv/bin/python benchmarks/bold.py [--workdir DIR] [--volumes 1200] [--repeats 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPE = (96, 96, 72)
N_MASK = 65_665
TR = 1.5
SLOPE, INTER = 0.25, 100.0
MIB = 2**20


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux /proc)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------ generation
def make_mask(shape=SHAPE, n=N_MASK):
    """Exactly ``n`` voxels: the ``n`` nearest to the centre in an ellipsoid metric."""
    import numpy as np

    grid = np.indices(shape, dtype=np.float64)
    centre = [(s - 1) / 2 for s in shape]
    radii = [s * 0.42 for s in shape]
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    order = np.argsort(r2, axis=None, kind="stable")
    mask = np.zeros(int(np.prod(shape)), dtype=np.uint8)
    mask[order[:n]] = 1
    return mask.reshape(shape)


def generate(workdir: Path, n_volumes: int) -> tuple[Path, Path]:
    """Write run.nii (int16 + scl_slope/scl_inter) and mask.nii.gz, one volume at a time."""
    import nibabel as nib
    import numpy as np

    run, mask_path = workdir / f"run_{n_volumes}.nii", workdir / "mask.nii.gz"
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-144.0, -144.0, -108.0]
    if not mask_path.exists():
        mask = make_mask()
        nib.save(nib.Nifti1Image(mask, affine), mask_path)
    if run.exists() and run.stat().st_size == 352 + 2 * int(np.prod(SHAPE)) * n_volumes:
        return run, mask_path
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(SHAPE + (n_volumes,))
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header.set_zooms((3.0, 3.0, 3.0, TR))
    header.set_xyzt_units("mm", "sec")
    header.set_slope_inter(SLOPE, INTER)
    header.set_data_offset(352)
    rng = np.random.default_rng(0)
    x, y, z = np.indices(SHAPE, dtype=np.float32)
    baseline = 4000 + 1500 * np.cos(x / 17) * np.sin(y / 23) + 10 * z  # raw int16 units
    amplitude = 40 * np.sin(x / 9 + y / 13)
    tmp = run.with_suffix(".partial")
    with open(tmp, "wb") as fh:
        header.write_to(fh)
        fh.write(b"\x00" * (352 - fh.tell()))
        for t in range(n_volumes):
            vol = baseline + amplitude * np.sin(2 * np.pi * t * TR / 30.0)
            vol += rng.standard_normal(SHAPE, dtype=np.float32) * 30
            vol[40:42, 40:42, 30] = 5000  # 4 constant voxels inside the mask
            fh.write(np.clip(np.rint(vol), -32768, 32767).astype("<i2").tobytes(order="F"))
    os.replace(tmp, run)
    return run, mask_path


# ------------------------------------------------------------------ child steps
def step_read(run: Path, mask_path: Path) -> dict:
    """Baseline: the stage's block reads and masking, nothing written."""
    from voxelflow.pipeline.stages.nifti import RunReader, load_mask, mask_voxels, probe_run

    rss0 = _status_mib("VmRSS")
    info = probe_run(run)
    mask = load_mask(mask_path, info)
    flat = mask_voxels(mask)[3]
    t0 = time.perf_counter()
    checksum = 0.0
    for _, values in RunReader(run).iter_masked(flat, 0, info.n_volumes):
        checksum += float(values[0, 0])
    dt = time.perf_counter() - t0
    return {"volumes": info.n_volumes, "seconds": dt, "rss_after_imports_mib": rss0,
            "peak_mib": _status_mib("VmHWM")}


def step_ingest(run: Path, mask_path: Path, store: Path) -> dict:
    """The whole stage into a new workspace."""
    import dask.array  # noqa: F401  (imports the stage needs, counted in the baseline)
    import nibabel  # noqa: F401
    import numpy  # noqa: F401
    import xarray  # noqa: F401
    import zarr  # noqa: F401

    from voxelflow.pipeline.stages.bold import run_bold_stage
    from voxelflow.stores import Workspace

    rss0, hwm0 = _status_mib("VmRSS"), _status_mib("VmHWM")
    t0 = time.perf_counter()
    summary = run_bold_stage(Workspace(store), [run], "bench", mask=mask_path, progress=False)
    dt = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    # Spot check after the peak is taken: a few voxels against nibabel, z-scored here.
    ws = Workspace(store)
    ds = ws.open_run("bold/bench", 0)
    img = nibabel.load(str(run))
    error = 0.0
    for v in (0, 30_000, summary["voxels"] - 1):
        i, j, k = (int(ds[c].values[v]) for c in "ijk")
        series = numpy.asarray(img.dataobj[i, j, k, :], dtype=numpy.float64)
        want = (series - series.mean()) / series.std()
        error = max(error, float(numpy.abs(ds["bold"][:, v].values - want).max()))
    return {"volumes": sum(summary["volumes"]), "voxels": summary["voxels"],
            "invalid": summary["invalid"], "seconds": dt, "rss_after_imports_mib": rss0,
            "hwm_after_imports_mib": hwm0, "peak_mib": peak, "spot_check_max_error": error}


def child(step: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--step", step, *args],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{step} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def du_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the generated run and workspace go (default: a temp dir)")
    parser.add_argument("--volumes", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=2, help="ingest runs (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--step", choices=["generate", "read", "ingest"], help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.step == "generate":
        run, mask = generate(Path(args.paths[0]), args.volumes)
        print(json.dumps({"run": str(run), "mask": str(mask)}))
        return
    if args.step == "read":
        print(json.dumps(step_read(Path(args.paths[0]), Path(args.paths[1]))))
        return
    if args.step == "ingest":
        print(json.dumps(step_ingest(*(Path(p) for p in args.paths))))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="voxelflow-bold-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print(f"load average at start (1, 5, 15 min): {os.getloadavg()}; "
              f"{os.cpu_count()} CPUs")
        t0 = time.perf_counter()
        made = child("generate", str(workdir), "--volumes", str(args.volumes))
        run, mask = Path(made["run"]), Path(made["mask"])
        print(f"generated {run.name}: {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} x {args.volumes} "
              f"int16 (+scl_slope), {run.stat().st_size / MIB:.0f} MiB, "
              f"{time.perf_counter() - t0:.0f} s; mask {N_MASK} voxels")
        masked_mib = N_MASK * args.volumes * 4 / MIB
        target = masked_mib / 4
        child("read", str(run), str(mask))  # warm the page cache
        read = child("read", str(run), str(mask))
        ings = []
        for rep in range(args.repeats):
            store = workdir / f"bench{rep}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            ings.append(child("ingest", str(run), str(mask), str(store)))
        read_vps = read["volumes"] / read["seconds"]
        print(f"masked data: {N_MASK} voxels x {args.volumes} volumes x 4 B = "
              f"{masked_mib:.0f} MiB ({masked_mib * MIB / 1e6:.0f} MB); target peak < "
              f"{target:.0f} MiB ({target * MIB / 1e6:.0f} MB)")
        print(f"baseline read+mask (no writes) : {read_vps:8.1f} volumes/s")
        for rep, ing in enumerate(ings):
            ing_vps = ing["volumes"] / ing["seconds"]
            extra = ing["peak_mib"] - ing["rss_after_imports_mib"]
            print(f"ingest #{rep + 1} (2 passes, z-score)  : {ing_vps:8.1f} volumes/s "
                  f"({ing['seconds']:.1f} s), ratio ingest/read {ing_vps / read_vps:.3f}")
            print(f"  RSS after imports (baseline) : {ing['rss_after_imports_mib']:8.1f} MiB "
                  f"(high-water mark so far {ing['hwm_after_imports_mib']:.1f} MiB)")
            print(f"  peak RSS (absolute)          : {ing['peak_mib']:8.1f} MiB  "
                  f"({'meets' if ing['peak_mib'] < target else 'does NOT meet'} the target)")
            print(f"  peak minus baseline          : {extra:8.1f} MiB  "
                  f"({'meets' if extra < target else 'does NOT meet'} the target)")
        ing = ings[-1]
        print(f"invalid voxels flagged: {ing['invalid']} (4 planted constant voxels); "
              f"3 voxels vs nibabel z-scored: max |error| {ing['spot_check_max_error']:.1e}")
        print(f"workspace on disk: {du_mib(store):.0f} MiB")
        print(f"load average at end (1, 5, 15 min): {os.getloadavg()}")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
