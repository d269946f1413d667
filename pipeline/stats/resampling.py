"""Time blocks of the test set and the resamples drawn from them, as pure functions of
a seed and the test set's size.

Every fit of a study that has the same test samples gets the *same* resamples
(:func:`block_permutations`, :func:`bootstrap_counts`), because they are drawn from a
generator seeded with ``(seed, n_samples, block_length, purpose)``: the permutation
null of one voxel block is the same as the next one's (which is what makes the
max-statistic over all voxels valid when blocks are computed apart), and the
bootstrap of one cell is paired with the bootstrap of every other cell.

Blocks are contiguous runs of ``block_length`` test samples (TRs) in test order:
``[0, L), [L, 2L), ...``; the last block is shorter when ``L`` does not divide the
number of test samples.  Shuffling or resampling whole blocks keeps the
autocorrelation of BOLD within a block, which shuffling single samples would destroy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_BLOCK_LENGTH", "block_boundaries", "block_permutations",
           "bootstrap_counts", "circular_shifts", "resample_generator"]

#: Default block length in samples (TRs): BOLD's autocorrelation (the haemodynamic
#: response) lasts a few TRs, so 10-TR blocks are nearly independent of each other.
DEFAULT_BLOCK_LENGTH = 10

_PURPOSE = {"permutation": 1, "bootstrap": 2}


def resample_generator(seed: int, n_samples: int, block_length: int, purpose: str
                       ) -> np.random.Generator:
    """The NumPy generator of one kind of resample (``"permutation"`` or
    ``"bootstrap"``), seeded by ``(seed, n_samples, block_length, purpose)``."""
    entropy = [int(seed), int(n_samples), int(block_length), _PURPOSE[purpose]]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def block_boundaries(n_samples: int, block_length: int) -> np.ndarray:
    """int64 (n_blocks + 1,): the start of every block, then ``n_samples``.

    ``ceil(n_samples / block_length)`` blocks; all are ``block_length`` long but the
    last, which holds the remainder.
    """
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1 (got {block_length})")
    starts = np.arange(0, max(int(n_samples), 0), int(block_length), dtype=np.int64)
    return np.append(starts, np.int64(n_samples))


def block_permutations(n_samples: int, block_length: int, n_permutations: int,
                       seed: int) -> np.ndarray:
    """int64 (n_permutations, n_full_blocks): random orders of the full-length blocks.

    Row ``b`` says which block of the predictions is placed at each block position:
    permuted predictions are ``pred[block order[b, k]]`` at block ``k``.  Only the
    ``n_samples // block_length`` full blocks are shuffled; the remaining samples
    (fewer than a block) stay in place, which can only make the test conservative.
    Empty (``(n_permutations, 0)``) when there are fewer than two full blocks.
    """
    n_blocks = int(n_samples) // int(block_length)
    if n_blocks < 2 or n_permutations < 1:
        return np.zeros((max(int(n_permutations), 0), 0), dtype=np.int64)
    rng = resample_generator(seed, n_samples, block_length, "permutation")
    orders = np.tile(np.arange(n_blocks, dtype=np.int64), (int(n_permutations), 1))
    return rng.permuted(orders, axis=1)


def bootstrap_counts(n_samples: int, block_length: int, n_resamples: int,
                     seed: int) -> np.ndarray:
    """int32 (n_resamples, n_blocks): how often each block is drawn in each resample.

    A resample draws ``n_blocks`` blocks uniformly with replacement (the
    non-overlapping block bootstrap, Carlstein 1986); the order of the drawn blocks
    does not change a correlation, so their counts describe the resample fully.
    """
    n_blocks = block_boundaries(n_samples, block_length).size - 1
    if n_blocks < 1 or n_resamples < 1:
        return np.zeros((max(int(n_resamples), 0), max(n_blocks, 0)), dtype=np.int32)
    rng = resample_generator(seed, n_samples, block_length, "bootstrap")
    drawn = rng.integers(0, n_blocks, size=(int(n_resamples), n_blocks))
    counts = np.zeros((int(n_resamples), n_blocks), dtype=np.int32)
    np.add.at(counts, (np.arange(int(n_resamples))[:, None], drawn), 1)
    return counts


def circular_shifts(n_samples: int, block_length: int) -> np.ndarray:
    """int64: every circular shift ``s`` of the predictions with ``block_length <= s
    <= n_samples - block_length`` (shifts closer to 0 keep the series aligned with
    itself through its autocorrelation).  Empty when ``n_samples < 2 * block_length``."""
    return np.arange(int(block_length), int(n_samples) - int(block_length) + 1,
                     dtype=np.int64)
