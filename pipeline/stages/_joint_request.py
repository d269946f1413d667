"""The joint fit's bounded request: the memory of every weighting's factors (or of one
at a time, spilled to the store's scratch space) and the disk of its outputs, checked
before any work (:mod:`voxelflow.pipeline.execution.resources`)."""
from __future__ import annotations

from voxelflow.pipeline import ridge
from voxelflow.pipeline.execution import resources
from voxelflow.pipeline.stages.fit import fit_memory
from voxelflow.stores.inventory import stored_bytes
from voxelflow.stores.workspace import Workspace


def _factor_bytes(widths: list[int], n_train: int, n_test: int, n_alphas: int,
                  sizes: list[int], weighting_counts: list[int], save_weights: bool
                  ) -> tuple[int, int]:
    """``(held, transient)`` bytes of the joint model's and every sub-model's factors
    (:func:`ridge.banded_factor_bytes`; the joint model keeps its eigenbasis)."""
    held = transient = 0
    for number, count in enumerate(weighting_counts):
        kept, peak = ridge.banded_factor_bytes(
            widths, n_train, n_test, n_alphas, sizes, count, keep_basis=number == 0,
            keep_designs=number == 0 and save_weights,
            max_dense_bytes=ridge.DEFAULT_MAX_DENSE_BYTES)
        transient = max(transient, held + peak)
        held += kept
    return held, transient


def _spill_needed(need_bytes: float) -> bool:
    """Whether every weighting's factors cannot stay in memory together."""
    memory, _ = resources.available_memory()
    return need_bytes > resources.MEMORY_FRACTION * memory


def _check_joint_request(workspace: Workspace, group: str, widths: list[int],
                         n_train: int, n_test: int, n_alphas: int, folds: list,
                         voxel_block: int, weighting_counts: list[int], n_voxels: int,
                         n_parts: int, save_weights: bool, save_predictions: bool) -> bool:
    """Refuse (one line naming --weightings) a joint fit whose factors and two voxel
    blocks cannot be held in memory, or whose outputs cannot fit on disk; returns
    True where every weighting's factors (``weighting_counts``: the joint model's,
    then each sub-model's) do not fit together but one weighting at a time does:
    the factors then go to the store's scratch space (counted on disk)."""
    n, p = n_train + n_test, sum(widths)
    design, block = fit_memory(n, n_test, p, n_alphas, len(folds), voxel_block,
                               save_weights, save_predictions)
    sizes = [len(f) for f in folds]
    held, transient = _factor_bytes(widths, n_train, n_test, n_alphas, sizes,
                                    weighting_counts, save_weights)
    spill = _spill_needed(design + max(held + block, transient))
    on_disk = held if spill else 0
    if spill:  # one weighting of each model at a time
        held, transient = _factor_bytes(widths, n_train, n_test, n_alphas, sizes,
                                        [1] * len(weighting_counts), save_weights)
    n_weightings = weighting_counts[0]
    per_voxel = (2 * n_alphas + 4 + 2 * len(widths) + n_parts + (p if save_weights else 0)
                 + (n_test if save_predictions else 0))
    resources.check_request(
        f"joint fit of {len(widths)} spaces ({p:,} lagged features) x {n_weightings} "
        f"weightings", block_bytes=design + max(held + block, transient),
        block_option=f"use fewer --weightings (gave {n_weightings}), fewer spaces or "
                     f"lags, leave out --partition, or lower --voxel-block",
        output_bytes=4 * n_voxels * per_voxel + on_disk, store=workspace.path,
        disk_option="leave out --save-weights / --save-predictions",
        already_written=stored_bytes(workspace, group))
    return spill
