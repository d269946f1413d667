"""BIDS input (pybids) and streamed confound cleaning against nilearn.signal.clean, on
generated datasets (raw + fMRIPrep-like derivatives), the real Haxby runs through a BIDS
tree of symlinks, and the automatic mask on a partial-coverage slab."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_inputs import N_TIME, SHAPE, TR, confounds_table, make_bids, write_json
from bold_inputs import cli_main, haxby_runs, write_nifti
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.stages.bids import find_bids_runs
from voxelflow.pipeline.stages.bold import run_bold_stage
from voxelflow.pipeline.stages.confounds import parse_strategy
from voxelflow.stores.workspace import Workspace

MNI = "MNI152NLin2009cAsym"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_bids(tmp_path_factory.mktemp("bids") / "ds")
    from bids import BIDSLayout

    layout = BIDSLayout(root, validate=True, derivatives=True)  # pybids accepts the tree
    assert len(layout.get(suffix="bold", extension=".nii.gz", scope="raw")) == 3
    return root


def test_raw_bids_runs_tr_events_entities(tmp_path, dataset, capsys):
    store = str(tmp_path / "ws.zarr")
    code, out, err = cli_main(capsys, "bold", "--bids", str(dataset), "--subject", "01",
                              "--task", "movie", "--mask", str(_full_mask(tmp_path)),
                              "--no-zscore", "--store", store)
    assert code == 0, err
    assert "2 run(s)" in out and "BIDS sidecar RepetitionTime" in out
    ws = Workspace(store)
    for r in range(2):
        run = ws.open_run("bold/01", r)
        src = dataset / "sub-01" / "func" / f"sub-01_task-movie_run-{r + 1}_bold.nii.gz"
        np.testing.assert_array_equal(run["bold"].values, _masked(src))
        attrs = ws.attrs(f"bold/01/run-{r:03d}")
        assert attrs["bids"]["run"] == r + 1 and attrs["bids"]["task"] == "movie"
        assert attrs["events_file"].endswith(f"run-{r + 1}_events.tsv")
        assert attrs["tr"] == TR


def _full_mask(tmp_path):
    path = tmp_path / "mask.nii.gz"
    if not path.exists():
        write_nifti(path, np.ones(SHAPE, dtype=np.uint8))
    return path


def _masked(path):
    return nib.load(str(path)).get_fdata().reshape(-1, N_TIME).T.astype(np.float32)


def test_missing_names_what_is_there(dataset, capsys, tmp_path):
    with pytest.raises(InputError, match="tasks there: movie, rest"):
        find_bids_runs(dataset, "01", "film")
    with pytest.raises(InputError, match="subjects there: 01"):
        find_bids_runs(dataset, "02", "movie")
    with pytest.raises(InputError, match=f"spaces there: {MNI}"):
        find_bids_runs(dataset, "01", "movie", space="T1w")
    code, _, err = cli_main(capsys, "bold", "--bids", str(dataset), "--subject", "01",
                            "--task", "movie", "--space", "fsLR", "--store",
                            str(tmp_path / "x.zarr"))
    assert code == 2 and err.count("\n") == 1 and "spaces there" in err


def _clean_reference(x, confounds, detrend):
    from nilearn.signal import clean

    return clean(x.astype(np.float64), confounds=confounds, detrend=detrend,
                 standardize=False, standardize_confounds=True, filter=False)


@pytest.mark.parametrize("detrend", ["none", "linear"])
def test_fmriprep_confounds_equal_nilearn_clean(tmp_path, dataset, detrend):
    """Pass-2 cleaning (float64, per chunk) == nilearn.signal.clean with the stored
    regressors, to 1e-5; the regressors stored are nilearn load_confounds' own."""
    from nilearn.interfaces.fmriprep import load_confounds

    ws = Workspace(tmp_path / "ws.zarr")
    runs = find_bids_runs(dataset, "01", "movie", space=MNI, desc="preproc")
    files = [r.files[0] for r in runs]
    run_bold_stage(ws, files, "c", mask=_full_mask(tmp_path), zscore=False, detrend=detrend,
                   confounds="motion=derivatives,wm_csf=basic,global_signal,high_pass",
                   chunk_voxels=16, progress=False)
    for r, path in enumerate(files):
        run = ws.open_run("bold/c", r)
        ref_frame, _ = load_confounds(path, strategy=("motion", "wm_csf", "global_signal",
                                                      "high_pass"), motion="derivatives")
        assert list(run["confound"].values) == list(ref_frame.columns)
        np.testing.assert_array_equal(run["confounds"].values, ref_frame.to_numpy())
        want = _clean_reference(_masked(path), ref_frame.to_numpy(), detrend == "linear")
        np.testing.assert_allclose(run["bold"].values, want, atol=1e-5 * np.abs(want).max())


def test_high_pass_without_fmriprep_and_zscore(tmp_path, dataset):
    """--high-pass on raw runs: nilearn's cosine filter, then voxelflow's z-score (ddof 0)."""
    from nilearn.signal import clean

    ws = Workspace(tmp_path / "ws.zarr")
    src = dataset / "sub-01" / "func" / "sub-01_task-movie_run-1_bold.nii.gz"
    run_bold_stage(ws, [src], "hp", mask=_full_mask(tmp_path), high_pass=0.05,
                   detrend="linear", progress=False)
    want = clean(_masked(src).astype(np.float64), detrend=True, standardize=False,
                 filter="cosine", high_pass=0.05, t_r=TR)
    want = (want - want.mean(0)) / want.std(0)
    np.testing.assert_allclose(ws.open_run("bold/hp", 0)["bold"].values, want, atol=1e-5)
    assert ws.open_run("bold/hp", 0)["confounds"].shape[1] > 0


def test_bad_confounds_one_line(tmp_path, dataset, capsys):
    deriv = tmp_path / "d"
    func = deriv / "sub-01" / "func"
    func.mkdir(parents=True)
    write_json(deriv / "dataset_description.json",
               {"Name": "f", "BIDSVersion": "1.8.0", "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "fMRIPrep"}]})
    run = write_nifti(func / f"sub-01_task-movie_space-{MNI}_desc-preproc_bold.nii.gz",
                      np.random.default_rng(0).standard_normal(SHAPE + (N_TIME,))
                      .astype(np.float32), tr=TR)
    tsv = func / "sub-01_task-movie_desc-confounds_timeseries.tsv"
    lines = confounds_table(1).splitlines()
    cases = {
        "short": ("\n".join(lines[:-3]) + "\n", "rows but the run has"),
        "nan": ("\n".join(lines[:5] + [lines[5].replace(lines[5].split("\t")[0], "n/a", 1)]
                          + lines[6:]) + "\n", "n/a or infinite at row 5"),
        "columns": ("\n".join(l.split("\t", 1)[1] for l in lines) + "\n", "could not be read"),
    }
    for name, (text, message) in cases.items():
        tsv.write_text(text)
        code, _, err = cli_main(capsys, "bold", str(run), "--subject", name, "--confounds",
                                "wm_csf,global_signal", "--mask", str(_full_mask(tmp_path)),
                                "--store", str(tmp_path / "ws.zarr"))
        assert code == 2 and message in err and err.count("\n") == 1, (name, err)
    assert not (tmp_path / "ws.zarr" / "bold").exists() or not any(
        (tmp_path / "ws.zarr" / "bold").iterdir())
    with pytest.raises(InputError, match="unknown strategy 'motoin'"):
        parse_strategy("motoin=full")


def test_partial_coverage_mask_falls_back(tmp_path):
    """A slab of 3 slices: compute_epi_mask finds no brain; the fallback does, and says so."""
    from nilearn.masking import compute_background_mask, compute_epi_mask

    rng = np.random.default_rng(2)
    data = np.zeros((8, 8, 3, 12), dtype=np.float32)
    data[1:7, 1:7] = 300 + rng.standard_normal((6, 6, 3, 12))
    path = write_nifti(tmp_path / "slab.nii.gz", data)
    mean_img = nib.Nifti1Image(data.mean(3), np.eye(4))
    assert not np.asarray(compute_epi_mask(mean_img).dataobj).any()  # the case to handle
    ws = Workspace(tmp_path / "ws.zarr")
    summary = run_bold_stage(ws, [path], "slab", progress=False)
    want = np.asarray(compute_background_mask(mean_img).dataobj) != 0
    np.testing.assert_array_equal(ws.open_node("bold/slab")["mask"].values.astype(bool), want)
    assert "compute_background_mask" in ws.attrs("bold/slab")["mask_method"]
    assert "compute_background_mask" in summary["mask"]
    flat = write_nifti(tmp_path / "flat.nii.gz", np.ones((4, 4, 2, 5), dtype=np.float32))
    with pytest.raises(InputError, match="no automatic method found a plausible brain"):
        run_bold_stage(ws, [flat], "flat", progress=False)


def test_otsu_matches_skimage():
    from skimage.filters import threshold_otsu

    from voxelflow.pipeline.stages.nifti import otsu_threshold

    values = np.concatenate([np.random.default_rng(0).normal(10, 2, 500),
                             np.random.default_rng(1).normal(40, 5, 300)])
    assert otsu_threshold(values) == pytest.approx(threshold_otsu(values), rel=1e-6)


def test_haxby_runs_through_a_bids_tree(tmp_path, haxby_dir):
    """The real Haxby runs as a BIDS dataset of symlinks: same bytes as the plain files."""
    root = tmp_path / "haxby"
    func = root / "sub-1" / "func"
    func.mkdir(parents=True)
    write_json(root / "dataset_description.json", {"Name": "haxby", "BIDSVersion": "1.8.0"})
    runs = haxby_runs(haxby_dir)[:3]
    for n, path in enumerate(runs, start=1):
        (func / f"sub-1_task-objects_run-{n}_bold.nii.gz").symlink_to(path)
        (func / f"sub-1_task-objects_run-{n}_events.tsv").symlink_to(
            path.parent / "bold_events.tsv")
        write_json(func / f"sub-1_task-objects_run-{n}_bold.json", {"RepetitionTime": 2.5})
    mask = haxby_dir / "masks" / "brain.nii.gz"
    ws = Workspace(tmp_path / "ws.zarr")
    run_bold_stage(ws, runs, "plain", mask=mask, progress=False)
    from voxelflow.pipeline.stages.bold import bold_inputs

    files, tr, source, attrs = bold_inputs([], bids=root, subject="1", task="objects")
    run_bold_stage(ws, files, "1", mask=mask, tr=tr, tr_source=source, run_attrs=attrs,
                   progress=False)
    for r in range(3):
        np.testing.assert_array_equal(ws.open_run("bold/1", r)["bold"].values,
                                      ws.open_run("bold/plain", r)["bold"].values)
        assert json.loads(json.dumps(ws.attrs(f"bold/1/run-{r:03d}")["bids"]))["run"] == r + 1
    assert ws.attrs("bold/1")["tr_source"] == "BIDS sidecar RepetitionTime"
