"""``voxelflow run`` with ``[bold] bids = ...``: the runs, TR and events that pybids
finds in a generated fMRIPrep-like dataset, with confounds removed, end to end."""

from __future__ import annotations

import numpy as np

from bids_inputs import make_bids
from voxelflow.pipeline.study.config import load_experiment
from voxelflow.pipeline.study.run import run_experiment
from voxelflow.stores import Workspace


def test_experiment_with_bids_input(tmp_path):
    root = make_bids(tmp_path / "ds", runs=3)
    events = [str(root / "sub-01" / "func" / f"sub-01_task-movie_run-{r}_events.tsv")
              for r in (1, 2, 3)]
    toml = tmp_path / "exp.toml"
    toml.write_text(f"""
[experiment]
name = "bidsexp"
[bold]
subject = "01"
bids = "ds"
task = "movie"
space = "MNI152NLin2009cAsym"
desc = "preproc"
confounds = "motion=basic,wm_csf=basic"
high_pass = 0.01
[[models]]
name = "cats"
source = "events"
events = {events!r}
rate = 2
columns = ["trial_type"]
[fit]
lag_sets = [[3]]
test_runs = [2]
cv = "runs"
""".replace("'", '"'))
    exp = load_experiment(toml)
    assert [str(p) for p in exp.bold_runs] == sorted(str(p) for p in exp.bold_runs)
    assert exp.tr == 1.5 and exp.bold_options["tr_source"] == "BIDS sidecar RepetitionTime"
    out = run_experiment(exp, progress=False, log=lambda *_: None)
    ws = Workspace(exp.store)
    assert ws.state("bold/01") == "complete"
    run = ws.open_run("bold/01", 2)
    assert list(run["confound"].values)[:8] == ["csf", "rot_x", "rot_y", "rot_z", "trans_x",
                                               "trans_y", "trans_z", "white_matter"]
    assert ws.attrs("bold/01/run-002")["bids"]["run"] == 3
    assert ws.attrs("bold/01")["confounds"] == "motion=basic,wm_csf=basic"
    assert ws.state("fits/bidsexp/cats/lags-3") == "complete"
    assert np.isfinite(ws.open_node("fits/bidsexp/cats/lags-3")["r_test"].values).any()
    assert out["report"]
