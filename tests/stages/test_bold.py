"""BOLD stage: real Haxby runs against a NumPy reference, NIfTI round trip, scaling and
TR units, NaN/constant voxels, resume after interruption and kill -9, bad input."""

from __future__ import annotations

import gzip
import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import xarray as xr

from voxelflow import cli
from conftest import ROOT, run_cli
from voxelflow.pipeline.stages.bold import run_bold_stage
from voxelflow.pipeline.stages.export import export_variable
from voxelflow.pipeline.errors import InputError, WorkspaceConflict
from voxelflow.stores import Workspace
from voxelflow.stores.scratch import SCRATCH_DIR, TransposeScratch
from voxelflow.stores.workspace import StageWriter

HAXBY_TR = 2.5


# ---------------------------------------------------------------------- helpers
def haxby_runs(haxby_dir: Path) -> list[Path]:
    runs = sorted(haxby_dir.glob("run*/bold_25mm.nii.gz"))
    assert len(runs) == 12
    return runs


def mask_of(path: Path) -> np.ndarray:
    """Independent reading of a mask: nibabel's data, voxel != 0."""
    return nib.load(str(path)).get_fdata() != 0


def zscore_reference(x: np.ndarray) -> np.ndarray:
    """(voxel, time) -> z-scored per voxel over time, ddof 0; constant voxels -> 0."""
    mean = x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    out = np.zeros_like(x)
    np.divide(x - mean, std, out=out, where=std > 0)
    return out


def detrend_reference(x: np.ndarray) -> np.ndarray:
    """(voxel, time) -> residual of a least-squares fit of [1, t] per voxel (lstsq)."""
    t = np.arange(x.shape[1], dtype=np.float64)
    design = np.stack([np.ones_like(t), t], axis=1)
    coef, *_ = np.linalg.lstsq(design, x.T, rcond=None)
    return (x.T - design @ coef).T


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
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def cli_main(capsys, *args: str) -> tuple[int, str, str]:
    """The real CLI entry point, in process (fast): exit status, stdout, stderr."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """Two small float32 runs (10x8x6, 50 and 40 volumes) on a shared grid with a mask."""
    d = tmp_path_factory.mktemp("synthetic")
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


# ---------------------------------------------------------------------- real data
@pytest.mark.parametrize("mask_name", ["brain", "vt", "hoc"])
def test_haxby_runs_equal_numpy_reference(tmp_path, haxby_dir, mask_name):
    runs = haxby_runs(haxby_dir)
    mask_path = haxby_dir / "masks" / f"{mask_name}.nii.gz"
    ws = Workspace(tmp_path / "ws.zarr")
    summary = run_bold_stage(ws, runs, "sub1", mask=mask_path, progress=False)
    mask = mask_of(mask_path)
    assert summary["voxels"] == int(mask.sum()) and summary["runs"] == 12

    tree = xr.open_datatree(ws.path, engine="zarr")
    group = tree["bold/sub1"]
    want_i, want_j, want_k = np.nonzero(mask)
    for run, path in enumerate(runs):
        ds = group[f"run-{run:03d}"].to_dataset()
        raw = nib.load(str(path)).get_fdata()[mask]  # (voxel, time), float64
        got = ds["bold"].values
        assert got.dtype == np.float32 and got.shape == (raw.shape[1], raw.shape[0])
        np.testing.assert_allclose(got, zscore_reference(raw).T, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(ds["time"].values, np.arange(raw.shape[1]) * HAXBY_TR)
        assert ds["time"].attrs["units"] == "s"
        assert (ds["run"].values == run).all()
        # per-voxel coordinates in every run node (DataTree inherits only indexes)
        np.testing.assert_array_equal(ds["i"].values, want_i)
        np.testing.assert_array_equal(ds["j"].values, want_j)
        np.testing.assert_array_equal(ds["k"].values, want_k)
        # raw per-run statistics: z-scoring can be undone
        np.testing.assert_allclose(group["raw_mean"].values[run], raw.mean(axis=1), rtol=1e-6)
        np.testing.assert_allclose(group["raw_std"].values[run], raw.std(axis=1), rtol=1e-5)
    flat = ws.open_concat("bold/sub1")
    assert flat.sizes["time"] == 12 * 121
    np.testing.assert_array_equal(np.unique(flat["run"].values), np.arange(12))
    for name in ("i", "j", "k", "valid"):
        assert name in flat.coords and flat[name].dims == ("voxel",)
    assert "valid" in ws.open_run("bold/sub1", 3).coords
    assert int(summary["invalid"]) == int((~flat["valid"].values).sum())

    attrs = ws.attrs("bold/sub1")
    img = nib.load(str(runs[0]))
    np.testing.assert_array_equal(np.asarray(attrs["affine"]), img.affine)
    assert attrs["volume_shape"] == [6, 10, 10] and attrs["tr"] == HAXBY_TR
    assert attrs["mask_file"] == str(mask_path)
    assert attrs["mask_sha256"] == hashlib.sha256(mask_path.read_bytes()).hexdigest()
    np.testing.assert_array_equal(group["mask"].values.astype(bool), mask)

    # querying by time works per run
    sub = tree["bold/sub1"].sel(time=slice(10, 20))
    np.testing.assert_allclose(sub["run-011"]["time"].values, [10, 12.5, 15, 17.5, 20])
    assert not (ws.path / SCRATCH_DIR).exists()


def test_haxby_no_zscore_is_raw_and_linear_detrend_matches_lstsq(tmp_path, haxby_dir):
    runs = haxby_runs(haxby_dir)[:2]
    mask_path = haxby_dir / "masks" / "brain.nii.gz"
    mask = mask_of(mask_path)
    ws = Workspace(tmp_path / "ws.zarr")
    run_bold_stage(ws, runs, "raw", mask=mask_path, zscore=False, progress=False)
    run_bold_stage(ws, runs, "det", mask=mask_path, detrend="linear", progress=False)
    run_bold_stage(ws, runs, "detraw", mask=mask_path, detrend="linear", zscore=False,
                   progress=False)
    for run, path in enumerate(runs):
        raw = nib.load(str(path)).get_fdata()[mask]
        np.testing.assert_array_equal(ws.open_run("bold/raw", run)["bold"].values, raw.T)
        resid = detrend_reference(raw)
        np.testing.assert_allclose(ws.open_run("bold/detraw", run)["bold"].values, resid.T,
                                   atol=1e-3, rtol=0)  # float32 of values ~10-100
        np.testing.assert_allclose(ws.open_run("bold/det", run)["bold"].values,
                                   zscore_reference(resid).T, atol=1e-5, rtol=0)


def test_export_mean_round_trip_cli(tmp_path, haxby_dir, capsys):
    runs = haxby_runs(haxby_dir)
    mask_path = haxby_dir / "masks" / "brain.nii.gz"
    store = tmp_path / "ws.zarr"
    code, out, err = cli_main(capsys, "bold", *map(str, runs), "--subject", "sub1", "--mask",
                              str(mask_path), "--store", str(store), "--no-progress")
    assert code == 0, err
    assert "12 run(s), 12 x 121 volumes, 129 voxels, TR 2.5 s" in out
    assert "invalid voxels: 0 of 129" in out
    out = tmp_path / "mean.nii.gz"
    res = run_cli("export", "bold/sub1", "mean", str(out), "--store", str(store))
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout

    mask = mask_of(mask_path)
    means = np.concatenate([nib.load(str(p)).get_fdata()[mask] for p in runs], axis=1).mean(1)
    img = nib.load(str(out))
    source = nib.load(str(runs[0]))
    assert img.shape == (6, 10, 10) and img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.affine, source.affine)
    np.testing.assert_array_equal(img.header.get_zooms(), source.header.get_zooms()[:3])
    data = img.get_fdata()
    np.testing.assert_allclose(data[mask], means, rtol=1e-6)
    assert (data[~mask] == 0).all()
    # nilearn reads it too, on the same grid as the mask
    from nilearn.masking import apply_mask

    np.testing.assert_allclose(apply_mask(str(out), str(mask_path)), means, rtol=1e-6)


def test_export_alpha_by_voxel_result_through_bold_group_attr(tmp_path, synthetic):
    ws = Workspace(tmp_path / "ws.zarr")
    run_bold_stage(ws, synthetic["runs"], "s", mask=synthetic["mask"], chunk_voxels=64,
                   progress=False)
    n_vox = int(synthetic["mask_bool"].sum())
    alphas = np.array([0.1, 10.0, 1000.0])
    rng = np.random.default_rng(0)
    r_test = rng.uniform(-1, 1, (alphas.size, n_vox)).astype(np.float32)
    fit = xr.Dataset({"r_test": (("alpha", "voxel"), r_test),
                      "best_alpha": ("voxel", alphas[rng.integers(0, 3, n_vox)]),
                      "note": ("alpha", np.arange(3))},
                     coords={"alpha": alphas}, attrs={"bold_group": "bold/s"})
    ws.write_dataset("fits/e/m/lags", fit, {"test": 1})

    summary = export_variable(ws, "fits/e/m/lags", "r_test", tmp_path / "r.nii")
    img = nib.load(str(tmp_path / "r.nii"))
    assert img.shape == (10, 8, 6, 3) and summary["dim"] == "alpha"
    np.testing.assert_allclose(img.affine, synthetic["affine"])
    data = img.get_fdata()
    for a in range(3):
        np.testing.assert_allclose(data[..., a][synthetic["mask_bool"]], r_test[a], rtol=1e-7)
        assert (data[..., a][~synthetic["mask_bool"]] == 0).all()
    export_variable(ws, "fits/e/m/lags", "best_alpha", tmp_path / "best.nii.gz")
    best = nib.load(str(tmp_path / "best.nii.gz")).get_fdata()
    np.testing.assert_allclose(best[synthetic["mask_bool"]], fit["best_alpha"].values)
    # per-run statistics of the bold group itself: one volume per run
    export_variable(ws, "bold/s", "raw_std", tmp_path / "std.nii.gz")
    assert nib.load(str(tmp_path / "std.nii.gz")).shape == (10, 8, 6, 2)
    # the saved mask is already a volume on the grid: written as is
    export_variable(ws, "bold/s", "mask", tmp_path / "mask.nii.gz")
    mask_img = nib.load(str(tmp_path / "mask.nii.gz"))
    assert mask_img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(mask_img.dataobj) != 0, synthetic["mask_bool"])

    with pytest.raises(InputError, match="no 'voxel'"):
        export_variable(ws, "fits/e/m/lags", "note", tmp_path / "x.nii.gz")
    with pytest.raises(InputError, match="has no variable 'nope'.*r_test"):
        export_variable(ws, "fits/e/m/lags", "nope", tmp_path / "x.nii.gz")
    ws.write_dataset("fits/e/m/orphan", fit.drop_attrs(), {"test": 1})
    with pytest.raises(InputError, match="bold_group"):
        export_variable(ws, "fits/e/m/orphan", "r_test", tmp_path / "x.nii.gz")
    with pytest.raises(InputError, match=r"\.nii or \.nii\.gz"):
        export_variable(ws, "bold/s", "mean", tmp_path / "x.png")


def test_computed_epi_mask_is_saved(tmp_path, haxby_dir):
    from nilearn.masking import compute_epi_mask

    runs = haxby_runs(haxby_dir)[:3]
    ws = Workspace(tmp_path / "ws.zarr")
    summary = run_bold_stage(ws, runs, "auto", progress=False)
    mean = np.concatenate([nib.load(str(p)).get_fdata() for p in runs], axis=3).mean(axis=3)
    ref = compute_epi_mask(nib.Nifti1Image(mean.astype(np.float32),
                                           nib.load(str(runs[0])).affine))
    want = np.asarray(ref.dataobj) != 0
    saved = ws.open_node("bold/auto")["mask"].values.astype(bool)
    np.testing.assert_array_equal(saved, want)
    assert summary["voxels"] == int(want.sum())
    assert "compute_epi_mask" in ws.attrs("bold/auto")["mask_method"]
    raw = nib.load(str(runs[1])).get_fdata()[want]
    np.testing.assert_allclose(ws.open_run("bold/auto", 1)["bold"].values,
                               zscore_reference(raw).T, atol=1e-5)


# ---------------------------------------------------------------------- synthetic
def test_scale_factor_and_millisecond_tr(tmp_path):
    rng = np.random.default_rng(1)
    data = (rng.integers(-2000, 2000, (5, 4, 3, 30)) * 0.5 + 10).astype(np.float64)
    run = write_nifti(tmp_path / "scaled.nii", data, tr=2000.0, time_unit="msec",
                      dtype=np.int16, slope=0.5, inter=10.0)
    img = nib.load(str(run))
    assert img.dataobj.slope == 0.5 and img.dataobj.inter == 10.0
    ws = Workspace(tmp_path / "ws.zarr")
    run_bold_stage(ws, [run], "s", mask=_full_mask(tmp_path, data), zscore=False,
                   progress=False)
    ds = ws.open_run("bold/s", 0)
    np.testing.assert_array_equal(ds["bold"].values, img.get_fdata().reshape(-1, 30, order="C").T)
    np.testing.assert_array_equal(ds["time"].values, np.arange(30) * 2.0)
    assert ws.attrs("bold/s")["tr"] == 2.0


def _full_mask(tmp_path: Path, data: np.ndarray) -> Path:
    return write_nifti(tmp_path / "full_mask.nii.gz", np.ones(data.shape[:3], np.float32))


def test_nan_and_constant_voxels_are_flagged_and_counted(tmp_path, capsys):
    rng = np.random.default_rng(5)
    a = (100 + rng.standard_normal((4, 4, 4, 20))).astype(np.float32)
    b = (100 + rng.standard_normal((4, 4, 4, 25))).astype(np.float32)
    a[0, 0, 1, 7] = np.nan      # NaN in run 0 only
    a[0, 1, 0, :] = 42.0        # constant in run 0 only
    a[2, 2, 2, :] = 7.0         # constant in both runs
    b[2, 2, 2, :] = 7.0
    b[3, 3, 3, 4] = np.inf      # non-finite in run 1
    runs = [write_nifti(tmp_path / "a.nii", a), write_nifti(tmp_path / "b.nii", b)]
    mask = write_nifti(tmp_path / "m.nii.gz", np.ones((4, 4, 4), np.int16))
    store = tmp_path / "ws.zarr"
    code, out, err = cli_main(capsys, "bold", *map(str, runs), "--subject", "x", "--mask",
                              str(mask), "--store", str(store), "--no-progress",
                              "--chunk-voxels", "16")
    assert code == 0, err
    assert "invalid voxels: 4 of 64" in out
    ws = Workspace(store)
    flat_c = np.ravel_multi_index  # voxel order is C order of the mask
    bad = {flat_c(v, (4, 4, 4)) for v in [(0, 0, 1), (0, 1, 0), (2, 2, 2), (3, 3, 3)]}
    valid = ws.open_concat("bold/x")["valid"].values
    assert set(np.flatnonzero(~valid)) == bad
    for run, x in enumerate((a, b)):
        got = ws.open_run("bold/x", run)["bold"].values
        ref = x.reshape(-1, x.shape[3]).astype(np.float64)
        for v in range(64):
            series = ref[v]
            finite = np.isfinite(series)
            want = np.full_like(series, np.nan)
            s = series[finite]
            want[finite] = 0.0 if s.std() == 0 else (s - s.mean()) / s.std()
            np.testing.assert_allclose(got[:, v], want, atol=1e-5, err_msg=f"run {run} voxel {v}")


def test_interrupted_ingest_resumes_byte_identical(tmp_path, synthetic, monkeypatch):
    args = dict(mask=synthetic["mask"], chunk_voxels=32, time_block=8, progress=False)
    ref = Workspace(tmp_path / "ref.zarr")
    run_bold_stage(ref, synthetic["runs"], "s", **args)

    class Crash(Exception):
        pass

    def crash_after(cls, name, n):
        original = getattr(cls, name)
        calls = {"n": 0}

        def wrapper(self, *a, **k):
            if calls["n"] >= n:
                raise Crash(name)
            calls["n"] += 1
            return original(self, *a, **k)
        monkeypatch.setattr(cls, name, wrapper)

    ws = Workspace(tmp_path / "ws.zarr")
    crash_after(TransposeScratch, "write_block", 3)  # dies in pass 1 of run 0
    with pytest.raises(Crash):
        run_bold_stage(ws, synthetic["runs"], "s", **args)
    assert ws.state("bold/s") == "writing"
    monkeypatch.undo()
    # dies in pass 2 of run 1: the 10th chunk is written but never marked done
    crash_after(StageWriter, "mark_done", 9)
    with pytest.raises(Crash):
        run_bold_stage(ws, synthetic["runs"], "s", **args)
    assert ws.state("bold/s") == "writing"
    assert ws.list_groups("bold") == []
    monkeypatch.undo()
    summary = run_bold_stage(ws, synthetic["runs"], "s", **args)
    assert summary["blocks_skipped"] == 9 and summary["blocks_written"] == 3
    a, b = tree_bytes(ref.path / "bold" / "s"), tree_bytes(ws.path / "bold" / "s")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert not (ws.path / SCRATCH_DIR).exists()
    again = run_bold_stage(ws, synthetic["runs"], "s", **args)
    assert again["blocks_written"] == 0


def test_sigkill_mid_ingest_then_resume_equals_uninterrupted(tmp_path):
    rng = np.random.default_rng(2)
    data = (500 + 20 * rng.standard_normal((24, 24, 24, 300))).astype(np.float32)
    run = write_nifti(tmp_path / "long.nii", data)
    mask = write_nifti(tmp_path / "m.nii", np.ones((24, 24, 24), np.uint8))
    del data
    args = ["bold", str(run), "--subject", "k", "--mask", str(mask), "--chunk-voxels", "64",
            "--no-progress"]
    assert cli.main([*args, "--store", str(tmp_path / "ref.zarr")]) == 0  # in process
    n_blocks = 24 ** 3 // 64

    store = tmp_path / "killed.zarr"
    done_dir = store / "bold/k/run-000/block_done/c"
    proc = subprocess.Popen([sys.executable, "-m", "voxelflow.cli", *args, "--store", str(store)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done_dir.exists() and len(list(done_dir.iterdir())) >= 3:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(done_dir.iterdir()))
    assert 0 < done_at_kill < n_blocks, "kill must land mid-stage"
    assert Workspace(store).state("bold/k") == "writing"

    resumed = run_cli(*args, "--store", str(store))
    assert resumed.returncode == 0, resumed.stderr
    skipped = int(resumed.stdout.split("blocks written, ")[1].split(" already")[0])
    assert skipped >= done_at_kill
    a = tree_bytes(tmp_path / "ref.zarr" / "bold" / "k")
    b = tree_bytes(store / "bold" / "k")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_rerun_with_other_parameters_is_refused_then_overwritten(tmp_path, synthetic, capsys):
    store = tmp_path / "ws.zarr"
    base = ["bold", *map(str, synthetic["runs"]), "--subject", "s", "--mask",
            str(synthetic["mask"]), "--store", str(store), "--no-progress"]
    code, out, err = cli_main(capsys, *base)
    assert code == 0, err
    code, out, err = cli_main(capsys, *base)
    assert code == 0 and "0 blocks written, 2 already done" in out
    code, out, err = cli_main(capsys, *base, "--no-zscore")
    assert code == 2
    assert "--overwrite" in err and "zscore: true -> false" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = cli_main(capsys, *base, "--no-zscore", "--overwrite")
    assert code == 0, err
    raw = Workspace(store).open_run("bold/s", 0)["bold"].values
    np.testing.assert_array_equal(raw, synthetic["data"][0][synthetic["mask_bool"]].T)
    with pytest.raises(WorkspaceConflict):
        run_bold_stage(Workspace(store), synthetic["runs"], "s", progress=False)


def test_tr_from_option_and_mismatched_trs(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((3, 3, 3, 10)).astype(np.float32)
    a = write_nifti(tmp_path / "a.nii", x, tr=2.0)
    b = write_nifti(tmp_path / "b.nii", x, tr=2.5)
    c = write_nifti(tmp_path / "c.nii", x, tr=0.0)
    m = write_nifti(tmp_path / "m.nii", np.ones((3, 3, 3), np.float32))
    common = ["--mask", str(m), "--store", str(tmp_path / "ws.zarr"), "--no-progress"]
    code, _, err = cli_main(capsys, "bold", str(a), str(b), "--subject", "ab", *common)
    assert code == 2 and str(b) in err and "--tr" in err and "2.5" in err
    code, _, err = cli_main(capsys, "bold", str(c), "--subject", "c", *common)
    assert code == 2 and str(c) in err and "--tr" in err
    code, out, err = cli_main(capsys, "bold", str(a), str(b), "--subject", "ab",
                              "--tr", "1.5", *common)
    assert code == 0, err
    ws = Workspace(tmp_path / "ws.zarr")
    np.testing.assert_array_equal(ws.open_run("bold/ab", 1)["time"].values, np.arange(10) * 1.5)
    assert ws.attrs("bold/ab")["tr_source"] == "--tr"


@pytest.fixture
def bad_inputs(tmp_path, synthetic) -> dict[str, tuple[list[Path], Path, Path]]:
    """kind -> (runs, mask, the file the message must name)."""
    good, mask = synthetic["runs"][0], synthetic["mask"]
    vol3d = write_nifti(tmp_path / "vol3d.nii.gz", synthetic["data"][0][..., 0])
    other_grid = write_nifti(tmp_path / "other_grid.nii.gz",
                             np.zeros((10, 8, 5, 4), np.float32), synthetic["affine"])
    shifted = synthetic["affine"].copy()
    shifted[0, 3] += 4
    other_affine = write_nifti(tmp_path / "shifted.nii.gz", synthetic["data"][1], shifted)
    small_mask = write_nifti(tmp_path / "small_mask.nii.gz", np.ones((5, 4, 3), np.uint8))
    empty_mask = write_nifti(tmp_path / "empty_mask.nii.gz", np.zeros((10, 8, 6), np.float32),
                             synthetic["affine"])
    text = tmp_path / "notes.nii.gz"
    text.write_text("not a nifti\n")
    events = tmp_path / "events.tsv"
    events.write_text("onset\tduration\n0\t1\n")
    data = synthetic["runs"][0].read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    return {
        "3d_run": ([vol3d], mask, vol3d),
        "other_grid": ([good, other_grid], mask, other_grid),
        "other_affine": ([good, other_affine], mask, other_affine),
        "mask_shape": ([good], small_mask, small_mask),
        "empty_mask": ([good], empty_mask, empty_mask),
        "not_nifti": ([text], mask, text),
        "tsv_run": ([events], mask, events),
        "missing": ([tmp_path / "absent.nii.gz"], mask, tmp_path / "absent.nii.gz"),
        "truncated": ([truncated], mask, truncated),
    }


@pytest.mark.parametrize("kind", ["3d_run", "other_grid", "other_affine", "mask_shape",
                                  "empty_mask", "not_nifti", "tsv_run", "missing",
                                  "truncated"])
def test_bad_input_gives_one_line_error_and_no_complete_group(tmp_path, bad_inputs, kind,
                                                              capsys):
    runs, mask, culprit = bad_inputs[kind]
    store = tmp_path / "ws.zarr"
    code, out, err = cli_main(capsys, "bold", *map(str, runs), "--subject", "bad", "--mask",
                              str(mask), "--store", str(store), "--no-progress")
    assert code == 2, (kind, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxelflow: error:"), err
    assert str(culprit) in lines[0]
    assert Workspace(store).state("bold/bad") != "complete"
    assert Workspace(store).list_groups("bold") == []


def test_bad_export_requests(tmp_path, synthetic, capsys):
    store = tmp_path / "ws.zarr"
    code, out, err = cli_main(capsys, "export", "bold/none", "mean", str(tmp_path / "o.nii"),
                              "--store", str(store))
    assert code == 2 and "no workspace" in err
    run_bold_stage(Workspace(store), synthetic["runs"][:1], "s", mask=synthetic["mask"],
                   progress=False)
    code, out, err = cli_main(capsys, "export", "bold/other", "mean", str(tmp_path / "o.nii"),
                              "--store", str(store))
    assert code == 2 and "no group /bold/other" in err and "complete bold groups: s" in err
    code, out, err = cli_main(capsys, "export", "bold/s", "bold", str(tmp_path / "o.nii"),
                              "--store", str(store))
    assert code == 2 and "no variable 'bold'" in err and "mean" in err
    code, out, err = cli_main(capsys, "export", "bold/s", "mean",
                              str(tmp_path / "nodir" / "o.nii"), "--store", str(store))
    assert code == 2 and "does not exist" in err
