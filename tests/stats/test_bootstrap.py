"""Block bootstrap of test r from per-time-block sums against explicit resampling of
the test rows (scipy's Pearson r), paired comparisons of cells, Holm's adjustment and
the per-voxel winner map by definition."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from voxelflow.pipeline.stats import bootstrap as boot
from voxelflow.pipeline.stats import compare, resampling


def resample_rows(counts_row: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Test rows of one resample: each block's rows, as many times as it was drawn."""
    return np.concatenate([np.tile(np.arange(boundaries[k], boundaries[k + 1]), c)
                           for k, c in enumerate(counts_row)])


def problem(seed: int, n: int = 47, n_voxels: int = 9):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, n_voxels)) + 100
    p = 0.4 * y + rng.normal(size=(n, n_voxels)) - 3
    return y, p


@pytest.mark.parametrize("block_length", [10, 5, 1])
def test_resampled_r_equals_r_of_the_resampled_rows(block_length):
    y, p = problem(block_length)
    n = y.shape[0]
    counts = resampling.bootstrap_counts(n, block_length, 30, seed=11)
    boundaries = resampling.block_boundaries(n, block_length)
    assert counts.shape == (30, boundaries.size - 1)
    assert (counts.sum(axis=1) == boundaries.size - 1).all()  # K blocks drawn each time
    np.testing.assert_array_equal(counts, resampling.bootstrap_counts(n, block_length, 30, 11))
    sums = boot.time_block_sums(y, p, boundaries)
    r = boot.resampled_r(sums, counts, np.diff(boundaries))
    for b in range(30):
        rows = resample_rows(counts[b], boundaries)
        expected = [stats.pearsonr(y[rows, v], p[rows, v]).statistic for v in range(9)]
        np.testing.assert_allclose(r[b], expected, rtol=0, atol=3e-6)
    # over all voxels: the sum and count of each resample's r (NaN left out)
    scored = np.ones(9, bool)
    scored[4] = False
    total, number = boot.resampled_sums(sums, counts, np.diff(boundaries), scored)
    np.testing.assert_allclose(total, r[:, scored].sum(axis=1), rtol=1e-6)
    assert (number == 8).all()


def test_interval_pvalue_and_paired_difference_by_definition():
    rng = np.random.default_rng(3)
    a = rng.normal(0.2, 0.02, 999)
    b = a - rng.normal(0.01, 0.005, 999)
    assert boot.percentile_interval(a) == tuple(np.quantile(a, [0.025, 0.975]))
    d = a - b
    p = boot.bootstrap_p_two_sided(d)
    assert p == min(1.0, 2 * min(1 + np.sum(d <= 0), 1 + np.sum(d >= 0)) / 1000)
    paired = boot.paired_difference(a, b, 0.01)
    assert paired["low"] > 0 and paired["p"] < 0.05
    # unpaired, the same two cells overlap: pairing is what makes the difference clear
    assert boot.percentile_interval(a)[0] < boot.percentile_interval(b)[1]


def test_holm_equals_the_step_down_procedure():
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.2, 0.005])
    adjusted = compare.holm(p)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite])]
    m = order.size
    for alpha in (0.01, 0.05, 0.1, 0.3):
        # step down: reject the k smallest while p_(i) <= alpha / (m - i)
        rejected = set()
        for i, index in enumerate(order):
            if p[index] > alpha / (m - i):
                break
            rejected.add(index)
        assert {i for i in finite if adjusted[i] <= alpha} == rejected, alpha
    assert np.isnan(adjusted[2])


def test_compare_cells_pairs_only_cells_with_the_same_resamples():
    rng = np.random.default_rng(4)
    base = rng.normal(0.30, 0.02, 500)
    cells = [compare.Cell("best", 0.30, base, ("k",)),
             compare.Cell("close", 0.299, base - rng.normal(0.001, 0.004, 500), ("k",)),
             compare.Cell("far", 0.25, base - rng.normal(0.05, 0.004, 500), ("k",)),
             compare.Cell("other test set", 0.2, base - 0.1, ("other",)),
             compare.Cell("no bootstrap", 0.1, None, ("k",))]
    rows = compare.compare_cells(cells, best=0)
    assert rows[0]["diff_vs_best"] == 0.0 and np.isnan(rows[0]["p_vs_best"])
    assert rows[1]["paired"] and rows[1]["p_vs_best"] > 0.05
    assert rows[2]["paired"] and rows[2]["p_vs_best_holm"] < 0.05
    low, high = np.quantile(cells[0].bootstrap - cells[2].bootstrap, [0.025, 0.975])
    assert (rows[2]["diff_ci_low"], rows[2]["diff_ci_high"]) == (low, high)
    assert abs(rows[2]["diff_vs_best"] - 0.05) < 1e-12
    for row in rows[3:]:
        assert not row["paired"] and np.isnan(row["p_vs_best"])
    assert np.isnan(rows[4]["ci_low"]) and np.isfinite(rows[3]["ci_low"])


def test_winner_map_by_definition():
    n, n_voxels, n_resamples = 60, 40, 300
    rng = np.random.default_rng(5)
    y = rng.normal(size=(n, n_voxels))
    strength = np.zeros((3, n_voxels))
    strength[0, :15] = 2.0      # cell 0 clearly best on voxels 0-14
    strength[1, 15:30] = 2.0    # cell 1 on voxels 15-29
    strength[:, 30:] = 0.3      # no clear winner on 30-39
    preds = [strength[c] * y + rng.normal(size=(n, n_voxels)) for c in range(3)]
    boundaries = resampling.block_boundaries(n, 5)
    counts = resampling.bootstrap_counts(n, 5, n_resamples, seed=0)
    sums = [boot.time_block_sums(y, p, boundaries) for p in preds]
    r_obs = np.array([[stats.pearsonr(y[:, v], p[:, v]).statistic for v in range(n_voxels)]
                      for p in preds])
    scored = np.ones((3, n_voxels), bool)
    scored[2, 39] = False
    out = compare.winner_map(r_obs, scored, lambda c, cols: sums[c][:, :, cols], counts,
                             np.diff(boundaries))
    # by definition: the winner's p against each other cell, the largest of them, BH
    lengths = np.diff(boundaries)
    r_b = np.stack([boot.resampled_r(s, counts, lengths) for s in sums])
    expected_p = np.full(n_voxels, np.nan)
    for v in range(39):
        w = int(np.argmax(r_obs[:, v]))
        expected_p[v] = max(boot.bootstrap_p_two_sided(r_b[w, :, v] - r_b[c, :, v])
                            for c in range(3) if c != w)
    np.testing.assert_allclose(out["p"], expected_p, rtol=1e-6, equal_nan=True)
    q = stats.false_discovery_control(expected_p[:39])
    winners = np.where(q < 0.05, np.argmax(r_obs[:, :39], axis=0) + 1, 0)
    np.testing.assert_array_equal(out["winner"][:39], winners)
    assert out["winner"][39] == 0 and out["best"][39] == 0
    assert (out["winner"][:15] == 1).mean() > 0.8 and (out["winner"][15:30] == 2).mean() > 0.8
    assert (out["winner"][30:] == 0).mean() > 0.8
