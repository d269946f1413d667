"""``voxelflow events``: boxcars against a fine-grid numerical integral, the same
integral at any rate, the lagged design of events at several rates (``aggregate =
"mean"``) against the covered fraction of each window, resume after an interruption
(byte-identical), and one-line errors for every class of bad events file or option."""

from __future__ import annotations

import numpy as np
import pytest

from bold_inputs import cli_main, tree_bytes
from conftest import cli_error
from voxelflow.pipeline.design.lags import build_design
from voxelflow.pipeline.stages.events import (boxcars, check_events_options,
                                              events_to_features, read_events)
from voxelflow.stores import Workspace
from voxelflow.stores.stage import StageWriter

HEADER = "onset\tduration\ttrial_type\tloudness\n"
# Onsets and durations off every sampling grid below; "b" events touch (no overlap).
RUN0 = [(1.3, 2.7, "a", 0.5), (4.0, 3.05, "b", 2.0), (7.05, 1.0, "b", 1.0), (9.9, 4.0, "a", 3.0)]
RUN1 = [(0.0, 1.75, "b", 1.0), (3.2, 0.4, "a", 2.0), (6.6, 2.2, "a", 0.5)]
SECONDS = 12.0  # the runs last 12 s (the last "a" event of run 0 is cut at 12 s)


def _write(path, rows, header=HEADER):
    path.write_text(header + "".join("\t".join(str(v) for v in row) + "\n" for row in rows))
    return path


@pytest.fixture
def files(tmp_path):
    return [_write(tmp_path / "run0.tsv", RUN0), _write(tmp_path / "run1.tsv", RUN1)]


def _coverage(rows, category, lo, hi, column=None):
    """Seconds of [lo, hi) covered by ``category``'s events (or, with ``column``, the
    sum of their heights x seconds): an independent interval intersection."""
    total = 0.0
    for onset, duration, cat, loud in rows:
        if column is None and cat != category:
            continue
        overlap = max(0.0, min(hi, onset + duration, SECONDS) - max(lo, onset, 0.0))
        total += overlap * (loud if column else 1.0)
    return total


@pytest.mark.parametrize("rate", [20.0, 3.0, 0.5])
def test_boxcars_are_the_covered_fraction_of_each_sample(files, rate):
    arrays, _ = events_to_features(files, check_events_options(rate), [SECONDS] * 2)
    for rows, arr in zip((RUN0, RUN1), arrays):
        assert arr.dtype == np.float32 and arr.dims == ("time", "feature")
        assert arr["feature"].values.tolist() == ["a", "b"]
        n = int(np.ceil(SECONDS * rate))
        np.testing.assert_allclose(arr["time"].values, np.arange(n) / rate)
        for f, cat in enumerate(("a", "b")):
            expected = [_coverage(rows, cat, k / rate, (k + 1) / rate) * rate for k in range(n)]
            np.testing.assert_allclose(arr.values[:, f], expected, atol=1e-6)
            # the integral over time is the covered duration whatever the rate
            assert arr.values[:, f].sum() / rate == pytest.approx(
                _coverage(rows, cat, 0, SECONDS), abs=1e-5)


def test_amplitude_heights_add_up_where_events_overlap(tmp_path):
    rows = [(1.0, 4.0, "a", 2.0), (3.0, 2.0, "b", 0.5)]  # overlap in [3, 5)
    path = _write(tmp_path / "amp.tsv", rows)
    arr = events_to_features([path], check_events_options(1.0, amplitude="loudness"),
                             [SECONDS])[0][0]
    assert arr["feature"].values.tolist() == ["loudness"]
    np.testing.assert_allclose(arr.values[:6, 0], [0, 2, 2, 2.5, 2.5, 0])


def test_a_fine_grid_integral_agrees_with_the_boxcar(files):
    """A 1 ms numerical integral of the indicator (the definition) against 4 Hz samples."""
    arr = events_to_features(files, check_events_options(4.0), [SECONDS] * 2)[0][0]
    fine = np.arange(0, SECONDS, 0.001) + 0.0005
    indicator = np.zeros(fine.size)
    for onset, duration, cat, _ in RUN0:
        if cat == "a":
            indicator[(fine >= onset) & (fine < onset + duration)] = 1.0
    by_sample = indicator.reshape(-1, 250).mean(axis=1)
    np.testing.assert_allclose(arr.values[:, 0], by_sample, atol=1e-9)


@pytest.mark.parametrize("rate", [1.0, 2.0, 4.0])
def test_lagged_design_of_events_at_any_rate_with_aggregate_mean(files, rate):
    """With ``aggregate = "mean"`` each lag's column is the mean of the samples in
    [t - L - TR, t - L): for windows on the sample grid, exactly the covered fraction
    of the window, whatever the rate -- also for a rate below 1 / TR."""
    import xarray as xr

    tr, lags = 2.0, [2.0, 3.0]
    arrays = events_to_features(files, check_events_options(rate), [SECONDS] * 2)[0]
    feats = [a.to_dataset(name="features") for a in arrays]
    bold = [xr.Dataset({"bold": (("time", "voxel"), np.zeros((6, 1), np.float32))},
                       coords={"time": np.arange(6) * tr}) for _ in arrays]
    design = build_design(feats, bold, lags, tr, aggregate="mean")
    X = design.X.compute()
    assert design.feature_names.tolist() == ["a", "b"]
    rows = []
    for r, events in enumerate((RUN0, RUN1)):
        for t in np.arange(6) * tr:
            if t - max(lags) - tr >= 0:
                rows.append([_coverage(events, c, t - L - tr, t - L) / tr
                             for L in lags for c in ("a", "b")])
    np.testing.assert_allclose(X, rows, atol=1e-6)


def test_events_stage_resumes_byte_identical_and_refuses_other_options(files, tmp_path,
                                                                       capsys, monkeypatch):
    args = ["events", *map(str, files), "--name", "ev", "--rate", "2", "--duration", "12"]
    whole = tmp_path / "whole.zarr"
    code, out, err = cli_main(capsys, *args, "--store", str(whole))
    assert code == 0, err
    assert "2 run(s), 2 x 24 samples at 2 Hz, 2 feature(s): a, b (7 events" in out
    ws = Workspace(whole)
    attrs = ws.attrs("features/ev")
    assert attrs["source"] == "events" and attrs["kind"] == "categorical"
    assert ws.params("features/ev")["files"][0]["name"] == "run0.tsv"
    # interrupted after the first run's block, then rerun: the same bytes
    original = StageWriter.write_block_data
    calls = {"n": 0}

    def stop_after_one(self, run, block, arrays):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        original(self, run, block, arrays)

    cut = tmp_path / "cut.zarr"
    monkeypatch.setattr(StageWriter, "write_block_data", stop_after_one)
    assert cli_main(capsys, *args, "--store", str(cut))[0] == 130
    monkeypatch.setattr(StageWriter, "write_block_data", original)
    assert Workspace(cut).state("features/ev") == "writing"
    code, out, _ = cli_main(capsys, *args, "--store", str(cut))
    assert code == 0 and "1 blocks written, 1 already done" in out
    assert tree_bytes(cut / "features") == tree_bytes(whole / "features")
    # other options: refused without --overwrite, nothing changed
    msg = cli_error(capsys, *args[:-4], "--rate", "4", "--duration", "12", "--store", str(whole))
    assert "other parameters" in msg and "rate: 2.0 -> 4.0" in msg
    assert tree_bytes(cut / "features") == tree_bytes(whole / "features")


def test_run_lengths_come_from_the_bold_group(files, tmp_path, capsys):
    """--bold SUBJECT: each run lasts volumes x TR of the matching BOLD run."""
    import dask.array as da
    import xarray as xr

    from voxelflow.stores import RunTemplate

    ws = Workspace(tmp_path / "ws.zarr")
    templates = []
    for n in (6, 5):
        ds = xr.Dataset({"bold": (("time", "voxel"), da.empty((n, 2), np.float32))},
                        coords={"time": np.arange(n) * 2.0})
        templates.append(RunTemplate(ds, {"bold": {"chunks": (n, 2)}}, "time", n))
    writer = ws.start_stage("bold/s", {"stage": "test"}, templates, group_attrs={"tr": 2.0})
    for r, n in enumerate((6, 5)):
        writer.write_block(r, 0, {"bold": np.ones((n, 2), np.float32)})
    writer.finish()
    code, out, err = cli_main(capsys, "events", *map(str, files), "--name", "ev", "--rate",
                              "1", "--bold", "s", "--store", str(ws.path))
    assert code == 0, err
    assert [r.sizes["time"] for r in ws.open_runs("features/ev")] == [12, 10]
    assert "12 + 10 samples" in out
    msg = cli_error(capsys, "events", str(files[0]), "--name", "one", "--rate", "1",
                    "--bold", "s", "--store", str(ws.path))
    assert "1 events file(s) but /bold/s has 2 run(s)" in msg


def test_categories_option_fixes_the_order_and_allows_missing_ones(tmp_path):
    only_a = _write(tmp_path / "a.tsv", [(1.0, 1.0, "a", 1.0)])
    options = check_events_options(1.0, categories=["b", "a", "c"])
    arrays, _ = events_to_features([only_a], options, [4.0])
    assert arrays[0]["feature"].values.tolist() == ["b", "a", "c"]
    np.testing.assert_array_equal(arrays[0].values[:, 1], [0, 1, 0, 0])
    assert not arrays[0].values[:, [0, 2]].any()


def test_several_columns_name_features_column_equals_value(tmp_path):
    path = _write(tmp_path / "two.tsv", [(0.0, 1.0, "a", "x"), (2.0, 1.0, "b", "y")],
                  header="onset\tduration\ttrial_type\tside\n")
    events = read_events(path, check_events_options(1.0, columns=["trial_type", "side"]))
    assert sorted(set(events.label)) == ["side=x", "side=y", "trial_type=a", "trial_type=b"]
    arr = boxcars(events, ["trial_type=a", "side=y"], 4, 1.0)
    np.testing.assert_array_equal(arr, [[1, 0], [0, 0], [0, 1], [0, 0]])


BAD = [
    # (what, file text or None for the good files, extra options, expected message part)
    ("no onset column", "start\tduration\ttrial_type\n1\t2\ta\n", [], "no 'onset' column"),
    ("comma separated", "onset,duration,trial_type\n1,2,a\n", [], "tab-separated"),
    ("negative duration", HEADER + "1\t-2\ta\t1\n", [], "durations cannot be negative"),
    ("zero duration", HEADER + "1\t0\ta\t1\n", [], "--duration-from fixed:S"),
    ("n/a duration", HEADER + "1\tn/a\ta\t1\n", [], "duration is missing"),
    ("not a number", HEADER + "one\t2\ta\t1\n", [], "onset 'one' is not a number"),
    ("no category", HEADER + "1\t2\tn/a\t1\n", [], "no trial_type"),
    ("overlap", HEADER + "1\t3\ta\t1\n2\t1\ta\t1\n", [], "two 'a' events overlap"),
    ("after the end", HEADER + "1\t1\tb\t1\n13\t1\ta\t1\n", [], "starts after the run ends"),
    ("empty file", "", [], "empty file"),
    ("no such column", None, ["--columns", "condition"], "no column 'condition'"),
    ("amplitude text", None, ["--amplitude", "trial_type"], "is not a number"),
    ("bad duration-from", None, ["--duration-from", "fixed:-1"], "--duration-from must be"),
    ("rate zero", None, ["--rate", "0"], "--rate must be > 0"),
    ("unknown category", None, ["--categories", "a"], "categories not in --categories: b"),
]


@pytest.mark.parametrize("what, text, options, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_events_input_is_one_line_and_writes_nothing(tmp_path, capsys, files, what,
                                                         text, options, expected):
    paths = files
    if text is not None:
        paths = [_write(tmp_path / "bad.tsv", [], header=text), files[1]]
    store = tmp_path / "ws.zarr"
    rate = [] if "--rate" in options else ["--rate", "2"]
    msg = cli_error(capsys, "events", *map(str, paths), "--name", "ev", *rate, *options,
                    "--duration", "12", "--store", str(store))
    assert expected in msg, msg
    assert Workspace(store).state("features/ev") is None


def test_categories_that_differ_between_runs_are_named(tmp_path, capsys, files):
    other = _write(tmp_path / "other.tsv", [(1.0, 1.0, "a", 1.0), (3.0, 1.0, "dog", 1.0)])
    msg = cli_error(capsys, "events", str(files[0]), str(other), "--name", "ev", "--rate",
                    "2", "--duration", "12", "--store", str(tmp_path / "ws.zarr"))
    assert "other.tsv: categories differ" in msg and "unknown: dog" in msg
    assert "missing: b" in msg and "--categories" in msg


def test_missing_run_length_and_missing_file(tmp_path, capsys, files):
    store = str(tmp_path / "ws.zarr")
    msg = cli_error(capsys, "events", *map(str, files), "--name", "ev", "--rate", "2",
                    "--store", store)
    assert "--bold SUBJECT" in msg and "--duration" in msg
    msg = cli_error(capsys, "events", str(tmp_path / "nope.tsv"), "--name", "ev", "--rate",
                    "2", "--duration", "12", "--store", store)
    assert "no such events file" in msg
    msg = cli_error(capsys, "events", *map(str, files), "--name", "ev", "--rate", "2",
                    "--duration", "12,13,14", "--store", store)
    assert "--duration needs one length" in msg
    msg = cli_error(capsys, "events", *map(str, files), "--name", "ev", "--rate", "2",
                    "--bold", "nobody", "--store", store)
    assert "no group /bold/nobody" in msg
