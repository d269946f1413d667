"""``voxelflow run`` on a tiny experiment file (an 80 s movie at 32 px, 46 voxels): the
fit of ``aggregate = "mean"`` against scikit-learn on a design built with NumPy, the ROI
table of ``[report] atlas``, resume after a SIGKILL mid-stage (every array and
attribute of the workspace equal to an uninterrupted run), and the refusal of a
workspace the cluster's workers cannot see."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import zarr
from sklearn.linear_model import Ridge

from conftest import cli_error, cli_here
from torch_threads import one_torch_thread  # noqa: F401 - autouse: 1 torch thread
from voxelflow.pipeline.study.config import load_experiment
from voxelflow.pipeline.study.plan import build_plan
from voxelflow.pipeline.synthetic.movies import write_moving_video
from voxelflow.stores import Workspace

TR = 2.0
FPS = 4.0
N_VOLUMES = 40                      # 80 s of BOLD, like the movie
GRID = (4, 4, 3)
CONSTANT_VOXEL = (1, 1, 0)          # invalid (constant), inside ROI 1
OUT_OF_MASK = [(3, 3, 2), (0, 3, 0)]
LAG_SETS = [[2.0], [2.0, 4.0]]
ALPHAS = [10.0, 1e3, 1e5]
TEST_SAMPLES = 10
ROI_NAMES = {1: "left", 2: "right front", 3: "right back"}

# The sections as inline tables: the same file for tomllib as [section] headers.
EXPERIMENT = f"""
experiment = {{ name = "tiny", store = "voxelflow.zarr", reports = "reports" }}
stimulus = {{ name = "movie", videos = ["movie.mp4"], fps = {FPS:g}, size = 32, frames = "all" }}
bold = {{ subject = "s", runs = ["bold.nii.gz"], mask = "mask.nii.gz" }}
models = [{{ name = "r18", model = "resnet18", weights = "random:0" }}]
fit = {{ lag_sets = [[2], [2, 4]], alphas = [10, 1000, 100000], test_samples = {TEST_SAMPLES}, cv = 2, aggregate = "mean" }}
report = {{ atlas = "atlas.nii.gz", atlas_labels = "atlas.tsv" }}
"""


def _atlas() -> np.ndarray:
    atlas = np.zeros(GRID, np.int16)
    atlas[:2] = 1
    atlas[2:, :2] = 2
    atlas[2:, 2:, 1:] = 3       # atlas[2:, 2:, 0] stays 0: voxels in no ROI
    return atlas


def _write_inputs(folder: Path) -> None:
    """Movie (80 s, 8 fps, 32 px), one BOLD run of 40 volumes (TR 2 s) on a 4x4x3 grid
    with a constant voxel, a mask without two voxels, an atlas and its label file."""
    write_moving_video(folder / "movie.mp4", 80, rate=8, size=(32, 32), seed=1)
    rng = np.random.default_rng(0)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    vol = rng.normal(100, 5, size=GRID + (N_VOLUMES,)).astype(np.float32)
    vol[CONSTANT_VOXEL] = 7.0
    img = nib.Nifti1Image(vol, affine)
    img.header["pixdim"][4] = TR
    nib.save(img, str(folder / "bold.nii.gz"))
    mask = np.ones(GRID, np.uint8)
    for ijk in OUT_OF_MASK:
        mask[ijk] = 0
    nib.save(nib.Nifti1Image(mask, affine), str(folder / "mask.nii.gz"))
    nib.save(nib.Nifti1Image(_atlas(), affine), str(folder / "atlas.nii.gz"))
    (folder / "atlas.tsv").write_text(
        "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in ROI_NAMES.items()))
    (folder / "experiment.toml").write_text(EXPERIMENT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The folder of the tiny experiment, run once (uninterrupted) through the CLI's
    entry point, in this process (as the resume of the SIGKILL test: the same torch
    threads, so the same bits)."""
    folder = tmp_path_factory.mktemp("tiny")
    _write_inputs(folder)
    res = cli_here("run", str(folder / "experiment.toml"), "--no-progress")
    assert res.returncode == 0, res.stderr
    return folder


def _open(store: Path, node: str):
    return Workspace(store).open_node(node)


# --------------------------------------------------- aggregate = "mean", independently
def _design(features: np.ndarray, frame_times: np.ndarray, bold_times: np.ndarray,
            lags: list[float], aggregate: str) -> tuple[np.ndarray, np.ndarray]:
    """Kept BOLD samples and their design rows, by plain loops: ``mean`` averages the
    frames shown in [t - L - TR, t - L), ``last`` takes the latest frame at or before
    t - L; a sample is kept when every window starts at or after 0 s and ends within
    the stimulus."""
    end = frame_times[-1] + 1 / FPS
    history = max(lags) + (TR if aggregate == "mean" else 0.0)
    kept, rows = [], []
    for s, t in enumerate(bold_times):
        if t - history < 0 or t - min(lags) >= end:
            continue
        row = []
        for lag in lags:
            if aggregate == "mean":
                window = (frame_times >= t - lag - TR) & (frame_times < t - lag)
                row.append(features[window].astype(np.float64).mean(axis=0))
            else:
                row.append(features[frame_times <= t - lag][-1].astype(np.float64))
        kept.append(s)
        rows.append(np.concatenate(row))
    return np.asarray(kept), np.asarray(rows)


def _sklearn_r_test(store: Path, lags: list[float], aggregate: str) -> np.ndarray:
    """(alpha, voxel) test r of scikit-learn's Ridge (intercept = centring on the
    training samples) on the NumPy design; the last TEST_SAMPLES samples are the test."""
    feats = _open(store, "features/r18/run-000")
    bold = _open(store, "bold/s/run-000")
    kept, X = _design(feats["features"].values, feats["time"].values, bold["time"].values,
                      lags, aggregate)
    Y = bold["bold"].values[kept].astype(np.float64)
    train, test = slice(0, len(kept) - TEST_SAMPLES), slice(len(kept) - TEST_SAMPLES, None)
    r = np.full((len(ALPHAS), Y.shape[1]), np.nan)
    for a, alpha in enumerate(ALPHAS):
        pred = Ridge(alpha=alpha).fit(X[train], Y[train]).predict(X[test])
        for v in range(Y.shape[1]):
            if np.std(Y[test, v]) > 0:
                r[a, v] = np.corrcoef(pred[:, v], Y[test, v])[0, 1]
    return r


@pytest.mark.parametrize("lags", LAG_SETS, ids=["lags-2", "lags-2-4"])
def test_mean_aggregate_fit_equals_sklearn_on_a_numpy_design(tiny, lags):
    store = tiny / "voxelflow.zarr"
    group = "fits/tiny/r18/lags-" + "-".join(f"{l:g}" for l in lags)
    fit = _open(store, group)
    assert Workspace(store).attrs(group)["aggregate"] == "mean"
    valid = fit["valid"].values.astype(bool)
    assert valid.sum() == 46 - 1  # the mask's voxels less the constant one
    expected = _sklearn_r_test(store, lags, "mean")
    got = fit["r_test"].values
    np.testing.assert_allclose(got[:, valid], expected[:, valid], rtol=0, atol=1e-4)
    # r_test_cv is r_test at each voxel's CV-selected alpha.
    best = fit["best_alpha"].values[valid]
    assert set(best.tolist()) <= set(ALPHAS)
    a_index = np.searchsorted(ALPHAS, best)
    np.testing.assert_array_equal(fit["r_test_cv"].values[valid],
                                  got[:, valid][a_index, np.arange(valid.sum())])
    # The check tells the aggregates apart: the "last" design scores otherwise.
    other = _sklearn_r_test(store, lags, "last")
    assert np.abs(other[:, valid] - got[:, valid]).max() > 0.05


# ------------------------------------------------------------------ ROI table, atlas
def test_roi_table_means_valid_voxels_of_each_atlas_label(tiny):
    store = tiny / "voxelflow.zarr"
    table = pd.read_csv(tiny / "reports" / "tiny" / "roi_table.csv")
    assert len(table) == len(LAG_SETS) * len(ROI_NAMES)
    atlas = _atlas()
    seen = set()
    for _, row in table.iterrows():
        fit = _open(store, "fits/tiny/r18/lags-" + str(row["lags"]).replace(",", "-"))
        label = atlas[fit["i"].values, fit["j"].values, fit["k"].values]
        r = fit["r_test_cv"].values
        sel = fit["valid"].values.astype(bool) & np.isfinite(r) & (label == row["roi"])
        assert row["model"] == "r18" and row["roi_name"] == ROI_NAMES[row["roi"]]
        assert row["n_voxels"] == sel.sum() > 0
        assert abs(row["mean_r"] - r[sel].astype(np.float64).mean()) < 1e-6
        seen.add((row["lags"], row["roi"]))
    assert seen == {(lags, roi) for lags in ("2", "2,4") for roi in ROI_NAMES}
    # ROI 1: 24 voxels on the grid, one outside the mask, the constant one counted out.
    assert (table[table["roi"] == 1]["n_voxels"] == 22).all()


# ------------------------------------------------- SIGKILL at a named write step
# The killed run is a child forked from the suite's CLI helper (tests/forked_cli.py:
# its own process and Zarr threads, no interpreter start-up); VOXELFLOW_FAULT makes it
# SIGKILL itself right after the first block of the run (a frames block: frames is the
# plan's first stage) is marked done (voxelflow/stores/faults.py), however loaded the
# machine is.
FIRST_BLOCK_MARKED = "block:marked@1"

# Attributes that may differ between two runs of the same request.  None do today
# (the stores hold no timestamps, host names or store paths); list one here, with
# the reason, if a stage starts recording such a thing.
VOLATILE_ATTRS: frozenset[str] = frozenset()


def _done_flags(store: Path, node: str) -> np.ndarray:
    try:
        return zarr.open_array(store / node / "block_done", mode="r")[...]
    except (FileNotFoundError, KeyError, ValueError):
        return np.zeros(0, np.uint8)


def _workspace_contents(store: Path) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Every array (path -> values) and every node's attrs (path -> dict, less
    VOLATILE_ATTRS) of a workspace, walked with zarr."""
    root = zarr.open_group(store, mode="r", use_consolidated=False)
    arrays, attrs = {}, {"/": dict(root.attrs)}
    for name, node in root.members(max_depth=None):
        attrs[name] = {k: v for k, v in node.attrs.items() if k not in VOLATILE_ATTRS}
        if isinstance(node, zarr.Array):
            arrays[name] = np.asarray(node[...])
    return arrays, attrs


def test_sigkill_mid_stage_then_rerun_equals_the_uninterrupted_run(tiny, forked):
    text = (tiny / "experiment.toml").read_text()
    text = text.replace('store = "voxelflow.zarr"', 'store = "killed.zarr"')
    exp_file = tiny / "killed.toml"
    exp_file.write_text(text.replace('reports = "reports"', 'reports = "killed_reports"'))
    store, group = tiny / "killed.zarr", "frames/movie"
    n_blocks = int(np.ceil(80 * FPS / 128))
    status, _, err = forked.run("run", str(exp_file), "--no-progress", cwd=tiny,
                                fault=FIRST_BLOCK_MARKED)
    assert status == -signal.SIGKILL, err
    done = _done_flags(store, f"{group}/run-000")
    assert done.size == n_blocks and 0 < done.sum() < n_blocks, done
    assert Workspace(store).state(group) == "writing"
    plan = build_plan(load_experiment(exp_file), progress=False)
    assert [(s.kind, s.action) for s in plan] == [
        ("frames", "resume"), ("bold", "run"), ("features", "run"), ("fit", "run"),
        ("fit", "run")]

    res = cli_here("run", str(exp_file), "--no-progress")  # the resume, in this process
    assert res.returncode == 0, res.stderr
    arrays, attrs = _workspace_contents(store)
    ref_arrays, ref_attrs = _workspace_contents(tiny / "voxelflow.zarr")
    assert sorted(arrays) == sorted(ref_arrays)
    assert {"frames/movie/run-000/frames", "features/r18/run-000/features",
            "bold/s/run-000/bold", "fits/tiny/r18/lags-2-4/r_test"} <= set(arrays)
    for name, ref in ref_arrays.items():
        got = arrays[name]
        assert (got.dtype, got.shape) == (ref.dtype, ref.shape), name
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(ref).tobytes(), name
    assert attrs == ref_attrs
    table = pd.read_csv(tiny / "killed_reports" / "tiny" / "table.csv")
    expected = pd.read_csv(tiny / "reports" / "tiny" / "table.csv")
    pd.testing.assert_frame_equal(table, expected)


# ------------------------------------------------- a workspace the workers cannot see
def test_run_refuses_a_workspace_the_workers_cannot_see(tiny, capsys, monkeypatch):
    """Workers that answer "no such path" for the workspace (as on a cluster without a
    shared file system): one error line naming it, exit 2, nothing made."""
    import distributed

    real_run = distributed.Client.run
    asked = []

    def run(self, fn, *args, **kwargs):
        if fn is os.path.exists:
            asked.append(args)
            return {worker: False for worker in real_run(self, os.getpid)}
        return real_run(self, fn, *args, **kwargs)

    monkeypatch.setattr(distributed.Client, "run", run)
    text = (tiny / "experiment.toml").read_text()
    exp_file = tiny / "blind.toml"
    exp_file.write_text(text.replace('store = "voxelflow.zarr"', 'store = "blind.zarr"'))
    line = cli_error(capsys, "run", str(exp_file), "--workers", "1", "--no-progress")
    store = os.path.abspath(tiny / "blind.zarr")
    assert line.startswith(f"voxelflow: error: {store}: not visible to dask worker(s) tcp://")
    assert "file system the workers share" in line
    assert asked and asked[0] == (store,)
    assert Workspace(tiny / "blind.zarr").state("frames/movie") != "complete"


# ------------------------------------------------------- voxelflow report, no refit
def _store_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file()}


def test_report_command_rebuilds_the_report_from_stored_fits_alone(tiny, tmp_path):
    store = tiny / "voxelflow.zarr"
    before = _store_files(store)
    expected = pd.read_csv(tiny / "reports" / "tiny" / "table.csv")
    for source, out in [(store, tmp_path / "from_store"),
                        (tiny / "experiment.toml", tmp_path / "from_toml")]:
        res = cli_here("report", str(source), "--out", str(out))
        assert res.returncode == 0, res.stderr
        assert f"report: {out / 'index.html'}" in res.stdout
        pd.testing.assert_frame_equal(pd.read_csv(out / "table.csv"), expected)
        for lags in ("2", "2-4"):
            assert (out / "viewers" / f"r18_lags-{lags}.html").stat().st_size > 10_000
            r_map = nib.load(str(out / "maps" / f"r18_lags-{lags}_r_cv.nii.gz")).get_fdata()
            fit = _open(store, f"fits/tiny/r18/lags-{lags}")
            np.testing.assert_array_equal(
                r_map[fit["i"].values, fit["j"].values, fit["k"].values],
                fit["r_test_cv"].values.astype(np.float32))  # NaN at invalid voxels in both
        assert (out / "maps" / "mean_epi.nii.gz").exists()
    assert (tmp_path / "from_toml" / "roi_table.csv").exists()  # the file's atlas
    assert _store_files(store) == before  # nothing written into the workspace
    empty = tmp_path / "empty.zarr"
    zarr.open_group(empty, mode="w", zarr_format=3)
    res = cli_here("report", str(empty))
    assert res.returncode == 2 and res.stderr.startswith("voxelflow: error: ")
    assert "no complete fits" in res.stderr and len(res.stderr.strip().splitlines()) == 1
