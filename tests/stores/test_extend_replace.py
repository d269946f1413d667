"""Extending a sparse group (``--extend``, and ``voxelflow features`` on extended frames)
is a replacement like ``--overwrite``: a SIGKILL at each step of the build and of the
journalled swap leaves the old complete group or the new complete one (byte for byte
against uninterrupted runs), never a mix or no group, no staged group is ever listed,
and the same command again ends byte-identical to an uninterrupted extension."""

from __future__ import annotations

import shutil

import pytest

from forked_cli import ForkedCLI
from store_snapshot import differences, snapshot
from voxelflow import cli
from voxelflow.stores import Workspace

GROUP = "frames/c"
LAYERS = ("layer3.1.add", "avgpool")  # two groups: the kill may fall between their swaps
FEATURES = [f"features/f.{layer}" for layer in LAYERS]

# (step at which the extension is killed, the group a reader then finds): one kill in
# the build (old values copied, missing times computed), one with the new group
# complete in staging, two inside the journalled swap; every other step of the swap is
# killed in tests/stores/test_atomic_replace.py, on the same code (stores/replace.py)
STEPS = [
    ("block:data-written", "old"),
    ("finish:complete", "old"),           # new group complete in staging, swap not begun
    ("swap:journal-written", "new"),
    ("swap:old-moved", "new"),            # old group moved aside: the journal finishes
]
FEATURE_STEPS = [("block:marked", ("old", "old")), ("swap:old-moved", ("new", "old")),
                 ("swap:old-moved@2", ("new", "new"))]


def _frames(bold_store, videos, lags: str, extend: bool = False) -> list[str]:
    return ["frames", str(videos["a"]), str(videos["b"]), "--name", "c", "--fps", "20",
            "--size", "32", "--times-from-bold", "s", "--lags", lags,
            *(["--extend"] if extend else []), "--store", str(bold_store), "--no-progress"]


def _features(store) -> list[str]:
    return ["features", "--frames", "c", "--model", "resnet18", "--weights", "random:0",
            "--pool", "avg", "--layer", *LAYERS, "--name", "f", "--store", str(store),
            "--no-progress"]


@pytest.fixture(scope="module")
def forked_features(tmp_path_factory):
    """A forked CLI whose helper has imported torch and the features stage once: each
    killed ``voxelflow features`` child would otherwise import them again (~6 s CPU)."""
    cli_ = ForkedCLI(tmp_path_factory.mktemp("forked-features"),
                     preload=("torch", "torchvision", "voxelflow.pipeline.stages.features"))
    yield cli_
    cli_.close()


def _snaps(store) -> dict:
    return {g: snapshot(store, g) for g in (GROUP, *FEATURES)}


@pytest.fixture(scope="module")
def refs(tmp_path_factory, fit_inputs, videos):
    """Uninterrupted runs: ``old`` (frames and features for lags 2), ``mid`` (frames
    extended by lags 2.5, features still old) and ``new`` (both extended)."""
    base = tmp_path_factory.mktemp("extend-refs")
    old = shutil.copytree(fit_inputs, base / "old.zarr")
    assert cli.main(_frames(old, videos, "2")) == 0
    assert cli.main(_features(old)) == 0
    mid = shutil.copytree(old, base / "mid.zarr")
    summary_args = _frames(mid, videos, "2.5", extend=True)
    assert cli.main(summary_args) == 0
    new = shutil.copytree(mid, base / "new.zarr")
    assert cli.main(_features(new)) == 0
    out = {"old": old, "mid": mid, "new": new}
    for key in ("old", "mid", "new"):
        out[f"{key}_snap"] = _snaps(out[key])
    old_ws, new_ws = Workspace(old), Workspace(new)
    for g in (GROUP, *FEATURES):  # the extension added times and kept the old ones
        assert old_ws.open_run(g, 0).sizes["time"] < new_ws.open_run(g, 0).sizes["time"]
    return out


def _assert_one_complete(store, group: str, refs, expect: str) -> None:
    ws = Workspace(store)  # opening it finishes a swap the kill interrupted
    assert ws.state(group) == "complete", group
    assert group.split("/")[1] in ws.list_groups(group.split("/")[0])
    assert not any("~" in g for g in ws.child_groups(group.split("/")[0]))
    want = refs["old_snap" if expect == "old" else "new_snap"][group]
    assert not differences(snapshot(store, group), want), (group, expect)


@pytest.mark.parametrize("step,expect", STEPS, ids=[s for s, _ in STEPS])
def test_kill_during_frames_extension_leaves_old_or_new(tmp_path, refs, videos, forked,
                                                        step, expect):
    store = shutil.copytree(refs["old"], tmp_path / "s.zarr")
    args = _frames(store, videos, "2.5", extend=True)
    status, out, err = forked.run(*args, fault=step)
    assert status == -9, (step, out, err)  # the extension reached the step and died there
    _assert_one_complete(store, GROUP, refs, expect)

    assert cli.main(args) == 0  # the same command again: resumes, or finds it done
    assert not differences(snapshot(store, GROUP), refs["new_snap"][GROUP]), step
    assert not (store / ".staging").exists()


@pytest.mark.parametrize("step,expect", FEATURE_STEPS, ids=[s for s, _ in FEATURE_STEPS])
def test_kill_during_features_extension_leaves_old_or_new(tmp_path, refs, forked_features,
                                                          step, expect):
    store = shutil.copytree(refs["mid"], tmp_path / "s.zarr")
    status, out, err = forked_features.run(*_features(store), fault=step)
    assert status == -9, (step, out, err)
    for group, want in zip(FEATURES, expect):
        _assert_one_complete(store, group, refs, want)

    assert cli.main(_features(store)) == 0
    for group in FEATURES:
        assert not differences(snapshot(store, group), refs["new_snap"][group]), step
    assert not (store / ".staging").exists()
