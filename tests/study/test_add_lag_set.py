"""``voxelflow run`` after a lag set is added (``frames = "needed"``): frames and
features are extended (only the new times computed), the fits of the lag sets that were
already there stay done, untouched, and only the new fit runs; every stored result
equals that of a run of the final experiment from scratch."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from store_snapshot import differences, snapshot
from voxelflow.pipeline.study.config import load_experiment
from voxelflow.pipeline.study.plan import build_plan
from voxelflow.pipeline.study.run import execute_plan
from voxelflow.pipeline.synthetic.movies import write_moving_video
from voxelflow.stores import Workspace

EXPERIMENT = """
experiment = {{ name = "e", store = "{store}", reports = "reports" }}
stimulus = {{ name = "m", videos = ["{inputs}/movie.mp4"], fps = 4, size = 32 }}
bold = {{ subject = "s", runs = ["{inputs}/bold.nii.gz"], mask = "{inputs}/mask.nii.gz" }}
models = [{{ name = "r18", model = "resnet18", weights = "random:0", pool = "avg" }}]
fit = {{ lag_sets = {lag_sets}, alphas = [10, 1000], test_samples = 6, cv = 2 }}
"""
OLD, NEW = "[[2]]", "[[2], [3]]"
FITS = {"[[2]]": ["fits/e/r18/lags-2"], "[[2], [3]]": ["fits/e/r18/lags-2", "fits/e/r18/lags-3"]}


def _experiment(folder: Path, inputs: Path, lag_sets: str):
    folder.mkdir(exist_ok=True)
    path = folder / "experiment.toml"
    path.write_text(EXPERIMENT.format(store=folder / "ws.zarr", inputs=inputs,
                                      lag_sets=lag_sets))
    return load_experiment(path)


def _run(exp) -> list:
    """Plan and run the stages (no report); return the plan."""
    ws = Workspace(exp.store)
    stages = build_plan(exp, ws, progress=False)
    execute_plan(ws, stages, log=lambda line: None)
    return stages


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Inputs (a 40 s movie, 20 volumes at TR 2 s on 8 voxels); the experiment run with
    one lag set then with two, and a run of the two from scratch."""
    base = tmp_path_factory.mktemp("add-lag-set")
    inputs = base / "inputs"
    inputs.mkdir()
    write_moving_video(inputs / "movie.mp4", 40, rate=8, size=(32, 32), seed=2)
    rng = np.random.default_rng(1)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    img = nib.Nifti1Image(rng.normal(100, 5, size=(2, 2, 2, 20)).astype(np.float32), affine)
    img.header["pixdim"][4] = 2.0
    nib.save(img, str(inputs / "bold.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.uint8), affine), str(inputs / "mask.nii.gz"))

    grown = base / "grown"
    _run(_experiment(grown, inputs, OLD))
    store = grown / "ws.zarr"
    before = {g: snapshot(store, g) for g in FITS[OLD]}
    mtimes = {p: p.stat().st_mtime_ns for p in (store / FITS[OLD][0]).rglob("*") if p.is_file()}
    old_times = Workspace(store).open_run("features/r18", 0)["time"].values
    plan = _run(_experiment(grown, inputs, NEW))
    scratch = base / "scratch"
    _run(_experiment(scratch, inputs, NEW))
    return {"grown": store, "scratch": scratch / "ws.zarr", "plan": plan, "before": before,
            "mtimes": mtimes, "old_times": old_times}


def test_only_the_new_fit_runs_and_the_old_one_is_untouched(runs):
    actions = {stage.group: (stage.action, stage.extends) for stage in runs["plan"]}
    assert actions["frames/m"] == ("rerun", True)
    assert actions["features/r18"] == ("rerun", True)
    assert actions["bold/s"][0] == "skip"
    assert actions["fits/e/r18/lags-2"][0] == "skip"
    assert actions["fits/e/r18/lags-3"][0] == "run"
    store = runs["grown"]
    for group, snap in runs["before"].items():
        assert not differences(snapshot(store, group), snap), group
    assert {p: p.stat().st_mtime_ns for p in (store / FITS[OLD][0]).rglob("*")
            if p.is_file()} == runs["mtimes"]
    ws = Workspace(store)
    assert ws.state("fits/e/r18/lags-3") == "complete"
    # the extension added times and kept the old ones
    assert np.isin(runs["old_times"], ws.open_run("features/r18", 0)["time"].values).all()
    assert ws.open_run("features/r18", 0).sizes["time"] > runs["old_times"].size
    again = build_plan(load_experiment(store.parent / "experiment.toml"), ws, progress=False)
    assert {stage.action for stage in again} == {"skip"}


def test_grown_store_equals_a_run_from_scratch(runs):
    grown, scratch = Workspace(runs["grown"]), Workspace(runs["scratch"])
    for group in ("frames/m", "features/r18"):
        a, b = grown.open_run(group, 0), scratch.open_run(group, 0)
        assert np.array_equal(a["time"].values, b["time"].values), group
        var = "frames" if group.startswith("frames") else "features"
        assert np.array_equal(a[var].values, b[var].values), group
    for group in FITS[NEW]:
        a, b = grown.open_node(group), scratch.open_node(group)
        for var in ("r_test", "r_cv", "best_alpha"):
            assert np.array_equal(a[var].values, b[var].values, equal_nan=True), (group, var)
