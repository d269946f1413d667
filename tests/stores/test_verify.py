"""Damage is found, named and repaired: ``voxelflow verify`` reports a deleted, a
truncated and a bit-flipped chunk one line each and clears exactly their blocks, the
rerun recomputes them byte for byte; a stage reading a damaged upstream group stops
with one line naming the group, run, block and ``voxelflow verify`` (never fill values)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from storage_inputs import bold_args, fit_args, frames_args
from store_snapshot import differences, snapshot
from voxelflow import cli
from voxelflow.stores import Workspace

GROUP = "frames/c"


def _out(capsys) -> tuple[list[str], list[str]]:
    cap = capsys.readouterr()
    return cap.out.strip().splitlines(), cap.err.strip().splitlines()


def _chunk(store: Path, node: str, var: str, block: int) -> Path:
    """The chunk (shard) file of ``block`` along the first axis of ``node/var``."""
    files = sorted((store / node / var / "c" / str(block)).rglob("*"))
    return [f for f in files if f.is_file()][0]


@pytest.fixture(scope="module")
def frames_ref(tmp_path_factory, videos):
    store = tmp_path_factory.mktemp("verify-ref") / "ref.zarr"
    assert cli.main(frames_args(videos["long"], store)) == 0
    return store


def test_deleted_truncated_and_flipped_chunks_are_named_and_repaired_bitwise(
        tmp_path, frames_ref, videos, capsys):
    store = shutil.copytree(frames_ref, tmp_path / "s.zarr")
    node = f"{GROUP}/run-000"
    gone, cut, flipped = (_chunk(store, node, "frames", b) for b in (0, 1, 3))
    gone.unlink()
    cut.write_bytes(cut.read_bytes()[:100])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(bytes(data))
    capsys.readouterr()

    assert cli.main(["verify", "--store", str(store)]) == 1
    out, _ = _out(capsys)
    for block, path, problem in ((0, gone, "is missing"), (1, cut, "is damaged"),
                                 (3, flipped, "is damaged")):
        rel = path.relative_to(store).as_posix()
        line = f"{store}: /{GROUP} run-000 block {block}: {rel} {problem}"
        assert sum(o.startswith(line) for o in out) == 1, (line, out)
    assert out[-1].startswith(f"/{GROUP}: 3 damaged file(s) in 3 block(s)")
    assert Workspace(store).state(GROUP) == "writing"

    assert cli.main(frames_args(videos["long"], store)) == 0
    out, _ = _out(capsys)
    assert "(3 blocks written, 1 already done)" in out[-1]
    assert not differences(snapshot(store, GROUP), snapshot(frames_ref, GROUP))
    assert cli.main(["verify", GROUP, "--store", str(store)]) == 0
    assert _out(capsys)[0] == [f"/{GROUP}: 6 files checked, intact"]


def test_a_stage_reading_a_damaged_group_stops_with_one_line(tmp_path, frames_ref,
                                                             capsys):
    """Defect 3: a missing chunk is not read as fill values, a truncated one is not a
    codec traceback (the features stage reads frames through the workspace)."""
    store = shutil.copytree(frames_ref, tmp_path / "s.zarr")
    node = f"{GROUP}/run-000"
    ws = Workspace(store)
    shutil.copy(_chunk(store, node, "frames", 2), tmp_path / "keep")
    _chunk(store, node, "frames", 2).unlink()
    with pytest.raises(Exception) as missing:
        ws.require_complete(GROUP, "voxelflow frames ...")
    assert re.fullmatch(rf"{store}: /{GROUP} run-000 block 2 is damaged \(\S+ is missing\); "
                        rf"run: voxelflow verify {GROUP} --store {store}, then rerun the "
                        rf"command that made it", str(missing.value)), str(missing.value)
    shutil.copy(tmp_path / "keep", store / node / "frames/c/2/0/0/0")
    cut = _chunk(store, node, "frames", 1)
    cut.write_bytes(cut.read_bytes()[:-50])
    ws.require_complete(GROUP, "voxelflow frames ...")  # every file is there
    with pytest.raises(Exception) as bad:
        ws.read_array(node, "frames", slice(120, 140))
    assert "run-000 block 1 is damaged" in str(bad.value)
    assert "cannot be decoded" in str(bad.value) and "voxelflow verify" in str(bad.value)


def test_fit_on_a_damaged_bold_group_stops_and_the_repair_is_bitwise(
        tmp_path, fit_inputs, bold_runs, capsys):
    store = shutil.copytree(fit_inputs, tmp_path / "s.zarr")
    node = "bold/s/run-001"
    victims = sorted((store / node / "bold/c/0").iterdir())  # one file per 8 voxels
    victims[1].unlink()  # voxels 8-15 of run 1: block 1
    capsys.readouterr()
    assert cli.main(fit_args(store)) == 2
    _, err = _out(capsys)
    assert len(err) == 1 and "/bold/s run-001 block 1 is damaged" in err[0], err
    assert "voxelflow verify bold/s" in err[0]

    cut = victims[2]
    cut.write_bytes(cut.read_bytes()[:40])
    assert cli.main(["verify", "bold/s", "--store", str(store)]) == 1
    out, _ = _out(capsys)
    assert [line.split(": ")[1].split(":")[0] for line in out[:-1]] == [
        "/bold/s run-001 block 1", "/bold/s run-001 block 2"], out
    assert cli.main(bold_args(bold_runs, store)) == 0
    assert "(2 blocks written, 6 already done)" in _out(capsys)[0][0]
    assert not differences(snapshot(store, "bold/s"), snapshot(fit_inputs, "bold/s"))
    assert cli.main(fit_args(store)) == 0


def test_groups_made_before_digests_are_read_and_said_so(tmp_path, frames_ref, capsys):
    """Format 1 (no block_digest, sparse chunks): still readable and verifiable."""
    store = shutil.copytree(frames_ref, tmp_path / "s.zarr")
    shutil.rmtree(store / GROUP / "run-000" / "block_digest")
    meta_path = store / GROUP / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["voxelflow"]["format"] = 1
    meta_path.write_text(json.dumps(meta))
    ws = Workspace(store)
    ws.require_complete(GROUP, "voxelflow frames ...")
    assert ws.read_array(f"{GROUP}/run-000", "frames").shape == (500, 32, 32, 3)
    assert cli.main(["verify", "--store", str(store)]) == 0
    out, _ = _out(capsys)
    assert out == [f"/{GROUP}: 6 files checked, intact (made before digests were recorded: "
                   f"checked by reading)"]
    _chunk(store, f"{GROUP}/run-000", "frames", 3).unlink()
    assert cli.main(["verify", "--store", str(store)]) == 1
    out, _ = _out(capsys)
    assert "block" not in out[0] and "frames/c/run-000/frames/c/3/0/0/0 is missing" in out[0]
    assert ws.state(GROUP) == "writing"
    assert np.count_nonzero(ws.read_array(f"{GROUP}/run-000", "block_done")) == 0
