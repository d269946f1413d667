"""Probing video files with PyAV: what a file holds, checked before any decoding.

* :func:`probe_video` reads every video packet's timestamp (demuxing, no decoding) and
  checks that the file is whole (:class:`VideoInfo`: pts, duration, size, rate);
* :func:`probe_video_header` reads the container header only (:class:`VideoHeader`:
  duration and nominal rate), the cheap probe the experiment runner uses at plan time.

Both refuse, with one line naming the file, a missing or unreadable file, a file
without a video stream, a still image (FFmpeg's picture demuxers, e.g. a JPEG renamed
``.mp4``) and, for :func:`probe_video`, an empty, one-frame or truncated video.
Decoding is :mod:`voxelflow.pipeline.stages.frames`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from voxelflow.pipeline.errors import InputError

__all__ = ["VideoHeader", "VideoInfo", "corrupt_video", "ffmpeg_reason", "open_container", "probe_video",
           "probe_video_header", "video_stream"]

# Demuxers of single pictures: a JPEG/PNG/... file (whatever its extension) is not a video.
STILL_IMAGE_DEMUXERS = ("image2", "image2pipe")


@dataclass(frozen=True)
class VideoInfo:
    """What a demux pass learned about one video file.

    ``pts`` (n_frames,) int: presentation timestamps in ``time_base`` units, sorted.
    ``pts_s`` (n_frames,) float64: the same in seconds from the first frame.
    ``end_s``: when the last frame stops being shown (s, from the first frame).
    """

    path: Path
    pts: np.ndarray
    pts_s: np.ndarray
    end_s: float
    time_base: float
    width: int
    height: int
    nominal_rate: float | None

    @property
    def n_frames(self) -> int:
        return int(self.pts.size)


def open_container(path: Path) -> av.container.InputContainer:
    """``path`` opened with PyAV for reading, or a one-line :class:`InputError`."""
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a video file")
    try:
        return av.open(str(path), mode="r")
    except av.error.FFmpegError as exc:
        raise InputError(
            f"{path}: not a readable video file ({ffmpeg_reason(exc)}); "
            f"check that it is a complete video (truncated files cannot be read)"
        ) from None


def ffmpeg_reason(exc: Exception) -> str:
    """The first words of an FFmpeg error (for quoting it in a one-line message)."""
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).split(":")[0].strip() or type(exc).__name__


def corrupt_video(path: Path, exc: Exception, where: str = "") -> InputError:
    """The one-line error for an FFmpeg failure while reading ``path`` (``where``: e.g.
    ``" after 12 frames"``)."""
    return InputError(f"{path}: video is corrupt or truncated ({ffmpeg_reason(exc)}{where}); "
                      f"re-encode or re-download it")


def video_stream(container: av.container.InputContainer, path: Path
                 ) -> av.video.stream.VideoStream:
    """The first video stream of ``container``, or a one-line :class:`InputError`."""
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
        raise InputError(f"{path}: has no video stream (found: {kinds}); give a video file")
    return container.streams.video[0]


def _refuse_still_image(container: av.container.InputContainer, path: Path) -> None:
    """Raise when FFmpeg reads ``path`` as a picture (``jpeg_pipe``, ``png_pipe``, ...)."""
    demuxer = container.format.name
    if demuxer in STILL_IMAGE_DEMUXERS or demuxer.endswith("_pipe"):
        raise InputError(f"{path}: is a still image ({demuxer.removesuffix('_pipe')}), not a "
                         f"video; give a video file (e.g. make one from images with ffmpeg)")


@dataclass(frozen=True)
class VideoHeader:
    """What a video's container header says, without demuxing: ``duration_s`` (None
    when the header has none) and the stream's nominal frame rate (None: unknown)."""

    path: Path
    duration_s: float | None
    rate: float | None


def probe_video_header(path: str | Path) -> VideoHeader:
    """The header's duration and frame rate (no packet is read, nothing decoded); refuses
    what :func:`probe_video` refuses up front (missing, unreadable, no video, image)."""
    path = Path(path)
    with open_container(path) as container:
        stream = video_stream(container, path)
        _refuse_still_image(container, path)
        duration = None
        if container.duration:
            duration = container.duration / 1e6
        elif stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        rate = stream.average_rate or stream.guessed_rate
        return VideoHeader(path, duration, float(rate) if rate else None)


def probe_video(path: str | Path) -> VideoInfo:
    """Read every video packet's pts (no decoding) and check the file is whole.

    Raises :class:`InputError` for a missing/unreadable file, no video stream, no
    frames, or a file that ends before its header says it should (truncated).
    """
    path = Path(path)
    with open_container(path) as container:
        stream = video_stream(container, path)
        _refuse_still_image(container, path)
        time_base = stream.time_base
        pts: list[int] = []
        durations: list[int] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                if packet.pts is None:
                    pts = []
                    break
                pts.append(int(packet.pts))
                durations.append(int(packet.duration or 0))
        except av.error.FFmpegError as exc:
            raise corrupt_video(path, exc, f" after {len(pts)} frames") from None
        width, height = stream.codec_context.width, stream.codec_context.height
        declared_frames = int(stream.frames or 0)
        nominal = float(stream.average_rate) if stream.average_rate else None
        container_duration = container.duration  # microseconds or None
    if not pts:
        pts, durations = _decode_pts(path)
    if not pts:
        raise InputError(f"{path}: video stream holds no frames; give a non-empty video")
    if len(pts) < 2:
        raise InputError(f"{path}: holds a single frame (a still image?); give a video "
                         f"with at least two frames")
    order = np.argsort(pts, kind="stable")
    pts_arr = np.asarray(pts, dtype=np.int64)[order]
    dur_arr = np.asarray(durations, dtype=np.int64)[order]
    tb = float(time_base)
    pts_s = (pts_arr - pts_arr[0]) * tb
    last_duration = _last_frame_duration(pts_s, dur_arr[-1] * tb, nominal)
    end_s = float(pts_s[-1] + last_duration)
    _check_not_truncated(path, pts_arr.size, declared_frames, pts_arr[0] * tb + end_s,
                         container_duration, last_duration)
    return VideoInfo(path, pts_arr, pts_s, end_s, tb, int(width), int(height), nominal)


def _decode_pts(path: Path) -> tuple[list[int], list[int]]:
    """Fallback when packets carry no pts: decode once and read the frames' pts."""
    pts: list[int] = []
    durations: list[int] = []
    with open_container(path) as container:
        stream = video_stream(container, path)
        try:
            for index, frame in enumerate(container.decode(stream)):
                value = frame.pts if frame.pts is not None else index
                pts.append(int(value))
                durations.append(int(frame.duration or 0))
        except av.error.FFmpegError as exc:
            raise corrupt_video(path, exc) from None
    return pts, durations


def _last_frame_duration(pts_s: np.ndarray, packet_duration_s: float,
                         nominal_rate: float | None) -> float:
    """How long the last frame is shown (s): its packet duration, else the usual gap."""
    if packet_duration_s > 0:
        return packet_duration_s
    if pts_s.size > 1:
        return float(np.median(np.diff(pts_s)))
    return 1.0 / nominal_rate if nominal_rate else 0.0


def _check_not_truncated(path: Path, n_frames: int, declared_frames: int, last_end_s: float,
                         container_duration_us: int | None, frame_s: float) -> None:
    """Raise when the header promises more frames or time than the file holds."""
    if declared_frames > 0 and n_frames < declared_frames:
        raise InputError(
            f"{path}: video is truncated ({n_frames} of {declared_frames} frames present); "
            f"re-encode or re-download it"
        )
    if container_duration_us:
        declared_s = container_duration_us / 1e6
        slack = max(0.5, 3 * frame_s)
        if last_end_s + slack < declared_s:
            raise InputError(
                f"{path}: video is truncated (frames end at {last_end_s:.2f} s, header says "
                f"{declared_s:.2f} s); re-encode or re-download it"
            )
