"""Experiment runner, report and demo: planted answer, no recomputation, report values
against the stored arrays, bad experiment files (resume after SIGKILL: test_run.py)."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conftest import ROOT, cli_error, cli_here
from torch_threads import one_torch_thread  # noqa: F401 - autouse: 1 torch thread
from voxelflow.pipeline.study.config import load_experiment
from voxelflow.pipeline.study.demo import PLANTED_LAGS, PLANTED_MODEL, run_demo
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.study.plan import build_plan
from voxelflow.pipeline.study.run import run_experiment
from voxelflow.pipeline.study.report import ranking

# 100 frames at 1 fps from a movie generated at 2 frames/s (cheaper to write than 24),
# and MobileNet-V3-Small (random weights) as the distractor the planted model must beat.
SMALL = dict(seconds=100.0, fps=1.0, n_voxels=400, progress=False, movie_rate=2,
             distractor="mobilenet_v3_small")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    out = run_demo(work, log=lambda *_: None, **SMALL)
    return work, out


def test_small_demo_ranks_the_planted_model_and_lags_first(demo):
    _, out = demo
    top = ranking(out["report"]["table"]).iloc[0]
    assert top["model"] == PLANTED_MODEL
    assert top["lags"] == ",".join(f"{l:g}" for l in PLANTED_LAGS)


def test_second_run_recomputes_nothing(demo):
    work, first = demo
    exp = load_experiment(work / "experiment.toml")
    plan = build_plan(exp, progress=False)
    assert {s.action for s in plan} == {"skip"}, [s.describe() for s in plan]
    again = run_experiment(exp, progress=False, log=lambda *_: None)
    assert again["ran"] == []
    pd.testing.assert_frame_equal(again["report"]["table"], first["report"]["table"])
    res = cli_here("run", str(work / "experiment.toml"), "--dry-run")
    assert res.returncode == 0 and "skip" in res.stdout and " run " not in res.stdout


def test_changed_alphas_rerun_only_the_fits(demo, tmp_path):
    work, _ = demo
    text = (work / "experiment.toml").read_text().replace("alphas = [0.5, ", "alphas = [0.25, 0.5, ")
    changed = work / "changed.toml"
    changed.write_text(text)
    plan = build_plan(load_experiment(changed), progress=False)
    actions = {s.kind: set() for s in plan}
    for s in plan:
        actions[s.kind].add(s.action)
    assert actions == {"frames": {"skip"}, "bold": {"skip"}, "features": {"skip"},
                       "fit": {"rerun"}}


def test_report_table_equals_values_recomputed_from_store(demo):
    work, out = demo
    table = pd.read_csv(out["report"]["files"]["table_csv"])
    tree = xr.open_datatree(work / "voxelflow.zarr", engine="zarr")
    for _, row in table.iterrows():
        lags = "-".join(str(row["lags"]).split(","))
        node = tree[f"fits/demo/{row['model']}/lags-{lags}"].to_dataset()
        valid = node["valid"].values.astype(bool) & np.isfinite(node["r_test"].values).all(0)
        for a_i, alpha in enumerate(node["alpha"].values):
            expected = node["r_test"].values[a_i, valid].astype(np.float64).mean()
            assert abs(row[f"{alpha:g}"] - expected) < 1e-6
        assert abs(row["r_cv_selected"] - node["r_test_cv"].values[valid].mean()) < 1e-6


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.refs.append(attrs["src"])
        if tag == "a":
            self.refs.append(attrs["href"])


def test_report_files_exist_and_images_are_real(demo):
    _, out = demo
    files = out["report"]["files"]
    html = Path(files["html"])
    parser = _Refs()
    parser.feed(html.read_text())
    assert len(parser.refs) >= 6
    for ref in parser.refs:
        target = html.parent / ref
        assert target.exists() and target.stat().st_size > 0, ref
        if ref.endswith(".png"):
            from PIL import Image
            with Image.open(target) as img:
                assert img.size[0] > 200 and img.size[1] > 150
                assert np.unique(np.asarray(img.convert("L"))).size > 10  # not a blank image
    import nibabel as nib
    best = nib.load(str(files["best_map_nifti"]))
    assert np.isfinite(best.get_fdata()).all() and best.get_fdata().max() > 0.1


def test_best_model_map_is_r_test_cv_on_the_bold_grid(demo):
    """The best model's NIfTI map holds its stored r_test_cv at each voxel's (i, j, k)
    and 0 elsewhere, on the BOLD grid and affine."""
    import nibabel as nib

    from voxelflow.stores import Workspace

    work, out = demo
    model, label = out["report"]["best"]
    ws = Workspace(work / "voxelflow.zarr")
    fit = ws.open_node(f"fits/demo/{model}/lags-{label.replace(',', '-')}")
    img = nib.load(str(out["report"]["files"]["best_map_nifti"]))
    bold_attrs = ws.attrs("bold/simulated")
    assert img.shape == tuple(bold_attrs["volume_shape"])
    np.testing.assert_array_equal(img.affine, np.asarray(bold_attrs["affine"]))
    expected = np.zeros(img.shape, np.float32)
    expected[fit["i"].values, fit["j"].values, fit["k"].values] = fit["r_test_cv"].values
    np.testing.assert_array_equal(np.asarray(img.dataobj, dtype=np.float32), expected)
    assert np.count_nonzero(expected) == fit.sizes["voxel"]


BASE = """
[experiment]
name = "x"
[stimulus]
name = "m"
videos = ["{video}"]
[bold]
subject = "s"
runs = ["{bold}"]
[[models]]
name = "a"
model = "resnet50"
weights = "random:0"
[fit]
lag_sets = [[4], [4, 5]]
alphas = [1, 10]
test_samples = 10
"""


@pytest.mark.parametrize("edit, key", [
    (("{video}", "missing.mp4"), "stimulus.videos"),
    (('model = "resnet50"', 'model = "resnet5O"'), "models.model"),
    (("[[4], [4, 5]]", "[[4], [-1, 5]]"), "fit.lag_sets"),
    (("alphas = [1, 10]", "alphas = [0, 10]"), "fit.alphas"),
    (('runs = ["{bold}"]', 'runs = ["{bold}", "{bold}"]'), "bold.runs"),
    (("test_samples = 10", "test_sample = 10"), "fit.test_sample"),
    (('[fit]', '[fit]\ncv = "five"'), "fit.cv"),
    (('weights = "random:0"', 'weights = "random:0"\nepochs = 3'), "models.epochs"),
    (('model = "resnet50"', 'model = "autoencoder"\ntrain = false'), "models.train"),
    (('model = "resnet50"', 'model = "autoencoder"\ntrain_steps = 0'), "models.train_steps"),
    (("test_samples = 10", "test_repeats = [[0]]"), "fit.test_repeats"),
    (("test_samples = 10", "test_repeats = [[0, 1]]"), "fit.test_repeats"),
    (("test_samples = 10", "test_samples = 10\ntest_repeats = [[0, 1]]"), "[fit]"),
    (("[fit]", "[fit]\npermutations = -1"), "fit.permutations"),
    (("[fit]", "[fit]\nblock_length = 0"), "fit.block_length"),
    (("[fit]", '[fit]\nnull = "permute"'), "fit.null"),
])
def test_bad_experiment_files_name_the_key_and_line(tmp_path, capsys, edit, key):
    (tmp_path / "v.mp4").write_bytes(b"x")
    (tmp_path / "b.nii.gz").write_bytes(b"x")
    text = BASE.replace(edit[0], edit[1]).replace("{video}", "v.mp4").replace("{bold}", "b.nii.gz")
    path = tmp_path / "exp.toml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_experiment(path)
    msg = str(err.value)
    assert key in msg and f"{path}:" in msg, msg
    line = int(msg.split(f"{path}:")[1].split(":")[0])
    assert line > 1
    assert cli_error(capsys, "run", str(path)) == f"voxelflow: error: {msg}"  # exit 2, one line


def test_test_repeats_and_statistics_keys_reach_the_fit_request(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"x")
    (tmp_path / "b.nii.gz").write_bytes(b"x")
    text = (BASE.replace('videos = ["{video}"]', 'videos = ["v.mp4", "v.mp4", "v.mp4"]')
            .replace('runs = ["{bold}"]', 'runs = ["b.nii.gz", "b.nii.gz", "b.nii.gz"]')
            .replace("test_samples = 10", 'test_repeats = [[1, 2]]\npermutations = 200\n'
                     'bootstrap = 0\nblock_length = 6\nnull = "shifts"\nseed = 3'))
    (tmp_path / "exp.toml").write_text(text)
    exp = load_experiment(tmp_path / "exp.toml")
    assert exp.test_repeats == [[1, 2]] and exp.test_samples is None
    assert exp.statistics().as_params() == {"permutations": 200, "bootstrap": 0,
                                            "block_length": 6, "null": "shifts", "seed": 3}
    # the files are placeholders: plan without the input probes (check=False)
    fit = next(s for s in build_plan(exp, progress=False, check=False) if s.kind == "fit")
    assert fit.request["test_repeats"] == [[1, 2]]
    assert fit.request["statistics"]["null"] == "shifts"


AUTOENCODER_MODEL = """
[[models]]
name = "ae"
model = "autoencoder"
weights = "random:0"
train_steps = 3
train_batch_size = 4
lr = 1e-3
checkpoint = "ae/ae.pt"

[fit]"""


def test_experiment_trains_the_autoencoder_on_training_frames_only(demo):
    """An autoencoder model: the experiment trains it (frames before the earliest frame
    of any test sample), extracts its code, fits it; a second run skips everything."""
    import torch

    work, _ = demo
    text = (work / "experiment.toml").read_text()
    head, fit = text.split("[[models]]", 1)[0], text.split("[fit]", 1)[1]
    head = head.replace("size = 224", "size = 64").replace('name = "demo"', 'name = "ae_demo"')
    head = head.replace('store = "voxelflow.zarr"', 'store = "ae_ws.zarr"')
    fit = fit.replace("lag_sets = [", "lag_sets = [[4, 5, 6, 7]] # ").replace(
        "cv = 5", "cv = 2")
    path = work / "ae.toml"  # next to the demo's movie and BOLD files
    path.write_text(head + AUTOENCODER_MODEL + fit)
    exp = load_experiment(path)
    plan = build_plan(exp, progress=False)
    assert [s.kind for s in plan] == ["frames", "bold", "train", "features", "fit"]
    out = run_experiment(exp, progress=False, log=lambda *_: None)
    assert [s.kind for s in out["ran"]] == ["frames", "bold", "train", "features", "fit"]
    ckpt = torch.load(work / "ae" / "ae.pt", map_location="cpu", weights_only=True)
    assert ckpt["complete"] and ckpt["step"] == 3
    # Independently: the first BOLD sample held out is at t0 = (n - test_samples) * TR
    # (all samples kept: the movie is longer than the lags); its lag-7 s frame is the
    # earliest test frame, so training ends strictly before t0 - 7 s.
    bold = xr.open_datatree(work / "ae_ws.zarr", engine="zarr")["bold/simulated/run-000"]
    times = bold["time"].values
    t0 = times[times.size - exp.test_samples]
    (run, start, stop), = ckpt["train_frames"]
    assert run == 0 and start == 0 and stop == int(round((t0 - 7) * exp.fps))
    assert out["report"]["table"]["model"].tolist() == ["ae"]
    again = build_plan(load_experiment(path), progress=False)
    assert {s.action for s in again} == {"skip"}, [s.describe() for s in again]


def test_the_readme_study_file_is_valid(tmp_path):
    """The documented experiment file (the study's setup) parses as it is printed."""
    readme = (ROOT / "docs" / "experiment.md").read_text()
    section = readme.split("## The study's file", 1)[1]
    text = section.split("```toml\n", 1)[1].split("```", 1)[0]
    for name in ("movie_run1.mp4", "sub01_run1.nii.gz", "cortex_mask.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    path = tmp_path / "study.toml"
    path.write_text(text)
    exp = load_experiment(path)
    assert [m.model for m in exp.models] == ["resnet50", "vgg16", "autoencoder"]
    assert exp.lag_sets == [[4], [4, 5, 6, 7], [4, 5, 6], [4, 4.5, 5, 5.5]]
    assert len(exp.alphas) == 12 and exp.test_samples == 300 and exp.fps == 20
    assert exp.models[2].checkpoint == tmp_path / "autoencoders" / "study-autoencoder.pt"
