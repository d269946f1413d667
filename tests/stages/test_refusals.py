"""Issue 12, the input half, on the stage commands: every bad input of defects 4-5 exits 2
with one line naming the option or file and the fix, before any work, and leaves the
workspace exactly as it was (every array's bytes and every attr, walked before and
after).  In process through ``cli.main`` (fast), a few through a real subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cli_error, run_cli
from input_files import write_inputs
from store_snapshot import snapshot
from voxelflow.pipeline.execution import resources
from voxelflow.pipeline.stages.bold import run_bold_stage
from voxelflow.pipeline.stages.features import run_features_stage
from voxelflow.pipeline.stages.fit import run_fit_stage
from voxelflow.pipeline.stages.frames import run_frames_stage
from voxelflow.stores import Workspace

FIT = ["fit", "--features", "r18", "--bold", "s", "--lags", "2", "--test-samples", "5",
       "--cv", "2"]
FEATURES = ["features", "--frames", "clip", "--model", "resnet18", "--weights", "random:0"]
FRAMES = ["frames", "{d}/movie.mp4", "--fps", "2", "--size", "32"]
BOLD = ["bold", "{d}/bold.nii.gz", "--mask", "{d}/mask.nii.gz"]

# id -> (argv, a fragment the one error line must hold: the option/file and the fix)
CASES = {
    # defect 4: names that are paths
    "frames-name-dotdot": (FRAMES + ["--name", ".."], "--name '..': is a folder reference"),
    "frames-name-dot": (FRAMES + ["--name", "."], "--name '.': is a folder reference"),
    "frames-name-abs": (FRAMES + ["--name", "/abs/x"], "--name '/abs/x': holds a path sep"),
    "frames-name-slash": (FRAMES + ["--name", "a/b"], "--name 'a/b': holds a path separator"),
    "frames-name-empty": (FRAMES + ["--name", ""], "--name '': is empty"),
    "frames-name-hidden": (FRAMES + ["--name", ".x"], "--name '.x': starts with '.'"),
    "features-name-dotdot": (FEATURES + ["--name", ".."], "--name '..': is a folder ref"),
    "features-frames-dotdot": (["features", "--frames", "..", "--model", "resnet18"],
                               "--frames '..': is a folder reference"),
    "train-frames-dot": (["train-autoencoder", "--frames", ".", "--train-until", "10",
                          "--out", "{d}/ae.pt"], "--frames '.': is a folder reference"),
    "bold-subject-dotdot": (BOLD + ["--subject", ".."], "--subject '..': is a folder ref"),
    "bold-subject-slash": (BOLD + ["--subject", "a/b"], "--subject 'a/b': holds a path"),
    "fit-name-dotdot": (FIT + ["--name", ".."], "--name '..': is a folder reference"),
    "fit-name-abs": (FIT + ["--name", "/abs/x"], "--name '/abs/x': is an absolute path"),
    "fit-name-up": (FIT + ["--name", "a/../../x"], "part '..' is a folder reference"),
    "fit-features-dot": (["fit", "--features", ".", "--bold", "s", "--lags", "2",
                          "--test-samples", "5"], "--features '.': is a folder reference"),
    "fit-bold-dotdot": (["fit", "--features", "r18", "--bold", "..", "--lags", "2",
                         "--test-samples", "5"], "--bold '..': is a folder reference"),
    "export-dotdot": (["export", "..", "mean", "{d}/x.nii.gz"], "GROUP '..': is a folder"),
    "export-dot": (["export", ".", "mean", "{d}/x.nii.gz"], "GROUP '.': is a folder ref"),
    "export-up": (["export", "bold/s/../..", "mean", "{d}/x.nii.gz"], "part '..' is a fold"),
    # defect 4: unbounded requests
    "frames-size-huge": (FRAMES[:4] + ["--size", "100000", "--name", "big"],
                         "of memory but"),
    "frames-fps-1e9": (FRAMES[:2] + ["--fps", "1e9", "--size", "32", "--name", "fast"],
                       "--fps 1e+09 is above the cap of 240 fps"),
    "frames-fps-1e5": (FRAMES[:2] + ["--fps", "1e5", "--size", "32", "--name", "fast"],
                       "it would write 4,000,000 frames for 40.0 s of video; lower it"),
    "frames-fps-nan": (FRAMES[:2] + ["--fps", "nan", "--size", "32", "--name", "n"],
                       "--fps must be a positive number"),
    "features-block-huge": (FEATURES + ["--name", "big", "--block-size", "1000000000"],
                            "lower --block-size"),
    "features-batch-0": (FEATURES + ["--name", "b0", "--batch-size", "0"],
                         "--batch-size must be a positive number"),
    "cluster-memory-limit": (FRAMES + ["--name", "m", "--workers", "1", "--memory-limit",
                                       "abc"], "--memory-limit 'abc': not a size"),
    "cluster-workers-0": (FRAMES + ["--name", "w", "--workers", "0"],
                          "--workers must be a positive number"),
    # defect 5: degenerate data
    "video-still-image": (["frames", "{d}/still.mp4", "--name", "img", "--fps", "2", "--size",
                           "32"], "still.mp4: is a still image (jpeg), not a video"),
    "bold-nan-masked": (["bold", "{d}/nan.nii.gz", "--mask", "{d}/mask.nii.gz", "--subject",
                         "n"], "nan.nii.gz: no usable voxel"),
    "bold-nan-unmasked": (["bold", "{d}/nan.nii.gz", "--subject", "n"],
                          "nan.nii.gz: no usable voxel"),
    "bold-constant": (["bold", "{d}/constant.nii.gz", "--mask", "{d}/mask.nii.gz",
                       "--subject", "c"], "no usable voxel: all 48 voxels are constant"),
    "bold-one-volume": (["bold", "{d}/one.nii.gz", "--mask", "{d}/mask.nii.gz", "--subject",
                         "o"], "one.nii.gz: holds 1 volume(s)"),
    "bold-chunk-voxels-0": (BOLD + ["--subject", "c0", "--chunk-voxels", "0"],
                            "--chunk-voxels must be a positive number (got 0)"),
    "bold-tr-negative": (BOLD + ["--subject", "t", "--tr", "-2"],
                         "--tr must be a positive number of seconds"),
    # defect 6, as fit options
    "fit-lag-too-long": (FIT[:6] + ["1000", "--test-samples", "5", "--name", "l"],
                         "run 0 lasts 40 s (20 volumes x TR 2 s), shorter than the 1002 s"),
    "fit-lag-nan": (FIT[:6] + ["nan", "--test-samples", "5", "--name", "l"],
                    "--lags must be >= 0 seconds"),
    "fit-alpha-inf": (FIT + ["--alphas", "inf", "--name", "a"], "--alphas must all be > 0"),
    "fit-test-samples": (FIT[:7] + ["--test-samples", "1000", "--name", "t"], "--test-samples must be between"),
    "fit-cv-1000": (FIT[:-1] + ["1000", "--name", "c"], "--cv must be between 2 and"),
    "fit-test-runs": (FIT[:7] + ["--test-runs", "5", "--name", "r"],
                      "--test-runs [5] not among the runs"),
    "fit-voxel-block-0": (FIT + ["--voxel-block", "0", "--name", "v"],
                          "--voxel-block must be >= 1"),
}

# id -> (argv, fragment) refused for the free disk space (made 1 KiB for them)
DISK_CASES = {
    "frames-disk": (FRAMES + ["--name", "d"], "the output needs about"),
    "features-disk": (FEATURES + ["--name", "d"], "the output needs about"),
    "bold-disk": (BOLD + ["--subject", "d"], "the output needs about"),
    "fit-disk": (FIT + ["--name", "d"], "the output needs about"),
}

# id -> (argv, fragment) refused for the memory one block needs (made 1 KiB for them):
# each stage states its block's working set before any work
MEMORY_CASES = {
    "frames-memory": (FRAMES + ["--name", "m"], "lower --size"),
    "features-memory": (FEATURES + ["--name", "m"], "lower --block-size"),
    "bold-memory": (BOLD + ["--subject", "m"], "lower --chunk-voxels"),
    "fit-memory": (FIT + ["--name", "m"], "use fewer lags or a smaller feature layer"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The inputs and a workspace holding complete frames, features, bold and fit groups."""
    folder = write_inputs(tmp_path_factory.mktemp("refusals"))
    ws = Workspace(folder / "ws.zarr")
    run_frames_stage(ws, [folder / "movie.mp4"], "clip", fps=2, size=32, progress=False)
    run_features_stage(ws, "clip", "resnet18", weights="random:0", name="r18", progress=False)
    run_bold_stage(ws, [folder / "bold.nii.gz"], "s", mask=folder / "mask.nii.gz",
                   progress=False)
    run_fit_stage(ws, "r18", "s", [2.0], [1.0, 100.0], test_samples=5, cv=2, name="f",
                  progress=False)
    return folder


def _argv(argv: list[str], folder: Path) -> list[str]:
    out = [a.replace("{d}", str(folder)) for a in argv]
    return out + ["--store", str(folder / "ws.zarr")] + (
        [] if argv[0] == "export" else ["--no-progress"])


def _refused_unchanged(capsys, folder: Path, argv: list[str], fragment: str) -> str:
    before = snapshot(folder / "ws.zarr")
    files = sorted(p.name for p in folder.iterdir())
    line = cli_error(capsys, *_argv(argv, folder))
    assert fragment in line, line
    assert snapshot(folder / "ws.zarr") == before
    assert sorted(p.name for p in folder.iterdir()) == files  # nothing written beside it
    return line


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_an_unchanged_store(data, capsys, case):
    argv, fragment = CASES[case]
    _refused_unchanged(capsys, data, argv, fragment)


@pytest.mark.parametrize("case", list(DISK_CASES))
def test_an_output_larger_than_the_free_disk_is_refused(data, capsys, monkeypatch, case):
    monkeypatch.setattr(resources, "free_disk", lambda path: 1024)
    line = _refused_unchanged(capsys, data, *DISK_CASES[case])
    assert "on disk but 1 KiB is free at" in line, line


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_a_block_larger_than_the_available_memory_is_refused(data, capsys, monkeypatch,
                                                             case):
    monkeypatch.setattr(resources, "available_memory", lambda: (1024, "available here"))
    line = _refused_unchanged(capsys, data, *MEMORY_CASES[case])
    assert "of memory but 1 KiB is available here" in line, line


def test_the_workspace_built_for_these_tests_is_complete(data):
    """The refusals above are measured against complete groups of every stage."""
    ws = Workspace(data / "ws.zarr")
    for group in ("frames/clip", "features/r18", "bold/s", "fits/f/lags-2"):
        assert ws.state(group) == "complete", group


def test_an_fps_above_the_video_rate_says_how_many_frames_it_writes(data, capsys):
    """Up to the cap, a higher --fps than the video's own is allowed, with a note of
    how many frames it writes."""
    from voxelflow import cli

    argv = _argv(FRAMES[:2] + ["--fps", "30", "--size", "32", "--name", "up"], data)
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert ("movie.mp4: --fps 30 is above the video's 8 fps: each frame is repeated about "
            "3.8 times, 1,200 frames for 40.0 s") in err
    assert Workspace(data / "ws.zarr").open_run("frames/up", 0).sizes["time"] == 1200
    Workspace(data / "ws.zarr").delete("frames/up")


@pytest.mark.parametrize("case", ["frames-name-dotdot", "bold-nan-masked",
                                  "video-still-image"])
def test_the_real_command_refuses_with_one_line(data, case):
    argv, fragment = CASES[case]
    before = snapshot(data / "ws.zarr")
    res = run_cli(*_argv(argv, data))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxelflow: error: ") and fragment in lines[0]
    assert snapshot(data / "ws.zarr") == before
