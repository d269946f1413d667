"""Simulated BOLD with a planted answer (for the demo and end-to-end tests).

A voxel's response is a weighted sum of one feature space's features at a known set
of delays, the weights of each delay following the canonical (SPM double-gamma)
haemodynamic response, plus Gaussian noise at a chosen signal-to-noise ratio:

    y_v(t) = sum_L h(L) * f(t - L) @ w_v + noise,   L in the planted lag set (s)

so an encoding model with the planted features and lag set can explain it and others
only partly.  Pure NumPy; the caller writes the result wherever it wants.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import gamma


def canonical_hrf(t: np.ndarray, peak: float = 6.0, undershoot: float = 16.0,
                  ratio: float = 1.0 / 6.0) -> np.ndarray:
    """SPM's double-gamma HRF at times ``t`` (s), normalised to a maximum of 1."""
    t = np.asarray(t, dtype=np.float64)
    h = gamma.pdf(t, peak) - ratio * gamma.pdf(t, undershoot)
    grid = np.linspace(0, 32, 3201)
    top = (gamma.pdf(grid, peak) - ratio * gamma.pdf(grid, undershoot)).max()
    return h / top


def planted_response(features: np.ndarray, frame_times: np.ndarray, bold_times: np.ndarray,
                     lags: list[float], n_voxels: int, *, snr: float = 1.0,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Simulate BOLD (n_bold, n_voxels) float32 from ``features`` (n_frames, n_feat).

    Features are z-scored, taken at the latest frame at or before ``t - L`` (0 before
    the run starts), weighted by ``canonical_hrf(L)`` and projected with random
    per-voxel weights; noise is scaled per voxel so that var(signal)/var(noise) is
    drawn around ``snr`` (voxels differ, a tenth carry no signal at all).
    Returns (bold, per-voxel true SNR).
    """
    rng = np.random.default_rng(seed)
    f = np.asarray(features, dtype=np.float64)
    f = (f - f.mean(0)) / (f.std(0) + 1e-8)
    weights = rng.normal(size=(f.shape[1], n_voxels)) / np.sqrt(f.shape[1])
    signal = np.zeros((bold_times.size, n_voxels))
    hrf = canonical_hrf(np.asarray(lags, dtype=np.float64))
    for lag, h in zip(lags, hrf):
        idx = np.searchsorted(frame_times, bold_times - lag + 1e-6, side="right") - 1
        shifted = np.where((idx >= 0)[:, None], f[np.clip(idx, 0, None)], 0.0)
        signal += h * (shifted @ weights)
    signal /= signal.std(0) + 1e-12
    voxel_snr = snr * rng.lognormal(0, 0.5, size=n_voxels)
    voxel_snr[rng.random(n_voxels) < 0.1] = 0.0
    noise = rng.normal(size=signal.shape) / np.sqrt(np.maximum(voxel_snr, 1e-12))
    scale = np.where(voxel_snr > 0, 1.0, 0.0)
    bold = scale * signal + np.where(voxel_snr > 0, noise, rng.normal(size=signal.shape))
    return (100 + 5 * bold).astype(np.float32), voxel_snr
