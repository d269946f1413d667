"""Small generated BIDS datasets for the BIDS / confounds / surface tests: a raw dataset
with sidecars and events, an fMRIPrep-like derivative with a confounds TSV in the format
fMRIPrep writes, and CIFTI-2 / GIFTI runs written with nibabel's own axis classes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.cifti2 import cifti2_axes

from bold_inputs import write_nifti

SHAPE = (5, 4, 3)
N_TIME = 24
TR = 1.5
MOTION = [f"{kind}_{axis}" for kind in ("trans", "rot") for axis in "xyz"]


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def bold_data(seed: int, shape=SHAPE, n_time: int = N_TIME) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (100 + 10 * rng.standard_normal(shape + (n_time,))).astype(np.float32)


def confounds_table(seed: int, n_time: int = N_TIME, n_cosine: int = 3) -> str:
    """A confounds TSV as fMRIPrep writes it: motion (+ derivatives with a leading n/a,
    + power2), csf / white_matter / global_signal (same expansions), FD, DVARS, cosines."""
    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {}
    for base in ["global_signal", "csf", "white_matter"] + MOTION:
        x = np.cumsum(rng.standard_normal(n_time)) * 0.1 + (50 if "_" not in base[:5] else 0)
        d = np.r_[np.nan, np.diff(x)]
        columns |= {base: x, f"{base}_derivative1": d, f"{base}_power2": x ** 2,
                    f"{base}_derivative1_power2": d ** 2}
    columns["framewise_displacement"] = np.r_[np.nan, np.abs(rng.standard_normal(n_time - 1))]
    columns["std_dvars"] = np.r_[np.nan, 1 + np.abs(rng.standard_normal(n_time - 1))]
    t = np.arange(n_time)
    for k in range(n_cosine):
        columns[f"cosine{k:02d}"] = np.sqrt(2 / n_time) * np.cos(np.pi / n_time * (t + .5) * (k + 1))
    names = list(columns)
    rows = ["\t".join(names)]
    for r in range(n_time):
        rows.append("\t".join("n/a" if np.isnan(columns[n][r]) else f"{columns[n][r]:.6g}"
                              for n in names))
    return "\n".join(rows) + "\n"


def make_bids(root: Path, runs: int = 2, fmriprep: bool = True) -> Path:
    """raw: sub-01 task-movie runs 1..N (+ task-rest run 1) with sidecars and events;
    derivatives/fmriprep: the same movie runs in MNI space, desc-preproc, with confounds."""
    write_json(root / "dataset_description.json", {"Name": "gen", "BIDSVersion": "1.8.0"})
    write_json(root / "task-movie_bold.json", {"RepetitionTime": TR, "TaskName": "movie"})
    write_json(root / "task-rest_bold.json", {"RepetitionTime": TR, "TaskName": "rest"})
    func = root / "sub-01" / "func"
    func.mkdir(parents=True)
    for run in range(1, runs + 1):
        stem = f"sub-01_task-movie_run-{run}"
        write_nifti(func / f"{stem}_bold.nii.gz", bold_data(run), tr=TR)
        (func / f"{stem}_events.tsv").write_text(
            "onset\tduration\ttrial_type\n0\t6\tface\n9\t6\thouse\n")
    write_nifti(func / "sub-01_task-rest_run-1_bold.nii.gz", bold_data(99), tr=TR)
    if not fmriprep:
        return root
    deriv = root / "derivatives" / "fmriprep"
    write_json(deriv / "dataset_description.json",
               {"Name": "fMRIPrep", "BIDSVersion": "1.8.0", "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "fMRIPrep", "Version": "23.2.0"}]})
    dfunc = deriv / "sub-01" / "func"
    dfunc.mkdir(parents=True)
    for run in range(1, runs + 1):
        stem = f"sub-01_task-movie_run-{run}"
        name = f"{stem}_space-MNI152NLin2009cAsym_desc-preproc_bold"
        write_nifti(dfunc / f"{name}.nii.gz", bold_data(10 + run), tr=TR)
        write_json(dfunc / f"{name}.json", {"RepetitionTime": TR})
        (dfunc / f"{stem}_desc-confounds_timeseries.tsv").write_text(confounds_table(run))
        write_json(dfunc / f"{stem}_desc-confounds_timeseries.json", {})
    return root


# ------------------------------------------------------------------ surfaces
def brain_models(n_left: int = 7, n_right: int = 6, with_volume: bool = True
                 ) -> cifti2_axes.BrainModelAxis:
    """Cortex left/right (a subset of a mesh's vertices) + a few subcortical voxels."""
    left = cifti2_axes.BrainModelAxis.from_mask(np.arange(10) < n_left, "CortexLeft")
    right = cifti2_axes.BrainModelAxis.from_mask(np.arange(9) % 3 != 1, "CortexRight")
    right = right[:n_right]
    models = left + right
    if with_volume:
        mask = np.zeros((3, 3, 2), dtype=bool)
        mask[1, :, 1] = True
        mask[0, 2, 0] = True
        models = models + cifti2_axes.BrainModelAxis.from_mask(
            mask, "thalamus_left", affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    return models


def write_dtseries(path: Path, data: np.ndarray, models, tr: float = TR) -> Path:
    """``data`` (time, grayordinate) -> a CIFTI-2 dtseries."""
    series = cifti2_axes.SeriesAxis(start=0.0, step=tr, size=data.shape[0], unit="SECOND")
    img = nib.Cifti2Image(data, header=(series, models))
    img.nifti_header.set_intent("ConnDenseSeries")
    img.to_filename(str(path))
    return path


def write_func_gii(path: Path, data: np.ndarray, hemi: str, tr: float | None = TR) -> Path:
    """``data`` (time, vertex) -> a GIFTI func file, one data array per volume, with
    Workbench's ``TimeStep`` (ms)."""
    meta = {"TimeStep": f"{tr * 1000:.6f}"} if tr else {}
    arrays = [nib.gifti.GiftiDataArray(row.astype(np.float32),
                                       intent="NIFTI_INTENT_TIME_SERIES",
                                       meta=nib.gifti.GiftiMetaData(meta))
              for row in data]
    img = nib.gifti.GiftiImage(darrays=arrays, meta=nib.gifti.GiftiMetaData(
        {"AnatomicalStructurePrimary": {"L": "CortexLeft", "R": "CortexRight"}[hemi]}))
    nib.save(img, str(path))
    return path
