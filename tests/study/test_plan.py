"""The plan's decisions from what a workspace holds: skip, run, resume, rerun, and a
rerun upstream turning its dependants into reruns (no stage is run here)."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from voxelflow.pipeline.study.plan import (
    REQUEST_ATTR,
    STARTED_ATTR,
    PlannedStage,
    decide_actions,
    note_started,
    started_requests,
)
from voxelflow.stores import RunTemplate, Workspace


def _group(ws: Workspace, group: str, *, blocks_done: int, request: str | None = None) -> None:
    """A stage group of 2 blocks with ``blocks_done`` of them written (2: complete)."""
    ds = xr.Dataset({"x": (("time",), da.empty(8, dtype=np.float32, chunks=4))},
                    coords={"time": np.arange(8.0)})
    writer = ws.start_stage(group, {"stage": "test"}, [RunTemplate(ds, {"x": {"chunks": (4,)}},
                                                                    "time", 4)])
    for block in range(blocks_done):
        writer.write_block(0, block, {"x": np.ones(4, np.float32)})
    if blocks_done == 2:
        writer.finish()
    if request is not None:
        ws.update_attrs(group, {REQUEST_ATTR: request})


def _stages() -> list[PlannedStage]:
    frames = PlannedStage("frames", "frames/a", {"fps": 2})
    feats = PlannedStage("features", "features/b", {"model": "m"}, upstream=["frames/a"])
    return [frames, feats]


def _actions(ws: Workspace) -> list[str]:
    return [s.action for s in decide_actions(ws, _stages())]


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws.zarr")


def test_nothing_stored_runs_everything(ws):
    assert _actions(ws) == ["run", "run"]


def test_complete_groups_made_from_the_same_request_are_skipped(ws):
    frames, feats = _stages()
    _group(ws, "frames/a", blocks_done=2, request=frames.fingerprint)
    _group(ws, "features/b", blocks_done=2, request=feats.fingerprint)
    assert _actions(ws) == ["skip", "skip"]
    _group(ws, "frames/a", blocks_done=2, request="another request")
    assert _actions(ws) == ["rerun", "rerun"]  # and the dependant with it


def test_a_stage_interrupted_with_the_same_request_resumes(ws):
    frames, feats = _stages()
    note_started(ws, "frames/a", frames.fingerprint)
    _group(ws, "frames/a", blocks_done=1)
    assert ws.state("frames/a") == "writing"
    assert started_requests(ws) == {"frames/a": frames.fingerprint}
    assert _actions(ws) == ["resume", "run"]
    note_started(ws, "frames/a", "another request")
    assert _actions(ws) == ["rerun", "run"]


def test_a_resumable_stage_reruns_when_its_upstream_reruns(ws):
    frames, feats = _stages()
    _group(ws, "frames/a", blocks_done=2, request="another request")
    note_started(ws, "features/b", feats.fingerprint)
    _group(ws, "features/b", blocks_done=1)
    stages = decide_actions(ws, _stages())
    assert [s.action for s in stages] == ["rerun", "rerun"]
    assert stages[1].note == "an upstream stage reruns"


def test_finished_stages_leave_no_started_request(ws):
    note_started(ws, "frames/a", "r1")
    note_started(ws, "features/b", "r2")
    root = zarr.open_group(ws.path, mode="r", use_consolidated=False)
    assert root.attrs[STARTED_ATTR] == {"frames/a": "r1", "features/b": "r2"}
    # rewriting the root's attrs keeps the consolidated metadata xarray reads first
    assert "consolidated_metadata" in json.loads((ws.path / "zarr.json").read_text())
    note_started(ws, "frames/a", None)
    note_started(ws, "features/b", None)
    root = zarr.open_group(ws.path, mode="r", use_consolidated=False)
    assert STARTED_ATTR not in root.attrs and started_requests(ws) == {}
