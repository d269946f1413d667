"""The per-block work of the BOLD stage's two passes, and the maths of pass 2.

Both passes are :class:`~voxelflow.pipeline.execution.blocks.BlockWork` objects, run by
:func:`~voxelflow.pipeline.execution.blocks.run_blocks` here (compute on the calling
thread, one writer thread) or on a Dask cluster (one task per key), the same code:

* pass 1, :class:`ScratchWork`: a key is a tuple of time blocks of one run; ``compute``
  reads those volumes of the NIfTI file and keeps the mask's voxels, ``write`` puts each
  ``(time_block, voxel)`` float32 block into the run's transpose scratch
  (``stores/scratch.py``) and flags it there (so ``run_blocks(..., mark_done=None)``);
* pass 2, :class:`ChunkWork`: a key is ``(run, block)`` of the stage; ``compute`` reads
  the voxel chunk (all time points) back from the scratch and standardises it
  (:func:`standardize`), ``write`` puts the chunk into ``run-NNN/bold`` and the run's
  ``raw_mean`` / ``raw_std`` into the group; the client marks the block done.

Memory: pass 1 holds two masked time blocks here (one read while the other is
written), pass 2 one output chunk (the stage runs it with ``overlap=False``: a chunk
is its memory budget); both in buffers reused from block to block (:class:`_Buffers`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from voxelflow.pipeline.stages.nifti import RunReader
from voxelflow.pipeline.stages.surface import GiftiReader
from voxelflow.stores.scratch import TransposeScratch
from voxelflow.stores.workspace import StageWriter, Workspace

SCRATCH_BUDGET = 8 * 2**20  # bytes of one masked (time_block, voxel) float32 block
FLOAT64_COLUMNS = 256  # voxels standardised at once in float64 inside an output chunk


# ==================================================================== the maths
def standardize(x: np.ndarray, zscore: bool, detrend: str,
                columns: int = FLOAT64_COLUMNS, basis: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Clean, detrend / z-score ``x`` (time, voxel) float32 *in place*, per voxel.

    ``basis`` (time, q) float64, orthonormal: confound regressors to remove first
    (:func:`~voxelflow.pipeline.stages.confounds.projection_basis`), ``x - Q (Q^T x)``
    on the voxels whose samples are all finite (the others are invalid anyway).
    Returns the raw per-voxel ``mean`` and ``std`` (float32, ``ddof=0``, before any
    change) with NaN where the voxel has a non-finite sample and ``std`` exactly 0
    where the voxel is constant.  Work is done in float64, ``columns`` voxels at a time.
    """
    n_time, n_vox = x.shape
    raw_mean = np.empty(n_vox, dtype=np.float32)
    raw_std = np.empty(n_vox, dtype=np.float32)
    t = np.arange(n_time, dtype=np.float64)
    for c0 in range(0, n_vox, columns):
        c1 = min(c0 + columns, n_vox)
        xs = x[:, c0:c1].astype(np.float64)
        finite = np.isfinite(xs)
        all_finite = finite.all(axis=0)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            constant = all_finite & (xs.max(axis=0) == xs.min(axis=0))
            mean = xs.mean(axis=0)
            std = xs.std(axis=0)
            std[constant] = 0.0
            raw_mean[c0:c1] = mean
            raw_std[c0:c1] = std
            if basis is not None and all_finite.any():
                clean = xs[:, all_finite]
                clean -= basis @ (basis.T @ clean)
                xs[:, all_finite] = clean
            if not zscore and detrend == "none":
                if basis is not None:
                    x[:, c0:c1] = xs  # cleaned, mean kept (as nilearn keeps it)
                continue
            _standardize_columns(xs, finite, all_finite.all(), mean, constant, t, zscore,
                                 detrend)
        x[:, c0:c1] = xs
        del xs, finite
    return raw_mean, raw_std


def _standardize_columns(xs: np.ndarray, finite: np.ndarray, all_finite: bool,
                         mean: np.ndarray, constant: np.ndarray, t: np.ndarray,
                         zscore: bool, detrend: str) -> None:
    """Centre, detrend and scale ``xs`` (time, columns) float64 in place.

    Non-finite samples become NaN and are left out of every statistic; a column
    constant in this run (or of zero spread after detrending) becomes exactly 0.
    """
    if all_finite:
        weight = None
        n = np.full(xs.shape[1], xs.shape[0], dtype=np.float64)
        centre = mean
    else:
        xs[~finite] = np.nan  # +-inf too: a z-score of inf means nothing
        weight = finite.astype(np.float64)
        n = weight.sum(axis=0)
        centre = np.where(finite, xs, 0.0).sum(axis=0) / n
    xs -= centre
    if detrend == "linear":
        if weight is None:
            tdev = (t - t.mean())[:, None]
            slope = (tdev * xs).sum(axis=0) / (tdev ** 2).sum()
        else:
            t_mean = (weight * t[:, None]).sum(axis=0) / n
            tdev = (t[:, None] - t_mean) * weight
            slope = np.where(finite, tdev * xs, 0.0).sum(axis=0) / (tdev ** 2).sum(axis=0)
            tdev = t[:, None] - t_mean
        slope = np.where(np.isfinite(slope), slope, 0.0)
        xs -= tdev * slope
    flat = constant.copy()
    if zscore:
        if weight is None:
            scale = np.sqrt((xs ** 2).mean(axis=0))
        else:
            scale = np.sqrt(np.where(finite, xs ** 2, 0.0).sum(axis=0) / n)
        flat |= ~(scale > 0)
        xs /= np.where(flat, 1.0, scale)
    if flat.any():
        # constant in this run: exactly 0 (not rounding noise), NaN samples kept
        xs[:, flat] = np.where(finite[:, flat], 0.0, xs[:, flat])


def run_validity(raw_std: np.ndarray) -> np.ndarray:
    """Per-run usable voxels: every sample finite and not constant."""
    return np.isfinite(raw_std) & (raw_std > 0)


# ==================================================================== shared pieces
def scratch_time_block(n_time: int, n_vox: int) -> int:
    """Volumes per scratch block: one masked block stays under ``SCRATCH_BUDGET``."""
    return int(max(1, min(n_time, SCRATCH_BUDGET // (4 * max(n_vox, 1)))))


@dataclass(frozen=True)
class ScratchSpec:
    """How any process reopens the transpose scratch of one run (see :meth:`open`)."""

    store: str  # absolute path of the workspace
    group: str
    run: int
    n_time: int
    n_voxel: int
    time_block: int
    voxel_chunk: int
    token: str

    def open(self) -> TransposeScratch:
        """The scratch of the run: created by the first call (the client's), reopened
        as it is by every later one (same parameters, so never recreated)."""
        return Workspace(self.store).scratch(self.group, self.run, self.n_time, self.n_voxel,
                                             self.time_block, self.voxel_chunk, self.token)


class _Buffers:
    """Reusable float32 arrays: ``compute`` takes one, ``write`` gives it back.

    At most two blocks are alive at a time here (one computed, one being written), so
    ``keep=2`` buffers serve a whole run instead of a new block-sized array per block
    (freed arrays of that size would linger in the malloc arenas of two threads).
    Pickling gives an empty pool (a cluster worker fills its own).
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def __reduce__(self):
        return (type(self), (self.keep,))

    def take(self, shape: tuple[int, int]) -> np.ndarray:
        with self._lock:
            for n, buffer in enumerate(self._free):
                if buffer.shape == shape:
                    return self._free.pop(n)
        return np.empty(shape, dtype=np.float32)

    def clear(self) -> None:
        """Drop the free buffers (before a block that needs its memory otherwise)."""
        with self._lock:
            self._free.clear()

    def give(self, buffer: np.ndarray | None) -> None:
        if buffer is None:
            return
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buffer)


# ==================================================================== pass 1
def scratch_keys(run_file: str | Path | tuple, pending: Sequence[int]) -> list[tuple[int, ...]]:
    """Pass-1 keys of one run: a time block each, or all of them in one key for a gzip
    file (reading volume ``t`` of a ``.nii.gz`` decompresses everything before it, so
    only one sequential reader per file is efficient) or a GIFTI run (parsed whole)."""
    if not pending:
        return []
    if isinstance(run_file, tuple) or str(run_file).endswith((".gz", ".gii")):
        return [tuple(int(b) for b in pending)]
    return [(int(b),) for b in pending]


class MaskedBlock(NamedTuple):
    """One time block of pass 1: ``data`` (time_block, voxel) float32, a view of ``buffer``."""

    block: int
    data: np.ndarray
    buffer: np.ndarray


@dataclass
class ScratchWork:
    """Pass 1 of one run: masked time blocks of its NIfTI file -> its transpose scratch.

    ``flat_index`` (voxel,) int64 is the Fortran-order flat index of the mask's voxels
    in one volume (:func:`~voxelflow.pipeline.stages.nifti.mask_voxels`); ``run_file``
    is absolute (cluster workers open it).  A key is a tuple of time blocks
    (:func:`scratch_keys`); its summary is the number of volumes written.
    """

    scratch: ScratchSpec
    run_file: str | tuple[str, ...]  # a NIfTI file, or the hemisphere files of a GIFTI run
    flat_index: np.ndarray
    _buffers: _Buffers = field(default_factory=_Buffers, repr=False, compare=False)

    def compute(self, blocks: tuple[int, ...]) -> Iterator[MaskedBlock]:
        """The masked blocks of ``blocks``, in order.

        One block is read here and now (so on threads it overlaps the previous key's
        write); several (a gzip run) are read lazily, one at a time as :meth:`write`
        takes them, so memory holds one block whatever the run's length.
        """
        reader = (GiftiReader(self.run_file) if isinstance(self.run_file, tuple)
                  else RunReader(self.run_file))
        scratch = self.scratch.open()
        if len(blocks) == 1:
            return iter([self._read(reader, scratch, blocks[0])])
        return (self._read(reader, scratch, block) for block in blocks)

    def _read(self, reader: RunReader | GiftiReader, scratch: TransposeScratch, block: int) -> MaskedBlock:
        region = scratch.block_slice(block)
        buffer = self._buffers.take((scratch.time_block, scratch.n_voxel))
        data = reader.read_masked(self.flat_index, region.start, region.stop, buffer)
        return MaskedBlock(block, data, buffer)

    def write(self, blocks: tuple[int, ...], masked: Iterator[MaskedBlock]) -> int:
        """Write each block's tiles into the scratch, then its flag there; return volumes."""
        scratch = self.scratch.open()
        volumes = 0
        for item in masked:
            scratch.write_block(item.block, item.data)
            volumes += item.data.shape[0]
            self._buffers.give(item.buffer)
        return volumes


# ==================================================================== pass 2
class StandardizedChunk(NamedTuple):
    """One voxel chunk of pass 2: ``bold`` (n_time, voxels) float32 and the raw
    per-voxel statistics of the run (voxels,) float32; ``bold`` is a view of
    ``buffer`` (``None``: its own array)."""

    bold: np.ndarray
    raw_mean: np.ndarray
    raw_std: np.ndarray
    buffer: np.ndarray | None


@dataclass
class ChunkWork:
    """Pass 2 of one run: a voxel chunk of its scratch -> standardised -> the workspace.

    A key is ``(run, block)`` of the stage's writer (a chunk of ``chunk_voxels``
    voxels, all time points).  The region written is one whole output chunk (and one
    chunk of ``raw_mean`` / ``raw_std``), so blocks never share a file.
    """

    scratch: ScratchSpec
    writer: StageWriter
    zscore: bool
    detrend: str
    basis: np.ndarray | None = None  # (time, q) confounds to remove, or None
    _buffers: _Buffers = field(default_factory=_Buffers, repr=False, compare=False)

    def compute(self, key: tuple[int, int]) -> StandardizedChunk:
        """Read the chunk from the scratch and standardise it (:func:`standardize`)."""
        run, block = key
        region = self.writer.block_slice(run, block)
        width = self.writer.templates[run].block_size
        if region.stop - region.start == width:
            buffer = self._buffers.take((self.scratch.n_time, width))
        else:
            # The last, narrower chunk: Zarr pads it to a whole chunk when writing, so
            # drop the full-width buffers first and read these few voxels on their own.
            self._buffers.clear()
            buffer = None
        x = self.scratch.open().read_voxels(region, out=buffer)  # a view of `buffer`
        raw_mean, raw_std = standardize(x, self.zscore, self.detrend, basis=self.basis)
        return StandardizedChunk(x, raw_mean, raw_std, buffer)

    def write(self, key: tuple[int, int], chunk: StandardizedChunk) -> int:
        """Write the chunk's raw statistics and BOLD (not its done flag); return voxels."""
        run, block = key
        region = self.writer.block_slice(run, block)
        workspace = self.writer.workspace
        workspace.write_array(self.writer.group, "raw_mean", chunk.raw_mean, (run, region))
        workspace.write_array(self.writer.group, "raw_std", chunk.raw_std, (run, region))
        with workspace.dense_writes():
            self.writer.write_block_data(run, block, {"bold": chunk.bold})
        self._buffers.give(chunk.buffer)
        return region.stop - region.start
