"""Damage is detected, never read as fill values: chunk files, block digests, strict reads.

* **Which files a block owns.** A block of a run (:class:`RunTemplate`) covers whole
  shards of each data variable that has the block dimension; :func:`block_files` lists
  their chunk (or shard) files in a fixed order, the block's *slots*.
* **Digests.** When a block is marked done, the CRC32C of each of its files is stored
  in ``block_digest (block, block_file)`` uint64 beside ``block_done`` (value
  ``2**32 + crc``; 0 = no digest, as in groups written before digests existed).
  ``voxelflow verify`` (:mod:`voxelflow.stores.verify`) re-reads the files and compares.
* **Every chunk file exists.** Stage writes use ``write_empty_chunks=True`` (format 2),
  so a complete group has a file for every chunk of every array; :func:`missing_files`
  checks that with a directory listing (no reads) before a stage reads an upstream
  group, and :class:`CheckedPipeline` (the codec pipeline of the workspace's reads)
  raises :class:`DamagedData` for a missing chunk or one that does not decode, instead
  of returning fill values or a codec traceback.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import google_crc32c
import numpy as np
import zarr
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.registry import register_pipeline

from voxelflow.pipeline.errors import DamagedData

DONE_VAR = "block_done"
DIGEST_VAR = "block_digest"
DIGEST_DIM = "block_file"
BOOKKEEPING = (DONE_VAR, DIGEST_VAR)
PRESENT = 1 << 32  # digest = PRESENT + crc32c: 0 means "no digest recorded"
_METADATA = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")


def dense(arr: zarr.Array) -> zarr.Array:
    """``arr`` writing every chunk, even one equal to the fill value (so that a missing
    file always means damage); per array, not Zarr's process-wide config."""
    return arr.with_config({"write_empty_chunks": True})


# ---------------------------------------------------------------- files of arrays
def chunk_keys(arr: zarr.Array, axis: int | None = None,
               region: slice | None = None) -> list[str]:
    """Store keys (relative to the array) of the chunk files (shards when sharded) of
    ``arr``, all of them or those covering ``region`` along ``axis``; C order."""
    outer = arr.metadata.chunk_grid.chunk_shape
    ranges = [range(-(-n // c)) for n, c in zip(arr.shape, outer)]
    if axis is not None and region is not None:
        size = outer[axis]
        ranges[axis] = range(region.start // size, -(-region.stop // size))
    return [arr.metadata.encode_chunk_key(coords) for coords in itertools.product(*ranges)]


def block_variables(dataset_vars: dict[str, Sequence[str]], block_dim: str) -> list[str]:
    """Names of the data variables a block writes (those with the block dimension)."""
    return sorted(name for name, dims in dataset_vars.items()
                  if block_dim in dims and name not in BOOKKEEPING)


def block_files(node: zarr.Group, names: Sequence[str], block_dim: str,
                region: slice) -> list[str]:
    """Keys (relative to ``node``) of the files block ``region`` owns, in slot order."""
    keys = []
    for name in names:
        arr = node[name]
        axis = list(arr.metadata.dimension_names or ()).index(block_dim)
        keys += [f"{name}/{k}" for k in chunk_keys(arr, axis, region)]
    return keys


def file_digest(path: Path) -> int:
    """``PRESENT + crc32c`` of the file's bytes (streamed in 8 MiB pieces)."""
    crc = google_crc32c.Checksum()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(8 << 20), b""):
            crc.update(piece)
    return PRESENT + int.from_bytes(crc.digest(), "big")


def digest_row(node_dir: Path, keys: Sequence[str], width: int) -> np.ndarray:
    """uint64 ``(width,)`` digests of ``keys`` (files under ``node_dir``), 0-padded."""
    row = np.zeros(width, dtype="u8")
    for slot, key in enumerate(keys):
        row[slot] = file_digest(node_dir / key)
    return row


def expected_files(group_node: zarr.Group, strict: bool) -> Iterator[tuple[str, str]]:
    """``(array path, chunk key)`` of every chunk file a complete group must hold.

    ``strict`` (format 2, dense writes): every array but the bookkeeping.  Otherwise
    (older groups, which skipped chunks equal to the fill value): only the data
    variables (2-D and more) of nodes with block flags."""
    for path, arr in _arrays(group_node):
        name = path.rsplit("/", 1)[-1]
        if name in BOOKKEEPING:
            continue
        if not strict:
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            holder = group_node[parent] if parent else group_node
            if len(arr.shape) < 2 or DONE_VAR not in holder:
                continue
        for key in chunk_keys(arr):
            yield path, key


def _arrays(group: zarr.Group, prefix: str = "") -> Iterator[tuple[str, zarr.Array]]:
    for name, member in sorted(group.members()):
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Array):
            yield path, member
        else:
            yield from _arrays(member, path + "/")


def missing_files(group_dir: Path, group_node: zarr.Group, strict: bool) -> list[str]:
    """Chunk files (relative to the group folder) that should exist and do not: one
    directory listing per array, no reads."""
    missing = []
    listed: dict[str, set[str]] = {}
    for path, key in expected_files(group_node, strict):
        if path not in listed:
            root = group_dir / path
            listed[path] = {str(Path(d, f).relative_to(root)) for d, _, files in os.walk(root)
                            for f in files}
        if key not in listed[path]:
            missing.append(f"{path}/{key}")
    return missing


# ---------------------------------------------------------------- where, in words
def locate(store: Path, key: str) -> tuple[str, str, str]:
    """``(group, where, block text)`` of a chunk file ``key`` (relative to ``store``):
    the stage group that holds it, its node within the group, and ``block N`` when the
    group records its block size (else the sample range)."""
    parts = key.split("/")
    group = None
    for i in range(len(parts) - 1, 0, -1):
        attrs = _attributes(store / "/".join(parts[:i]))
        if attrs is not None and "voxelflow" in attrs:
            group, info = "/".join(parts[:i]), attrs["voxelflow"]
            break
    if group is None:
        return "/".join(parts[:-3]), "", ""
    rest = parts[len(group.split("/")):]
    node = rest[0] if len(rest) > 3 and rest[0].startswith("run-") else ""
    array = rest[1] if node else rest[0]
    coords = [int(c) for c in rest[(3 if node else 2):] if c.isdigit()]
    return group, node, _block_text(store / group / node / array, coords, info)


def _block_text(array_dir: Path, coords: list[int], info: dict) -> str:
    meta = _metadata(array_dir)
    if meta is None:
        return ""
    dims = list(meta.get("dimension_names") or [])
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", [])
    dim, size = info.get("block_dim"), info.get("block_size")
    if dim in dims and size and len(coords) == len(dims):
        axis = dims.index(dim)
        return f"block {coords[axis] * grid[axis] // int(size)}"
    if dims and coords and grid:
        start = coords[0] * grid[0]
        return f"{dims[0]} {start}-{start + grid[0] - 1}"
    return ""


def _metadata(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _attributes(folder: Path) -> dict | None:
    meta = _metadata(folder)
    return None if meta is None else meta.get("attributes", {})


def damage_message(store: Path, key: str, problem: str) -> str:
    """One line: which group, run and block is damaged, and the fix (verify, rerun)."""
    group, node, block = locate(Path(store), key)
    where = " ".join(p for p in (node, block) if p)
    attrs = _attributes(Path(store) / group) or {}
    if attrs.get("voxelflow", {}).get("state") != "complete":
        return (f"{store}: /{group}{' ' + where if where else ''} is not written yet "
                f"({key} {problem}); rerun the command that makes it")
    return (f"{store}: /{group}{' ' + where if where else ''} is damaged ({key} "
            f"{problem}); run: voxelflow verify {group} --store {store}, then rerun the "
            f"command that made it")


# ---------------------------------------------------------------- strict reads
class CheckedPipeline(BatchedCodecPipeline):
    """Zarr's codec pipeline, except that in a voxelflow stage group a chunk that is
    missing or fails to decode raises :class:`DamagedData` naming the group, run and
    block (instead of fill values or a codec traceback).  Everything else (other Zarr
    data, the sparse ``block_done`` flags, chunks inside a shard) reads exactly as with
    Zarr's own pipeline."""

    async def read_batch(self, batch_info, out, drop_axes=()):  # noqa: D102 - see class
        batch_info = list(batch_info)
        checked = [getter for getter, *_ in batch_info if _is_checked(getter)]
        if not checked:
            return await super().read_batch(batch_info, out, drop_axes)
        for byte_getter in checked:
            if not await byte_getter.exists():
                raise DamagedData(damage_message(_store_root(byte_getter), byte_getter.path,
                                                 "is missing"))
        try:
            await super().read_batch(batch_info, out, drop_axes)
        except DamagedData:
            raise
        except Exception as exc:  # noqa: BLE001 - any codec failure is damage
            byte_getter = checked[0]
            reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
            raise DamagedData(damage_message(_store_root(byte_getter), byte_getter.path,
                                             f"cannot be decoded: {reason}")) from None


register_pipeline(CheckedPipeline)
PIPELINE_PATH = f"{CheckedPipeline.__module__}.{CheckedPipeline.__qualname__}"
ZARR_PIPELINE_PATH = "zarr.core.codec_pipeline.BatchedCodecPipeline"
_in_group_cache: dict[tuple[str, str], bool] = {}  # (store root, array) -> checked


def install_checked_pipeline() -> bool:
    """Make :class:`CheckedPipeline` Zarr's codec pipeline in this process, unless the
    user chose another pipeline than Zarr's default (then reads of missing chunks are
    still caught by the listing before a stage reads, :func:`missing_files`).

    Zarr 3.1 has no switch for "raise on a missing chunk" (``array.read_missing_chunks``
    comes with a later release, and would also hit the sparse ``block_done`` flags); the
    pipeline is chosen when an array is opened, so it is set once, here, rather than
    around each read (``zarr.config.set`` is process-wide: contexts on two threads
    would undo each other)."""
    if zarr.config.get("codec_pipeline.path") != ZARR_PIPELINE_PATH:
        return zarr.config.get("codec_pipeline.path") == PIPELINE_PATH
    zarr.config.set({"codec_pipeline.path": PIPELINE_PATH})
    return True


def _is_checked(byte_getter) -> bool:
    """Whether the chunk is data of a voxelflow stage group on a local store."""
    root, key = _store_root(byte_getter), getattr(byte_getter, "path", None)
    if root is None or key is None or not hasattr(byte_getter, "exists"):
        return False  # a chunk inside a shard (its shard's read names the file), or memory
    parts = key.split("/")
    for cut in range(len(parts) - 1, 1, -1):
        known = _in_group_cache.get((str(root), "/".join(parts[:cut])))
        if known is not None:
            return known
    for cut in range(len(parts) - 1, 1, -1):  # the array is the longest prefix with metadata
        meta = _metadata(root / "/".join(parts[:cut]))
        if meta is None:
            continue
        checked = meta.get("node_type") == "array" and parts[cut - 1] not in BOOKKEEPING and any(
            "voxelflow" in (_attributes(root / "/".join(parts[:i])) or {})
            for i in range(cut - 1, 1, -1))
        _in_group_cache[(str(root), "/".join(parts[:cut]))] = checked
        return checked
    return False


def _store_root(byte_getter) -> Path | None:
    root = getattr(getattr(byte_getter, "store", None), "root", None)
    return Path(root) if root is not None else None


install_checked_pipeline()
