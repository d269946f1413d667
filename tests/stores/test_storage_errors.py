"""The store's own failures are one-line errors with exit status 2, never tracebacks:
``--store`` naming a file or a foreign folder, a damaged ``zarr.json``, a full disk, a
read-only store.  Refused requests leave the store exactly as it was (every file, array
and attr); a write cut by a full disk leaves it resumable."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import zarr.storage._local as zarr_local

from storage_inputs import bold_args, build_frames, frames_args, refused
from store_snapshot import differences, snapshot
from voxelflow import cli
import voxelflow.stores.scratch as scratch_module

GROUP = "frames/c"


@pytest.fixture(scope="module")
def refs(tmp_path_factory, videos):
    base = tmp_path_factory.mktemp("storage-refs")
    return build_frames(base, {"old": videos["a"], "long": videos["long"]}, ("old", "long"))


def _unchanged(store, before, *argv, capsys) -> str:
    line = refused(capsys, *argv)
    assert not differences(snapshot(store), before), argv
    return line


@pytest.mark.parametrize("command", ["frames", "status", "verify"])
def test_store_that_is_a_file_is_refused(tmp_path, videos, command, capsys):
    store = tmp_path / "notes.txt"
    store.write_text("my notes\n")
    before = snapshot(store)
    argv = {"frames": frames_args(videos["a"], store),
            "status": ["status", "--store", str(store)],
            "verify": ["verify", "--store", str(store)]}[command]
    line = _unchanged(store, before, *argv, capsys=capsys)
    assert f"{store}: is a file, not a workspace folder" in line


def test_foreign_folder_is_refused(tmp_path, videos, capsys):
    store = tmp_path / "photos"
    store.mkdir()
    (store / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    before = snapshot(store)
    line = _unchanged(store, before, *frames_args(videos["a"], store), capsys=capsys)
    assert "is a folder that is not a voxelflow workspace" in line


@pytest.mark.parametrize("damaged", ["frames/c/zarr.json", "frames/c/run-000/zarr.json",
                                     "zarr.json"])
def test_damaged_zarr_json_is_named(tmp_path, refs, videos, damaged, capsys):
    store = shutil.copytree(refs["old"], tmp_path / "s.zarr")
    (store / damaged).write_text('{"zarr_format": 3, "node_type": "gr')
    before = snapshot(store)
    for argv in (frames_args(videos["a"], store), ["status", "--store", str(store)],
                 ["verify", "--store", str(store)]):
        line = _unchanged(store, before, *argv, capsys=capsys)
        assert f"{store / damaged}: damaged workspace metadata" in line, line


def _fail_writes(monkeypatch, code: int, when: str) -> list[str]:
    """Make Zarr's file writes raise OSError(code) for keys containing ``when``."""
    real = zarr_local._put
    failed: list[str] = []

    def put(path, value, exclusive=False):
        if when in str(path):
            failed.append(str(path))
            raise OSError(code, os.strerror(code), str(path))
        return real(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", put)
    return failed


def test_disk_full_mid_stage_is_one_line_and_the_rerun_resumes(tmp_path, refs, videos,
                                                                monkeypatch, capsys):
    store = tmp_path / "s.zarr"
    with monkeypatch.context() as patch:
        failed = _fail_writes(patch, errno.ENOSPC, "/frames/c/2/")  # the third block
        line = refused(capsys, *frames_args(videos["long"], store))
    assert failed and "the disk is full" in line and "rerun the same command" in line
    assert cli.main(frames_args(videos["long"], store)) == 0
    assert "(2 blocks written, 2 already done)" in capsys.readouterr().out
    assert not differences(snapshot(store, GROUP), snapshot(refs["long"], GROUP))


def test_disk_full_during_an_overwrite_keeps_the_old_group(tmp_path, refs, videos,
                                                           monkeypatch, capsys):
    store = shutil.copytree(refs["old"], tmp_path / "s.zarr")
    before = snapshot(store, GROUP)
    with monkeypatch.context() as patch:
        _fail_writes(patch, errno.ENOSPC, "/frames/c/1/")
        line = refused(capsys, *frames_args(videos["long"], store), "--overwrite")
    assert "the disk is full" in line
    assert not differences(snapshot(store, GROUP), before)
    assert cli.main([*frames_args(videos["long"], store), "--overwrite"]) == 0
    assert not differences(snapshot(store, GROUP), snapshot(refs["long"], GROUP))


def test_disk_full_outside_zarr_is_one_line(tmp_path, bold_runs, monkeypatch, capsys):
    """ENOSPC from the BOLD stage's scratch file (plain os.pwrite): the CLI's net."""
    def full(fd, buf, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    store = tmp_path / "s.zarr"
    with monkeypatch.context() as patch:
        patch.setattr(scratch_module, "_pwrite_all", full)
        line = refused(capsys, *bold_args(bold_runs, store))
    assert f"{store}: the disk is full" in line
    assert cli.main(bold_args(bold_runs, store)) == 0


def test_read_only_store_is_refused_before_any_write(tmp_path, refs, videos, monkeypatch,
                                                     capsys):
    store = shutil.copytree(refs["old"], tmp_path / "s.zarr")
    before = snapshot(store)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path).startswith(
        str(store)) else real_access(path, mode, **kw))
    for extra in ([], ["--overwrite"]):
        line = _unchanged(store, before, *frames_args(videos["b"], store), *extra,
                          capsys=capsys)
        assert f"{store}: is read-only" in line


def test_permission_denied_mid_write_is_one_line(tmp_path, videos, monkeypatch, capsys):
    store = tmp_path / "s.zarr"
    with monkeypatch.context() as patch:
        _fail_writes(patch, errno.EACCES, "/frames/c/0/")
        line = refused(capsys, *frames_args(videos["a"], store))
    assert "cannot be written (Permission denied)" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; the read-only "
                    "path is covered by the os.access test above")
def test_chmod_read_only_store_is_refused(tmp_path, refs, videos, capsys):
    store = shutil.copytree(refs["old"], tmp_path / "s.zarr")
    before = snapshot(store)
    for folder, _, _ in os.walk(store):
        os.chmod(folder, 0o555)
    try:
        line = _unchanged(store, before, *frames_args(videos["b"], store), "--overwrite",
                          capsys=capsys)
        assert "is read-only" in line
    finally:
        for folder, _, _ in os.walk(store):
            os.chmod(folder, 0o755)
