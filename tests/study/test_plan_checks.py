"""Issue 12, the input half, on experiment files: every value check of the stages runs
when the plan is made, as ``FILE:LINE: section.key: ...`` (probing the videos' and NIfTI
runs' headers), for ``voxelflow run`` and ``--dry-run`` alike, before anything is
written; the plan is printed before the first stage runs, an interrupted stage as
``resume``."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cli_error
from input_files import write_inputs
from voxelflow.pipeline.study.config import load_experiment
from voxelflow.pipeline.study.plan import build_plan

EXPERIMENT = """\
[experiment]
name = "tiny"
store = "ws.zarr"
reports = "reports"

[stimulus]
name = "movie"
videos = ["movie.mp4"]
fps = 2
size = 32
frames = "all"  # the plan order and kill points below are those of every frame

[bold]
subject = "s"
runs = ["bold.nii.gz"]
mask = "mask.nii.gz"

[[models]]
name = "r18"
model = "resnet18"
weights = "random:0"

[fit]
lag_sets = [[2], [2, 4]]
alphas = [1, 100]
test_samples = 5
cv = 2
"""

AUTOENCODER = 'model = "autoencoder"\ntrain_steps = 1'

# id -> (edits of EXPERIMENT, the key named, a fragment of the message)
CASES = {
    # defect 6: names that would write outside the workspace or the reports folder
    "name-absolute": ([('name = "tiny"', 'name = "/abs/path"')], "experiment.name",
                      "'/abs/path' holds a path separator (an absolute path)"),
    "name-empty": ([('name = "tiny"', 'name = ""')], "experiment.name", "'' is empty"),
    "name-up-autoencoder": ([('name = "tiny"', 'name = "../../../../x"'),
                             ('model = "resnet18"', AUTOENCODER)], "experiment.name",
                            "'../../../../x' holds a path separator"),
    "name-dot": ([('name = "tiny"', 'name = "."')], "experiment.name", "folder reference"),
    "model-name-slash": ([('name = "r18"', 'name = "a/b"')], "models.name",
                         "'a/b' holds a path separator"),
    "subject-slash": ([('subject = "s"', 'subject = "a/b"')], "bold.subject",
                      "'a/b' holds a path separator"),
    "stimulus-name-dotdot": ([('name = "movie"', 'name = ".."')], "stimulus.name",
                             "'..' is a folder reference"),
    # defect 6: values, checked from the file alone
    "lags-nan": ([("[[2], [2, 4]]", "[[2], [nan]]")], "fit.lag_sets", "finite seconds >= 0"),
    "lags-inf": ([("[[2], [2, 4]]", "[[inf]]")], "fit.lag_sets", "finite seconds >= 0"),
    "alpha-inf": ([("alphas = [1, 100]", "alphas = [1, inf]")], "fit.alphas",
                  "finite numbers > 0"),
    "batch-size-0": ([('weights = "random:0"', 'weights = "random:0"\nbatch_size = 0')],
                     "models.batch_size", "must be a positive number of frames, got 0"),
    "tr-negative": ([('mask = "mask.nii.gz"', 'mask = "mask.nii.gz"\ntr = -2')], "bold.tr",
                    "must be a finite number > 0, got -2.0"),
    "fps-nan": ([("fps = 2", "fps = nan")], "stimulus.fps", "must be a finite number > 0"),
    "test-runs-unknown": ([("test_samples = 5", "test_runs = [5]")], "fit.test_runs",
                          "[5] not among the runs 0..0 of bold.runs"),
    "cv-runs-one-run": ([("cv = 2", 'cv = "runs"')], "fit.cv",
                        "needs at least two training runs"),
    # defect 6: values checked against probes of the inputs' headers
    "lags-1000": ([("[[2], [2, 4]]", "[[2], [1000]]")], "fit.lag_sets",
                  "run 0 (bold.nii.gz) lasts 40 s (20 volumes x TR 2 s), shorter than the "
                  "1002 s"),
    "test-samples-1000": ([("test_samples = 5", "test_samples = 1000")], "fit.test_samples",
                          "1000 leaves no training sample: lags [2] keep at most 19 samples"),
    "cv-1000": ([("cv = 2", "cv = 1000")], "fit.cv",
                "1000 folds but lags [2] leave at most 14 training samples"),
    "video-shorter-than-bold": ([('"movie.mp4"', '"short.mp4"')], "stimulus.videos",
                                "run 0: short.mp4 lasts 20.0 s but its BOLD run bold.nii.gz "
                                "lasts 40.0 s"),
    "video-still-image": ([('"movie.mp4"', '"still.mp4"')], "stimulus.videos",
                          "still.mp4: is a still image (jpeg)"),
    "bold-one-volume": ([('"bold.nii.gz"', '"one.nii.gz"')], "bold.runs",
                        "one.nii.gz: holds 1 volume(s)"),
    "fps-1e5": ([("fps = 2", "fps = 1e5")], "stimulus.fps",
                "movie.mp4: 100000 fps is above the cap of 240 fps"),
    "size-huge": ([("size = 32", "size = 100000")], "stimulus.size", "of memory but"),
    "mean-window-empty": ([("fps = 2", "fps = 0.25"), ("cv = 2", 'cv = 2\naggregate = "mean"')],
                          "fit.aggregate", "at 0.25 fps some TRs hold no frame"),
    "weights-bad-seed": ([('weights = "random:0"', 'weights = "random:x"')], "models.weights",
                         "random:x: the seed must be an integer"),
    # video models' clips (issue 17)
    "clip-image-model": ([('weights = "random:0"', 'weights = "random:0"\nclip_frames = 4')],
                         "models.clip_frames", "clip_frames/clip_fps apply to video models"),
    "clip-frames-0": ([('model = "resnet18"', 'model = "r3d_18"\nclip_frames = 0')],
                      "models.clip_frames", "clip_frames must be a positive number of frames"),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_inputs(tmp_path_factory.mktemp("plan_checks"))


def _write(folder: Path, name: str, edits: list[tuple[str, str]]) -> Path:
    text = EXPERIMENT
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_experiment_is_refused_at_plan_time_naming_file_line_and_key(folder, capsys,
                                                                          case):
    edits, key, fragment = CASES[case]
    path = _write(folder, case, edits)
    before = sorted(p.name for p in folder.iterdir())
    for extra in (["--dry-run"], ["--no-progress"]):  # the plan and the real run alike
        line = cli_error(capsys, "run", str(path), *extra)
        head, message = line.removeprefix(f"voxelflow: error: {path}:").split(": ", 1)
        assert message.startswith(f"{key}: ") and fragment in message, line
        key_name = key.split(".")[1]
        assert path.read_text().splitlines()[int(head) - 1].startswith(key_name), (head, line)
        assert "--" not in message.split(":", 1)[1], line  # file wording, not CLI options
    # nothing ran: no workspace, report, checkpoint or anything else beside the inputs
    assert sorted(p.name for p in folder.iterdir()) == before


def test_the_unedited_experiment_plans_every_stage(folder, capsys):
    """The checks do not refuse a good file (every case above is one edit of it)."""
    path = _write(folder, "good", [])
    plan = build_plan(load_experiment(path), progress=False)
    assert [(s.kind, s.action) for s in plan] == [
        ("frames", "run"), ("bold", "run"), ("features", "run"), ("fit", "run"), ("fit", "run")]
    assert not (folder / "ws.zarr").exists()


def test_a_video_models_clips_are_in_the_needed_frames_and_features_requests(folder):
    path = _write(folder, "video", [('frames = "all"', 'frames = "needed"'),
                                    ('model = "resnet18"', 'model = "r3d_18"\nclip_frames = 4'
                                                           '\nclip_fps = 2')])
    exp = load_experiment(path)
    assert (exp.models[0].clip_frames, exp.models[0].clip_fps) == (4, 2.0)
    plan = {s.kind: s for s in build_plan(exp, progress=False)}
    assert plan["frames"].request["needed_for"]["clip_frames"] == 4
    assert plan["frames"].request["needed_for"]["clip_fps"] == 2.0
    assert (plan["features"].request["clip_frames"], plan["features"].request["clip_fps"]) \
        == (4, 2.0)
    # defaults: 16 frames at 15 fps, Kinetics weights, the stage's clip batch
    path = _write(folder, "video_defaults", [('model = "resnet18"\nweights = "random:0"',
                                              'model = "r3d_18"')])
    spec = load_experiment(path).models[0]
    assert (spec.clip_frames, spec.clip_fps, spec.weights, spec.batch_size) == \
        (16, 15.0, "kinetics", None)


def test_plan_is_printed_before_work_and_an_interrupted_stage_resumes(folder, capsys,
                                                                      monkeypatch):
    """A run stopped in the frames stage (after its first block is written) has printed
    its plan before any work; the next plan says ``resume`` for that stage, and the next
    run prints it so and finishes the missing blocks only.  (That a resumed run equals
    an uninterrupted one is test_run.py's SIGKILL test.)"""
    from voxelflow import cli
    from voxelflow.pipeline.stages.frames import FramesWork
    from voxelflow.stores import Workspace

    path = _write(folder, "stopped", [("fps = 2", "fps = 8"),
                                      ('store = "ws.zarr"', 'store = "stopped.zarr"')])
    compute, computed = FramesWork.compute, []

    def stop_at(block: int):
        def compute_until(self, key):
            if key[1] == block:
                raise KeyboardInterrupt
            computed.append(key)
            return compute(self, key)
        return compute_until

    monkeypatch.setattr(FramesWork, "compute", stop_at(1))  # 320 frames: blocks 0, 1, 2
    assert cli.main(["run", str(path), "--no-progress"]) == 130
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == [f"plan for {path} (store {folder / 'stopped.zarr'}):",
                                    "     run  frames   /frames/movie"]
    assert "done in" not in out  # the plan was out before the stage did (or finished) work

    assert cli.main(["run", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "  resume  frames   /frames/movie  (interrupted earlier; finishing the missing blocks)")

    monkeypatch.setattr(FramesWork, "compute", stop_at(2))
    assert cli.main(["run", str(path), "--no-progress"]) == 130
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("  resume  frames   /frames/movie")
    assert computed == [(0, 0), (0, 1)]  # block 0 was not computed again
    done = Workspace(folder / "stopped.zarr").read_array("frames/movie/run-000", "block_done")
    assert done.tolist() == [1, 1, 0]
