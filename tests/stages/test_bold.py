"""BOLD stage: real Haxby runs against a NumPy reference, NIfTI round trip, scaling and
TR units, NaN/constant voxels, resume after interruption and kill -9, bad input."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
import zarr

from bold_inputs import cli_main, haxby_runs, make_synthetic, mask_of, tree_bytes, write_nifti
from conftest import ROOT, cli_here
from voxelflow import cli
from voxelflow.pipeline.errors import WorkspaceConflict
from voxelflow.pipeline.stages._bold_passes import ChunkWork, scratch_time_block
from voxelflow.pipeline.stages.bold import run_bold_stage
from voxelflow.stores import Workspace
from voxelflow.stores.scratch import SCRATCH_DIR, TransposeScratch
from voxelflow.stores.workspace import StageWriter

HAXBY_TR = 2.5


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


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"))


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


def test_pass_2_holds_one_chunk_at_a_time(tmp_path, synthetic, monkeypatch):
    """Here, each output chunk is computed, written and marked done on the calling thread
    before the next one is read (an output chunk is the stage's memory budget)."""
    events: list[tuple] = []
    compute, write, mark = ChunkWork.compute, ChunkWork.write, StageWriter.mark_done
    monkeypatch.setattr(ChunkWork, "compute", lambda self, key: (
        events.append(("compute", key, threading.get_ident())) or compute(self, key)))
    monkeypatch.setattr(ChunkWork, "write", lambda self, key, chunk: (
        events.append(("write", key, threading.get_ident())) or write(self, key, chunk)))
    monkeypatch.setattr(StageWriter, "mark_done", lambda self, run, block: (
        events.append(("mark", (run, block), threading.get_ident())) or mark(self, run, block)))
    run_bold_stage(Workspace(tmp_path / "ws.zarr"), synthetic["runs"], "s",
                   mask=synthetic["mask"], chunk_voxels=32, progress=False)
    keys = [(run, block) for run in range(2) for block in range(6)]
    here = threading.get_ident()
    assert events == [(step, key, here) for key in keys for step in ("compute", "write", "mark")]


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


# The killed run: the real CLI in a child process whose StageWriter kills the process
# (SIGKILL, nothing flushed or cleaned up) right after writing the data of chunk KILL_AT,
# before its done flag: an observed state, mid pass 2, with one chunk really interrupted.
_KILL_HOOK = """
import os, signal, sys
from voxelflow import cli
from voxelflow.stores.workspace import StageWriter

write = StageWriter.write_block_data

def write_then_die(self, run, block, arrays):
    write(self, run, block, arrays)
    if block == int(os.environ["VOXELFLOW_TEST_KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)

StageWriter.write_block_data = write_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def _finished(done_dir: Path) -> list[int]:
    """Blocks whose done flag is written; a killed atomic write leaves a ``*.partial``."""
    return sorted(int(p.name) for p in done_dir.iterdir() if not p.name.endswith(".partial"))


def _arrays(store: Path, group: str) -> dict[str, np.ndarray]:
    """Every array below ``group``, read back through Zarr (path -> values)."""
    members = zarr.open_group(store, mode="r")[group].members(max_depth=None)
    return {path: node[...] for path, node in members if isinstance(node, zarr.Array)}


def test_sigkill_mid_ingest_then_resume_equals_uninterrupted(tmp_path):
    # 16^3 voxels x 600 volumes (9.8 MB): two pass-1 time blocks (512 + 88 volumes under
    # SCRATCH_BUDGET), 64 output chunks; the kill comes from a hook, so size buys nothing.
    side, n_time = 16, 600
    assert scratch_time_block(n_time, side ** 3) == 512
    rng = np.random.default_rng(2)
    data = (500 + 20 * rng.standard_normal((side, side, side, n_time))).astype(np.float32)
    run = write_nifti(tmp_path / "long.nii", data)
    mask = write_nifti(tmp_path / "m.nii", np.ones((side, side, side), np.uint8))
    del data
    args = ["bold", str(run), "--subject", "k", "--mask", str(mask), "--chunk-voxels", "64",
            "--no-progress"]
    assert cli.main([*args, "--store", str(tmp_path / "ref.zarr")]) == 0  # in process
    n_blocks, kill_at = side ** 3 // 64, 30

    store = tmp_path / "killed.zarr"
    run_dir = store / "bold/k/run-000"
    killed = subprocess.run([sys.executable, "-c", _KILL_HOOK, *args, "--store", str(store)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "VOXELFLOW_TEST_KILL_AT": str(kill_at)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Mid-stage: the chunks before kill_at are finished, kill_at is written but not
    # marked (the interrupted block), nothing after it exists, the scratch is left over.
    assert _finished(run_dir / "block_done/c") == list(range(kill_at))
    assert (run_dir / f"bold/c/0/{kill_at}").exists()
    assert not (run_dir / f"bold/c/0/{kill_at + 1}").exists()
    assert Workspace(store).state("bold/k") == "writing"
    assert (store / SCRATCH_DIR).exists()
    stamps = {b: (run_dir / f"bold/c/0/{b}").stat().st_mtime_ns for b in range(kill_at)}

    resumed = cli_here(*args, "--store", str(store))  # the resume needs no new process
    assert resumed.returncode == 0, resumed.stderr
    assert f"{n_blocks - kill_at} blocks written, {kill_at} already done" in resumed.stdout
    # Finished chunks were not rewritten ...
    assert all((run_dir / f"bold/c/0/{b}").stat().st_mtime_ns == stamps[b] for b in stamps)
    # ... and every file and every array equals the uninterrupted run's, byte for byte.
    a = tree_bytes(tmp_path / "ref.zarr" / "bold" / "k")
    b = tree_bytes(store / "bold" / "k")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    want, got = _arrays(tmp_path / "ref.zarr", "bold/k"), _arrays(store, "bold/k")
    assert want.keys() == got.keys() and "run-000/bold" in got
    for name, values in want.items():
        assert got[name].dtype == values.dtype and got[name].tobytes() == values.tobytes(), name
    assert not (store / SCRATCH_DIR).exists()


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
