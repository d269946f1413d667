"""Which frames the autoencoder trains on, and the order it sees them in.

* :func:`training_ranges`: the *training part* of the stimulus, ``train_until=SECONDS``
  (the runs played one after another, frames strictly before ``SECONDS`` of that
  movie time; with one run, ``time < SECONDS``) or ``train_runs=[r, ...]`` (whole
  runs); in a sparse group (only some frame times stored) the stored frames of that
  part, by their ``time``.  Every frame the trainer reads goes through
  :func:`read_training_frames`, which refuses a range outside the training frames
  (the batches, the preview and the mean-frame baseline all read through it).
* Data order: frames stream from the Zarr store in *pieces* (:func:`make_pieces`: the
  training frames of one Zarr chunk, 16 frames).  Per epoch, the pieces are visited in
  a random order and fed into a shuffle buffer of ``buffer`` frames; a frame is drawn
  uniformly from the buffer whenever it is fuller than that, so memory is at most
  ``buffer`` + one piece of frames, whatever the length of the movie.  The draw is
  planned on indices first (:meth:`ShuffleStream.epoch_order`, seeded by ``(seed,
  epoch)``), so the data-order state is one number: the stream position (frames
  consumed); epochs follow each other and every batch is full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from voxelflow.pipeline.errors import InputError
from voxelflow.stores.workspace import Workspace


@dataclass(frozen=True)
class Piece:
    """Training frames ``start:stop`` of ``run`` inside one Zarr chunk; ids from ``first``."""

    run: int
    start: int
    stop: int
    first: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def training_ranges(run_lengths: Sequence[int], fps: float, *, train_until: float | None,
                    train_runs: Sequence[int] | None, group: str,
                    stored: Sequence[np.ndarray] | None = None) -> list[tuple[int, int, int]]:
    """``[(run, start, stop), ...]``: the training frames, from exactly one selection.

    ``train_until``: the runs played one after another (run ``r`` starts at the sum of
    the earlier runs' durations, ``n_frames / fps``); frames strictly before ``train_until``
    seconds of that movie time.  ``train_runs``: whole runs.

    ``stored`` (a sparse group, ``frames --times-from-bold`` / ``--times``): per run, the
    grid index (n_stored_r,), sorted, of each stored frame; ``run_lengths`` are then the
    runs' full grid lengths (``k / fps``, k < n), and ``start``/``stop`` are positions
    among the stored frames: those whose grid time is before ``train_until`` (the same
    frames as in a group of every frame, less those not stored).
    """
    if (train_until is None) == (not train_runs):
        raise InputError("give exactly one of --train-until SECONDS or --train-runs R[,R...] "
                         "(the training part of the stimulus; test frames are never trained on)")
    n_runs = len(run_lengths)
    total_s = sum(run_lengths) / fps
    if train_runs:
        bad = sorted({int(r) for r in train_runs if not 0 <= int(r) < n_runs})
        if bad:
            raise InputError(f"--train-runs {','.join(map(str, bad))}: /{group} has runs "
                             f"0..{n_runs - 1}")
        ranges = [(r, 0, int(run_lengths[r] if stored is None else stored[r].size))
                  for r in sorted({int(r) for r in train_runs})]
    else:
        if not math.isfinite(train_until):
            raise InputError(f"--train-until must be a number of seconds (got {train_until})")
        ranges = []
        offset = 0.0
        for r, n in enumerate(run_lengths):
            # frame k of run r is shown at offset + k / fps; keep those < train_until
            stop = int(np.clip(math.ceil((train_until - offset) * fps - 1e-9), 0, n))
            if stored is not None:  # the stored frames of grid index < stop
                stop = int(np.searchsorted(stored[r], stop))
            if stop > 0:
                ranges.append((r, 0, stop))
            offset += n / fps
    ranges = [rg for rg in ranges if rg[2] > rg[1]]
    if not ranges:
        what = (f"--train-until {train_until:g}" if train_until is not None
                else f"--train-runs {','.join(map(str, train_runs))}")
        held = (f"{sum(run_lengths)} frames" if stored is None else
                f"{sum(int(s.size) for s in stored)} of {sum(run_lengths)} grid frames stored")
        raise InputError(
            f"training range is empty: {what} keeps no frame of /{group} ({n_runs} run(s), "
            f"{held}, {total_s:g} s at {fps:g} fps); give the seconds "
            f"(or runs) of the stimulus to train on, before the test samples")
    return ranges


def make_pieces(ranges: Sequence[tuple[int, int, int]], chunk: int) -> list[Piece]:
    """Cut the training ranges at Zarr chunk boundaries (the unit of a read)."""
    pieces: list[Piece] = []
    first = 0
    for run, start, stop in ranges:
        a = start
        while a < stop:
            b = min(stop, (a // chunk + 1) * chunk)
            pieces.append(Piece(run, a, b, first))
            first += b - a
            a = b
    return pieces


class ShuffleStream:
    """Planned shuffle-buffer order of the training frames (ids ``0 .. n_train - 1``).

    Epoch ``e``: pieces in the order ``default_rng([seed, e]).permutation``; each
    piece's frames enter a buffer; while the buffer holds more than ``buffer`` frames,
    one is drawn uniformly (same generator) and emitted; at the end the buffer is
    drained the same way.  The stream is the epochs one after another; stream
    position ``p`` is frame ``epoch_order(p // n)[p % n]``.
    """

    def __init__(self, pieces: Sequence[Piece], seed: int, buffer: int) -> None:
        self.pieces = list(pieces)
        self.seed = int(seed)
        self.buffer = max(1, int(buffer))
        self.n = sum(p.size for p in self.pieces)
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(frame ids in emission order, piece indices in load order) of ``epoch``."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        rng = np.random.default_rng([self.seed, int(epoch)])
        piece_order = rng.permutation(len(self.pieces))
        buf: list[int] = []
        out: list[int] = []

        def draw() -> None:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            out.append(buf.pop())

        for p in piece_order:
            piece = self.pieces[p]
            buf.extend(range(piece.first, piece.first + piece.size))
            while len(buf) > self.buffer:
                draw()
        while buf:
            draw()
        order = np.asarray(out, dtype=np.int64)
        self._cache = (int(epoch), order, piece_order)
        return order, piece_order

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Frame ids at stream positions ``start .. stop - 1``."""
        out = []
        for pos in range(start, stop):
            epoch, k = divmod(pos, self.n)
            out.append(self.epoch_order(epoch)[0][k])
        return np.asarray(out, dtype=np.int64)

    def frames(self, read: Callable[[Piece], np.ndarray],
               start: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(id, frame)`` from stream position ``start`` on, forever.

        Pieces are read in the planned load order, only as far as the next frame
        needs; frames already emitted before ``start`` (a resume) are dropped on read.
        Frames held: at most ``buffer`` + one piece.
        """
        epoch, offset = divmod(int(start), self.n)
        while True:
            order, piece_order = self.epoch_order(epoch)
            position = np.empty(self.n, dtype=np.int64)
            position[order] = np.arange(self.n)
            held: dict[int, np.ndarray] = {}
            next_piece = 0
            for i in range(offset, self.n):
                fid = int(order[i])
                while fid not in held:
                    piece = self.pieces[int(piece_order[next_piece])]
                    next_piece += 1
                    block = read(piece)
                    for k in range(piece.size):
                        if position[piece.first + k] >= i:
                            held[piece.first + k] = block[k].copy()
                    del block
                yield fid, held.pop(fid)
            epoch, offset = epoch + 1, 0

    def locate(self, fid: int) -> tuple[int, int]:
        """(run, frame index) of training frame ``fid``."""
        for piece in self.pieces:
            if piece.first <= fid < piece.first + piece.size:
                return piece.run, piece.start + fid - piece.first
        raise IndexError(fid)


def read_training_frames(workspace: Workspace, group: str,
                         ranges: Sequence[tuple[int, int, int]], run: int, start: int,
                         stop: int) -> np.ndarray:
    """``frames[start:stop]`` of ``run``: the only place training reads frames.

    Refuses (AssertionError: a bug, never an input problem) any range that is not
    inside the training frames, so no test-sample frame can be drawn.
    """
    if not any(r == run and a <= start and stop <= b for r, a, b in ranges) or stop <= start:
        raise AssertionError(f"read of /{group} run {run} frames {start}:{stop} is outside "
                             f"the training frames {list(ranges)}")
    return workspace.read_array(Workspace.run_path(group, run), "frames", slice(start, stop))
