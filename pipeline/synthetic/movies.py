"""Generated stimuli for the demo, tests and benchmarks (written with PyAV).

``write_index_video`` writes a video whose every frame encodes its own index as a
4 x 4 grid of black/white cells (16 bits), robust to lossy coding and to resizing,
so a test can tell exactly which source frame ended up at which sample.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np

GRID = 4  # index cells per side (GRID**2 bits)


def index_frame(index: int, height: int = 128, width: int = 128) -> np.ndarray:
    """(height, width, 3) uint8 frame whose 4x4 cells spell ``index`` in binary."""
    bits = [(index >> b) & 1 for b in range(GRID * GRID)]
    cells = np.array(bits, dtype=np.uint8).reshape(GRID, GRID) * 255
    frame = np.kron(cells, np.ones((height // GRID, width // GRID), dtype=np.uint8))
    return np.repeat(frame[:, :, None], 3, axis=2)


def read_index(frame: np.ndarray) -> int:
    """Inverse of :func:`index_frame` for a (h, w, 3) frame of any size (centre of each cell)."""
    h, w = frame.shape[:2]
    value = 0
    for b in range(GRID * GRID):
        r, c = divmod(b, GRID)
        y = int((r + 0.5) * h / GRID)
        x = int((c + 0.5) * w / GRID)
        if frame[y, x].mean() > 127:
            value |= 1 << b
    return value


def write_index_video(path: str | Path, pts_s: Sequence[float] | None = None, *,
                      n_frames: int = 48, rate: Fraction | float = 24,
                      codec: str = "libx264", size: tuple[int, int] = (128, 128)) -> np.ndarray:
    """Write an index-encoding video and return its frames' pts in seconds.

    Constant rate: ``n_frames`` at ``rate`` frames/s.  Variable rate: give ``pts_s``
    (seconds, increasing, first 0); the container time base is 1/1000 s.
    """
    path = Path(path)
    rate = Fraction(rate).limit_denominator(1001000)
    h, w = size
    with av.open(str(path), mode="w") as container:
        if pts_s is None:
            stream = container.add_stream(codec, rate=rate)
            time_base = 1 / rate
            ticks = list(range(n_frames))
            times = [float(t / rate) for t in ticks]
        else:
            stream = container.add_stream(codec, rate=24)
            time_base = Fraction(1, 1000)
            stream.codec_context.time_base = time_base
            ticks = [int(round(t * 1000)) for t in pts_s]
            times = [t / 1000 for t in ticks]
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast"}
        for i, tick in enumerate(ticks):
            frame = av.VideoFrame.from_ndarray(index_frame(i, h, w), format="rgb24")
            frame.pts = tick
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return np.asarray(times)


def write_moving_video(path: str | Path, seconds: float, *, rate: int = 24,
                       size: tuple[int, int] = (160, 240), seed: int = 0,
                       codec: str = "libx264") -> int:
    """Write a synthetic movie (drifting coloured blobs on a changing background).

    Cheap to generate at any length (used for the demo and the memory benchmark);
    returns the number of frames.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    n = int(round(seconds * rate))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    centres = rng.uniform(0, 1, size=(4, 2)) * [h, w]
    speeds = rng.normal(0, 2.0, size=(4, 2))
    colours = rng.uniform(0, 255, size=(4, 3))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        for i in range(n):
            base = 60 + 40 * np.sin(i / rate / 3.0)
            img = np.full((h, w, 3), base, dtype=np.float32)
            for c in range(4):
                cy, cx = (centres[c] + speeds[c] * i) % [h, w]
                blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (h / 8) ** 2))
                img += blob[:, :, None] * (colours[c] - base)
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return n


def _smooth_texture(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """(h, w, 3) float32 texture in [0, 255]: coarse noise upsampled (cheap, tileable)."""
    coarse = rng.uniform(0, 255, size=(h // scale + 2, w // scale + 2, 3)).astype(np.float32)
    big = np.repeat(np.repeat(coarse, scale, axis=0), scale, axis=1)
    # Box-blur once so the texture is smooth rather than blocky.
    k = max(scale // 2, 1)
    big = (big + np.roll(big, k, 0) + np.roll(big, k, 1) + np.roll(big, (k, k), (0, 1))) / 4
    return big[:h + scale, :w + scale]


def write_scene_movie(path: str | Path, seconds: float, *, rate: int = 24,
                      size: tuple[int, int] = (180, 320), scene_seconds: float = 6.0,
                      seed: int = 0, codec: str = "libx264") -> int:
    """Write a synthetic movie of scenes: a drifting texture, moving shapes, hard cuts.

    Each scene (``scene_seconds`` on average, random length) has its own texture,
    palette, texture drift and 1-4 moving rectangles/discs; scenes change by cuts.
    Returns the number of frames.  Used by the demo as a stand-in for a real film.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    n = int(round(seconds * rate))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "23"}
        i = 0
        while i < n:
            length = int(rate * rng.uniform(0.5, 1.5) * scene_seconds)
            scale = int(rng.choice([8, 16, 32, 48]))
            texture = _smooth_texture(rng, h, w, scale) * rng.uniform(0.3, 1.0, size=3)
            drift = rng.normal(0, 1.5, size=2)
            n_shapes = int(rng.integers(1, 5))
            pos = rng.uniform(0, 1, size=(n_shapes, 2)) * [h, w]
            vel = rng.normal(0, 3.0, size=(n_shapes, 2))
            radius = rng.uniform(8, h / 3, size=n_shapes)
            colour = rng.uniform(0, 255, size=(n_shapes, 3)).astype(np.float32)
            disc = rng.random(n_shapes) < 0.5
            for f in range(min(length, n - i)):
                dy, dx = (drift * f).astype(int) % [scale, scale]
                img = texture[dy:dy + h, dx:dx + w].copy()
                for s in range(n_shapes):
                    cy, cx = (pos[s] + vel[s] * f) % [h, w]
                    if disc[s]:
                        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius[s] ** 2
                    else:
                        inside = (np.abs(yy - cy) < radius[s]) & (np.abs(xx - cx) < radius[s] / 2)
                    img[inside] = colour[s]
                frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            i += length
        for packet in stream.encode():
            container.mux(packet)
    return n
