"""Your own features: ``voxelflow.write_features`` (round trips, float32, resume,
conflicts), ``voxelflow import-features`` for every file kind against the source
values, imported features in the lagged design, and one-line errors for bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import voxelflow
from bold_inputs import cli_main, tree_bytes
from conftest import cli_error
from voxelflow.pipeline.design.lags import build_design
from voxelflow.pipeline.errors import InputError, WorkspaceConflict
from voxelflow.stores import Workspace
from voxelflow.stores.stage import StageWriter

RNG = np.random.default_rng(3)
NAMES = ["loud", "pitch", "speech"]


def _runs(n_times=(50, 37), irregular=True) -> list[xr.DataArray]:
    """float64 runs with names and (for the second) irregular, increasing times."""
    runs = []
    for r, n in enumerate(n_times):
        times = np.arange(n) * 0.25
        if irregular and r == 1:
            times = np.cumsum(RNG.uniform(0.1, 0.6, n))
        runs.append(xr.DataArray(RNG.normal(size=(n, len(NAMES))), dims=("time", "feature"),
                                 coords={"time": times, "feature": NAMES}))
    return runs


def test_write_features_round_trip_float32_with_a_warning(tmp_path):
    runs = _runs()
    runs[1] = runs[1].chunk({"time": 10})  # dask-backed works too
    with pytest.warns(UserWarning, match="float64 are stored as float32"):
        summary = voxelflow.write_features(tmp_path / "ws.zarr", "audio", runs=runs)
    assert summary["blocks_written"] == 2 and summary["converted"] == ["float64"]
    tree = xr.open_datatree(tmp_path / "ws.zarr", engine="zarr")
    for r, run in enumerate(runs):
        node = tree[f"features/audio/run-{r:03d}"].to_dataset()
        assert node["features"].dtype == np.float32
        assert node["features"].dims == ("time", "feature")
        np.testing.assert_array_equal(node["features"].values, run.values.astype(np.float32))
        np.testing.assert_array_equal(node["time"].values, run["time"].values)
        assert node["feature"].values.tolist() == NAMES
        assert (node["run"].values == r).all()
    ws = Workspace(tmp_path / "ws.zarr")
    assert ws.state("features/audio") == "complete"
    assert ws.attrs("features/audio")["source"] == "arrays"
    # float32 input: no warning; a group read back is writable again, identically
    back = [ws.open_run("features/audio", r)["features"] for r in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        voxelflow.write_features(ws, "again", runs=back)
    for r in range(2):
        xr.testing.assert_equal(ws.open_run("features/again", r)["features"].load(),
                                    back[r].load())


def test_write_features_resumes_byte_identical_and_refuses_other_content(tmp_path,
                                                                       monkeypatch):
    runs = [r.astype(np.float32) for r in _runs(n_times=(40, 40, 40), irregular=False)]
    whole = Workspace(tmp_path / "whole.zarr")
    voxelflow.write_features(whole, "f", runs=runs, block_size=16)
    original = StageWriter.write_block_data
    calls = {"n": 0}

    def stop(self, run, block, arrays):
        if calls["n"] == 4:
            raise KeyboardInterrupt
        calls["n"] += 1
        original(self, run, block, arrays)

    cut = Workspace(tmp_path / "cut.zarr")
    monkeypatch.setattr(StageWriter, "write_block_data", stop)
    with pytest.raises(KeyboardInterrupt):
        voxelflow.write_features(cut, "f", runs=runs, block_size=16)
    monkeypatch.setattr(StageWriter, "write_block_data", original)
    assert cut.state("features/f") == "writing"
    summary = voxelflow.write_features(cut, "f", runs=runs, block_size=16)
    assert summary["blocks_skipped"] == 4 and summary["blocks_written"] == 5
    assert tree_bytes(cut.path / "features") == tree_bytes(whole.path / "features")
    again = voxelflow.write_features(cut, "f", runs=runs, block_size=16)
    assert again["blocks_written"] == 0
    changed = [runs[0] + 1, runs[1], runs[2]]
    with pytest.raises(WorkspaceConflict, match="other parameters"):
        voxelflow.write_features(cut, "f", runs=changed, block_size=16)
    voxelflow.write_features(cut, "f", runs=changed, block_size=16, overwrite=True)
    np.testing.assert_array_equal(cut.open_run("features/f", 0)["features"].values,
                                  changed[0].values)


@pytest.fixture
def sources(tmp_path):
    """The same two runs as .tsv (times column), .csv, .npy, .npz, .nc and .zarr."""
    runs = _runs(irregular=False)
    out = {}
    for r, run in enumerate(runs):
        table = pd.DataFrame(run.values, columns=NAMES)
        table.insert(0, "t", run["time"].values)
        table.to_csv(tmp_path / f"r{r}.tsv", sep="\t", index=False)
        table.drop(columns="t").to_csv(tmp_path / f"r{r}.csv", index=False)
        np.save(tmp_path / f"r{r}.npy", run.values)
        np.savez(tmp_path / f"r{r}.npz", emb=run.values)
        ds = run.rename(feature="unit").to_dataset(name="emb")
        ds["unit"] = ds["unit"].astype(object)
        ds.to_netcdf(tmp_path / f"r{r}.nc")
        ds.to_zarr(tmp_path / f"r{r}.zarr", mode="w")
        out.setdefault("runs", []).append(run)
    out["dir"] = tmp_path
    return out


@pytest.mark.parametrize("kind, options, named", [
    ("tsv", ["--times-column", "t"], True),
    ("csv", ["--rate", "4"], True),
    ("npy", ["--rate", "4"], False),
    ("npz", ["--rate", "4"], False),
    ("nc", [], True),
    ("zarr", [], True),
])
def test_import_features_from_every_kind_of_file(sources, capsys, kind, options, named):
    files = [str(sources["dir"] / f"r{r}.{kind}") for r in range(2)]
    store = sources["dir"] / "ws.zarr"
    code, out, err = cli_main(capsys, "import-features", *files, "--name", kind, *options,
                              "--store", str(store))
    assert code == 0, err
    assert "stored as float32" in out and "2 run(s), 50 + 37 samples, 3 feature(s)" in out
    ws = Workspace(store)
    expected_names = NAMES if named else [f"unit-{i:04d}" for i in range(3)]
    for r, run in enumerate(sources["runs"]):
        got = ws.open_run(f"features/{kind}", r)
        np.testing.assert_array_equal(got["features"].values, run.values.astype(np.float32))
        np.testing.assert_allclose(got["time"].values, run["time"].values, rtol=0, atol=1e-12)
        assert got["feature"].values.tolist() == expected_names
    assert ws.params(f"features/{kind}")["stage"] == "import"


def test_imported_features_that_start_late_drop_samples_without_history():
    """Features whose first sample is at 3 s: no design row may reach before it."""
    feats = xr.Dataset({"features": (("time", "feature"), np.arange(20.0)[:, None])},
                       coords={"time": 3.0 + np.arange(20) * 0.5})
    bold = xr.Dataset({"bold": (("time", "voxel"), np.zeros((7, 1), np.float32))},
                      coords={"time": np.arange(7) * 2.0})
    design = build_design([feats], [bold], [2.0], 2.0, aggregate="last")
    assert design.time.tolist() == [6.0, 8.0, 10.0, 12.0]  # t - 2 >= 3
    # the sample at or before t - 2: t = 6 -> 4 s = row 2
    np.testing.assert_array_equal(design.X.compute()[:, 0], [2, 6, 10, 14])


BAD_FILES = [
    ("unknown suffix", "x.bin", b"1", [], "unknown kind of file"),
    ("no rate", "x.csv", b"a,b\n1,2\n", [], "give --rate HZ"),
    ("text column", "x.csv", b"a,b\n1,x\n", ["--rate", "1"], "are not numbers"),
    ("no times column", "x.tsv", b"a\tb\n1\t2\n", ["--times-column", "t"], "no column 't'"),
    ("times not increasing", "x.tsv", b"t\ta\n1\t2\n0.5\t3\n", ["--times-column", "t"],
     "time must increase strictly"),
    ("times column on npy", "x.npy", None, ["--times-column", "t"], "for .tsv/.csv tables"),
    ("nan value", "x.csv", b"a,b\n1,2\n3,nan\n", ["--rate", "1"], "NaN or infinite value"),
    ("not a table", "x.csv", b"", ["--rate", "1"], "empty file"),
    ("3-D array", "x3.npy", None, ["--rate", "1"], "expected (time, feature)"),
    ("not an array", "x.npy", b"garbage", ["--rate", "1"], "not a NumPy array file"),
]


@pytest.mark.parametrize("what, name, content, options, expected", BAD_FILES,
                         ids=[b[0] for b in BAD_FILES])
def test_bad_feature_files_are_one_line_and_write_nothing(tmp_path, capsys, what, name,
                                                          content, options, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    else:
        np.save(path, np.zeros((4, 2, 2)) if name == "x3.npy" else np.zeros((4, 2)))
    msg = cli_error(capsys, "import-features", str(path), "--name", "f", *options,
                    "--store", str(tmp_path / "ws.zarr"))
    assert expected in msg, msg
    assert Workspace(tmp_path / "ws.zarr").state("features/f") is None


def test_bad_datasets_are_one_line(tmp_path, capsys):
    store = str(tmp_path / "ws.zarr")
    two = xr.Dataset({"a": ("time", np.zeros(3)), "b": ("time", np.ones(3))},
                     coords={"time": [0.0, 1.0, 2.0]})
    two.to_netcdf(tmp_path / "two.nc")
    msg = cli_error(capsys, "import-features", str(tmp_path / "two.nc"), "--name", "f",
                    "--store", store)
    assert "several variables have a 'time' dimension (a, b)" in msg
    dated = xr.Dataset({"a": ("time", np.zeros(3))},
                       coords={"time": pd.date_range("2024-01-01", periods=3, freq="s")})
    dated.to_netcdf(tmp_path / "dated.nc")
    msg = cli_error(capsys, "import-features", str(tmp_path / "dated.nc"), "--name", "f",
                    "--store", store)
    assert "time is a date" in msg
    msg = cli_error(capsys, "import-features", str(tmp_path / "two.nc"), "--name", "f",
                    "--variable", "a", "--rate", "2", "--store", store)
    assert "own time coordinate; drop --rate" in msg


def _da(values, times=None, **coords):
    times = np.arange(len(values)) * 0.5 if times is None else times
    return xr.DataArray(values, dims=("time", "feature"), coords={"time": times, **coords})


@pytest.mark.parametrize("runs, expected", [
    ([], "non-empty list"),
    ([np.zeros((3, 2))], "expected an xarray.DataArray"),
    ([xr.Dataset()], "not a Dataset"),
    ([xr.DataArray(np.zeros((3, 2)), dims=("t", "f"))], "dims must be (time, feature)"),
    ([xr.DataArray(np.zeros((3, 2)), dims=("time", "feature"))], "no time coordinate"),
    ([_da(np.zeros((3, 2)), times=[0.0, 2.0, 1.0])], "time must increase strictly"),
    ([_da(np.array([[1.0, np.inf]]))], "NaN or infinite value at time 0 s"),
    ([_da(np.array([["a", "b"]]))], "values must be real numbers"),
    ([_da(np.zeros((2, 2)), feature=["x", "x"])], "repeated: x"),
    ([_da(np.zeros((2, 2)), feature=["x", "y"]), _da(np.zeros((2, 2)), feature=["x", "z"])],
     "run 1: feature names differ from run 0's (unknown: z)"),
    ([_da(np.zeros((2, 2))), _da(np.zeros((2, 3)))], "run 1: 3 features but run 0 has 2"),
])
def test_write_features_refuses_bad_arrays(tmp_path, runs, expected):
    ws = Workspace(tmp_path / "ws.zarr")
    with pytest.raises(InputError) as err:
        voxelflow.write_features(ws, "f", runs=runs)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert ws.state("features/f") is None


def test_dask_backed_nan_leaves_the_group_unfinished(tmp_path):
    values = np.zeros((40, 2))
    values[35, 1] = np.nan
    run = _da(values).chunk({"time": 8})
    ws = Workspace(tmp_path / "ws.zarr")
    with pytest.raises(InputError, match="NaN or infinite value at time 17.5 s"):
        voxelflow.write_features(ws, "f", runs=[run], block_size=16)
    assert ws.state("features/f") == "writing"
    assert ws.list_groups("features") == []
