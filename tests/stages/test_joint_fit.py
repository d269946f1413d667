"""The joint fit (``voxelflow fit --features A B ...``): banded ridge through the fit
stage's block protocol, against the banded engine called directly, today's fit for
one space, resume after a crash, variance partitioning, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import cli_main
from test_fit import ALPHAS, _planted, _write_features
from voxelflow.pipeline.design.lags import build_design
from voxelflow.pipeline.ridge import banded_ridge, simplex_weightings
from voxelflow.pipeline.ridge.scoring import contiguous_folds
from voxelflow.pipeline.stages.bold import run_bold_stage
from voxelflow.pipeline.stages.fit import run_fit_stage
from voxelflow.pipeline.stages.joint_fit import joint_weights
from voxelflow.stores import Workspace
from voxelflow.stores.workspace import StageWriter

NO_STATS = ("--permutations", "0", "--bootstrap", "0")
COMMON = ("--bold", "s", "--lags", "4,5", "--alphas", ",".join(map(str, ALPHAS)),
          "--test-samples", "30", "--cv", "4", "--no-progress")


@pytest.fixture(scope="module")
def joint_ws(tmp_path_factory):
    """Features f (drive the BOLD), g (noise, 4 features, same frames), h (the
    second run 4 s shorter: at lag 0 its last 4 samples have no frame: other kept samples) and BOLD s."""
    tmp = tmp_path_factory.mktemp("joint")
    feats, paths = _planted(tmp)
    rng = np.random.default_rng(7)
    ws = Workspace(tmp / "ws.zarr")
    _write_features(ws, "f", feats)
    _write_features(ws, "g", [rng.normal(size=(f.shape[0], 4)) for f in feats])
    _write_features(ws, "h", [feats[0][:, :3], feats[1][:-16, :3]])
    run_bold_stage(ws, paths, "s", mask=paths[0].parent / "mask.nii.gz", progress=False)
    return ws, tmp


def _cli(capsys, ws, *args):
    """``voxelflow fit ARGS`` with the common options (ARGS' --lags wins)."""
    common = COMMON[:2] + (COMMON[4:] if "--lags" in args else COMMON[2:])
    code, out, err = cli_main(capsys, "fit", *args, *common, "--store", str(ws.path))
    return code, out, err


def test_one_features_group_is_todays_fit_bit_for_bit(joint_ws, capsys):
    ws, _ = joint_ws
    code, _, err = _cli(capsys, ws, "--features", "f", "--name", "one",
                        "--permutations", "20", "--bootstrap", "20")
    assert code == 0, err
    from voxelflow.pipeline.stats.per_block import StatisticsOptions
    s = run_fit_stage(ws, "f", "s", [4, 5], ALPHAS, test_samples=30, cv=4, name="today",
                      statistics=StatisticsOptions(permutations=20, bootstrap=20),
                      progress=False)
    got, want = ws.open_node("fits/one/lags-4-5"), ws.open_node(s.group)
    assert set(got.data_vars) == set(want.data_vars)
    for var in want.data_vars:
        np.testing.assert_array_equal(got[var].values, want[var].values, err_msg=var)


def _direct(ws, names, weightings, **kw):
    """banded_ridge on the same lagged arrays (train: all but the last 30)."""
    bold = [ws.open_run("bold/s", r) for r in range(2)]
    designs = [build_design(ws.open_runs(f"features/{n}"), bold, [4, 5], 1.0,
                            features_name=n, bold_name="s") for n in names]
    Xs = [np.asarray(d.X.compute(), np.float32) for d in designs]
    Y = np.asarray(designs[0].Y.compute(), np.float32)
    n = Y.shape[0] - 30
    return banded_ridge([x[:n] for x in Xs], Y[:n], [x[n:] for x in Xs], Y[n:], ALPHAS,
                        weightings, contiguous_folds(n, 4), **kw)


def _direct_test_bold(ws):
    """The last 30 lagged BOLD samples (the test set), float64."""
    bold = [ws.open_run("bold/s", r) for r in range(2)]
    design = build_design(ws.open_runs("features/f"), bold, [4, 5], 1.0)
    return np.asarray(design.Y.compute(), np.float64)[-30:]


def test_two_space_cli_equals_banded_ridge(joint_ws, capsys):
    ws, _ = joint_ws
    code, out, err = _cli(capsys, ws, "--features", "f", "g", "--weightings", "6",
                          "--save-weights", "--save-predictions", "--permutations", "50",
                          "--bootstrap", "20")
    assert code == 0, err
    fit = ws.open_node("fits/f+g__s/lags-4-5")
    ref = _direct(ws, ["f", "g"], simplex_weightings(2, 6, seed=0), return_weights=True)
    for var in ("r_test", "r_cv", "r_test_cv", "r2_test_cv", "r2_split", "space_alpha",
                "weights"):
        # stored as float32: the reference rounded to float32 the same way
        np.testing.assert_allclose(fit[var].values, ref[var].astype(np.float32), rtol=0,
                                   atol=1e-6, err_msg=var)
    np.testing.assert_array_equal(fit["best_weighting"].values, ref["best_weighting"])
    np.testing.assert_array_equal(fit["best_alpha"].values, ref["best_alpha"])
    assert list(fit["space"].values) == ["f", "g"]
    # the stored predictions are the joint model's at each voxel's choice (their r is
    # r_test_cv), and the permutation statistics are computed from them
    pred, y = fit["predictions"].values.astype(np.float64), _direct_test_bold(ws)
    r = [np.corrcoef(pred[:, v], y[:, v])[0, 1] for v in range(y.shape[1])]
    np.testing.assert_allclose(r, fit["r_test_cv"].values, atol=1e-5)
    assert np.isfinite(fit["p_perm"].values).all() and "bootstrap_mean_r" in fit
    # one space's weights by lag and feature: the columns of f at lag 5
    w = joint_weights(fit, "f")
    assert w.shape == (2, 6, 27)
    np.testing.assert_array_equal(w.sel(lag=5.0).values, ref["weights"][6:12])
    assert (fit["best_weighting"].values >= 0).all() and "f+g__s" in out
    assert "R^2 split between spaces (mean over voxels): f " in out


_WRITE_BLOCK_DATA = StageWriter.write_block_data


def _writes_then_interrupts(n_blocks):
    """A ``StageWriter.write_block_data`` that writes ``n_blocks`` blocks, then
    raises KeyboardInterrupt (a crash between blocks); and the blocks written."""
    original, written = _WRITE_BLOCK_DATA, []

    def write(self, run, block, arrays):
        if len(written) >= n_blocks:
            raise KeyboardInterrupt
        original(self, run, block, arrays)
        written.append(block)

    return write, written


def test_weightings_file_and_resume_after_crash(joint_ws, capsys, monkeypatch):
    ws, tmp = joint_ws
    table = tmp / "w.tsv"
    table.write_text("f\tg\n1\t1\n0.9\t0.1\n0.2\t0.8\n1\t0\n")
    full = _cli(capsys, ws, "--features", "f", "g", "--weightings", str(table),
                "--voxel-block", "10", "--name", "full", *NO_STATS)
    assert full[0] == 0, full[2]
    write, written = _writes_then_interrupts(1)
    monkeypatch.setattr(StageWriter, "write_block_data", write)
    code, _, err = _cli(capsys, ws, "--features", "f", "g", "--weightings", str(table),
                        "--voxel-block", "10", "--name", "crash", *NO_STATS)
    assert code == 130 and "resume" in err and written == [0]
    assert ws.state("fits/crash/lags-4-5") != "complete"
    write, written = _writes_then_interrupts(99)
    monkeypatch.setattr(StageWriter, "write_block_data", write)
    code, _, err = _cli(capsys, ws, "--features", "f", "g", "--weightings", str(table),
                        "--voxel-block", "10", "--name", "crash", *NO_STATS)
    assert code == 0 and written == [1, 2], err  # only the blocks not done
    got, want = ws.open_node("fits/crash/lags-4-5"), ws.open_node("fits/full/lags-4-5")
    for var in want.data_vars:
        np.testing.assert_array_equal(got[var].values, want[var].values, err_msg=var)
    ref = _direct(ws, ["f", "g"], [[1, 1], [0.9, 0.1], [0.2, 0.8], [1, 0]])
    np.testing.assert_array_equal(want["best_weighting"].values, ref["best_weighting"])


def test_partition_parts_sum_to_the_joint_r2(joint_ws, capsys):
    ws, _ = joint_ws
    code, _, err = _cli(capsys, ws, "--features", "f", "g", "--weightings", "4",
                        "--partition", "--name", "part", *NO_STATS)
    assert code == 0, err
    fit = ws.open_node("fits/part/lags-4-5")
    assert list(fit["part"].values) == ["f", "g", "f&g"]
    parts = fit["partition"].values.astype(np.float64)
    joint = fit["r2_test_cv"].values.astype(np.float64)
    np.testing.assert_allclose(parts.sum(axis=0), joint, atol=1e-5)
    # unique to f = R^2(f+g) - R^2(g alone), R^2(g alone) from today's single fit
    alone = {}
    for name in ("f", "g"):
        s = run_fit_stage(ws, name, "s", [4, 5], ALPHAS, test_samples=30, cv=4,
                          name=f"alone-{name}", progress=False)
        alone[name] = ws.open_node(s.group)["r2_test_cv"].values.astype(np.float64)
    np.testing.assert_allclose(parts[0], joint - alone["g"], atol=1e-5)
    np.testing.assert_allclose(parts[2], alone["f"] + alone["g"] - joint, atol=1e-5)
    assert np.nanmean(parts[0]) > np.nanmean(parts[1])  # f drives the BOLD


@pytest.mark.parametrize("args, message", [
    (("--features", "f", "f"), "'f' twice"),
    (("--features", "f", "h", "--lags", "0"), "f and h do not pair"),
    (("--features", "f", "g", "--weightings", "BAD.tsv"), "--weightings"),
    (("--features", "f", "g", "--weightings", "0"), "--weightings"),
    (("--features", "f", "--partition"), "need several --features"),
    (("--features", "f", "g", "g", "--partition"), "twice"),
])
def test_bad_joint_input_is_one_line(joint_ws, capsys, args, message):
    ws, _ = joint_ws
    code, _, err = _cli(capsys, ws, *args, *NO_STATS)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("rows, message", [
    ("1\t1\t1\n", "one value per feature space"),
    ("1\tnan\n", "finite"),
    ("1\t-0.5\n", ">= 0"),
])
def test_bad_weighting_rows_are_one_line(joint_ws, capsys, tmp_path, rows, message):
    ws, _ = joint_ws
    table = tmp_path / "w.tsv"
    table.write_text(rows)
    code, _, err = _cli(capsys, ws, "--features", "f", "g", "--weightings", str(table),
                        *NO_STATS)
    assert code == 2 and message in err and "--weightings" in err, err
    assert len(err.strip().splitlines()) == 1


def test_weightings_that_cannot_fit_in_memory_are_refused_up_front(joint_ws, capsys,
                                                                   monkeypatch):
    ws, _ = joint_ws
    from voxelflow.pipeline.execution import resources

    # too little even for one weighting at a time (spilling the others cannot help)
    monkeypatch.setattr(resources, "available_memory", lambda: (2e4, "available"))
    code, _, err = _cli(capsys, ws, "--features", "f", "g", "--weightings", "200",
                        "--name", "big", *NO_STATS)
    assert code == 2 and "fewer --weightings (gave 200)" in err, err
    assert len(err.strip().splitlines()) == 1 and ws.state("fits/big/lags-4-5") != "complete"
    monkeypatch.undo()
    code, _, err = _cli(capsys, ws, "--features", "f", "g", "--weightings", "2",
                        "--name", "big", *NO_STATS)
    assert code == 0, err


def test_spilled_factors_give_the_same_fit(joint_ws, capsys, monkeypatch):
    """Weightings whose factors do not fit in memory together go to the store's
    scratch space, one file per weighting, loaded one at a time per block: same
    outputs as the in-memory fit; the scratch is removed once the fit is complete."""
    ws, _ = joint_ws
    from voxelflow.pipeline.stages import _joint_request, joint_fit
    args = ("--features", "f", "g", "--weightings", "3", "--partition",
            "--save-weights", *NO_STATS)
    code, _, err = _cli(capsys, ws, *args, "--name", "kept")
    assert code == 0, err
    loads = []
    original = joint_fit.ridge.SpilledFactors.load
    monkeypatch.setattr(_joint_request, "_spill_needed", lambda need: True)
    monkeypatch.setattr(joint_fit.ridge.SpilledFactors, "load",
                        lambda self: loads.append(self.path) or original(self))
    code, _, err = _cli(capsys, ws, *args, "--name", "spilled")
    assert code == 0, err
    assert loads and all("/.scratch/" in path for path in loads)
    assert not (ws.path / ".scratch" / "fits" / "spilled").exists()
    kept = ws.open_node("fits/kept/lags-4-5")
    spilled = ws.open_node("fits/spilled/lags-4-5")
    for var in ("r_cv", "r_test_cv", "best_weighting", "space_alpha", "r2_split",
                "partition", "weights"):
        np.testing.assert_array_equal(spilled[var].values, kept[var].values, err_msg=var)


def test_joint_fit_on_a_dask_cluster_equals_the_threaded_fit(joint_ws, capsys):
    """``--scheduler``: the voxel blocks run as tasks on 2 process workers with the
    work object (every weighting's factors) scattered once; same outputs as here."""
    distributed = pytest.importorskip("distributed")
    ws, _ = joint_ws
    args = ("--features", "f", "g", "--weightings", "3", "--partition", "--save-weights",
            "--voxel-block", "10", *NO_STATS)
    code, _, err = _cli(capsys, ws, *args, "--name", "here")
    assert code == 0, err
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=50) as cluster:
        code, _, err = _cli(capsys, ws, *args, "--name", "cluster", "--scheduler",
                            cluster.scheduler_address)
        assert code == 0, err
        with distributed.Client(cluster, set_as_default=False) as client:
            prefixes = client.run_on_scheduler(
                lambda dask_scheduler: list(dask_scheduler.task_prefixes))
    import dask
    assert dask.config.get("scheduler", None) != "dask.distributed"  # no stale client
    assert {"voxelflow", "JointFitWork"} <= set(prefixes), prefixes
    here, there = ws.open_node("fits/here/lags-4-5"), ws.open_node("fits/cluster/lags-4-5")
    np.testing.assert_array_equal(there["best_weighting"].values,
                                  here["best_weighting"].values)
    for var in ("r_cv", "r_test_cv", "space_alpha", "r2_split", "partition", "weights"):
        np.testing.assert_allclose(there[var].values, here[var].values, rtol=1e-5,
                                   atol=1e-6, err_msg=var)
