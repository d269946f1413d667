"""``[[models]] train_frames = "needed"``: the study's frames stage stays sparse while an
autoencoder is trained, the training reads exactly the needed frames of its training
split, the key is part of the requests (changing it reruns), and a key the experiment
cannot honour is one line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bold_inputs import write_nifti
from conftest import cli_error
from voxelflow.pipeline.study.config import load_experiment
from voxelflow.pipeline.study.plan import build_plan
from voxelflow.pipeline.study.run import execute_plan
from voxelflow.pipeline.synthetic.movies import write_moving_video
from voxelflow.stores import Workspace

EXPERIMENT = """[experiment]
name = "e"
store = "{store}"
[stimulus]
name = "m"
videos = ["{inputs}/movie.mp4"]
fps = 4
size = 32{frames}
[bold]
subject = "s"
runs = ["{inputs}/bold.nii.gz"]
mask = "{inputs}/mask.nii.gz"
[[models]]
name = "ae"
model = "autoencoder"
weights = "random:0"
train_steps = 2
train_batch_size = 4
checkpoint = "ae.pt"{train_frames}
[fit]
lag_sets = [[2], [4]]
alphas = [10, 1000]
test_samples = 6
cv = 2
"""
TR, N_VOLUMES, LAG_SETS, TEST_SAMPLES = 2.0, 20, [[2.0], [4.0]], 6


def _experiment(folder: Path, inputs: Path, *, frames: str = "",
                train_frames: str = '\ntrain_frames = "needed"', name: str = "experiment"):
    path = folder / f"{name}.toml"
    path.write_text(EXPERIMENT.format(store=folder / "ws.zarr", inputs=inputs, frames=frames,
                                      train_frames=train_frames))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 40 s movie (4 fps grid: 160 frames) and 20 volumes at TR 2 s on 8 voxels; the
    experiment with train_frames = "needed" run up to its training (bold, frames, train)."""
    base = tmp_path_factory.mktemp("train-needed")
    inputs = base / "inputs"
    inputs.mkdir()
    write_moving_video(inputs / "movie.mp4", 40, rate=8, size=(32, 32), seed=2)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    bold = np.random.default_rng(1).normal(100, 5, size=(2, 2, 2, N_VOLUMES))
    write_nifti(inputs / "bold.nii.gz", bold.astype(np.float32), affine, tr=TR)
    write_nifti(inputs / "mask.nii.gz", np.ones((2, 2, 2), np.uint8), affine)
    path = _experiment(base, inputs)
    exp = load_experiment(path)
    ws = Workspace(exp.store)
    plan = build_plan(exp, ws, progress=False)
    execute_plan(ws, [s for s in plan if s.kind in ("bold", "frames", "train")],
                 log=lambda line: None)
    return {"base": base, "inputs": inputs, "path": path, "plan": plan, "ws": ws}


def test_needed_training_reads_the_needed_frames_before_the_test_samples(trained):
    plan = {stage.kind: stage for stage in trained["plan"]}
    assert [s.kind for s in trained["plan"]] == ["bold", "frames", "train", "features",
                                                 "fit", "fit"]
    assert "needed_for" in plan["frames"].request  # sparse while the autoencoder trains
    assert plan["train"].request["train_frames"] == "needed"
    # Independently: the design reads the frame at t - L of each volume at t (t - L >= 0;
    # on the 4 fps grid these are exact frame times).
    bold_times = np.arange(N_VOLUMES) * TR
    needed = sorted({t - lag for t in bold_times for lags in LAG_SETS for lag in lags
                     if t - lag >= 0})
    stored = trained["ws"].open_run("frames/m", 0)["time"].values
    np.testing.assert_array_equal(stored, needed)
    # The test samples are the last 6 volumes (from t0 = 28 s); the earliest frame any of
    # them reads is t0 - 4 s, and the training frames are the needed ones before it.
    first_test_frame = bold_times[N_VOLUMES - TEST_SAMPLES] - max(max(s) for s in LAG_SETS)
    expected = [t for t in needed if t < first_test_frame]
    ckpt = torch.load(trained["base"] / "ae.pt", map_location="cpu", weights_only=True)
    assert ckpt["complete"] and ckpt["n_train"] == len(expected) == 12
    assert ckpt["train_frames"] == [[0, 0, len(expected)]]
    np.testing.assert_array_equal(stored[:len(expected)], expected)
    assert ckpt["config"]["train_until"] == first_test_frame


def test_train_frames_is_part_of_the_requests(trained):
    """Removing the key (the default "all") makes frames dense again and retrains; a file
    without the key plans as before (no train_frames in the train stage's request)."""
    default = _experiment(trained["base"], trained["inputs"], train_frames="",
                          name="default")
    plan = {s.kind: s for s in build_plan(load_experiment(default), trained["ws"],
                                          progress=False)}
    assert "needed_for" not in plan["frames"].request
    assert "train_frames" not in plan["train"].request
    assert plan["frames"].action == "rerun" and plan["train"].action == "rerun"
    again = {s.kind: s.action for s in build_plan(load_experiment(trained["path"]),
                                                  trained["ws"], progress=False)}
    assert again["frames"] == again["bold"] == again["train"] == "skip"


CNN = '\n[[models]]\nname = "r"\nmodel = "resnet18"\nweights = "random:0"'


@pytest.mark.parametrize("frames, train_frames, says", [
    ("", '\ntrain_frames = "some"', 'must be "all" or "needed"'),
    ("", '\ntrain = false\ntrain_frames = "needed"', "only with train = true"),
    ('\nframes = "all"', '\ntrain_frames = "needed"', 'set frames = "needed"'),
    ("", CNN + '\ntrain_frames = "needed"', 'only for model = "autoencoder"'),
    ("", '\ntrain_frames = "needed"' + CNN.replace('"r"', '"ae2"').replace(
        '"resnet18"', '"autoencoder"').replace("\nweights", '\ncheckpoint = "b.pt"\nweights'),
     "ask for different frames"),
])
def test_train_frames_it_cannot_honour_is_one_line_and_nothing_is_written(
        tmp_path, capsys, frames, train_frames, says):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("movie.mp4", "bold.nii.gz", "mask.nii.gz"):
        (inputs / name).write_bytes(b"x")  # placeholders: the file alone is refused
    (tmp_path / "ae.pt").write_bytes(b"x")  # train = false needs an existing checkpoint
    path = _experiment(tmp_path, inputs, frames=frames, train_frames=train_frames)
    msg = cli_error(capsys, "run", str(path))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), start=1)
                if text.startswith("train_frames"))
    assert f"{path}:{line}: models.train_frames: " in msg and says in msg, msg
    assert not (tmp_path / "ws.zarr").exists() and not (tmp_path / "reports").exists()
