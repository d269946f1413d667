"""Video models in the features stage: clips equal a direct torch forward (padding at
the run's start included), sparse needed-frames groups with and without the clips'
frames, resume after a kill, bad input in one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from fractions import Fraction
from math import floor
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from conftest import ROOT, cli_error, cli_main
from voxelflow.pipeline.errors import WorkspaceConflict
from voxelflow.pipeline.stages.features import run_features_stage
from voxelflow.pipeline.stages.frames import run_frames_stage
from voxelflow.pipeline.stages.needed_frames import NeededFrames
from voxelflow.pipeline.synthetic.movies import write_moving_video
from voxelflow.stores import Workspace

FPS = 10  # frames group rate: 15 frames of 32 px in 1.5 s
N, F = 4, 4.0  # clips of 4 frames at 4 fps: frames at t - 0.75, t - 0.5, t - 0.25, t
KINETICS_MEAN = torch.tensor([0.43216, 0.394666, 0.37645]).reshape(1, 3, 1, 1, 1)
KINETICS_STD = torch.tensor([0.22803, 0.22145, 0.216989]).reshape(1, 3, 1, 1, 1)
NEEDED_TIMES = (0.2, 0.9, 1.3)  # grid frames 2, 9, 13
CLIP = ["--clip-frames", str(N), "--clip-fps", f"{F:g}"]
R3D = dict(weights="random:0", clip_frames=N, clip_fps=F, block_size=3, batch_size=2)


@pytest.fixture(scope="module")
def video_store(tmp_path_factory) -> Path:
    """Frames 'all' (every 10 fps sample), 'need' (the 3 needed times only) and
    'need_clip' (the 3 needed times and their clips' frames)."""
    d = tmp_path_factory.mktemp("video")
    write_moving_video(d / "clip.mp4", 1.5, rate=20, size=(32, 32), seed=3)
    (d / "times.txt").write_text("".join(f"{t}\n" for t in NEEDED_TIMES))
    ws = Workspace(d / "ws.zarr")
    run_frames_stage(ws, [d / "clip.mp4"], "all", fps=FPS, size=32, progress=False)
    run_frames_stage(ws, [d / "clip.mp4"], "need", fps=FPS, size=32, progress=False,
                     needed=NeededFrames(times_file=d / "times.txt"))
    run_frames_stage(ws, [d / "clip.mp4"], "need_clip", fps=FPS, size=32, progress=False,
                     needed=NeededFrames(times_file=d / "times.txt", clip_frames=N, clip_fps=F))
    shutil.copytree(ws.path, d / "frames_only.zarr")
    # r3d_18 features of every time (5 blocks of 3), shared by the tests below.
    run_features_stage(ws, "all", "r3d_18", progress=False, **R3D)
    return d


@pytest.fixture
def ws(video_store, tmp_path) -> Workspace:
    """A private copy of the workspace (frames and /features/r3d_18 of 'all')."""
    return Workspace(shutil.copytree(video_store / "ws.zarr", tmp_path / "ws.zarr"))


def _hand_clip(i: int) -> list[int]:
    """Grid frames (10 fps) of the clip ending at frame i: floor(10 (i/10 - m/F)) for
    m = N-1 ... 0, exact in fractions; before the run's start, frame 0."""
    return [max(0, floor(i - Fraction(FPS) * m / Fraction(F))) for m in range(N - 1, -1, -1)]


def _reference(model: str, clips: np.ndarray) -> np.ndarray:
    """Direct forward written here: torchvision's model after torch.manual_seed(0), the
    Kinetics normalisation, (B, 3, T, H, W), the avgpool output taken by a hook."""
    torch.manual_seed(0)
    net = torchvision.models.get_model(model).eval()
    seen = {}
    net.avgpool.register_forward_hook(lambda m, i, out: seen.update(out=out))
    x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 255.0
    with torch.no_grad():
        net((x - KINETICS_MEAN) / KINETICS_STD)
    return seen["out"].flatten(1).numpy()


def test_hand_clips_include_the_padding():
    assert _hand_clip(0) == [0, 0, 0, 0]
    assert _hand_clip(2) == [0, 0, 0, 2]
    assert _hand_clip(9) == [1, 4, 6, 9]  # 0.15, 0.4, 0.65, 0.9 s


@pytest.mark.parametrize("model", ["r3d_18", "mc3_18"])
def test_features_equal_a_direct_forward_of_hand_built_clips(ws, model):
    if model != "r3d_18":  # r3d_18's group is the fixture's (R3D: blocks of 3, batches of 2)
        summary = run_features_stage(ws, "all", model, weights="random:0", clip_frames=N,
                                     clip_fps=F, block_size=4, batch_size=3, progress=False)
        assert summary["frames"] == [15] and summary["blocks_written"] == 4
    got = ws.open_run(f"features/{model}", 0)
    frames = ws.open_run("frames/all", 0)["frames"].values  # (15, 32, 32, 3)
    clips = np.stack([frames[_hand_clip(i)] for i in range(15)])  # (15, N, 32, 32, 3)
    want = _reference(model, clips)
    np.testing.assert_allclose(got["features"].values, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got["time"].values, np.arange(15) / FPS)
    attrs = ws.attrs(f"features/{model}")
    assert (attrs["clip_frames"], attrs["clip_fps"]) == (N, F)
    assert attrs["preprocessing_mean"] == [0.43216, 0.394666, 0.37645]
    if model == "r3d_18":  # other clip options are other parameters: refused, group kept
        with pytest.raises(WorkspaceConflict, match="clip_frames"):
            run_features_stage(ws, "all", model, **{**R3D, "clip_frames": N + 1},
                               progress=False)
        assert ws.state(f"features/{model}") == "complete"


def test_sparse_group_with_clip_frames_equals_full_rate_features(ws):
    # 'need_clip' holds the needed frames and their clips' frames; the features group
    # holds the times whose whole clip is stored, among them every needed time.
    stored = ws.open_run("frames/need_clip", 0)["time"].values
    want_frames = sorted({j for t in NEEDED_TIMES for j in _hand_clip(round(t * FPS))})
    np.testing.assert_array_equal(stored, np.array(want_frames) / FPS)
    run_features_stage(ws, "need_clip", "r3d_18", name="sparse", progress=False, **R3D)
    sparse = ws.open_run("features/sparse", 0)
    times = sparse["time"].values
    assert set(NEEDED_TIMES) <= set(np.round(times, 6))
    assert all(set(_hand_clip(round(t * FPS))) <= set(want_frames) for t in times)
    full = ws.open_run("features/r3d_18", 0)["features"].sel(time=times).values
    np.testing.assert_allclose(sparse["features"].values, full, rtol=1e-4, atol=1e-5)


def test_sparse_group_without_clip_frames_is_refused_then_extended(ws, video_store, capsys):
    args = ["features", "--frames", "need", "--model", "r3d_18", "--weights", "random:0",
            *CLIP, "--store", str(ws.path), "--no-progress"]
    msg = cli_error(capsys, *args, "--name", "v")
    assert "/frames/need is sparse" in msg and f"clips of {N} frames at {F:g} fps" in msg
    assert "--clip-frames 4 --clip-fps 4 --extend" in msg
    assert ws.state("features/v") is None
    # The command it names adds the clips' frames; then the features run.
    times = str(video_store / "times.txt")
    code, _, err = cli_main(capsys, "frames", str(video_store / "clip.mp4"), "--name", "need",
                            "--fps", str(FPS), "--size", "32", "--times", times, *CLIP,
                            "--extend", "--store", str(ws.path), "--no-progress")
    assert code == 0, err
    assert cli_main(capsys, *args, "--name", "v")[0] == 0
    assert ws.state("features/v") == "complete"


def test_kill_mid_stage_then_resume_equals_uninterrupted(video_store, tmp_path):
    # 15 times in blocks of 3: the child process SIGKILLs itself when its second block
    # is flagged done (an observed write step, no timing); the rerun resumes.  The
    # uninterrupted reference is the fixture's group (the same parameters).
    ref = video_store / "ws.zarr"
    killed = shutil.copytree(video_store / "frames_only.zarr", tmp_path / "killed.zarr")
    args = ["features", "--frames", "all", "--model", "r3d_18", "--weights", "random:0",
            *CLIP, "--block-size", "3", "--batch-size", "2", "--no-progress",
            "--store", str(killed)]
    env = {**os.environ, "VOXELFLOW_FAULT": "block:marked@2"}
    proc = subprocess.run([sys.executable, "-m", "voxelflow.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert Workspace(killed).state("features/r3d_18") == "writing"
    summary = run_features_stage(Workspace(killed), "all", "r3d_18", progress=False, **R3D)
    assert summary["blocks_skipped"] == 2 and summary["blocks_written"] == 3
    files = lambda root: {str(p.relative_to(root)): p.read_bytes()  # noqa: E731
                          for p in sorted((root / "features").rglob("*")) if p.is_file()}
    a, b = files(ref), files(killed)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


@pytest.mark.parametrize("case", ["zero_frames", "negative_fps", "image_model",
                                  "imagenet_name", "kinetics_absent", "too_small"])
def test_bad_input_is_one_line_error_and_nothing_written(ws, tmp_path, capsys, monkeypatch,
                                                          case):
    base = ["features", "--frames", "all", "--store", str(ws.path), "--no-progress",
            "--name", "x"]
    video = ["--model", "r3d_18", "--weights", "random:0"]
    if case == "zero_frames":
        msg = cli_error(capsys, *base, *video, "--clip-frames", "0", "--clip-fps", "4")
        assert "--clip-frames must be a positive number of frames (got 0)" in msg
    elif case == "negative_fps":
        msg = cli_error(capsys, *base, *video, "--clip-frames", "4", "--clip-fps", "-2")
        assert "--clip-fps must be a positive rate" in msg
    elif case == "image_model":
        msg = cli_error(capsys, *base, "--model", "resnet18", "--weights", "random:0", *CLIP)
        assert "--clip-frames/--clip-fps apply to video models" in msg and "resnet18" in msg
    elif case == "imagenet_name":
        msg = cli_error(capsys, *base, "--model", "r3d_18", "--weights", "imagenet", *CLIP)
        assert "--weights kinetics" in msg
    elif case == "kinetics_absent":
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
        monkeypatch.setenv("VOXELFLOW_OFFLINE", "1")
        msg = cli_error(capsys, *base, "--model", "r3d_18", *CLIP)  # default: kinetics
        assert "Kinetics-400 weights for r3d_18" in msg and "r3d_18-b3b3357e.pth" in msg
        assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg
    elif case == "too_small":  # s3d's last pooling needs longer, larger clips
        msg = cli_error(capsys, *base, "--model", "s3d", "--weights", "random:0", *CLIP)
        assert "s3d cannot take clips of 4 32x32 frames" in msg and "--clip-frames" in msg
    assert Workspace(ws.path).state("features/x") is None
    assert not (ws.path / "features" / "x").exists()


def test_on_a_dask_cluster_equals_the_threaded_run(ws):
    # One task per block; the worker builds the model from the spec (no model is sent).
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1,
                            dashboard_address=":0", set_as_default=False) as client:
        with client.as_current():
            summary = run_features_stage(ws, "all", "r3d_18", name="remote", progress=False,
                                         **R3D)
    assert summary["blocks_written"] == 5
    here = ws.open_run("features/r3d_18", 0)["features"].values
    there = ws.open_run("features/remote", 0)["features"].values
    np.testing.assert_allclose(there, here, rtol=1e-5, atol=1e-6)
