"""Synthetic degradations (training) and the evaluation conventions of ../shared/data/README.md.

All images here are float arrays in [0, 1] unless a name says otherwise (``*_255``, uint8)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = [
    "rgb_to_y",
    "gaussian_noise",
    "poisson_gaussian_noise",
    "bicubic_degrade",
    "jpeg_degrade",
    "psnr",
    "affine_fit",
]


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma as MATLAB's rgb2ycbcr, for uint8 RGB input; returns Y in [0, 255] (float)."""
    if rgb.ndim == 2:
        return rgb.astype(np.float64)
    x = rgb[..., :3].astype(np.float64) / 255.0
    return 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]


def gaussian_noise(clean: np.ndarray, sigma_255: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise, unclipped (the denoising convention); sigma in 8-bit units."""
    return (clean + rng.standard_normal(clean.shape) * (sigma_255 / 255.0)).astype(np.float32)


def poisson_gaussian_noise(clean: np.ndarray, photons: float, read_sigma: float,
                           rng: np.random.Generator) -> np.ndarray:
    """Camera noise: shot noise with ``photons`` expected photons at intensity 1, plus Gaussian read
    noise (std ``read_sigma`` in intensity units)."""
    lam = np.clip(clean, 0, None) * photons
    shot = rng.poisson(lam) / photons
    return (shot + rng.standard_normal(clean.shape) * read_sigma).astype(np.float32)


def bicubic_degrade(hr: np.ndarray, scale: int) -> np.ndarray:
    """Pillow bicubic down by ``scale`` and back up to the same size (the network's SR input).
    ``hr``'s shape must be a multiple of ``scale``."""
    h, w = hr.shape
    if h % scale or w % scale:
        raise ValueError(f"image {hr.shape} is not a multiple of the scale {scale}: crop it first")
    img = Image.fromarray(hr.astype(np.float32), mode="F")
    lr = img.resize((w // scale, h // scale), Image.BICUBIC)
    return np.asarray(lr.resize((w, h), Image.BICUBIC), dtype=np.float32)


def jpeg_degrade(clean: np.ndarray, quality: int) -> np.ndarray:
    """Encode a [0, 1] gray image as 8-bit JPEG at ``quality`` with Pillow and decode it."""
    u8 = np.clip(np.rint(clean * 255), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf), dtype=np.float32) / 255.0


def psnr(result: np.ndarray, clean: np.ndarray, peak: float = 255.0) -> float:
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


def _pillow_bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def bicubic_up_rows(n_in: int, scale: int, start: int, stop: int) -> tuple[np.ndarray, int, int]:
    """Rows [start, stop) of Pillow's BICUBIC upscaling matrix along one axis (float images):
    a = -0.5 kernel, weights clipped at the borders and renormalised, as Pillow does. Returns
    (rows restricted to their non-zero columns, first column, last column + 1). Applied to a window
    of the input, these rows reproduce whole-image upscaling exactly (used by tiled SR)."""
    step = 1.0 / scale  # input pixels per output pixel
    support = 2.0  # bicubic support; no widening when upscaling
    spans = []
    for xx in range(start, stop):
        center = (xx + 0.5) * step
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        w = np.array([_pillow_bicubic(x - center + 0.5) for x in range(xmin, xmax)])
        total = w.sum()
        spans.append((xmin, w / total if total != 0 else w))
    c0 = min(x for x, _ in spans)
    c1 = max(x + len(w) for x, w in spans)
    m = np.zeros((stop - start, c1 - c0), np.float64)
    for i, (x, w) in enumerate(spans):
        m[i, x - c0: x - c0 + len(w)] = w
    return m, c0, c1
