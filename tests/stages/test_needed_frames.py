"""Needed frames only: sparse time coordinate, designs and fits bit-identical to those
from every frame, refusal with the extension command, extension computes only the
missing times, and groups made at full rate keep working."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bold_inputs import write_nifti
from voxelflow.pipeline.design.lags import build_design
from voxelflow.pipeline.design.lags import needed_frame_indices
from voxelflow.pipeline.design.needed import MissingTimes
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.stages.bold import run_bold_stage
from voxelflow.pipeline.stages.features import run_features_stage
from voxelflow.pipeline.stages.fit import run_fit_stage
from voxelflow.pipeline.stages.frames import run_frames_stage, sample_times
from voxelflow.pipeline.stages.needed_frames import NeededFrames
from voxelflow.pipeline.synthetic.movies import write_moving_video
from voxelflow.stores import Workspace

FPS, TR, SECONDS = 10.0, 1.0, 16
LAGS = [[2.0], [2.0, 3.5]]


@pytest.fixture(scope="module")
def full_store(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Two short runs: full-rate frames and features (resnet18, random weights),
    and BOLD at TR 1 s."""
    d = tmp_path_factory.mktemp("needed")
    videos = [d / f"run{r}.mp4" for r in range(2)]
    for r, v in enumerate(videos):
        write_moving_video(v, SECONDS, rate=24, size=(48, 64), seed=r)
    rng = np.random.default_rng(0)
    bold = [write_nifti(d / f"bold{r}.nii", rng.normal(size=(2, 2, 2, SECONDS)).astype(
        np.float32), tr=TR) for r in range(2)]
    mask = write_nifti(d / "mask.nii", np.ones((2, 2, 2), np.uint8))
    ws = Workspace(d / "ws.zarr")
    run_bold_stage(ws, bold, "s1", mask=mask, progress=False)
    run_frames_stage(ws, videos, "all", fps=FPS, size=32, progress=False)
    run_features_stage(ws, "all", "resnet18", weights="random:0", name="f_all",
                       pool="avg", progress=False)
    return ws.path, videos


@pytest.fixture
def ws(full_store, tmp_path) -> Workspace:
    dest = tmp_path / "ws.zarr"
    shutil.copytree(full_store[0], dest)
    return Workspace(dest)


def _sparse(ws: Workspace, videos, lag_sets, aggregate="last", extend=False, name="need"):
    needed = NeededFrames(bold="s1", lag_sets=tuple(map(tuple, lag_sets)),
                          aggregate=aggregate, extend=extend)
    summary = run_frames_stage(ws, videos, name, fps=FPS, size=32, needed=needed,
                               progress=False)
    feats = run_features_stage(ws, name, "resnet18", weights="random:0", name=f"f_{name}",
                               pool="avg", progress=False)
    return summary, feats


@pytest.mark.parametrize("aggregate", ["last", "mean"])
def test_sparse_design_equals_full_design_bit_for_bit(ws, full_store, aggregate):
    summary, feats = _sparse(ws, full_store[1], LAGS, aggregate)
    full = ws.open_runs("frames/all")
    sparse = ws.open_runs("frames/need")
    for r, (f, s) in enumerate(zip(full, sparse)):
        grid = f["time"].values
        assert np.array_equal(grid, sample_times(SECONDS, FPS)[:grid.size])
        # exactly the frames the design rule picks, each frame's pixels the same
        want = needed_frame_indices(grid, np.arange(SECONDS) * TR, LAGS, TR, aggregate)
        assert np.array_equal(s["time"].values, grid[want])
        assert np.array_equal(s["frames"].values, f["frames"].values[want])
        assert s.sel(time=grid[want[3]])["frames"].shape == (32, 32, 3)
    if aggregate == "last":  # 3 lags x 1 frame per TR out of 10
        assert sum(summary["frames"]) < sum(summary["grid_frames"]) / 3
    assert ws.attrs("frames/need")["frames"] == "needed"
    assert ws.params("features/f_need")["frames"]["params"]["times"]["needed_for"][0][
        "lag_sets"] == LAGS
    bold = ws.open_runs("bold/s1")
    for lags in LAGS:
        a = build_design(ws.open_runs("features/f_all"), bold, lags, TR, aggregate=aggregate)
        b = build_design(ws.open_runs("features/f_need"), bold, lags, TR, aggregate=aggregate)
        assert a.dropped == b.dropped
        assert np.array_equal(a.X.compute(), b.X.compute())


def test_fit_outputs_identical_then_refuse_then_extend(ws, full_store):
    _sparse(ws, full_store[1], [[2.0]])
    kw = dict(test_samples=6, cv=2, progress=False)
    run_fit_stage(ws, "f_all", "s1", [2.0], [1.0, 10.0], name="a", **kw)
    run_fit_stage(ws, "f_need", "s1", [2.0], [1.0, 10.0], name="b", **kw)
    fa, fb = ws.open_node("fits/a/lags-2"), ws.open_node("fits/b/lags-2")
    for var in ("r_test", "best_alpha", "r_cv"):
        assert np.array_equal(fa[var].values, fb[var].values, equal_nan=True), var
    with pytest.raises(MissingTimes, match=r"--times-from-bold s1 --lags 2.5 --extend"):
        run_fit_stage(ws, "f_need", "s1", [2.5], [1.0], name="c", **kw)
    before = ws.open_run("features/f_need", 0)["features"].values.copy()
    old_times = ws.open_run("features/f_need", 0)["time"].values
    summary, feats = _sparse(ws, full_store[1], [[2.5]], extend=True)
    n_old = sum(ds.sizes["time"] for ds in ws.open_runs("features/f_all"))
    assert 0 < summary["reused_frames"] < n_old
    new = ws.open_run("features/f_need", 0)
    pos = np.searchsorted(new["time"].values, old_times)
    assert np.array_equal(new["features"].values[pos], before)
    assert feats["frames_computed"] == sum(feats["frames"]) - feats["reused_frames"]
    run_fit_stage(ws, "f_need", "s1", [2.5], [1.0], name="c", **kw)  # now it works


def test_needed_indices_against_hand_arithmetic():
    """Independent of the design code: the frame at t - L on a k / fps grid is
    floor((t - L) * fps); a BOLD sample is kept when t - max(L) >= 0 and t - min(L)
    is before the stimulus ends."""
    fps, tr, n_frames = 20.0, 1.0, 400
    grid = np.arange(n_frames) / fps
    bold = np.arange(20) * tr
    lag_sets = [[4.0], [4.0, 4.5, 5.0, 5.5]]
    want = set()
    for lags in lag_sets:
        for t in bold:
            if t - max(lags) >= 0 and t - min(lags) < n_frames / fps:
                want |= {int(np.floor((t - lag) * fps + 1e-9)) for lag in lags}
    got = needed_frame_indices(grid, bold, lag_sets, tr)
    assert got.tolist() == sorted(want)
    mean = needed_frame_indices(grid, bold, [[4.0]], tr, "mean")
    assert mean.tolist() == list(range(0, int((19 - 4) * fps)))


def test_bad_requests_are_one_line_errors(tmp_path, capsys):
    from voxelflow import cli

    video = tmp_path / "v.mp4"
    write_moving_video(video, 2, rate=24, size=(32, 32))
    times = tmp_path / "times.txt"
    times.write_text("0.5\nsoon\n")
    store = str(tmp_path / "ws.zarr")
    for args, message in (
            (["--lags", "4"], "--lags and --extend need --times-from-bold"),
            (["--times", str(times)], f"--times {times}:2: expected 'time' or 'run,time'"),
            (["--times-from-bold", "nobody", "--lags", "4"], "no group /bold/nobody")):
        code = cli.main(["frames", str(video), "--name", "x", "--store", store, *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and "\n" not in err, err


def test_disk_check_counts_only_the_needed_frames(ws, full_store, monkeypatch):
    """Issue 12's disk check of the frames stage: a sparse group needs room for its
    stored frames only, not for every sample of the grid."""
    from voxelflow.pipeline.execution import resources
    from voxelflow.pipeline.stages.frames import frames_disk_bytes

    grid = 2 * SECONDS * int(FPS)  # every sample of both runs
    monkeypatch.setattr(resources, "free_disk", lambda path: frames_disk_bytes(grid // 2, 32))
    summary = run_frames_stage(ws, full_store[1], "few", fps=FPS, size=32, progress=False,
                               needed=NeededFrames(bold="s1", lag_sets=((2.0,),)))
    assert sum(summary["frames"]) < grid // 2 <= sum(summary["grid_frames"])
    with pytest.raises(InputError, match="on disk but"):
        run_frames_stage(ws, full_store[1], "every", fps=FPS, size=32, progress=False)
