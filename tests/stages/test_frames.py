"""Frames stage: exact pts-based sampling, real clip, time queries, resume, bad input."""

from __future__ import annotations

import signal
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import xarray as xr

from conftest import cli_here
from voxelflow.pipeline.stages.frames import run_frames_stage
from voxelflow.pipeline.synthetic.movies import read_index, write_index_video, write_moving_video
from voxelflow.stores import Workspace


@pytest.fixture(scope="module")
def index_videos(tmp_path_factory) -> list[tuple[Path, np.ndarray]]:
    """Four videos whose frames encode their index: 24, 25, 29.97 fps and VFR."""
    d = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(7)
    vfr_pts = np.r_[0.0, np.cumsum(rng.uniform(0.01, 0.15, size=99))]
    made = [
        (d / "cfr24.mp4", write_index_video(d / "cfr24.mp4", n_frames=130, rate=24)),
        (d / "cfr25.mkv", write_index_video(d / "cfr25.mkv", n_frames=130, rate=25)),
        (d / "cfr2997.mp4", write_index_video(d / "cfr2997.mp4", n_frames=150,
                                              rate=Fraction(30000, 1001))),
        (d / "vfr.mkv", write_index_video(d / "vfr.mkv", vfr_pts)),
    ]
    return made


def expected_index(pts_s: np.ndarray, t: float) -> int:
    """Independent reference: the latest frame whose pts <= t (plain Python loop)."""
    best = 0
    for j, p in enumerate(pts_s):
        if p <= t + 1e-9:
            best = j
    return best


@pytest.mark.parametrize("fps", [20.0, 2.0])
def test_every_sample_is_the_frame_shown_at_its_time(tmp_path, index_videos, fps):
    ws = Workspace(tmp_path / "ws.zarr")
    videos = [p for p, _ in index_videos]
    run_frames_stage(ws, videos, "idx", fps=fps, size=64, progress=False)
    tree = xr.open_datatree(ws.path, engine="zarr")
    for run, (path, pts_s) in enumerate(index_videos):
        ds = tree[f"frames/idx/run-{run:03d}"].to_dataset()
        times = ds["time"].values
        n = times.size
        # Every sample up to the last frame's pts exists, at exactly k / fps.
        assert n >= int(np.floor(pts_s[-1] * fps)) + 1, path.name
        np.testing.assert_allclose(times, np.arange(n) / fps, atol=1e-12)
        assert times[-1] < pts_s[-1] + np.max(np.diff(pts_s)) + 1e-9
        assert ds["time"].attrs["units"] == "s"
        assert (ds["run"].values == run).all()
        frames = ds["frames"].values
        assert frames.shape == (n, 64, 64, 3) and frames.dtype == np.uint8
        got = {k: read_index(f) for k, f in enumerate(frames)}
        want = {k: expected_index(pts_s, t) for k, t in enumerate(times)}
        assert got.keys() == want.keys() == set(range(n)), path.name
        assert got == want, f"{path.name} at fps {fps}"


def test_real_clip_gives_600_frames_at_20fps(tmp_path, bbb_clip):
    ws = Workspace(tmp_path / "ws.zarr")
    summary = run_frames_stage(ws, [bbb_clip], "bbb", fps=20, size=224, progress=False)
    assert summary["frames"] == [600]
    ds = xr.open_datatree(ws.path, engine="zarr")["frames/bbb/run-000"].to_dataset()
    np.testing.assert_allclose(ds["time"].values, np.arange(600) * 0.05, atol=1e-12)
    assert ds["time"].values[0] == 0.0 and abs(ds["time"].values[-1] - 29.95) < 1e-9
    # Spot-check pixels against an independent decode: the clip is 24 fps, so sample k
    # (t = k / 20 s) shows source frame floor(k * 24 / 20).
    wanted = {0: 0, 7: 8, 301: 361, 599: 718}
    got = {}
    with av.open(str(bbb_clip)) as c:
        for j, frame in enumerate(c.decode(video=0)):
            for k, jj in wanted.items():
                if jj == j:
                    got[k] = frame.reformat(width=224, height=224, format="rgb24",
                                            interpolation="AREA").to_ndarray()
    assert got.keys() == wanted.keys(), "the decode must reach every wanted source frame"
    for k, ref in got.items():
        np.testing.assert_array_equal(ds["frames"].values[k], ref)


def test_sel_time_slice_returns_each_runs_second(tmp_path, index_videos):
    ws = Workspace(tmp_path / "ws.zarr")
    run_frames_stage(ws, [p for p, _ in index_videos[:2]], "two", fps=20, size=32,
                     progress=False)
    sub = xr.open_datatree(ws.path, engine="zarr")["frames/two"].sel(time=slice(1, 2))
    for run in range(2):
        t = sub[f"run-{run:03d}"]["time"].values
        np.testing.assert_allclose(t, np.arange(20, 41) / 20)
        assert (sub[f"run-{run:03d}"]["run"].values == run).all()
    # The concatenated view carries the run coordinate for computation.
    flat = ws.open_concat("frames/two")
    assert flat.sizes["time"] == sum(
        ws.open_run("frames/two", r).sizes["time"] for r in range(2))
    assert set(np.unique(flat["run"].values)) == {0, 1}


def test_rerun_with_other_parameters_is_refused_then_overwritten(tmp_path, index_videos):
    store = tmp_path / "ws.zarr"
    video = str(index_videos[0][0])
    ok = cli_here("frames", video, "--name", "a", "--fps", "20", "--size", "32",
                 "--store", str(store), "--no-progress")
    assert ok.returncode == 0, ok.stderr
    bad = cli_here("frames", video, "--name", "a", "--fps", "2", "--size", "32",
                  "--store", str(store), "--no-progress")
    assert bad.returncode == 2
    assert "--overwrite" in bad.stderr and "fps: 20.0 -> 2.0" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    again = cli_here("frames", video, "--name", "a", "--fps", "2", "--size", "32",
                    "--store", str(store), "--no-progress", "--overwrite")
    assert again.returncode == 0, again.stderr
    ds = Workspace(store).open_run("frames/a", 0)
    np.testing.assert_allclose(ds["time"].values[:3], [0, 0.5, 1.0])


def _finished(done_dir: Path) -> list[Path]:
    """Done-flag chunk files; a killed atomic write leaves a ``*.partial`` temp file."""
    return [p for p in done_dir.iterdir() if not p.name.endswith(".partial")]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_sigkill_mid_write_then_resume_equals_uninterrupted(tmp_path, forked):
    """A real process SIGKILLed mid-stage (a forked CLI child that kills itself,
    VOXELFLOW_FAULT, right after writing the data of its 4th block, before that block's
    done flag: an observed state, no polling), then resumed: the same bytes as an
    uninterrupted run."""
    video = tmp_path / "long.mp4"
    write_moving_video(video, seconds=40, size=(96, 128))
    args = ["frames", str(video), "--name", "m", "--fps", "20", "--size", "160",
            "--no-progress"]
    ref = cli_here(*args, "--store", str(tmp_path / "ref.zarr"))
    assert ref.returncode == 0, ref.stderr
    n_blocks = int(np.ceil(800 / 128))

    store = tmp_path / "killed.zarr"
    done_dir = store / "frames/m/run-000/block_done/c"
    status, _, err = forked.run(*args, "--store", str(store), fault="block:data-written@4")
    assert status == -signal.SIGKILL, ("the stage was not killed", err)
    done_at_kill = len(_finished(done_dir))
    assert 0 < done_at_kill < n_blocks, "kill must land mid-stage"
    assert Workspace(store).state("frames/m") == "writing"

    resumed = cli_here(*args, "--store", str(store))
    assert resumed.returncode == 0, resumed.stderr
    skipped = int(resumed.stdout.split("blocks written, ")[1].split(" already")[0])
    assert skipped >= done_at_kill
    a = _tree_bytes(tmp_path / "ref.zarr" / "frames" / "m")
    b = _tree_bytes(store / "frames" / "m")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def _write_audio_only(path: Path) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=44100)
        samples = np.zeros((1, 1024), dtype=np.float32)
        for i in range(20):
            f = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            f.sample_rate = 44100
            f.pts = i * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture
def bad_inputs(tmp_path, index_videos) -> dict[str, Path]:
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    audio = tmp_path / "sound.m4a"
    _write_audio_only(audio)
    good_mkv = tmp_path / "whole.mkv"
    write_index_video(good_mkv, n_frames=240, rate=24)
    cut_mkv = tmp_path / "cut.mkv"
    data = good_mkv.read_bytes()
    cut_mkv.write_bytes(data[: len(data) // 2])
    cut_mp4 = tmp_path / "cut.mp4"
    data = index_videos[0][0].read_bytes()
    cut_mp4.write_bytes(data[: len(data) // 2])
    return {"missing": tmp_path / "absent.mp4", "text": text, "audio": audio,
            "truncated_mkv": cut_mkv, "truncated_mp4": cut_mp4}


@pytest.mark.parametrize("kind", ["missing", "text", "audio", "truncated_mkv", "truncated_mp4"])
def test_bad_video_gives_one_line_error_and_no_complete_group(tmp_path, bad_inputs, kind):
    store = tmp_path / "ws.zarr"
    bad = bad_inputs[kind]
    res = cli_here("frames", str(bad), "--name", "x", "--store", str(store), "--no-progress")
    assert res.returncode == 2, (kind, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxelflow: error:"), res.stderr
    assert str(bad) in lines[0]
    assert Workspace(store).state("frames/x") != "complete"


@pytest.mark.parametrize("fps", ["0", "-2"])
def test_non_positive_fps_is_refused(tmp_path, index_videos, fps):
    store = tmp_path / "ws.zarr"
    res = cli_here("frames", str(index_videos[0][0]), "--name", "x", f"--fps={fps}",
                  "--store", str(store))
    assert res.returncode == 2
    assert "--fps must be a positive" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (store / "frames" / "x").exists()


def test_crop_keeps_the_centre(tmp_path):
    # A wide frame whose left and right quarters are white: crop removes them.
    path = tmp_path / "wide.mkv"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 256, 128, "yuv420p"
        img = np.zeros((128, 256, 3), np.uint8)
        img[:, :64] = 255
        img[:, 192:] = 255
        for i in range(10):
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    ws = Workspace(tmp_path / "ws.zarr")
    run_frames_stage(ws, [path], "c", fps=10, size=32, resize="crop", progress=False)
    run_frames_stage(ws, [path], "s", fps=10, size=32, resize="squash", progress=False)
    crop = ws.open_run("frames/c", 0)["frames"].values[0]
    squash = ws.open_run("frames/s", 0)["frames"].values[0]
    assert crop.mean() < 10
    assert squash[:, :6].mean() > 240 and squash[:, 12:20].mean() < 10
