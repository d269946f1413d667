"""Video files -> frames sampled at a fixed rate, resized, streamed block by block.

The frame shown at time ``t`` (seconds from the run's first frame) is the latest
decoded frame whose presentation timestamp (pts) is <= ``t``; pts are read from the
file, never assumed from a nominal frame rate, so variable-frame-rate files come out
right.  Samples are at ``t_k = k / fps`` for every ``t_k`` before the end of the last
frame (its pts plus its duration).

Memory: one block (128 frames x size x size x 3 bytes, 19 MB at 224 px) plus the
decoder's state; the video itself is never held in memory.  Bounded requests
(:mod:`voxelflow.pipeline.execution.resources`): before any decoding the stage checks
that :data:`FRAMES_BLOCKS_IN_MEMORY` blocks fit in memory (``--size``) and that the
frames fit on disk (``--fps``, ``--size``), and ``--fps`` may exceed a video's own
frame rate only up to :func:`fps_cap` (frames are then repeated, and the stage says so).
Probing the files (and refusing still images, one-frame and truncated files) is
:mod:`voxelflow.pipeline.stages.video`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import av
import dask.array as da
import numpy as np
import xarray as xr
from tqdm.auto import tqdm
from zarr.codecs import ZstdCodec

from voxelflow.pipeline.execution.blocks import run_blocks
from voxelflow.pipeline.execution.cluster import active_client, require_shared_path
from voxelflow.pipeline.design.needed import grid_attrs
from voxelflow.pipeline.execution.resources import (FRAMES_COMPRESSION, check_disk,
                                                    check_memory)
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.stages.video import (VideoInfo, corrupt_video, open_container,
                                             video_stream, probe_video)
from voxelflow.stores.inventory import stored_bytes
from voxelflow.stores.names import check_name
from voxelflow.pipeline.stages.needed_frames import NeededFrames, reuse_plan, select_frames
from voxelflow.stores.workspace import RunTemplate, StageWriter, Workspace

FRAME_CHUNK = 16  # frames per Zarr chunk
FRAME_SHARD = 128  # frames per shard == frames per resumable block
RESIZE_MODES = ("squash", "crop")
PTS_TOLERANCE_S = 1e-7  # pts <= t comparisons allow for float rounding of k / fps
MAX_FPS = 240.0  # --fps may exceed a video's rate up to max(MAX_FPS, MAX_FPS_FACTOR x rate)
MAX_FPS_FACTOR = 4.0
# The block being decoded, the block being written and its shard's encoded copy.
FRAMES_BLOCKS_IN_MEMORY = 3


def sample_times(end_s: float, fps: float) -> np.ndarray:
    """Sample times ``k / fps`` (s, float64) for every ``k`` with ``k / fps < end_s``."""
    n = int(math.ceil(end_s * fps - 1e-9))
    times = np.arange(max(n, 0), dtype=np.float64) / fps
    return times[times < end_s - 1e-12]


def frame_index_at(pts_s: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Index of the latest frame with pts <= t, for each t (n_samples,) int64.

    ``pts_s`` must be sorted and start at 0, so every t >= 0 has such a frame.
    """
    return np.searchsorted(pts_s, times + PTS_TOLERANCE_S, side="right").astype(np.int64) - 1


def resize_frame(frame: av.VideoFrame, size: int, mode: str) -> np.ndarray:
    """Decoded frame -> (size, size, 3) uint8 RGB.

    ``squash`` scales the whole picture to a square (aspect ratio not kept);
    ``crop`` takes the central square first, then scales.  Area averaging.
    """
    if mode == "squash":
        out = frame.reformat(width=size, height=size, format="rgb24", interpolation="AREA")
        return out.to_ndarray()
    rgb = frame.to_ndarray(format="rgb24")
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = np.ascontiguousarray(rgb[top:top + side, left:left + side])
    sq = av.VideoFrame.from_ndarray(square, format="rgb24")
    return sq.reformat(width=size, height=size, format="rgb24", interpolation="AREA").to_ndarray()


def iter_sampled_frames(info: VideoInfo, source_index: np.ndarray, start_sample: int,
                        size: int, mode: str) -> Iterator[np.ndarray]:
    """Yield the (size, size, 3) uint8 frame of each sample from ``start_sample`` on.

    ``source_index`` (n_samples,) is :func:`frame_index_at` of the sample times.
    Decoding starts at the keyframe before the first needed frame (seek), falls back
    to the start of the file if the seek overshoots, and never holds more than one
    decoded frame.
    """
    if start_sample >= source_index.size:
        return
    first_needed = int(source_index[start_sample])
    pts_to_index = {int(p): i for i, p in enumerate(info.pts)}
    with open_container(info.path) as container:
        stream = video_stream(container, info.path)
        stream.thread_type = "AUTO"
        frames = _decode_from(container, stream, info, first_needed)
        k = start_sample
        current: np.ndarray | None = None
        current_index = -1
        try:
            for frame in frames:
                index = pts_to_index.get(int(frame.pts)) if frame.pts is not None else None
                if index is None:
                    index = current_index + 1
                if index < first_needed:
                    continue
                while k < source_index.size and source_index[k] < index:
                    # Should not happen (frames come in pts order); repeat the last one.
                    yield _require(current, info, k)
                    k += 1
                if k >= source_index.size:
                    return
                if source_index[k] == index:
                    current = resize_frame(frame, size, mode)
                    current_index = index
                    while k < source_index.size and source_index[k] == index:
                        yield current
                        k += 1
                if k >= source_index.size:
                    return
        except av.error.FFmpegError as exc:
            raise corrupt_video(info.path, exc, f" near sample {k}") from None
        if k < source_index.size:
            raise InputError(
                f"{info.path}: video is corrupt or truncated (decoding stopped before frame "
                f"{int(source_index[k])} of {info.n_frames}); re-encode or re-download it"
            )


def take_frames(stream: Iterator[np.ndarray], n: int, size: int) -> np.ndarray:
    """The next ``n`` frames of ``stream`` as one uint8 ``(n, size, size, 3)`` block."""
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        out[i] = next(stream)
    return out


def _require(frame: np.ndarray | None, info: VideoInfo, k: int) -> np.ndarray:
    if frame is None:
        raise InputError(f"{info.path}: frame for sample {k} could not be decoded")
    return frame


def _decode_from(container, stream, info: VideoInfo, first_needed: int) -> Iterator[av.VideoFrame]:
    """Decoded frames starting at or before frame ``first_needed`` (in pts order)."""
    if first_needed > 0:
        target = int(info.pts[first_needed])
        container.seek(target, backward=True, any_frame=False, stream=stream)
        gen = container.decode(stream)
        first = next(gen, None)
        if first is not None and first.pts is not None and int(first.pts) <= target:
            yield first
            yield from gen
            return
        container.seek(int(info.pts[0]), backward=True, any_frame=False, stream=stream)
    yield from container.decode(stream)


def validate_frame_args(fps: float, size: int, resize: str) -> None:
    """Check the sampling arguments; raise :class:`InputError` naming the flag."""
    if not math.isfinite(fps) or fps <= 0:
        raise InputError(f"--fps must be a positive number of frames per second (got {fps})")
    if size <= 0:
        raise InputError(f"--size must be a positive number of pixels (got {size})")
    if resize not in RESIZE_MODES:
        raise InputError(f"--resize must be one of {', '.join(RESIZE_MODES)} (got {resize!r})")


def n_samples(duration_s: float, fps: float) -> int:
    """About how many samples :func:`sample_times` gives (arithmetic: no array)."""
    return max(int(math.ceil(duration_s * fps - 1e-9)), 0)


def fps_cap(source_rate: float | None) -> float:
    """The highest ``--fps`` allowed for a video of ``source_rate`` fps: ``MAX_FPS``
    (240) or ``MAX_FPS_FACTOR`` (4) times the video's rate, whichever is higher."""
    return max(MAX_FPS, MAX_FPS_FACTOR * (source_rate or 0.0))


def fps_problem(fps: float, source_rate: float | None, duration_s: float) -> str | None:
    """Why ``fps`` is refused for a video of ``source_rate`` fps lasting ``duration_s``
    (None: allowed), as ``"is above the cap ..."``: the caller names the value."""
    cap = fps_cap(source_rate)
    if fps <= cap:
        return None
    rate = f"{MAX_FPS_FACTOR:g}x the video's {source_rate:.4g} fps" if source_rate else ""
    return (f"is above the cap of {cap:g} fps (the higher of {MAX_FPS:g} fps "
            f"and {rate or 'the video rate'}): it would write {n_samples(duration_s, fps):,} "
            f"frames for {duration_s:.1f} s of video; lower it")


def source_rate(info: VideoInfo) -> float:
    """A video's frame rate (fps): its frames over its duration, or the nominal rate."""
    mean = info.n_frames / info.end_s if info.end_s > 0 else 0.0
    return max(mean, info.nominal_rate or 0.0)


def frames_block_bytes(size: int) -> int:
    """Working set of the frames stage at ``size`` px: FRAMES_BLOCKS_IN_MEMORY blocks."""
    return FRAMES_BLOCKS_IN_MEMORY * FRAME_SHARD * int(size) ** 2 * 3


def frames_disk_bytes(n_frames: int, size: int) -> float:
    """Estimated bytes on disk of ``n_frames`` frames at ``size`` px (zstd, see
    :data:`~voxelflow.pipeline.execution.resources.FRAMES_COMPRESSION`)."""
    return n_frames * int(size) ** 2 * 3 / FRAMES_COMPRESSION


def _check_sampling(infos: list[VideoInfo], fps: float, log) -> None:
    """Refuse an ``--fps`` over :func:`fps_cap`; say how many frames an ``--fps`` above a
    video's own rate writes."""
    for info in infos:
        rate = source_rate(info)
        problem = fps_problem(fps, rate, info.end_s)
        if problem:
            raise InputError(f"{info.path}: --fps {fps:g} {problem}")
        n = n_samples(info.end_s, fps)
        if log is not None and fps > rate * (1 + 1e-6):
            log(f"{info.path}: --fps {fps:g} is above the video's {rate:.4g} fps: each "
                f"frame is repeated about {fps / rate:.2g} times, {n:,} frames for "
                f"{info.end_s:.1f} s")


def _check_disk(times: list[np.ndarray], fps: float, size: int, workspace: Workspace,
                group: str) -> None:
    """Refuse frames that cannot fit on disk: the samples that will be stored (only the
    needed ones of a sparse selection), counted as :func:`frames_disk_bytes`."""
    check_disk(f"frames --fps {fps:g} --size {size}",
               frames_disk_bytes(sum(int(t.size) for t in times), size),
               workspace.path, "lower --fps or --size",
               already_written=stored_bytes(workspace, group))


def frames_template(info: VideoInfo, times: np.ndarray, run: int, size: int,
                    time_attrs: dict | None = None) -> RunTemplate:
    """Template of one run: ``frames (time, y, x, rgb) uint8`` with time/run coords;
    ``time_attrs`` adds to the ``time`` attrs (the full grid of a sparse selection)."""
    n = times.size
    data = da.empty((n, size, size, 3), dtype=np.uint8,
                    chunks=(min(FRAME_SHARD, max(n, 1)), size, size, 3))
    ds = xr.Dataset(
        {"frames": (("time", "y", "x", "rgb"), data, {"long_name": "video frame, RGB"})},
        coords={
            "time": ("time", times, {"units": "s", "long_name": "time from run onset",
                                     **(time_attrs or {})}),
            "run": ("time", np.full(n, run, dtype=np.int32), {"long_name": "run index"}),
        },
        attrs={
            "video": str(info.path),
            "source_frames": info.n_frames,
            "source_duration_s": info.end_s,
            "source_nominal_rate": info.nominal_rate or 0.0,
            "source_width": info.width,
            "source_height": info.height,
        },
    )
    encoding = {
        # zstd level 1: 2.2x smaller than raw frames at ~2.4x the speed of the default
        # level 3 (2.7x smaller), so compression keeps up with decoding.
        "frames": {"chunks": (FRAME_CHUNK, size, size, 3), "shards": (FRAME_SHARD, size, size, 3),
                   "compressors": [ZstdCodec(level=1)]},
        "time": {"chunks": (max(n, 1),)},
        "run": {"chunks": (max(n, 1),)},
    }
    return RunTemplate(ds, encoding, block_dim="time", block_size=FRAME_SHARD)


def frames_group(name: str) -> str:
    return f"frames/{name}"


def run_frames_stage(workspace: Workspace, videos: list[str | Path], name: str, *,
                     fps: float = 20.0, size: int = 224, resize: str = "squash",
                     needed: NeededFrames | None = None, overwrite: bool = False,
                     progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Decode ``videos`` (one run each) into ``/frames/<name>``; resume if interrupted.

    Every input is checked before anything is decoded or written (name, sampling,
    memory of a block, disk space; ``log`` gets a note when ``fps`` repeats frames).
    ``needed``: decode only the samples the planned fits read (a sparse ``time``
    coordinate, :mod:`~voxelflow.pipeline.design.needed`); other samples are decoded
    past but never converted, resized or stored.  A group holding some of the selected
    times with otherwise equal parameters (an extension) has those copied and only
    the missing ones decoded, built in staging and swapped in when complete (as for
    ``overwrite``: :mod:`voxelflow.stores.replace`).
    Returns a summary dict: group, runs, frames per run, blocks written, skipped.
    """
    check_name(name, "--name")
    validate_frame_args(fps, size, resize)
    if not videos:
        raise InputError("give at least one video file")
    check_memory(f"frames --size {size}", frames_block_bytes(size), "lower --size")
    infos = [probe_video(v) for v in videos]
    _check_sampling(infos, fps, log)
    grids = [sample_times(i.end_s, fps) for i in infos]
    for info, t in zip(infos, grids):
        if t.size == 0:
            raise InputError(f"{info.path}: shorter than one sample at --fps {fps}")
    params = {
        "stage": "frames",
        "videos": [{"file": os.path.abspath(i.path), "bytes": i.path.stat().st_size} for i in infos],
        "fps": float(fps), "size": int(size), "resize": resize,
    }
    group = frames_group(name)
    times, time_attrs = list(grids), [None] * len(grids)
    if needed is not None:
        selection, params["times"] = select_frames(workspace, group, needed, grids, params)
        if selection is not None:
            times = [g[i] for g, i in zip(grids, selection)]
            time_attrs = [grid_attrs(g.size, fps, name) for g in grids]
    _check_disk(times, fps, size, workspace, group)
    reuse = reuse_plan(workspace, group, params, times, overwrite)
    templates = [frames_template(i, t, r, size, a)
                 for r, (i, t, a) in enumerate(zip(infos, times, time_attrs))]
    # An extension is a replacement: built in staging with the held frames copied from
    # the complete group, then swapped in by finish() (journalled, stores/replace.py).
    writer = workspace.start_stage(
        group, params, templates, overwrite=overwrite or reuse is not None,
        group_attrs={"fps": float(fps), "size": int(size), "resize": resize,
                     "videos": [str(i.path) for i in infos],
                     "frames": "needed" if "times" in params else "all"},
    )
    work = FramesWork(writer, tuple(_absolute(i) for i in infos),
                      tuple(frame_index_at(i.pts_s, t) for i, t in zip(infos, times)),
                      size, resize, reuse)
    written, skipped_blocks = _run_frames(workspace, work, times, f"frames/{name}", progress)
    writer.finish()
    return {"group": group, "runs": len(infos), "frames": [int(t.size) for t in times],
            "grid_frames": [int(g.size) for g in grids],
            "reused_frames": 0 if reuse is None else int(sum((p >= 0).sum() for p in reuse)),
            "blocks_written": written, "blocks_skipped": skipped_blocks}


def _run_frames(workspace: Workspace, work: "FramesWork", times: list[np.ndarray],
                desc: str, progress: bool) -> tuple[int, int]:
    """Decode and write every pending block; ``(blocks written, blocks already done)``."""
    writer = work.writer
    pending = writer.n_pending()
    skipped_blocks = sum(t.n_blocks for t in writer.templates) - pending
    bar = tqdm(total=sum(t.size for t in times), unit="frame", desc=desc,
               disable=not progress, dynamic_ncols=True)
    bar.update(sum(t.size for t in times) -
               sum(writer.block_slice(r, b).stop - writer.block_slice(r, b).start
                   for r, b in writer.pending_keys()))
    client = active_client()
    if client is not None:
        require_shared_path(client, workspace.path)
        for info in work.infos:
            require_shared_path(client, info.path)
        work = dataclasses.replace(work, writer=writer.for_workers())
    written = run_blocks(work, writer.pending_keys(), client=client,
                         mark_done=lambda key: writer.mark_done(*key),
                         on_block=lambda key, n: bar.update(n))
    bar.close()
    return written, skipped_blocks


def _absolute(info: VideoInfo) -> VideoInfo:
    """``info`` with an absolute path (what a cluster worker must open)."""
    return dataclasses.replace(info, path=Path(os.path.abspath(info.path)))


@dataclass
class FramesWork:
    """Decoding one frames block: the per-block work of the frames stage.

    A block ``(run, block)`` is one frames shard of samples (128, or the run's last,
    shorter one).  ``source_index[run]`` (n_samples,) int64 is :func:`frame_index_at`
    of the run's sample times.  :meth:`compute` keeps its decoder open between
    consecutive blocks of a run on the same thread (no seek when the next block starts
    where the last one ended); any other block seeks to the keyframe before it, which
    gives the same pixels as decoding from the start.
    """

    writer: StageWriter
    infos: tuple[VideoInfo, ...]
    source_index: tuple[np.ndarray, ...]
    size: int
    resize: str
    reuse: list[np.ndarray] | None = None  # per run: old position per sample, -1: decode
    _streams: threading.local = field(default_factory=threading.local, repr=False,
                                      compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_streams")  # open decoders stay in the process that opened them
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _streams=threading.local())

    def compute(self, key: tuple[int, int]) -> np.ndarray:
        """``(n, size, size, 3)`` uint8 frames of block ``key = (run, block)``."""
        run, block = key
        region = self.writer.block_slice(run, block)
        if self.reuse is not None:
            return self._compute_reusing(run, region)
        cached = getattr(self._streams, "current", None)
        if cached is None or cached[0] != run or cached[1] != region.start:
            if cached is not None:
                cached[2].close()
            stream = iter_sampled_frames(self.infos[run], self.source_index[run],
                                         region.start, self.size, self.resize)
        else:
            stream = cached[2]
        out = take_frames(stream, region.stop - region.start, self.size)
        self._streams.current = (run, region.stop, stream)
        return out

    def _compute_reusing(self, run: int, region: slice) -> np.ndarray:
        """The block's frames: those the complete group (the one being replaced, as
        readers see it) holds copied, the others decoded."""
        pos = self.reuse[run][region]
        out = np.empty((pos.size, self.size, self.size, 3), dtype=np.uint8)
        held = np.flatnonzero(pos >= 0)
        if held.size:
            node = self.writer.run_path(run)
            first, last = int(pos[held].min()), int(pos[held].max()) + 1
            frames = self.writer.workspace.published().read_array(node, "frames",
                                                                   slice(first, last))
            out[held] = frames[pos[held] - first]
        missing = np.flatnonzero(pos < 0)
        if missing.size:
            source = self.source_index[run][region][missing]
            out[missing] = take_frames(iter_sampled_frames(self.infos[run], source, 0,
                                                           self.size, self.resize),
                                       missing.size, self.size)
        return out

    def write(self, key: tuple[int, int], frames: np.ndarray) -> int:
        """Write the block's frames (data only); returns the number of frames."""
        self.writer.write_block_data(*key, {"frames": frames})
        return int(frames.shape[0])
