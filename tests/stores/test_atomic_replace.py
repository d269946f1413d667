"""``--overwrite`` never destroys the complete group before its replacement is complete:
a SIGKILL at every step of the write and swap protocol leaves the old complete group or
the new complete one (byte for byte, against uninterrupted builds of each), and the
rerun of the same command ends with the new one, byte for byte.  While the new group
is built, readers and ``voxelflow status`` see the old one."""

from __future__ import annotations

import shutil

import pytest
import xarray as xr

from storage_inputs import bold_args, build_frames, fit_args, frames_args
from store_snapshot import differences, snapshot
from voxelflow import cli
from voxelflow.stores import Workspace

GROUP = "frames/c"
FIT = "fits/k/lags-2"

# (step at which the writer is killed, the group a reader finds afterwards)
STEPS = [
    ("stage:templating", "old"),          # staging group created, no arrays yet
    ("stage:started", "old"),             # staging arrays templated
    ("block:data-written", "old"),        # first block's chunks written, no digest/flag
    ("block:digest-written", "old"),      # its digests written, flag not set
    ("block:marked", "old"),              # first block done
    ("block:data-written@2", "old"),
    ("block:marked@2", "old"),            # every block done, group not complete
    ("finish:complete", "old"),           # staging group complete, swap not begun
    ("swap:journal-written", "new"),      # intent recorded, nothing renamed
    ("swap:old-moved", "new"),            # old group moved aside: the journal finishes
    ("swap:new-moved", "new"),            # new group in place, metadata not refreshed
    ("swap:consolidated", "new"),
    ("swap:journal-removed", "new"),      # leftovers (old copy, staging) not yet deleted
]
FIT_STEPS = [("block:marked@2", "old"), ("swap:old-moved", "new")]


@pytest.fixture(scope="module")
def refs(tmp_path_factory, videos):
    """Uninterrupted builds: ``old`` (video a) and ``new`` (video b) of /frames/c."""
    base = tmp_path_factory.mktemp("refs")
    out = {}
    built = build_frames(base, {"old": videos["a"], "new": videos["b"]}, ("old", "new"))
    for key, store in built.items():
        out[key] = store
        out[f"{key}_snap"] = snapshot(store, GROUP)
        out[f"{key}_n"] = Workspace(store).open_run(GROUP, 0).sizes["time"]
    assert out["old_n"] != out["new_n"]
    return out


@pytest.mark.parametrize("step,expect", STEPS, ids=[s for s, _ in STEPS])
def test_kill_at_each_step_of_an_overwrite_leaves_old_or_new(tmp_path, refs, videos,
                                                            forked, step, expect):
    store = shutil.copytree(refs["old"], tmp_path / "s.zarr")
    args = [*frames_args(videos["b"], store), "--overwrite"]
    status, out, err = forked.run(*args, fault=step)
    assert status == -9, (step, out, err)  # the writer reached the step and died there

    ws = Workspace(store)  # opening it finishes a swap the kill interrupted
    assert ws.state(GROUP) == "complete"
    assert not differences(snapshot(store, GROUP), refs[f"{expect}_snap"]), step
    tree = xr.open_datatree(store, engine="zarr")  # the consolidated view agrees
    assert tree[f"{GROUP}/run-000"].sizes["time"] == refs[f"{expect}_n"]

    assert cli.main(args) == 0  # the same command again: resumes, or finds it done
    assert not differences(snapshot(store, GROUP), refs["new_snap"]), step
    assert not (store / ".staging").exists()


def test_readers_and_status_see_the_old_group_while_the_new_one_is_built(
        tmp_path, refs, videos, forked, capsys):
    store = shutil.copytree(refs["old"], tmp_path / "s.zarr")
    hold = tmp_path / "hold"
    hold.mkdir()
    pid, _, err = forked.start(*frames_args(videos["b"], store), "--overwrite",
                               hold="block:marked", hold_dir=hold)
    try:
        while not (hold / "held").exists():  # the writer holds after its first block
            assert forked.alive(pid), err.read_text()
        ws = Workspace(store)
        assert ws.state(GROUP) == "complete"
        assert ws.open_run(GROUP, 0).sizes["time"] == refs["old_n"]
        assert not differences(snapshot(store, GROUP), refs["old_snap"])
        assert ws.replacement(GROUP)["state"] == "writing"
        assert cli.main(["status", "--store", str(store)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert any(line.split()[:2] == [f"/{GROUP}", "complete"] for line in lines), lines
        assert any("replacement being built" in line for line in lines), lines
    finally:
        (hold / "go").touch()
    assert forked.wait(pid) == 0, err.read_text()
    assert not differences(snapshot(store, GROUP), refs["new_snap"])


@pytest.fixture(scope="module")
def fit_refs(tmp_path_factory, fit_inputs):
    """The fit with alphas 1,10,100 (old) and 3,30 (new), each uninterrupted."""
    base = tmp_path_factory.mktemp("fit-refs")
    out = {}
    for key, alphas in (("old", "1,10,100"), ("new", "3,30")):
        store = shutil.copytree(fit_inputs, base / f"{key}.zarr")
        assert cli.main(fit_args(store, alphas)) == 0
        out[key], out[f"{key}_snap"] = store, snapshot(store, FIT)
    return out


@pytest.mark.parametrize("step,expect", FIT_STEPS, ids=[s for s, _ in FIT_STEPS])
def test_killed_fit_overwrite_keeps_the_old_fit(tmp_path, fit_refs, forked, step, expect):
    store = shutil.copytree(fit_refs["old"], tmp_path / "s.zarr")
    args = [*fit_args(store, "3,30"), "--overwrite"]
    status, out, err = forked.run(*args, fault=step)
    assert status == -9, (step, out, err)
    assert Workspace(store).state(FIT) == "complete"
    assert not differences(snapshot(store, FIT), fit_refs[f"{expect}_snap"])
    assert cli.main(args) == 0
    assert not differences(snapshot(store, FIT), fit_refs["new_snap"])


def test_bad_replacement_input_leaves_the_complete_group(tmp_path, refs, capsys):
    """Defect 1 as reported: an --overwrite whose input turns out bad (here a file that
    is not a video) exits 2 and the good frames stay complete."""
    store = shutil.copytree(refs["old"], tmp_path / "s.zarr")
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"\x00" * 4096)
    assert cli.main([*frames_args(fake, store), "--overwrite"]) == 2
    assert "fake.mp4" in capsys.readouterr().err
    assert not differences(snapshot(store, GROUP), refs["old_snap"])


def test_bold_overwrite_is_built_beside_the_old_group(tmp_path, fit_inputs, bold_runs):
    """The BOLD stage writes group-level arrays besides its blocks: an overwrite must put
    them in the replacement too (old group untouched until the swap)."""
    store = shutil.copytree(fit_inputs, tmp_path / "s.zarr")
    before = snapshot(store, "bold/s")
    assert cli.main([*bold_args(bold_runs[:1], store), "--no-zscore", "--overwrite"]) == 0
    ws = Workspace(store)
    assert ws.params("bold/s")["zscore"] is False and ws.n_runs("bold/s") == 1
    assert ws.read_array("bold/s", "mask").sum() == 27
    assert differences(snapshot(store, "bold/s"), before)
    assert not (store / ".staging").exists()


def test_bold_overwrite_with_no_usable_voxel_keeps_the_old_group(tmp_path, fit_inputs,
                                                                 bold_runs, capsys):
    """A replacement found unusable at its end (every voxel constant) is dropped; the
    complete group it was to replace stays, byte for byte."""
    import nibabel as nib
    import numpy as np

    store = shutil.copytree(fit_inputs, tmp_path / "s.zarr")
    before = snapshot(store, "bold/s")
    src = nib.load(bold_runs[0])
    flat = tmp_path / "mask.nii.gz"
    shutil.copy(bold_runs[0].parent / "mask.nii.gz", flat)
    run = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.full(src.shape, 100, np.float32), src.affine, src.header), run)
    assert cli.main([*bold_args([run], store), "--overwrite"]) == 2
    assert "no usable voxel" in capsys.readouterr().err
    assert not differences(snapshot(store, "bold/s"), before)
    assert Workspace(store).state("bold/s") == "complete"
    assert not (store / ".staging").exists()
