"""NIfTI runs -> masked ``(time, voxel)`` BOLD in ``/bold/<subject>``, streamed.

:func:`run_bold_stage` never holds a 4D run in memory.  For each run with blocks left:

* **pass 1** reads the run in blocks of a few volumes (:class:`~voxelflow.pipeline.
  stages.nifti.RunReader`: stored values, ``scl_slope``/``scl_inter`` applied to the
  masked voxels only), keeps the voxels of the mask and writes ``(time_block, voxel)``
  float32 blocks into a scratch file (``stores/scratch.py``);
* **pass 2** reads the scratch back one output chunk at a time (all time points x
  ``chunk_voxels`` voxels), detrends / z-scores it per run (:func:`standardize`) and
  writes it to ``/bold/<subject>/run-NNN/bold``, then sets the block's done flag.

When every block is done, ``valid`` and ``mean`` are combined from the per-run
statistics.  Both passes are one work object each (``_bold_passes.py``), run by
:func:`~voxelflow.pipeline.execution.blocks.run_blocks` on local threads or, under a
Dask client, one task per block: the same code, the same bytes.

Memory: in pass 1 one read block (<= ``READ_BUDGET`` bytes as stored) and two masked
time blocks (<= ``SCRATCH_BUDGET`` bytes: one read while the other is written), in pass
2 one output chunk (n_time x chunk_voxels x 4 B, 19.7 MB for 1,200 volumes), whatever
the number of voxels or volumes; the buffers are reused from block to block
(``benchmarks/bold.py`` measures it).

Conventions (the tests' independent NumPy reference follows them):

* voxel order: C order of ``np.nonzero(mask)`` (the order of ``vol[mask]``), so
  ``bold[:, v]`` is ``volume[i[v], j[v], k[v]]``; a mask is ``value != 0`` (NaN counts
  as outside), whatever its dtype.
* z-score per run and voxel: ``(x - mean) / std`` with ``ddof=0`` over that run's time
  points (after the linear detrend when ``detrend="linear"``, which removes the
  least-squares line ``a + b t`` like ``scipy.signal.detrend``).  A voxel constant in a
  run is stored as 0 there.  Non-finite samples (NaN, +-inf) are stored as NaN and the
  statistics of their voxel use the finite samples only.  With neither z-score nor
  detrend the raw values are stored unchanged.
* ``valid (voxel)``: False where the voxel is constant or has a non-finite sample in
  at least one run; such voxels are kept and must be excluded downstream.

Writing results back to NIfTI is :mod:`voxelflow.pipeline.stages.export`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.execution.blocks import run_blocks
from voxelflow.pipeline.execution.cluster import active_client, require_shared_path
from voxelflow.pipeline.execution.resources import check_disk, check_memory
from voxelflow.pipeline.stages._bold_layout import _voxel_coords, bold_template, group_variables
from voxelflow.pipeline.stages._bold_passes import (
    SCRATCH_BUDGET,
    ChunkWork,
    ScratchSpec,
    ScratchWork,
    run_validity,
    scratch_keys,
    scratch_time_block,
    standardize,
)
from voxelflow.pipeline.stages.confounds import (
    parse_strategy,
    projection_basis,
    run_confounds,
)
from voxelflow.pipeline.stages.nifti import (
    MASK_METHODS,
    READ_BUDGET,
    RunInfo,
    auto_mask,
    check_runs,
    check_usable_voxels,
    load_mask,
    mask_voxels,
    mean_volume,
    probe_run,
)
from voxelflow.pipeline.stages.surface import (
    CiftiColumns,
    SurfaceLayout,
    check_surface_tr,
    is_surface,
    probe_surface_runs,
)
from voxelflow.stores.names import check_name
from voxelflow.stores.inventory import stored_bytes
from voxelflow.stores.workspace import RunTemplate, StageWriter, Workspace

__all__ = ["CHUNK_VOXELS", "DETRENDS", "bold_group", "bold_template", "group_variables",
           "bold_inputs", "run_bold_stage", "run_validity",
           "standardize"]

CHUNK_VOXELS = 4096  # voxels per Zarr chunk (all time points) == voxels per resumable block
# Pass 2 holds an output chunk read from the scratch, the chunk Zarr writes, and the
# buffer pool's spare; pass 1 its read block and two masked time blocks (fixed sizes).
BOLD_CHUNKS_IN_MEMORY = 3
DETRENDS = ("none", "linear")
EPI_MASK_METHOD = "nilearn.masking.compute_epi_mask on the mean volume of all runs"


# ==================================================================== the stored layout
def bold_group(subject: str) -> str:
    """The workspace group of a subject's BOLD: ``bold/<subject>``."""
    return f"bold/{subject}"


def _scratch_token(params: dict, run: int, time_block: int) -> str:
    """What a run's scratch was made from: a scratch with another token is thrown away."""
    text = json.dumps({"params": params, "run": run, "time_block": time_block},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def _array_sha256(mask: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(mask.astype(np.uint8)).tobytes()).hexdigest()


# ==================================================================== the stage
def run_bold_stage(workspace: Workspace, runs: Sequence, subject: str, *,
                   mask: str | Path | None = None, tr: float | None = None,
                   zscore: bool = True, detrend: str = "none", confounds: str | None = None,
                   high_pass: float | None = None, hemis: Sequence[str] | None = None,
                   structures: Sequence[str] | None = None,
                   run_attrs: Sequence[dict] | None = None, tr_source: str | None = None,
                   chunk_voxels: int = CHUNK_VOXELS, time_block: int | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Ingest ``runs`` (4D NIfTI, CIFTI dtseries or GIFTI func files; one run each, or
    one ``(L, R)`` tuple / ``hemis`` group per GIFTI run) into ``/bold/<subject>``;
    resume if interrupted.

    ``confounds`` (nilearn ``load_confounds`` strategies, :func:`~voxelflow.pipeline.
    stages.confounds.parse_strategy`) and ``high_pass`` (Hz, cosine drift terms) are
    removed per run in pass 2.  ``run_attrs`` (one dict per run, e.g. BIDS entities) go
    into each run node's attrs; ``tr_source`` names where a given ``tr`` came from.
    ``time_block`` (volumes per pass-1 block) defaults to what fits ``SCRATCH_BUDGET``.
    Returns a summary: group, runs, volumes per run, voxels, invalid voxels, TR and its
    source, mask source, blocks written / skipped.
    """
    _check_arguments(runs, subject, detrend, chunk_voxels)
    strategy = parse_strategy(confounds)
    if any(is_surface(r) for r in runs):
        if mask is not None:
            raise InputError("--mask is for NIfTI runs; surface runs keep every vertex (choose "
                             "CIFTI brain models with --structures)")
        infos, surface = probe_surface_runs(runs, hemis, structures)
        tr_s, tr_src = check_surface_tr(infos, tr)
        i, j, k = (surface.ijk[:, n].copy() for n in range(3))
        flat_index, mask_arr, mask_spec = surface.index, None, {"surface": surface.kind}
    else:
        infos, surface = [probe_run(Path(r)) for r in runs], None
        tr_s, tr_src = check_runs(infos, tr)
        mask_path = Path(mask) if mask is not None else None
        mask_arr = load_mask(mask_path, infos[0]) if mask_path is not None else None
        _check_memory(infos, mask_arr, chunk_voxels)
        check_usable_voxels(infos, None if mask_arr is None else mask_voxels(mask_arr)[3],
                            str(mask_path))
        mask_spec = ({"file": os.path.abspath(mask_path), "sha256": _sha256(mask_path)}
                     if mask_path is not None else {"computed": EPI_MASK_METHOD})
    if tr is not None and tr_source:
        tr_src = tr_source
    group = bold_group(subject)
    params = {
        "stage": "bold",
        "runs": [{"file": os.path.abspath(f), "bytes": Path(f).stat().st_size}
                 for f in _run_files(infos)],
        "mask": mask_spec, "tr": tr_s, "zscore": bool(zscore), "detrend": detrend,
        "chunk_voxels": int(chunk_voxels),
    }
    if strategy or high_pass is not None:
        params["confounds"] = {"strategy": strategy, "high_pass": high_pass}
    if surface is not None:
        params["elements"] = {"structures": sorted(set(surface.structure.tolist())),
                              "hemis": list(hemis or [])}
    workspace.check_params(group, params, overwrite=overwrite)
    regressors = [run_confounds(_files_of(info), info.n_volumes, tr_s, strategy, high_pass)
                  for info in infos]
    attrs = {"subject": subject, "tr": tr_s, "tr_source": tr_src,
             "runs": [str(f) for f in _run_files(infos)],
             "n_volumes": [i_.n_volumes for i_ in infos], "zscore": bool(zscore),
             "detrend": detrend, "zscore_ddof": 0, "chunk_voxels": int(chunk_voxels),
             "confounds": confounds or "", "high_pass": high_pass}
    if surface is None:
        if mask_arr is None:
            mask_arr, method = _computed_mask(workspace, group, infos, overwrite, progress)
        else:
            method = "file (voxel != 0)"
        i, j, k, flat_index = mask_voxels(mask_arr)
        _check_disk(workspace, group, infos, int(i.size))
        attrs |= _volume_attrs(infos[0], mask, mask_spec, mask_arr, method)
    else:
        _check_disk(workspace, group, infos, int(i.size))
        attrs |= {"surface": surface.kind, "mask_method": "none (every element of the "
                  "file's brain models)", **{f"cifti_{k_}": v for k_, v in surface.attrs.items()},
                  "voxel_order": "order of the grayordinates (CIFTI) or of the vertices, L "
                                 "then R (GIFTI), in the input files"}
    attrs["n_voxels"] = int(i.size)
    coords = _voxel_coords(i, j, k, surface)
    templates = [bold_template(info, r, tr_s, coords, int(i.size), chunk_voxels, regressors[r],
                               (run_attrs or [{}] * len(infos))[r])
                 for r, info in enumerate(infos)]
    layout = group_variables(mask_arr, coords, len(infos), chunk_voxels)
    writer = _start_group(workspace, group, params, templates, attrs, layout, overwrite)
    skipped = sum(t.n_blocks for t in templates) - writer.n_pending()
    bases = [projection_basis(c.values, detrend) if c is not None else None
             for c in regressors]
    written = _ingest(writer, infos, params, flat_index, time_block, bool(zscore), detrend,
                      bases, surface, progress)
    n_invalid = _finish_group(workspace, group, writer, infos, int(i.size))
    workspace.remove_scratch(group)
    return {"group": group, "runs": len(infos), "volumes": [i_.n_volumes for i_ in infos],
            "voxels": int(i.size), "invalid": n_invalid, "tr": tr_s, "tr_source": tr_src,
            "mask": (f"none ({surface.kind} surface)" if surface is not None
                     else str(mask) if mask else f"computed ({attrs['mask_method']})"),
            "confounds": [len(c.names) if c is not None else 0 for c in regressors],
            "blocks_written": written, "blocks_skipped": skipped}


def _run_files(infos) -> list[str]:
    return [f for info in infos for f in _files_of(info)]


def _files_of(info) -> tuple[str, ...]:
    return tuple(getattr(info, "files", None) or (str(info.path),))


def _volume_attrs(grid: RunInfo, mask, mask_spec: dict, mask_arr: np.ndarray,
                  method: str) -> dict:
    return {
        "affine": grid.affine.tolist(), "volume_shape": list(grid.shape),
        "xform_code": grid.xform_code, "space_unit": grid.space_unit,
        "mask_file": str(mask) if mask else "",
        "mask_sha256": mask_spec.get("sha256", _array_sha256(mask_arr)),
        "mask_method": method,
        "voxel_order": "C order of np.nonzero(mask): bold[:, v] is volume[i[v], j[v], k[v]]",
    }


def bold_inputs(runs: Sequence, *, bids: str | Path | None, subject: str,
                task: str | None, session: str | None = None, space: str | None = None,
                desc: str | None = None, tr: float | None = None
                ) -> tuple[list, float | None, str | None, list[dict] | None]:
    """Runs given as files, or found in a BIDS dataset: ``(runs, tr, tr_source,
    run_attrs)`` for :func:`run_bold_stage`."""
    if bids is None:
        for option, value in (("--task", task), ("--session", session), ("--space", space),
                              ("--desc", desc)):
            if value:
                raise InputError(f"{option} selects runs in a BIDS dataset; give --bids DIR")
        return list(runs), tr, None, None
    if runs:
        raise InputError("give either RUN files or --bids DIR, not both")
    if not task:
        raise InputError(f"{bids}: --bids needs --task (the BIDS task label)")
    from voxelflow.pipeline.stages.bids import bids_stage_inputs, find_bids_runs

    found = find_bids_runs(bids, subject, task, session=session, space=space, desc=desc)
    files, sidecar_tr, attrs = bids_stage_inputs(found, bids)
    if tr is not None:
        return files, tr, "--tr", attrs
    return files, sidecar_tr, "BIDS sidecar RepetitionTime" if sidecar_tr else None, attrs


def _check_arguments(runs: Sequence, subject: str, detrend: str, chunk_voxels: int) -> None:
    check_name(subject, "--subject")
    if detrend not in DETRENDS:
        raise InputError(f"--detrend must be one of {', '.join(DETRENDS)} (got {detrend!r})")
    if chunk_voxels <= 0:
        raise InputError(f"--chunk-voxels must be a positive number (got {chunk_voxels})")
    if not runs:
        raise InputError("give at least one run (4D NIfTI, CIFTI dtseries or GIFTI func)")


def _check_memory(infos: Sequence[RunInfo], mask: np.ndarray | None, chunk_voxels: int
                  ) -> None:
    """Refuse an output chunk (all time points x ``chunk_voxels``) that cannot fit in
    memory; the voxels are the mask's, or the whole grid before an EPI mask exists."""
    n_vox = int(mask.sum()) if mask is not None else int(np.prod(infos[0].shape))
    n_time = max(info.n_volumes for info in infos)
    chunk = n_time * min(int(chunk_voxels), max(n_vox, 1)) * 4
    check_memory(f"bold --chunk-voxels {chunk_voxels} ({n_time} volumes)",
                 BOLD_CHUNKS_IN_MEMORY * chunk + READ_BUDGET + 2 * SCRATCH_BUDGET,
                 f"lower --chunk-voxels (default {CHUNK_VOXELS})")


def _check_disk(workspace: Workspace, group: str, infos: Sequence[RunInfo], n_vox: int
                ) -> None:
    """Refuse BOLD that cannot fit on disk: every run (float32, uncompressed) plus the
    largest run's transpose scratch."""
    volumes = [info.n_volumes for info in infos]
    need = (sum(volumes) + max(volumes)) * n_vox * 4
    check_disk(f"bold /{group} ({sum(volumes)} volumes x {n_vox:,} voxels)", need,
               workspace.path, "give a smaller --mask",
               already_written=stored_bytes(workspace, group))


def _computed_mask(workspace: Workspace, group: str, infos: Sequence[RunInfo],
                   overwrite: bool, progress: bool) -> tuple[np.ndarray, str]:
    """The automatic mask of the runs' mean volume (:func:`~voxelflow.pipeline.stages.
    nifti.auto_mask`) and its method, or the ones a resumed group saved."""
    if (not overwrite and workspace.state(group) in ("writing", "complete")
            and workspace.has_array(group, "mask")):
        method = workspace.attrs(group).get("mask_method", MASK_METHODS[0])
        return workspace.read_array(group, "mask").astype(bool), method  # resume: reuse it
    grid = infos[0]
    source = str(grid.path) + (f" and {len(infos) - 1} more run(s)" if len(infos) > 1 else "")
    mask, method = auto_mask(mean_volume(infos, progress), grid.affine, source)
    return mask, f"{method} on the mean volume of all runs"


def _start_group(workspace: Workspace, group: str, params: dict,
                 templates: list[RunTemplate], attrs: dict,
                 layout: tuple[xr.Dataset, dict], overwrite: bool) -> StageWriter:
    """Create (or reopen) the group: its run nodes, then (once) the group-level arrays
    ``layout`` (:func:`group_variables`: dataset and encoding)."""
    writer = workspace.start_stage(group, params, templates, overwrite=overwrite,
                                   group_attrs=attrs)
    target = writer.workspace  # where the group is written (a replacement: beside it)
    if not target.attrs(group).get("bold_layout"):
        ds, enc = layout
        target.add_variables(group, ds, encoding=enc)
        target.update_attrs(group, {"bold_layout": "ready"})
    return writer


def _ingest(writer: StageWriter, infos: Sequence, params: dict,
            flat_index: np.ndarray, time_block: int | None, zscore: bool, detrend: str,
            bases: Sequence[np.ndarray | None], surface: SurfaceLayout | None,
            progress: bool) -> int:
    """Both passes, run after run (so one run's scratch exists at a time); returns the
    chunks written.  Here or on the active Dask client: the same work objects.  A CIFTI
    run has no pass 1: pass 2 reads its chunks from the file (:class:`CiftiColumns`)."""
    client = active_client()
    store = os.path.abspath(writer.workspace.path)
    require_shared_path(client, store)
    for_workers = writer.for_workers()
    n_vox = int(flat_index.size)
    bar = tqdm(total=writer.n_pending(), unit="chunk", desc=writer.group,
               disable=not progress, dynamic_ncols=True)
    written = 0
    for run, info in enumerate(infos):
        keys = [(run, block) for block in writer.pending_blocks(run)]
        if not keys:
            continue
        files = tuple(os.path.abspath(f) for f in _files_of(info))
        for f in files:
            require_shared_path(client, f)
        if surface is not None and surface.kind == "cifti":
            spec = CiftiColumns(files[0], info.n_volumes, flat_index)
        else:
            tb = time_block or scratch_time_block(info.n_volumes, n_vox)
            spec = ScratchSpec(store, writer.group, run, info.n_volumes, n_vox, tb,
                               writer.templates[run].block_size,
                               _scratch_token(params, run, tb))
            run_file = files if surface is not None else files[0]
            _fill_scratch(ScratchWork(spec, run_file, flat_index), client, progress)
        # overlap=False: an output chunk is the stage's memory budget; two would double it.
        written += run_blocks(ChunkWork(spec, for_workers, zscore, detrend, bases[run]), keys,
                              client=client, mark_done=lambda key: writer.mark_done(*key),
                              on_block=lambda key, voxels: bar.update(1), overlap=False)
        spec.open().remove()
    bar.close()
    return written


def _files_of_key(run_file) -> str:
    return run_file[0] if isinstance(run_file, tuple) else run_file


def _fill_scratch(work: ScratchWork, client, progress: bool) -> None:
    """Pass 1 of one run: every time block not yet in its scratch (resumable)."""
    scratch = work.scratch.open()  # created here, before any worker reopens it
    keys = scratch_keys(work.run_file, scratch.pending_blocks())
    bar = tqdm(total=sum(map(len, keys)) * scratch.time_block, unit="vol",
               desc=f"read {Path(_files_of_key(work.run_file)).name}", disable=not progress or not keys,
               dynamic_ncols=True, leave=False)
    run_blocks(work, keys, client=client, mark_done=None,
               on_block=lambda key, volumes: bar.update(volumes))
    bar.close()
    if not work.scratch.open().complete:
        raise AssertionError(f"{scratch.path}: pass 1 finished with blocks missing")


def _finish_group(workspace: Workspace, group: str, writer: StageWriter,
                  infos: Sequence[RunInfo], n_vox: int) -> int:
    """Combine per-run statistics into ``valid`` and ``mean``; mark the group complete."""
    workspace = writer.workspace  # where the group is written (a replacement: beside it)
    if workspace.state(group) == "complete":
        writer.finish()  # nothing to add; releases the group's lock
        return int(workspace.attrs(group).get("n_invalid", 0))
    valid = np.ones(n_vox, dtype=bool)
    total = np.zeros(n_vox, dtype=np.float64)
    n_total = 0
    for run, info in enumerate(infos):
        raw_mean = workspace.read_array(group, "raw_mean", run).astype(np.float64)
        raw_std = workspace.read_array(group, "raw_std", run)
        valid &= run_validity(raw_std)
        total += raw_mean * info.n_volumes
        n_total += info.n_volumes
    mean = (total / n_total).astype(np.float32)
    workspace.write_array(group, "mean", mean)
    workspace.write_array(group, "valid", valid)
    for run in range(len(infos)):
        workspace.write_array(writer.run_path(run), "valid", valid)
    n_invalid = int(n_vox - valid.sum())
    if n_invalid == n_vox:
        # Nothing could ever be scored: drop the group rather than leave it looking usable.
        workspace.delete(group)
        workspace.remove_scratch(group)
        raise InputError(
            f"{infos[0].path}: no usable voxel: all {n_vox:,} voxels are constant or "
            f"non-finite in at least one run; check the runs (and the mask)")
    writer.finish({"n_invalid": n_invalid})
    return n_invalid
