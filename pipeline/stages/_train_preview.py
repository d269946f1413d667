"""After training the autoencoder: the mean-frame baseline and the preview PNG.

:func:`mean_frame_mse` is the loss a model that always predicts the mean training
frame would have (the number the training loss is compared with);
:func:`training_preview` reconstructs a few training frames and writes them, over
their originals, as ``<checkpoint stem>.preview.png`` (:func:`write_preview`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from voxelflow.pipeline.stages._stream import read_training_frames

PREVIEW_FRAMES = 8
PREVIEW_MIN_SIDE = 128  # small frames are enlarged (nearest) to at least this in the PNG


def mean_frame_mse(frames: Iterator[np.ndarray], mean: Sequence[float],
                   std: Sequence[float]) -> float:
    """MSE (normalised pixels) of predicting every frame by the mean frame, streamed."""
    total = None
    total_sq = None
    n = 0
    for block in frames:
        b = block.astype(np.float64)
        s, sq = b.sum(axis=0), (b * b).sum(axis=0)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        n += block.shape[0]
    var = np.maximum(total_sq / n - (total / n) ** 2, 0.0)  # (H, W, 3), raw units
    scale = (255.0 * np.asarray(std, dtype=np.float64)) ** 2
    return float((var / scale).mean())


def preview_path(out: str | Path) -> Path:
    """``autoencoder.pt`` -> ``autoencoder.preview.png`` (next to the checkpoint)."""
    out = Path(out)
    return out.with_name(out.stem + ".preview.png")


def write_preview(path: Path, inputs: np.ndarray, recons: np.ndarray) -> Path:
    """PNG grid: ``inputs`` (uint8 (k, H, W, 3)) on top, ``recons`` below, 2 px gaps."""
    from PIL import Image

    k, h, w, _ = inputs.shape
    zoom = max(1, -(-PREVIEW_MIN_SIDE // max(h, w)))
    gap = 2
    H, W = h * zoom, w * zoom
    canvas = np.full((2 * H + 3 * gap, k * W + (k + 1) * gap, 3), 255, dtype=np.uint8)
    for row, imgs in enumerate((inputs, recons)):
        for i in range(k):
            img = np.repeat(np.repeat(imgs[i], zoom, axis=0), zoom, axis=1)
            y, x = gap + row * (H + gap), gap + i * (W + gap)
            canvas[y:y + H, x:x + W] = img
    Image.fromarray(canvas).save(path)
    return path


def training_preview(plan: Any, state: Any, normalise: Callable, path: Path
                     ) -> tuple[Path, float]:
    """Reconstruct up to 8 evenly spaced training frames (eval mode) and write the PNG.

    ``plan``/``state``: the train stage's plan (its frame stream, workspace, group and
    training ranges) and state (model, normalisation ``mean``/``std``).  Returns the
    PNG path and the MSE (normalised pixels) of those reconstructions.
    """
    stream, model = plan.stream, state.model
    k = min(PREVIEW_FRAMES, stream.n)
    ids = np.unique(np.linspace(0, stream.n - 1, k).round().astype(np.int64))
    frames = []
    for fid in ids:
        run, index = stream.locate(int(fid))
        frames.append(read_training_frames(plan.workspace, plan.group, plan.ranges, run,
                                           index, index + 1)[0])
    inputs = np.stack(frames)
    model.eval()
    with torch.inference_mode():
        x = normalise(torch.from_numpy(inputs))
        recon = model(x)
        mse = float(torch.nn.functional.mse_loss(recon, x))
        m = torch.tensor(state.mean, device=recon.device).reshape(1, 3, 1, 1)
        s = torch.tensor(state.std, device=recon.device).reshape(1, 3, 1, 1)
        pixels = ((recon * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)
        recons = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return write_preview(path, inputs, recons), mse
