"""Permutation significance of test r: the matrix-product null against explicit
permutations with scipy's Pearson r, the p-value definitions, BH-FDR against scipy,
max-statistic FWE by definition, and calibration on autocorrelated null data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.signal import lfilter

from voxelflow.pipeline.stats import permutation as perm
from voxelflow.pipeline.stats import resampling
from voxelflow.pipeline.synthetic.simulate import canonical_hrf

HRF = canonical_hrf(np.arange(0, 30, 2.0))  # TR 2 s


def bold_like(rng: np.random.Generator, n: int, n_voxels: int) -> np.ndarray:
    """White noise through the canonical HRF at TR 2 s: BOLD-like autocorrelation
    (lag-1 r ~0.8, ~0 after 4 samples)."""
    return lfilter(HRF, 1.0, rng.normal(size=(n + HRF.size, n_voxels)), axis=0)[HRF.size:]


def explicit_null(y, p, order):
    """r of every voxel for every sample order (B, n), one scipy pearsonr at a time."""
    return np.array([[stats.pearsonr(y[:, v], p[idx, v]).statistic
                      for v in range(y.shape[1])] for idx in order])


@pytest.mark.parametrize("n_test, block_length", [(60, 10), (64, 7), (30, 1)])
def test_block_null_equals_explicit_block_permutations(n_test, block_length, monkeypatch):
    rng = np.random.default_rng(n_test)
    y = rng.normal(size=(n_test, 6)) + 5
    p = 0.5 * y + rng.normal(size=(n_test, 6))
    orders = resampling.block_permutations(n_test, block_length, 40, seed=3)
    # the same permutations as a seed's (seed, n_test, block_length) always give
    np.testing.assert_array_equal(orders, resampling.block_permutations(n_test, block_length,
                                                                        40, seed=3))
    assert not np.array_equal(orders, resampling.block_permutations(n_test, block_length, 40,
                                                                    seed=4))
    # explicit: blocks of the predictions in the permuted order, the tail in place
    k = n_test // block_length
    order = np.array([np.concatenate([np.arange(b * block_length, (b + 1) * block_length)
                                      for b in row] + [np.arange(k * block_length, n_test)])
                      for row in orders])
    expected = explicit_null(y, p, order)
    observed, null = perm.null_correlations(y, p, kind="blocks", block_length=block_length,
                                            orders=orders)
    np.testing.assert_allclose(null, expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(observed, [stats.pearsonr(y[:, v], p[:, v]).statistic
                                          for v in range(6)], rtol=0, atol=1e-12)
    # the other code path (gathering permuted predictions) gives the same null
    monkeypatch.setattr(perm, "MAX_PRODUCT_BLOCKS", 1)
    _, gathered = perm.null_correlations(y, p, kind="blocks", block_length=block_length,
                                         orders=orders)
    np.testing.assert_allclose(gathered, expected, rtol=0, atol=2e-6)


def test_shift_null_equals_np_roll():
    rng = np.random.default_rng(1)
    y, p = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    shifts = resampling.circular_shifts(50, 10)
    assert shifts[0] == 10 and shifts[-1] == 40 and shifts.size == 31
    order = np.array([np.roll(np.arange(50), -s) for s in shifts])  # p[(t + s) mod n]
    _, null = perm.null_correlations(y, p, kind="shifts", block_length=10, shifts=shifts)
    np.testing.assert_allclose(null, explicit_null(y, p, order), rtol=0, atol=2e-6)
    assert resampling.circular_shifts(15, 10).size == 0


def test_pvalues_by_definition():
    rng = np.random.default_rng(2)
    null = rng.normal(size=(99, 30)).astype(np.float32) * 0.1
    observed = rng.normal(size=30) * 0.15
    observed[3] = np.nan
    p = perm.permutation_pvalues(observed, null)
    for v in range(30):
        if v == 3:
            assert np.isnan(p[v])
            continue
        assert p[v] == (1 + np.sum(null[:, v] >= observed[v] - perm.TIE_TOLERANCE)) / 100
    # a permutation that restores the observed order counts as reaching it
    tie = np.vstack([null, observed[None, :].astype(np.float32) - 1e-7])
    assert (perm.permutation_pvalues(observed, tie)[[0, 1]]
            == (1 + np.sum(tie[:, [0, 1]] >= observed[[0, 1]] - 1e-5, axis=0)) / 101).all()
    # max statistic: compare each voxel with the maximum over voxels of each draw
    maxima = null.max(axis=1)
    fwe = perm.max_statistic_pvalues(observed, maxima)
    for v in (0, 5, 29):
        assert fwe[v] == (1 + np.sum(maxima >= observed[v] - perm.TIE_TOLERANCE)) / 100
    assert np.nanmin(fwe - p) >= 0  # FWE p is never below the voxel's own p
    # BH over finite p only; the parametric test is scipy's one-sided pearsonr
    q = perm.bh_fdr(p)
    finite = np.isfinite(p)
    np.testing.assert_allclose(q[finite], stats.false_discovery_control(p[finite]))
    assert np.isnan(q[3])
    y = rng.normal(size=(40, 5))
    x = y * np.linspace(0, 1, 5) + rng.normal(size=(40, 5))
    r = np.array([stats.pearsonr(x[:, v], y[:, v]).statistic for v in range(5)])
    expected = [stats.pearsonr(x[:, v], y[:, v], alternative="greater").pvalue for v in range(5)]
    np.testing.assert_allclose(perm.parametric_pvalues(r, 40), expected, rtol=1e-9)


def test_fdr_on_autocorrelated_null_data_stays_at_or_below_q_over_20_seeds():
    """BOLD and predictions independent of each other, both autocorrelated like BOLD:
    block permutations keep the BH-FDR false positives at or below q in every seed and
    the uncorrected p < 0.05 at about 5 % of voxels; shuffling single samples (block
    length 1) and the parametric t-test, which both assume independent samples, are
    far above (which shows this test can fail)."""
    n, n_voxels, q = 300, 200, 0.05
    fractions, rates = [], {"blocks": [], "samples": [], "parametric": []}
    for seed in range(20):
        rng = np.random.default_rng(seed)
        y, p = bold_like(rng, n, n_voxels), bold_like(rng, n, n_voxels)
        observed, null = perm.null_correlations(
            y, p, kind="blocks", block_length=resampling.DEFAULT_BLOCK_LENGTH,
            orders=resampling.block_permutations(n, 10, 1000, seed))
        p_blocks = perm.permutation_pvalues(observed, null)
        fractions.append(np.mean(perm.bh_fdr(p_blocks) < q))
        _, null_1 = perm.null_correlations(y, p, kind="blocks", block_length=1,
                                           orders=resampling.block_permutations(n, 1, 200, seed))
        rates["blocks"].append(np.mean(p_blocks < 0.05))
        rates["samples"].append(np.mean(perm.permutation_pvalues(observed, null_1) < 0.05))
        rates["parametric"].append(np.mean(perm.parametric_pvalues(observed, n) < 0.05))
    assert max(fractions) <= q and sum(f > 0 for f in fractions) <= 2, fractions
    assert 0.02 < np.mean(rates["blocks"]) < 0.07, rates["blocks"]
    assert np.mean(rates["samples"]) > 0.15 and np.mean(rates["parametric"]) > 0.15, rates


def test_planted_predictions_are_found_and_null_voxels_are_not():
    n = 300
    rng = np.random.default_rng(7)
    signal, noise = bold_like(rng, n, 100), bold_like(rng, n, 100)
    y = signal.copy()
    y[:, :50] += noise[:, :50]  # voxels 0-49 carry the predicted signal (SNR 1)
    y[:, 50:] = noise[:, 50:]   # voxels 50-99: none
    observed, null = perm.null_correlations(y, signal, kind="blocks", block_length=10,
                                            orders=resampling.block_permutations(n, 10, 1000, 0))
    significant = perm.bh_fdr(perm.permutation_pvalues(observed, null)) < 0.05
    # all planted voxels found; false discoveries a small share, as BH allows (<= q on
    # average)
    assert significant[:50].all() and significant[50:].sum() / significant.sum() <= 0.1
    fwe = perm.max_statistic_pvalues(observed, null.max(axis=1))
    assert (fwe[:50] < 0.05).all() and (fwe[50:] < 0.05).sum() == 0
