"""Autoencoder stage: it learns, exact resume after SIGKILL, the training-split guard,
features equal a direct encoder forward, bad input.

One small configuration is trained once, uninterrupted (module fixture, in this
process): 64x64 generated frames, 16 training frames of 30, batch 8, 24 steps,
random:0 weights, one intermediate checkpoint at step 22 (kept aside, by a hard
link: a checkpoint is ~0.5 GB and is replaced by a rename, never rewritten).
The SIGKILL test continues the same run through the CLI in a subprocess from that
step-22 checkpoint with a checkpoint every step (``--checkpoint-every`` is not part
of the training's configuration: it changes when the state is saved, not what is
trained), SIGKILLs it right after its step-23 checkpoint, resumes it with the same
command (in this process, through ``cli.main``), and compares the whole loss curve
and the final weights with the uninterrupted run.  (Starting the killed run at step
22 rather than 0 saves 22 training steps of test time; step 22-23 is then trained
across a process boundary and 23-24 across a SIGKILL, resumed mid-epoch: at frame
184 of the stream, half-way through the 12th pass over the 16 training frames.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import xarray as xr

import voxelflow.pipeline.stages.train as ae
from conftest import cli_error, cli_main, ROOT
from voxelflow.pipeline.stages.train import (ShuffleStream, make_pieces, preview_path,
                                             train_autoencoder, training_ranges)
from voxelflow.pipeline.stages.train import read_training_frames as _read_frames
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.stages.features import run_features_stage
from voxelflow.pipeline.stages.frames import run_frames_stage
from voxelflow.pipeline.synthetic.movies import write_moving_video
from voxelflow.stores import Workspace

SIZE = 64  # at 32 px, 32 steps do not bring the loss below half the mean frame's
FPS = 5.0
SECONDS = 6  # 30 frames
TRAIN_UNTIL = 3.2  # -> frames 0..15 train, 16..29 are the "test samples"
N_TRAIN = 16
BATCH = 8
STEPS = 24
WARMUP = 4
KEPT_STEP = STEPS - 2  # the uninterrupted run's checkpoint the killed run starts from
KILL_STEP = STEPS - 1  # the killed run's checkpoint after which it is SIGKILLed (mid-epoch)
TRAIN = dict(train_until=TRAIN_UNTIL, steps=STEPS, batch_size=BATCH, lr=3e-3,
             warmup_steps=WARMUP, weights="random:0", seed=0, checkpoint_every=KEPT_STEP)
CLI_TRAIN = ["--train-until", str(TRAIN_UNTIL), "--steps", str(STEPS), "--batch-size",
             str(BATCH), "--lr", "3e-3", "--warmup-steps", str(WARMUP), "--weights",
             "random:0", "--seed", "0",
             "--checkpoint-every", str(KILL_STEP - KEPT_STEP), "--no-progress"]
MEAN = np.array([0.485, 0.456, 0.406]).reshape(1, 1, 1, 3)
STD = np.array([0.229, 0.224, 0.225]).reshape(1, 1, 1, 3)


@pytest.fixture(scope="module")
def frames_store(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ae_frames")
    write_moving_video(d / "clip.mp4", SECONDS, rate=10, size=(SIZE, SIZE), seed=2)
    ws = Workspace(d / "ws.zarr")
    run_frames_stage(ws, [d / "clip.mp4"], "clip", fps=FPS, size=SIZE, progress=False)
    assert ws.open_run("frames/clip", 0).sizes["time"] == SECONDS * FPS
    return ws.path


@pytest.fixture(scope="module")
def trained(frames_store, tmp_path_factory):
    """Train once, recording every read of a frames array from the store."""
    d = tmp_path_factory.mktemp("ae_train")
    store = d / "ws.zarr"
    shutil.copytree(frames_store, store)
    save = ae._save_atomic
    kept = d / f"ae.step{KEPT_STEP}.pt"

    def keep_step(obj, path):
        save(obj, path)
        if obj["step"] == KEPT_STEP:
            os.link(path, kept)  # the next save replaces ``path`` by a rename

    mp = pytest.MonkeyPatch()
    reads = _record_frame_reads(mp)
    mp.setattr(ae, "_save_atomic", keep_step)
    try:
        summary = train_autoencoder(Workspace(store), "clip", d / "ae.pt", progress=False,
                                    **TRAIN)
    finally:
        mp.undo()
    assert kept.is_file(), f"no checkpoint at step {KEPT_STEP}"
    return {"summary": summary, "reads": reads, "ckpt": d / "ae.pt", "store": store,
            "kept": kept}


def _record_frame_reads(mp: pytest.MonkeyPatch) -> list[tuple[str, slice]]:
    """``(node, index)`` of every read of a frames array from any workspace, from now on."""
    reads: list[tuple[str, slice]] = []
    original = Workspace.read_array

    def spy(self, node, name, index=slice(None)):
        if name == "frames":
            reads.append((node, index))
        return original(self, node, name, index)

    mp.setattr(Workspace, "read_array", spy)
    return reads


def _normalised(frames: np.ndarray) -> np.ndarray:
    return (frames.astype(np.float64) / 255.0 - MEAN) / STD


# ------------------------------------------------------------------------- learning
def test_loss_falls_well_below_predicting_the_mean_frame(trained):
    s = trained["summary"]
    frames = Workspace(trained["store"]).open_run("frames/clip", 0)["frames"].values
    x = _normalised(frames[:N_TRAIN])
    baseline = float(((x - x.mean(axis=0)) ** 2).mean())  # independent of the pipeline
    assert s["mean_frame_mse"] == pytest.approx(baseline, rel=1e-6)
    assert s["n_train"] == N_TRAIN and s["steps"] == STEPS and len(s["losses"]) == STEPS
    final = float(np.mean(s["losses"][-4:]))
    assert final < 0.5 * baseline, (s["losses"], baseline)
    assert final < 0.5 * float(np.mean(s["losses"][:2]))
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["complete"] and ckpt["step"] == STEPS and ckpt["losses"] == s["losses"]
    # The preview: 8 inputs over their reconstructions, enlarged 2x (64 -> 128 px).
    from PIL import Image

    png = preview_path(trained["ckpt"])
    assert png.is_file() and s["preview"] == str(png)
    assert Image.open(png).size == (8 * 128 + 9 * 2, 2 * 128 + 3 * 2)


# ---------------------------------------------------------------------- split guard
def test_no_test_frame_is_ever_read(trained):
    """Every frames read of the whole training (baseline, batches, preview) lies in the
    training frames 0..15; the stream drew every training frame, and only those."""
    reads = trained["reads"]
    assert reads, "the spy saw no reads"
    for node, index in reads:
        assert node == "frames/clip/run-000"
        assert 0 <= index.start < index.stop <= N_TRAIN, index
    covered = set()
    for _, index in reads:
        covered.update(range(index.start, index.stop))
    assert covered == set(range(N_TRAIN))
    # The drawn ids over all STEPS x BATCH frames: whole epochs, each a permutation of 0..15.
    stream = ShuffleStream(make_pieces([(0, 0, N_TRAIN)], 16), seed=0, buffer=1024)
    epochs, rest = divmod(STEPS * BATCH, N_TRAIN)
    assert epochs >= 2 and rest == 0
    drawn = stream.ids(0, STEPS * BATCH)
    assert all(sorted(drawn[e * 16:(e + 1) * 16]) == list(range(16)) for e in range(epochs))


def test_the_guard_refuses_a_test_frame(frames_store):
    ws = Workspace(frames_store)
    ranges = [(0, 0, N_TRAIN)]
    assert _read_frames(ws, "frames/clip", ranges, 0, 0, N_TRAIN).shape[0] == N_TRAIN
    for run, a, b in [(0, N_TRAIN - 1, N_TRAIN + 1), (0, N_TRAIN, N_TRAIN + 1), (1, 0, 1)]:
        with pytest.raises(AssertionError, match="outside the training frames"):
            _read_frames(ws, "frames/clip", ranges, run, a, b)


def test_training_ranges():
    # Two runs of 100 frames at 10 fps, played one after another: 15 s = run 0 + 5 s.
    assert training_ranges([100, 100], 10.0, train_until=15.0, train_runs=None,
                           group="g") == [(0, 0, 100), (1, 0, 50)]
    assert training_ranges([100, 100], 10.0, train_until=3.25, train_runs=None,
                           group="g") == [(0, 0, 33)]  # 3.2 s < 3.25 s, 3.3 s is not
    assert training_ranges([100, 100], 10.0, train_until=None, train_runs=[1],
                           group="g") == [(1, 0, 100)]
    with pytest.raises(InputError, match="training range is empty"):
        training_ranges([100], 10.0, train_until=0.0, train_runs=None, group="g")
    with pytest.raises(InputError, match="runs 0..1"):
        training_ranges([100, 100], 10.0, train_until=None, train_runs=[2], group="g")


def test_shuffle_stream_is_bounded_and_resumable():
    pieces = make_pieces([(0, 3, 50), (1, 0, 37)], chunk=16)
    assert [p.size for p in pieces] == [13, 16, 16, 2, 16, 16, 5]
    stream = ShuffleStream(pieces, seed=5, buffer=20)
    n = stream.n
    loaded = [0]

    def read(piece):
        loaded[0] += piece.size
        return np.arange(piece.first, piece.first + piece.size)

    out = []
    for i, (fid, frame) in enumerate(stream.frames(read, 0)):
        assert fid == frame
        out.append(fid)
        held_before = loaded[0] - (i // n) * n - (i % n)  # loaded this epoch, not yet emitted
        assert held_before <= 20 + 16, i  # the buffer plus one piece
        if len(out) == 2 * n:
            break
    assert sorted(out[:n]) == list(range(n)) and sorted(out[n:]) == list(range(n))
    assert out[:n] != out[n:]  # a new order every epoch
    assert out == list(stream.ids(0, 2 * n))
    resumed = stream.frames(read, 61)  # a resume mid-epoch continues the same stream
    assert [next(resumed)[0] for _ in range(50)] == out[61:111]


# --------------------------------------------------------- sparse (needed) frames
# Times kept of each of two runs (the same 6 s clip twice; grid k / 5 fps, 30 frames).
SPARSE_TIMES = {0: [0.0, 0.4, 1.0, 2.2, 3.0, 5.0], 1: [0.2, 0.6, 1.0, 1.4, 3.6, 5.8]}
SPARSE_UNTIL = SECONDS + 1.1  # run 1 starts at 6 s (its grid), not at 6 stored frames / fps


def test_sparse_group_trains_on_the_stored_frames_before_train_until(frames_store, tmp_path,
                                                                     capsys, monkeypatch):
    """``voxelflow train-autoencoder`` on a group made with ``frames --times FILE``: the
    frames read (baseline, batches, preview) are exactly the stored frames shown before
    ``--train-until`` (the runs played one after another, each lasting its video's 6 s)."""
    store = tmp_path / "ws.zarr"
    times = tmp_path / "times.txt"
    times.write_text("".join(f"{r},{t}\n" for r, ts in SPARSE_TIMES.items() for t in ts))
    clip = str(frames_store.parent / "clip.mp4")
    status, _, err = cli_main(capsys, "frames", clip, clip, "--name", "few", "--fps",
                              str(FPS), "--size", str(SIZE), "--times", str(times),
                              "--store", str(store), "--no-progress")
    assert status == 0, err
    ws = Workspace(store)
    stored = [ws.open_run("frames/few", r)["time"].values for r in (0, 1)]
    np.testing.assert_allclose(stored[0], SPARSE_TIMES[0])
    expected = {(r, i) for r in (0, 1) for i, t in enumerate(stored[r])
                if r * SECONDS + t < SPARSE_UNTIL}
    assert len(expected) == 6 + 3
    reads = _record_frame_reads(monkeypatch)
    out = tmp_path / "ae.pt"
    status, _, err = cli_main(capsys, "train-autoencoder", "--frames", "few", "--store",
                              str(store), "--train-until", str(SPARSE_UNTIL), "--steps", "2",
                              "--batch-size", "3", "--weights", "random:0", "--out",
                              str(out), "--no-progress")
    assert status == 0, err
    read = {(int(node[-3:]), i) for node, index in reads
            for i in range(index.start, index.stop)}
    assert read == expected
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["n_train"] == 9 and ckpt["train_frames"] == [[0, 0, 6], [1, 0, 3]]
    assert ckpt["config"]["train_until"] == SPARSE_UNTIL


# ------------------------------------------------------------------ kill and resume
def test_sigkill_then_resume_gives_the_same_loss_curve(trained, frames_store, tmp_path,
                                                        capsys):
    store = tmp_path / "ws.zarr"
    shutil.copytree(frames_store, store)
    out = tmp_path / "ae.pt"
    # The uninterrupted run's checkpoint at step KEPT_STEP, hard-linked: every save replaces
    # ``out`` by a rename, so the kept file is never written to.
    os.link(trained["kept"], out)
    assert torch.load(out, map_location="cpu", weights_only=True)["step"] == KEPT_STEP
    before = out.stat().st_ino, out.stat().st_mtime_ns
    args = ["train-autoencoder", "--frames", "clip", *CLI_TRAIN, "--out", str(out),
            "--store", str(store)]
    proc = subprocess.Popen([sys.executable, "-m", "voxelflow.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (out.stat().st_ino, out.stat().st_mtime_ns) != before:  # a new checkpoint
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it was killed"
    mid = torch.load(out, map_location="cpu", weights_only=True)
    assert not mid["complete"] and mid["step"] == KILL_STEP, \
        f"kill must land after step {KILL_STEP}'s checkpoint"
    assert mid["data"]["position"] == KILL_STEP * BATCH and len(mid["losses"]) == KILL_STEP
    assert torch.load(trained["kept"], map_location="cpu",
                      weights_only=True)["step"] == KEPT_STEP  # the link was not written

    status, stdout, stderr = cli_main(capsys, *args)  # the resume: the CLI's entry point
    assert status == 0, stderr
    assert f"resumed at step {KILL_STEP}" in stdout, stdout
    final = torch.load(out, map_location="cpu", weights_only=True)
    assert final["complete"] and final["step"] == STEPS
    np.testing.assert_allclose(final["losses"], trained["summary"]["losses"], rtol=1e-5,
                               atol=1e-7)
    ref = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    for key in ("decoder.conv1.weight", "encoder.conv1.weight",
                "encoder.layer4.2.bn3.running_var", "decoder.layer1.2.bn3.weight"):
        torch.testing.assert_close(final["model"][key], ref["model"][key], rtol=1e-5,
                                   atol=1e-6)
    # A rerun of the finished checkpoint does nothing.
    status, stdout, stderr = cli_main(capsys, *args)
    assert status == 0 and "already complete" in stdout, stderr



# ----------------------------------------------------------------------- extraction
def test_features_equal_a_direct_encoder_forward(trained, tmp_path):
    store = tmp_path / "ws.zarr"
    shutil.copytree(trained["store"], store)
    ws = Workspace(store)
    summary = run_features_stage(ws, "clip", "autoencoder", weights=str(trained["ckpt"]),
                                 batch_size=7, progress=False)
    assert summary["groups"] == ["features/autoencoder"] and summary["n_features"] == [2048]
    tree = xr.open_datatree(store, engine="zarr")
    got = tree["features/autoencoder/run-000"]["features"].values
    frames = ws.open_run("frames/clip", 0)
    assert got.shape == (30, 2048)  # every frame, test frames included
    np.testing.assert_array_equal(tree["features/autoencoder/run-000"]["time"].values,
                                  frames["time"].values)
    # Reference: a plain torchvision resnet50 with the checkpoint's encoder.* tensors.
    state = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)["model"]
    net = torchvision.models.resnet50()
    missing, unexpected = net.load_state_dict(
        {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")},
        strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    net.eval()
    x = torch.from_numpy(_normalised(frames["frames"].values).astype(np.float32))
    got_ref = []
    net.avgpool.register_forward_hook(lambda m, i, o: got_ref.append(o.flatten(1)))
    with torch.no_grad():
        net(x.permute(0, 3, 1, 2).contiguous())
    want = got_ref[0].numpy()
    diff = float(np.abs(got - want).max())
    assert diff <= 1e-4, f"max abs difference {diff} (values up to {np.abs(want).max()})"
    attrs = tree["features/autoencoder"].attrs
    assert attrs["model"] == "autoencoder" and attrs["layer"] == "avgpool"
    assert len(attrs["weights_sha256"]) == 64 and attrs["weights_file"] == str(trained["ckpt"])


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("case", ["features_other_arch", "features_not_trained",
                                  "out_other_arch", "empty_range", "no_frames", "bad_runs"])
def test_bad_input_is_a_one_line_error(frames_store, tmp_path, capsys, case):
    store = str(frames_store)  # read-only use: every case fails before writing
    other = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    train = ["train-autoencoder", "--frames", "clip", "--store", store, "--no-progress",
             "--weights", "random:0"]
    if case == "features_other_arch":
        msg = cli_error(capsys, "features", "--frames", "clip", "--model", "autoencoder",
                         "--weights", str(other), "--store", store, "--name", "x")
        assert str(other) in msg and "not a voxelflow autoencoder checkpoint" in msg
    elif case == "features_not_trained":
        msg = cli_error(capsys, "features", "--frames", "clip", "--model", "autoencoder",
                         "--store", store, "--name", "x")
        assert "needs --weights CKPT" in msg and "train-autoencoder" in msg
    elif case == "out_other_arch":
        msg = cli_error(capsys, *train, "--train-until", "3", "--out", str(other))
        assert str(other) in msg and "not a voxelflow autoencoder checkpoint" in msg
    elif case == "empty_range":
        msg = cli_error(capsys, *train, "--train-until", "0", "--out", str(tmp_path / "a.pt"))
        assert "training range is empty" in msg and "--train-until 0" in msg
    elif case == "no_frames":
        msg = cli_error(capsys, *train[:2], "nope", *train[3:], "--train-until", "3",
                         "--out", str(tmp_path / "a.pt"))
        assert "/frames/nope" in msg and "voxelflow frames" in msg
    elif case == "bad_runs":
        msg = cli_error(capsys, *train, "--train-runs", "0,3", "--out", str(tmp_path / "a.pt"))
        assert "--train-runs 3" in msg
    assert not (tmp_path / "a.pt").exists()
    assert Workspace(frames_store).state("features/x") is None
