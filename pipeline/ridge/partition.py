"""Variance partitioning between feature spaces: the unique and shared parts of
explained variance from the scores of the joint model and of every sub-model.

With ``f(S)`` the test R^2 of the model on the spaces in ``S`` (``f({}) = 0``) and
``U`` all spaces, the part shared by exactly the spaces in ``S`` (and by no other)
is the Möbius inversion of ``F(C) = f(U) - f(U \\ C)`` (the variance lost when the
spaces in ``C`` are removed)::

    part(S) = sum_{T subset of S} (-1)^(|S| - |T|) F(T)

For two spaces: ``unique A = f(AB) - f(B)``, ``shared = f(A) + f(B) - f(AB)``; the
parts always sum to ``f(U)``. Parts can be negative (suppression, or noise in the
sub-models' scores): they are reported as computed, not clipped.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np


def subsets(names: Sequence[str]) -> list[frozenset[str]]:
    """Every non-empty subset of ``names``, smallest first."""
    return [frozenset(group) for size in range(1, len(names) + 1)
            for group in combinations(names, size)]


def variance_partition(r2: Mapping[frozenset[str], Any], names: Sequence[str]
                       ) -> dict[frozenset[str], np.ndarray]:
    """Unique and shared parts per voxel.

    Parameters
    ----------
    r2 : test R^2 (voxel,) of the model fitted on each non-empty subset of ``names``
    names : the spaces (2 or 3 in the fit stage; any number works here)

    Returns
    -------
    dict: subset -> float64 (voxel,), the variance explained by exactly the spaces
    of the subset (``{A}``: unique to A; ``{A, B}``: shared by A and B only; ...).
    """
    every = frozenset(names)
    missing = [sorted(group) for group in subsets(names) if group not in r2]
    if missing:
        raise ValueError(f"variance partitioning needs the R^2 of every sub-model; "
                         f"missing {missing}.")

    def score(group: frozenset[str]) -> np.ndarray:
        return np.asarray(r2[group], np.float64) if group else 0.0

    def lost(group: frozenset[str]) -> np.ndarray:
        return score(every) - score(every - group)

    parts = {}
    for group in subsets(names):
        total = 0.0
        for size in range(1, len(group) + 1):
            for inner in combinations(sorted(group), size):
                total = total + (-1) ** (len(group) - size) * lost(frozenset(inner))
        parts[group] = np.asarray(total, np.float64)
    return parts
