"""Scores with the evaluation conventions of ../shared/data/README.md: PSNR, the affine fit W2S needs,
the Y channel of colour images. numpy only."""

from __future__ import annotations

import numpy as np

__all__ = ["affine_fit", "psnr", "rgb_to_y"]


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma as MATLAB's rgb2ycbcr, for uint8 RGB input; returns Y in [0, 255] (float)."""
    if rgb.ndim == 2:
        return rgb.astype(np.float64)
    x = rgb[..., :3].astype(np.float64) / 255.0
    return 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]


def psnr(result: np.ndarray, clean: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of ``result`` against ``clean`` (inf when they are equal)."""
    mse = np.mean((np.asarray(result, np.float64) - np.asarray(clean, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


def affine_fit(result: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Least-squares a·result + b fitted to ``clean`` (CARE's normalize_minmse), for W2S, whose 8-bit
    noisy and clean images differ in scale and offset."""
    x = np.asarray(result, np.float64).ravel()
    y = np.asarray(clean, np.float64).ravel()
    xm, ym = x.mean(), y.mean()
    var = np.mean((x - xm) ** 2)
    a = np.mean((x - xm) * (y - ym)) / var if var > 0 else 0.0
    return (a * (np.asarray(result, np.float64) - xm) + ym).reshape(np.shape(result))
