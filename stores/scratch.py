"""Scratch space for the two-pass transpose of a stage (storage only, no maths).

A NIfTI run is stored volume after volume (time is the slowest axis), but the
workspace keeps BOLD as ``(time, voxel)`` chunks holding *all* time points of a few
thousand voxels.  Writing one time block straight into such chunks would rewrite every
chunk once per time block, so the transpose goes through a scratch file instead:

* pass 1 writes masked time blocks ``(time_block, voxel)``, cut into tiles of
  ``(time_block, voxel_chunk)``; each tile is one contiguous run of bytes in the file,
  and a time block's flag in ``done`` is set after its tiles;
* pass 2 reads the tiles of one voxel chunk, for all time blocks, straight into the
  ``(n_time, voxel_chunk)`` output array (``os.preadv`` into its rows: no copies).

Tile ``(b, c)`` (time block ``b``, voxel chunk ``c``) starts at byte
``4 * (b * time_block * n_voxel + t_b * c * voxel_chunk)`` where ``t_b`` is the length
of block ``b``: block ``b`` occupies rows ``b * time_block ...`` of a C-order
``(n_time, n_voxel)`` float32 array, tiled by voxel chunk inside the block.

Why not a Zarr array: reads and writes here are plain, single-threaded ``pread`` /
``pwrite`` of whole tiles, so memory is exactly one output chunk; Zarr's threaded codec
pipeline spreads the same buffers over several malloc arenas and the process keeps
tens of MB it no longer uses.  The folder lives under ``<store>/.scratch/``, which has
no ``zarr.json``, so the workspace (and ``xr.open_datatree``) never lists it.  Its
``meta.json`` names what it was made from (``token``: parameters, run, block size); a
scratch with another token is thrown away.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

SCRATCH_DIR = ".scratch"
_ITEM = 4  # float32


class TransposeScratch:
    """The ``(time, voxel)`` float32 staging data of one run, filled by time blocks."""

    def __init__(self, path: str | Path, n_time: int, n_voxel: int, time_block: int,
                 voxel_chunk: int, token: str) -> None:
        self.path = Path(path)
        self.n_time = int(n_time)
        self.n_voxel = int(n_voxel)
        self.time_block = int(max(1, min(time_block, n_time)))
        self.voxel_chunk = int(max(1, min(voxel_chunk, n_voxel)))
        self.token = token
        self._open_or_create()
        self._flags = np.frombuffer((self.path / "done").read_bytes(), dtype="u1").copy()

    # ------------------------------------------------------------------ layout
    @property
    def n_blocks(self) -> int:
        return -(-self.n_time // self.time_block)

    def block_slice(self, block: int) -> slice:
        start = block * self.time_block
        return slice(start, min(start + self.time_block, self.n_time))

    def _tile_offset(self, block: int, v0: int) -> int:
        region = self.block_slice(block)
        rows = region.stop - region.start
        return _ITEM * (region.start * self.n_voxel + rows * v0)

    def _meta(self) -> dict:
        return {"token": self.token, "shape": [self.n_time, self.n_voxel],
                "time_block": self.time_block, "voxel_chunk": self.voxel_chunk,
                "layout": "time blocks of voxel-chunk tiles, float32 little endian"}

    def _open_or_create(self) -> None:
        meta_path = self.path / "meta.json"
        if meta_path.exists():
            try:
                same = json.loads(meta_path.read_text()) == self._meta()
            except ValueError:
                same = False
            data = self.path / "data"
            if (same and data.exists() and (self.path / "done").exists()
                    and data.stat().st_size == _ITEM * self.n_time * self.n_voxel):
                return
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        with open(self.path / "data", "wb") as fh:
            fh.truncate(_ITEM * self.n_time * self.n_voxel)  # sparse until written
        (self.path / "done").write_bytes(bytes(self.n_blocks))
        meta_path.write_text(json.dumps(self._meta()))  # last: marks the scratch usable

    # ------------------------------------------------------------------ pass 1
    def pending_blocks(self) -> list[int]:
        return [int(b) for b in np.flatnonzero(self._flags == 0)]

    def write_block(self, block: int, data: np.ndarray) -> None:
        """Write time block ``block`` (``(len, n_voxel)`` float32), then flag it done."""
        region = self.block_slice(block)
        rows = region.stop - region.start
        if data.shape != (rows, self.n_voxel):
            raise AssertionError(f"scratch block {block}: shape {data.shape}, expected "
                                 f"{(rows, self.n_voxel)}")
        fd = os.open(self.path / "data", os.O_WRONLY)
        try:
            for v0 in range(0, self.n_voxel, self.voxel_chunk):
                v1 = min(v0 + self.voxel_chunk, self.n_voxel)
                tile = np.ascontiguousarray(data[:, v0:v1], dtype="<f4")
                _pwrite_all(fd, memoryview(tile).cast("B"), self._tile_offset(block, v0))
                del tile
        finally:
            os.close(fd)
        fd = os.open(self.path / "done", os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x01", block)
        finally:
            os.close(fd)
        self._flags[block] = 1

    @property
    def complete(self) -> bool:
        return bool(self._flags.all())

    # ------------------------------------------------------------------ pass 2
    def read_voxels(self, voxels: slice, out: np.ndarray | None = None) -> np.ndarray:
        """All time points of the voxels ``voxels`` (within one voxel chunk): ``(n_time, n)``.

        ``voxels`` must start on a voxel-chunk boundary and lie inside one chunk.  ``out``
        (float32, C order, ``(n_time, >= n)``) is filled and a view of it returned: a
        caller that reuses one buffer allocates nothing per chunk.
        """
        if not self.complete:
            raise AssertionError(f"{self.path}: scratch read before pass 1 finished")
        v0, v1 = voxels.start or 0, min(voxels.stop, self.n_voxel)
        if v0 % self.voxel_chunk or v1 - v0 > self.voxel_chunk:
            raise AssertionError(f"voxels {v0}:{v1} are not one scratch chunk "
                                 f"({self.voxel_chunk} voxels)")
        width = min(v0 + self.voxel_chunk, self.n_voxel) - v0
        if out is None:
            out = np.empty((self.n_time, width), dtype="<f4")
        elif (out.dtype != np.dtype("<f4") or out.shape[0] != self.n_time
              or out.shape[1] < width or not out.flags.c_contiguous):
            raise AssertionError(f"out must be C-order float32 ({self.n_time}, >= {width})")
        else:
            out = out.reshape(-1)[: self.n_time * width].reshape(self.n_time, width)
        fd = os.open(self.path / "data", os.O_RDONLY)
        try:
            for block in range(self.n_blocks):
                region = self.block_slice(block)
                target = memoryview(out[region]).cast("B")  # contiguous rows of `out`
                _pread_all(fd, target, self._tile_offset(block, v0))
        finally:
            os.close(fd)
        if v1 - v0 != width:
            out = np.ascontiguousarray(out[:, : v1 - v0])
        return out

    def remove(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def _pread_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            raise OSError(f"scratch file ends early at byte {offset}")
        buf, offset = buf[n:], offset + n
