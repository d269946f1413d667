"""One writer per group: a second writer is refused at once with one line naming the
holder and the first one's result stays intact; a lock left by a dead process is taken
over with a note; readers never wait."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import pytest

from storage_inputs import frames_args
from store_snapshot import differences, snapshot
from voxelflow import cli
from voxelflow.pipeline.errors import WorkspaceBusy
from voxelflow.stores import Workspace
from voxelflow.stores.locks import acquire_group, lock_file

GROUP = "frames/c"
BUSY = re.compile(r"^voxelflow: error: \S+: /frames/c is being written by pid (\d+) on \S+ "
                  r"since \d\d:\d\d \(voxelflow frames .*\); wait or stop it$")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, videos):
    store = tmp_path_factory.mktemp("lock-ref") / "ref.zarr"
    assert cli.main(frames_args(videos["long"], store)) == 0
    return snapshot(store, GROUP)


def test_second_writer_is_refused_at_once_and_the_first_finishes_intact(
        tmp_path, videos, forked, reference, capsys):
    store = tmp_path / "s.zarr"
    hold = tmp_path / "hold"
    hold.mkdir()
    pid, _, err = forked.start(*frames_args(videos["long"], store), hold="block:marked@2",
                               hold_dir=hold)
    try:
        while not (hold / "held").exists():  # the first writer holds after 2 blocks
            assert forked.alive(pid), err.read_text()
        # the same request, and a conflicting --overwrite: both refused, nothing written
        before = snapshot(store)
        for extra in ([], ["--overwrite"]):
            fps = "20" if not extra else "12"
            args = frames_args(videos["a"] if extra else videos["long"], store, float(fps))
            assert cli.main([*args, *extra]) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and BUSY.match(lines[0]), lines
            assert int(BUSY.match(lines[0]).group(1)) == pid
        assert not differences(snapshot(store), before)
        # readers never wait; another group of the same store is free
        assert Workspace(store).state(GROUP) == "writing"
        assert cli.main(["frames", str(videos["a"]), "--name", "other", "--fps", "2",
                         "--size", "32", "--store", str(store), "--no-progress"]) == 0
    finally:
        (hold / "go").touch()
    assert forked.wait(pid) == 0, err.read_text()
    assert Workspace(store).state(GROUP) == "complete"
    assert not differences(snapshot(store, GROUP), reference)
    assert not lock_file(store, GROUP).with_suffix(".lock.json").exists()


def test_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path, videos, reference,
                                                          capsys):
    store = tmp_path / "s.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    info = lock_file(store, GROUP).with_name("c.lock.json")
    info.parent.mkdir(parents=True)
    lock_file(store, GROUP).touch()
    info.write_text(json.dumps({"pid": dead_pid, "host": "gone-host", "started": 0,
                                "command": "voxelflow frames old.mp4 --name c"}))
    assert cli.main(frames_args(videos["long"], store)) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("voxelflow: note: taking over the lock of "), err
    assert f"pid {dead_pid} on gone-host" in err[0]
    assert not differences(snapshot(store, GROUP), reference)
    assert not info.exists()


def test_another_thread_of_the_same_process_is_refused(tmp_path):
    store = tmp_path / "s.zarr"
    held = acquire_group(store, GROUP)
    try:
        errors = []

        def second() -> None:
            try:
                acquire_group(store, GROUP)
            except WorkspaceBusy as exc:
                errors.append(str(exc))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        assert len(errors) == 1 and "another thread of this process" in errors[0]
        # the thread that holds it may start the group again (its earlier attempt ended)
        assert acquire_group(store, GROUP) is held
    finally:
        held.release()
