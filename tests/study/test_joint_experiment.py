"""``[[fit.joint]]`` in an experiment file: planned after its models' stages, run by
``voxelflow run`` as ``voxelflow fit --features a b`` would, one report row ``a+b``;
bad tables are one line naming the key."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.stages.joint_fit import run_joint_fit_stage
from voxelflow.pipeline.study.config import load_experiment
from voxelflow.pipeline.study.plan import build_plan
from voxelflow.pipeline.study.run import run_experiment
from voxelflow.stores import Workspace

N_VOL, RATE = 60, 2.0


def _inputs(folder: Path) -> None:
    """Two runs: imported features a (drives the BOLD) and b (noise), NIfTI BOLD."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 8))
    for r in range(2):
        a = np.repeat(rng.normal(size=(N_VOL, 3)), 2, axis=0)
        np.save(folder / f"a{r}.npy", a.astype(np.float32))
        np.save(folder / f"b{r}.npy", rng.normal(size=(2 * N_VOL, 2)).astype(np.float32))
        signal = np.vstack([np.zeros((2, 8)), a[::2][:-2] @ w])
        bold = 100 + signal + rng.normal(size=signal.shape)
        img = nib.Nifti1Image(bold.T.reshape(2, 2, 2, N_VOL).astype(np.float32), np.eye(4))
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = 1.0
        nib.save(img, folder / f"run{r}.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.uint8), np.eye(4)), folder / "mask.nii.gz")


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
alphas = [1, 10, 100, 1000]
test_samples = 20
cv = 3
permutations = 0
bootstrap = 0
{joint}
""")
    return path


JOINT = """[[fit.joint]]
features = ["a", "b"]
weightings = 4
partition = true
"""


def test_joint_model_is_planned_run_and_reported(tmp_path):
    _inputs(tmp_path)
    exp = load_experiment(_toml(tmp_path, JOINT))
    plan = build_plan(exp, progress=False)
    assert [s.group for s in plan][-1] == "fits/j/a+b/lags-2-3"
    out = run_experiment(exp, progress=False, log=lambda *_: None)
    ws = Workspace(exp.store)
    fit = ws.open_node("fits/j/a+b/lags-2-3")
    # the same fit as the stage called directly
    run_joint_fit_stage(ws, ["a", "b"], "s", [2, 3], [1, 10, 100, 1000], weightings=4,
                        partition=True, test_samples=20, cv=3, name="direct",
                        statistics=exp.statistics(), progress=False)
    direct = ws.open_node("fits/direct/lags-2-3")
    for var in ("r_test_cv", "best_weighting", "space_alpha", "partition"):
        np.testing.assert_array_equal(fit[var].values, direct[var].values, err_msg=var)
    table = out["table"] if isinstance(out, dict) and "table" in out else None
    report = (exp.reports / "j").rglob("*.md")
    text = "".join(p.read_text() for p in report)
    assert "a+b" in text, text[:500]
    if table is not None:
        assert "a+b" in list(table["model"])
    # a second plan skips everything
    assert {s.action for s in build_plan(exp, progress=False)} == {"skip"}


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
