"""``[[fit.joint]]`` in an experiment file: planned after its models' stages, run by
``voxelflow run`` as ``voxelflow fit --features a b`` would, one report row ``a+b``
and its per-space pieces (which-space map, split per ROI); bad tables are one line
naming the key."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.stages.joint_fit import run_joint_fit_stage
from voxelflow.pipeline.study.config import load_experiment
from voxelflow.pipeline.study.plan import build_plan
from voxelflow.pipeline.study.run import run_experiment
from voxelflow.stores import Workspace

N_VOL, RATE = 60, 2.0
ALPHAS = [1, 10, 100, 1000]
GRID = (4, 4, 2)  # 32 voxels: i < 2 driven by a, i >= 2 by b
ATLAS = np.repeat([1, 2], 16).reshape(GRID)  # ROI 1 "front" (i < 2), 2 "back"
ATLAS[3, 3] = 0                                # two voxels in no ROI


def _inputs(folder: Path) -> None:
    """Two runs: imported features a and b (each drives half of the voxels, at lag
    2 s), NIfTI BOLD on GRID, a mask, an atlas of two ROIs and its names."""
    rng = np.random.default_rng(3)
    w = {"a": rng.normal(size=(3, 16)), "b": 0.7 * rng.normal(size=(2, 16))}
    for r in range(2):
        feats = {n: np.repeat(rng.normal(size=(N_VOL, w[n].shape[0])), 2, axis=0)
                 for n in "ab"}
        for n, values in feats.items():
            np.save(folder / f"{n}{r}.npy", values.astype(np.float32))
        signal = np.vstack([np.zeros((2, 32)), np.hstack([feats[n][::2][:-2] @ w[n]
                                                           for n in "ab"])])
        bold = 100 + signal + rng.normal(size=signal.shape)
        img = nib.Nifti1Image(bold.T.reshape(*GRID, N_VOL).astype(np.float32), np.eye(4))
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = 1.0
        nib.save(img, folder / f"run{r}.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(GRID, np.uint8), np.eye(4)), folder / "mask.nii.gz")
    nib.save(nib.Nifti1Image(ATLAS.astype(np.int16), np.eye(4)), folder / "atlas.nii.gz")
    (folder / "atlas.tsv").write_text("label\tname\n1\tfront\n2\tback\n")


def _toml(folder: Path, joint: str) -> Path:
    path = folder / "exp.toml"
    models = "".join(f"""
[[models]]
name = "{n}"
source = "import"
files = ["{n}0.npy", "{n}1.npy"]
rate = {RATE}
""" for n in "ab")
    path.write_text(f"""
[experiment]
name = "j"
[bold]
subject = "s"
runs = ["run0.nii.gz", "run1.nii.gz"]
mask = "mask.nii.gz"
{models}
[fit]
lag_sets = [[2, 3]]
alphas = {ALPHAS}
test_samples = 20
cv = 3
permutations = 0
bootstrap = 0
{joint}
[report]
atlas = "atlas.nii.gz"
atlas_labels = "atlas.tsv"
""")
    return path


JOINT = """[[fit.joint]]
features = ["a", "b"]
weightings = 4
partition = true
"""


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    """The experiment with one joint model a+b (partition), run once: its plan before
    the run, the experiment, the run's result and the workspace."""
    folder = tmp_path_factory.mktemp("joint_experiment")
    _inputs(folder)
    exp = load_experiment(_toml(folder, JOINT))
    plan = build_plan(exp, progress=False)
    out = run_experiment(exp, progress=False, log=lambda *_: None)
    return {"plan": plan, "exp": exp, "out": out, "ws": Workspace(exp.store)}


@pytest.fixture(scope="module")
def direct(joint_run):
    """The same joint fit by the stage called directly, with its weights."""
    ws = joint_run["ws"]
    s = run_joint_fit_stage(ws, ["a", "b"], "s", [2, 3], ALPHAS, weightings=4,
                            partition=True, test_samples=20, cv=3, name="direct",
                            save_weights=True, statistics=joint_run["exp"].statistics(),
                            progress=False)
    return ws.open_node(s.group)


def test_joint_model_is_planned_run_and_reported(joint_run, direct):
    exp, out, ws = joint_run["exp"], joint_run["out"], joint_run["ws"]
    assert [s.group for s in joint_run["plan"]][-1] == "fits/j/a+b/lags-2-3"
    fit = ws.open_node("fits/j/a+b/lags-2-3")
    # the same fit as the stage called directly
    for var in ("r_test_cv", "best_weighting", "space_alpha", "r2_split", "partition"):
        np.testing.assert_array_equal(fit[var].values, direct[var].values, err_msg=var)
    table = out["table"] if isinstance(out, dict) and "table" in out else None
    report = (exp.reports / "j").rglob("*.md")
    text = "".join(p.read_text() for p in report)
    assert "a+b" in text, text[:500]
    if table is not None:
        assert "a+b" in list(table["model"])
    # a second plan skips everything
    assert {s.action for s in build_plan(exp, progress=False)} == {"skip"}


def _expected_labels(fit) -> np.ndarray:
    """1 + argmax over spaces of the stored r2_split where the joint r_test_cv > 0
    (no permutations in this experiment), else 0."""
    split = fit["r2_split"].values.astype(np.float64)
    r = fit["r_test_cv"].values.astype(np.float64)
    assert np.isfinite(split).all() and np.isfinite(r).all() and fit["valid"].values.all()
    return np.where(r > 0, split.argmax(axis=0) + 1, 0)


def test_report_maps_which_space_and_splits_per_roi(joint_run):
    exp, ws, report = joint_run["exp"], joint_run["ws"], joint_run["out"]["report"]
    fit = ws.open_node("fits/j/a+b/lags-2-3")
    ijk = tuple(fit[c].values for c in "ijk")
    folder = exp.reports / "j"
    # the which-space map: labels from the stored r2_split, placed on the BOLD grid
    expected = _expected_labels(fit)
    volume = np.asarray(nib.load(folder / "maps" / "a+b_lags-2-3_which_space.nii.gz")
                        .dataobj)
    np.testing.assert_array_equal(volume[ijk], expected)
    assert volume.sum() == expected.sum()  # nothing outside the fit's voxels
    planted = np.where(ijk[0] < 2, 1, 2)  # a drives i < 2, b the others
    shown = expected > 0
    assert shown.sum() >= 24 and (expected[shown] == planted[shown]).mean() >= 0.8
    # the numbers per ROI: numpy means of the stored arrays over the atlas masks
    table = pd.read_csv(folder / "space_split.csv")
    roi = ATLAS[ijk]
    for _, row in table.iterrows():
        values = fit[row["measure"]].sel({fit[row["measure"]].dims[0]: row["component"]})
        mask = roi == row["roi"]
        assert row["roi_name"] == {1: "front", 2: "back"}[row["roi"]]
        assert row["n_voxels"] == mask.sum() == (14 if row["roi"] == 2 else 16)
        np.testing.assert_allclose(row["mean"], values.values[mask].astype(np.float64).mean(),
                                   rtol=1e-12, err_msg=str(dict(row)))
    assert sorted(set(zip(table["measure"], table["component"]))) == [
        ("partition", "a"), ("partition", "a&b"), ("partition", "b"),
        ("r2_split", "a"), ("r2_split", "b")]
    assert len(table) == 2 * 5
    # the figures exist as PNG + SVG and the page shows them with the explanation
    page = (folder / "index.html").read_text()
    for stem in ("a+b_lags-2-3_which_space", "a+b_lags-2-3_space_split"):
        assert (folder / f"{stem}.png").stat().st_size > 1000
        assert f"src='{stem}.png'" in page and f"href='{stem}.svg'" in page
    bars = (folder / "a+b_lags-2-3_space_split.svg").read_text()
    for text in ("unique to a", "shared by a&amp;b", "front", "back", "R² split"):
        assert text in bars, text
    assert "1 a" in (folder / "a+b_lags-2-3_which_space.svg").read_text()
    assert "docs/statistics.md" in page and "r2_score_split" in page
    section = page[page.index("id='joint-models'"):]  # its table: one full row per ROI
    assert section.count("<td>front</td>") == section.count("<td>back</td>") == 1
    assert "<td>-</td>" not in section
    for mean in table["mean"]:
        assert f"<td>{mean:.3g}</td>" in section, mean
    assert "href='space_split.csv'" in page and "href='maps/a+b_lags-2-3_which_space" in page
    assert [i["model"] for i in report["joint"]] == ["a+b"]


def test_which_space_is_the_argmax_of_himalayas_split(joint_run, direct):
    """The split recomputed by himalaya's r2_score_split from the per-space predictions
    (stored weights x the centred test design of each space) gives the same labels."""
    from himalaya.scoring import r2_score_split

    from voxelflow.pipeline.design.lags import build_design
    from voxelflow.pipeline.study.report.spaces import which_space

    ws = joint_run["ws"]
    bold = [ws.open_run("bold/s", r) for r in range(2)]
    designs = [build_design(ws.open_runs(f"features/{n}"), bold, [2, 3], 1.0) for n in "ab"]
    y = np.asarray(designs[0].Y.compute(), np.float64)
    n = y.shape[0] - 20
    predictions = []
    for name, design in zip("ab", designs):
        x = np.asarray(design.X.compute(), np.float64)
        w = direct["weights"].values[direct["column_space"].values == name]
        predictions.append((x[n:] - x[:n].mean(axis=0)) @ w.astype(np.float64))
    predictions = np.stack(predictions)
    split = np.asarray(r2_score_split(y[n:] - y[n:].mean(axis=0),
                                      predictions - predictions.mean(axis=1, keepdims=True)))
    np.testing.assert_allclose(direct["r2_split"].values, split, atol=1e-4)
    found = which_space(direct)
    r = direct["r_test_cv"].values
    np.testing.assert_array_equal(found.labels, np.where(r > 0, split.argmax(axis=0) + 1, 0))
    assert set(found.labels) >= {1, 2}


@pytest.mark.parametrize("joint, message", [
    ('[[fit.joint]]\nfeatures = ["a"]\n', "two or more"),
    ('[[fit.joint]]\nfeatures = ["a", "c"]\n', "not among the [[models]]"),
    ('[[fit.joint]]\nfeatures = ["a", "a"]\n', "named twice"),
    ('[[fit.joint]]\nfeatures = ["a", "b"]\nweightings = [[1, 2, 3]]\n', "one value per"),
    ('[[fit.joint]]\nfeatures = ["a", "b"]\nweightings = [[1, -1]]\n', ">= 0"),
    ('[[fit.joint]]\nfeatures = ["a", "b"]\nweightings = 0\n', "count >= 1"),
    ('[[fit.joint]]\nfeatures = ["a", "b"]\nsize = 3\n', "unknown key"),
])
def test_bad_joint_tables_are_one_line(tmp_path, joint, message):
    _inputs(tmp_path)
    with pytest.raises(InputError) as info:
        load_experiment(_toml(tmp_path, joint))
    text = str(info.value)
    assert message in text and "fit.joint" in text and "\n" not in text, text
    assert text.split(":")[1].isdigit() and int(text.split(":")[1]) > 20, text
