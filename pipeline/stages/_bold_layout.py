"""The stored layout of a BOLD group: one run's template and the group-level arrays.

``bold (time, voxel) float32`` per run with its ``time``/``run`` coordinates and the
per-voxel coordinates (``i, j, k``, ``valid``; on surfaces ``structure``, ``vertex``,
``hemi``), and the group's ``mean``, ``raw_mean``/``raw_std`` per run and ``mask``.
Written by :func:`voxelflow.pipeline.stages.bold.run_bold_stage`.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from voxelflow.pipeline.stages.confounds import Confounds
from voxelflow.pipeline.stages.surface import SurfaceLayout
from voxelflow.stores.workspace import RunTemplate


def bold_template(info, run: int, tr: float, coords: dict, n_vox: int, chunk_voxels: int,
                  confounds: Confounds | None = None, attrs: dict | None = None
                  ) -> RunTemplate:
    """One run: ``bold (time, voxel) float32`` + time/run and the per-voxel ``coords``
    (:func:`_voxel_coords`); with ``confounds``, the regressors removed from it
    (``confounds (time, confound) float64``, names in the ``confound`` coordinate)."""
    n_time = info.n_volumes
    chunk = (n_time, min(chunk_voxels, n_vox))
    times = np.arange(n_time, dtype=np.float64) * tr
    data = {"bold": (("time", "voxel"), da.empty((n_time, n_vox), dtype=np.float32,
                                                 chunks=chunk),
                     {"long_name": "BOLD signal of the voxels in the mask"})}
    extra = {}
    if confounds is not None:
        data["confounds"] = (("time", "confound"), confounds.values,
                             {"long_name": "regressors removed from every voxel (before "
                                           "detrend/z-scoring)", "source": confounds.source})
        extra = {"confound": ("confound", np.asarray(confounds.names, dtype=str))}
    ds = xr.Dataset(
        data,
        coords=coords | extra | {
            "time": ("time", times, {"units": "s", "long_name": "time from run onset"}),
            "run": ("time", np.full(n_time, run, dtype=np.int32), {"long_name": "run index"}),
        },
        attrs={"source": str(info.path), "n_volumes": n_time, "tr": tr,
               "source_dtype": info.dtype, **(attrs or {})},
    )
    voxel_enc = {"chunks": (n_vox,)}
    # No compressor: z-scored float32 BOLD is noise down to the last mantissa bits (zstd
    # saves ~8 %), and the codec's buffers would double the memory of a chunk.
    encoding = {"bold": {"chunks": chunk, "compressors": None}, "time": {"chunks": (n_time,)},
                "run": {"chunks": (n_time,)}} | {c: voxel_enc for c in coords}
    return RunTemplate(ds, encoding, block_dim="voxel", block_size=chunk[1])


def _voxel_coords(i, j, k, surface: SurfaceLayout | None = None) -> dict:
    """Per-voxel coordinates: ``i, j, k`` (-1 on a surface), ``valid``, and on surfaces
    ``structure``, ``vertex`` (-1 for a subcortical voxel) and ``hemi``."""
    coords = {
        "i": ("voxel", i, {"long_name": "voxel index along the 1st NIfTI axis"}),
        "j": ("voxel", j, {"long_name": "voxel index along the 2nd NIfTI axis"}),
        "k": ("voxel", k, {"long_name": "voxel index along the 3rd NIfTI axis"}),
        "valid": ("voxel", np.zeros(i.size, dtype=bool),
                  {"long_name": "finite and not constant in every run; exclude invalid "
                                "voxels from scoring"}),
    }
    if surface is not None:
        coords |= {
            "structure": ("voxel", surface.structure, {"long_name": "CIFTI brain structure"}),
            "vertex": ("voxel", surface.vertex,
                       {"long_name": "vertex index on its mesh (-1: a subcortical voxel)"}),
            "hemi": ("voxel", surface.hemi, {"long_name": "hemisphere (L, R; '' elsewhere)"}),
        }
    return coords


def group_variables(mask: np.ndarray | None, coords: dict, n_runs: int, chunk_voxels: int
                    ) -> tuple[xr.Dataset, dict]:
    """Group-level arrays: the voxel ``coords``, ``mask`` (NIfTI only), ``mean`` and
    per-run raw stats."""
    n_vox = coords["i"][1].size
    chunk = min(chunk_voxels, n_vox)
    stats = {"long_name": "", "note": "of the raw signal before detrend/z-scoring; NaN where "
                                      "a sample is non-finite"}
    data = {
        "mean": ("voxel", da.empty(n_vox, dtype=np.float32, chunks=chunk),
                 {**stats, "long_name": "mean over all volumes of all runs"}),
        "raw_mean": (("run_index", "voxel"),
                     da.empty((n_runs, n_vox), dtype=np.float32, chunks=(1, chunk)),
                     {**stats, "long_name": "mean over each run's volumes"}),
        "raw_std": (("run_index", "voxel"),
                    da.empty((n_runs, n_vox), dtype=np.float32, chunks=(1, chunk)),
                    {**stats, "long_name": "standard deviation (ddof=0) over each run's "
                                           "volumes; 0 where constant"}),
    }
    encoding = {"mean": {"chunks": (chunk,)}, "raw_mean": {"chunks": (1, chunk)},
                "raw_std": {"chunks": (1, chunk)}} | {c: {"chunks": (n_vox,)} for c in coords}
    if mask is not None:
        data["mask"] = (("mask_i", "mask_j", "mask_k"), mask.astype(np.uint8),
                        {"long_name": "voxels ingested (1) on the NIfTI grid"})
        encoding["mask"] = {"chunks": mask.shape}
    return xr.Dataset(data, coords=coords), encoding
