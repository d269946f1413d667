"""Repeated test presentations: explainable variance against voxelwise_tutorials, the
noise ceiling on simulated data with a known signal-to-noise ratio, the split."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.stats.repeats import (explainable_variance, noise_ceiling,
                                              normalised_correlation, repeat_split)

utils = pytest.importorskip("voxelwise_tutorials.utils")


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("do_zscore", [True, False])
def test_explainable_variance_equals_voxelwise_tutorials(bias_correction, do_zscore):
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(1, 80, 40)) * np.linspace(0, 2, 40)
    data = (signal + rng.normal(size=(4, 80, 40)) * rng.uniform(0.5, 2, (4, 1, 40)) + 3)
    data = data.astype(np.float32)
    ours = explainable_variance(data, bias_correction=bias_correction, do_zscore=do_zscore)
    reference = utils.explainable_variance(data, bias_correction=bias_correction,
                                           do_zscore=do_zscore)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def _simulate(snr: np.ndarray, n_repeats: int, n_time: int, seed: int):
    """Repeats y_n = s + e_n with var(s) = 1 and var(e_n) = 1 / snr per voxel."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n_time, snr.size))
    noise = rng.normal(size=(n_repeats, n_time, snr.size)) / np.sqrt(snr)
    return signal, signal + noise


@pytest.mark.parametrize("n_repeats", [2, 5])
def test_noise_ceiling_recovers_a_known_snr_within_its_sampling_error(n_repeats):
    levels = np.array([0.25, 1.0, 4.0])
    snr = np.repeat(levels, 1500)
    signal, repeats = _simulate(snr, n_repeats, 200, seed=n_repeats)
    cc_max = noise_ceiling(repeats)
    ev = explainable_variance(repeats)
    # truth: corr(s, ybar)^2 = var(s) / (var(s) + var(e) / N); ev = snr / (1 + snr)
    true_cc = np.sqrt(levels / (levels + 1.0 / n_repeats))
    true_ev = levels / (1 + levels)
    ybar = repeats.mean(axis=0)
    r_truth = stats.pearsonr(signal, ybar, axis=0).statistic
    for level, cc, evt in zip(levels, true_cc, true_ev):
        sel = snr == level
        estimates = cc_max[sel]
        finite = np.isfinite(estimates)
        assert finite.mean() > 0.97
        spread = estimates[finite].std()  # the per-voxel sampling error
        # unbiased within a fifth of one voxel's sampling error, and most voxels
        # within two of them
        assert abs(np.mean(estimates[finite]) - cc) < 0.2 * spread + 1e-3, (level, cc)
        assert np.mean(np.abs(estimates[finite] - cc) < 2 * spread) > 0.93
        assert abs(np.mean(ev[sel]) - evt) < 0.2 * ev[sel].std() + 1e-3
        # the true signal as the prediction reaches the ceiling: cc_norm ~ 1
        cc_norm = normalised_correlation(r_truth[sel], cc_max[sel])
        assert abs(np.nanmedian(cc_norm) - 1.0) < 0.02


def test_noise_ceiling_without_signal_is_mostly_undefined():
    _, repeats = _simulate(np.full(2000, 1e-12), 3, 100, seed=1)
    cc_max = noise_ceiling(repeats)
    # no signal: the signal power estimate is centred on 0, so <= 0 (cc_max NaN, "no
    # measurable signal") for about half of the voxels
    assert 0.4 < np.isnan(cc_max).mean() < 0.6


def test_repeat_split_and_its_errors():
    runs = np.repeat([0, 1, 2, 3, 4, 5], 10)
    train, test, groups = repeat_split(runs, [[4, 5], [1, 2]])
    assert groups == [[1, 2], [4, 5]]  # sorted by first run: the order of test samples
    np.testing.assert_array_equal(test, np.flatnonzero(np.isin(runs, [1, 4])))
    np.testing.assert_array_equal(train, np.flatnonzero(np.isin(runs, [0, 3])))
    for bad, message in [([[1]], "at least two runs"), ([[1, 2], [2, 3]], "appears twice"),
                         ([[1, 2], [3, 4, 5]], "same number of repeats"),
                         ([[1, 9]], r"runs \[9\] not among"),
                         ([[0, 1, 2], [3, 4, 5]], "no training runs")]:
        with pytest.raises(InputError, match=message):
            repeat_split(runs, bad, option="test_repeats")
