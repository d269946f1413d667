"""Confound regressors of a run and their removal, as ``nilearn.signal.clean`` does it.

* :func:`parse_strategy` reads ``--confounds`` (``motion=full,wm_csf=basic,high_pass,
  global_signal``): the strategies and options of nilearn's
  :func:`~nilearn.interfaces.fmriprep.load_confounds`;
* :func:`run_confounds` loads one run's regressors with ``load_confounds`` from the
  fMRIPrep ``*_desc-confounds_timeseries.tsv`` next to the run (leading ``n/a`` of the
  ``_derivative1`` columns replaced by nilearn), turns volumes nilearn would censor
  (non-steady-state, ``scrub``) into one spike regressor each (voxelflow keeps every
  volume, so the time axis stays aligned with the stimulus), and appends the cosine
  drift terms of ``--high-pass HZ`` (:func:`nilearn.signal.create_cosine_drift`);
* :func:`projection_basis` turns the ``(time, regressor)`` matrix into the orthonormal
  basis ``Q`` that ``nilearn.signal.clean`` projects out (detrended with the signal when
  ``detrend="linear"``, z-scored with ``ddof=1``, pivoted QR, columns with
  ``|R_ii| <= 100 eps`` dropped); pass 2 then computes ``x - Q (Q^T x)`` per voxel chunk
  in float64 (:func:`~voxelflow.pipeline.stages._bold_passes.standardize`).

Because the regressors are detrended/demeaned before the QR, ``Q`` is orthogonal to the
constant (and to the line), so removing ``Q`` first and detrending / z-scoring after
gives nilearn's ``detrend -> remove confounds -> standardize`` result.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from voxelflow.pipeline.errors import InputError, exception_reason

__all__ = ["Confounds", "STRATEGIES", "parse_strategy", "projection_basis", "run_confounds"]

# strategy -> (load_confounds option it sets, allowed values); None: no option
STRATEGIES = {
    "motion": ("motion", ("basic", "power2", "derivatives", "full")),
    "wm_csf": ("wm_csf", ("basic", "power2", "derivatives", "full")),
    "global_signal": ("global_signal", ("basic", "power2", "derivatives", "full")),
    "compcor": ("compcor", ("anat_combined", "anat_separated", "temporal",
                            "temporal_anat_combined", "temporal_anat_separated")),
    "ica_aroma": ("ica_aroma", ("basic",)),
    "scrub": ("scrub", None),
    "high_pass": (None, None),
}


@dataclass(frozen=True)
class Confounds:
    """The regressors removed from one run: ``values`` (time, regressor) float64."""

    names: list[str]
    values: np.ndarray
    source: str  # the confounds TSV, or "--high-pass" only


def parse_strategy(text: str | None) -> dict | None:
    """``"motion=full,wm_csf,high_pass"`` -> keyword arguments of ``load_confounds``
    (``strategy`` tuple plus options), or None for no confounds."""
    if text is None or not text.strip():
        return None
    kwargs: dict = {"strategy": []}
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if name not in STRATEGIES:
            raise InputError(f"--confounds: unknown strategy {name!r}; use a comma list of "
                             f"{', '.join(STRATEGIES)} (nilearn load_confounds), e.g. "
                             f"motion=full,wm_csf=basic,high_pass")
        option, allowed = STRATEGIES[name]
        kwargs["strategy"].append(name)
        if sep:
            if option is None:
                raise InputError(f"--confounds: {name} takes no value (got {item.strip()!r})")
            if allowed is not None and value not in allowed:
                raise InputError(f"--confounds {name}={value}: use one of {', '.join(allowed)}")
            kwargs[option] = int(value) if name == "scrub" and value.isdigit() else value
    kwargs["strategy"] = tuple(kwargs["strategy"])
    return kwargs


def run_confounds(run_files: Sequence[str | Path], n_time: int, tr: float,
                  strategy: dict | None, high_pass: float | None) -> Confounds | None:
    """The regressors of one run (its file, or both hemisphere files of a GIFTI run)."""
    names: list[str] = []
    columns: list[np.ndarray] = []
    source = "--high-pass"
    if strategy is not None:
        frame, source = _load(run_files, n_time, strategy)
        names += [str(c) for c in frame.columns]
        columns += [frame[c].to_numpy(dtype=np.float64) for c in frame.columns]
    if high_pass is not None:
        if any(n.startswith("cosine") for n in names):
            raise InputError("--high-pass and the high_pass confound strategy both add "
                             "cosine drift terms; keep one of them")
        if not math.isfinite(high_pass) or high_pass <= 0:
            raise InputError(f"--high-pass must be a positive frequency in Hz (got {high_pass})")
        from nilearn.signal import create_cosine_drift

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            drift = create_cosine_drift(high_pass, np.arange(n_time) * tr)[:, :-1]
        names += [f"cosine_hp{n:02d}" for n in range(drift.shape[1])]
        columns += list(drift.T)
    if not columns:
        return None
    return Confounds(names, np.column_stack(columns), source)


def _load(run_files: Sequence[str | Path], n_time: int, strategy: dict):
    """``load_confounds`` on one run, checked; volumes to censor become spike columns."""
    from nilearn.interfaces.fmriprep import load_confounds
    from nilearn.interfaces.fmriprep.load_confounds_utils import get_confounds_file

    files = [str(f) for f in run_files]
    first = Path(files[0])
    try:
        tsv = get_confounds_file(files[0], flag_full_aroma=False, flag_tedana=False)
    except Exception:
        tsv = None
    if tsv is None or not Path(tsv).exists():
        raise InputError(f"{first}: no fMRIPrep confounds file next to this run (expected "
                         f"..._desc-confounds_timeseries.tsv in {first.parent}); use "
                         f"fMRIPrep derivatives, or only --high-pass")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame, sample_mask = load_confounds(files if len(files) > 1 else files[0],
                                                demean=True, **strategy)
    except Exception as exc:  # nilearn raises ValueError / MissingConfound / KeyError
        raise InputError(f"{tsv}: confounds {','.join(strategy['strategy'])} could not be "
                         f"read ({exception_reason(exc)}); check the file's columns or "
                         f"choose other --confounds") from None
    if len(frame) != n_time:
        raise InputError(f"{tsv}: {len(frame)} rows but the run has {n_time} volumes; "
                         f"give the confounds file of this run")
    values = frame.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise InputError(f"{tsv}: column {frame.columns[col]} is n/a or infinite at row "
                         f"{row + 1} (only the first row of derivative columns may be n/a); "
                         f"fix or regenerate the confounds file")
    if sample_mask is not None:
        frame = frame.copy()
        for volume in sorted(set(range(n_time)) - set(int(v) for v in sample_mask)):
            spike = np.zeros(n_time)
            spike[volume] = 1.0
            frame[f"spike_{volume:04d}"] = spike
    return frame, str(tsv)


def projection_basis(values: np.ndarray, detrend: str) -> np.ndarray:
    """Orthonormal ``Q`` (time, q) float64 spanning the regressors as ``nilearn.signal.
    clean`` prepares them (``detrend`` them like the signal, z-score with ``ddof=1``,
    pivoted QR, drop columns whose ``|R_ii| <= 100 eps``)."""
    from scipy import linalg

    c = np.asarray(values, dtype=np.float64).copy()
    n = c.shape[0]
    if detrend == "linear":
        t = np.arange(n, dtype=np.float64)
        design = np.column_stack([np.ones(n), t])
        c -= design @ np.linalg.lstsq(design, c, rcond=None)[0]
    c -= c.mean(axis=0)
    std = c.std(axis=0, ddof=1) if n > 1 else np.ones(c.shape[1])
    std[std < np.finfo(np.float64).eps] = 1.0
    c /= std
    q, r, _ = linalg.qr(c, mode="economic", pivoting=True)
    return np.ascontiguousarray(q[:, np.abs(np.diag(r)) > np.finfo(np.float64).eps * 100.0])
