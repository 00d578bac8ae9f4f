"""Pillow-exact bicubic upscaling for super-resolution, as matrices over a window (tiled restore) and as a
transposed-convolution kernel (exported graphs): the restore side of the paper's pre-upsampled SR."""

from __future__ import annotations

import numpy as np

__all__ = ["bicubic_up_kernel", "bicubic_up_rows"]


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


def bicubic_up_kernel(scale: int) -> np.ndarray:
    """Pillow's BICUBIC upscaling weights along one axis as one transposed-convolution kernel
    (stride ``scale``, padding ``2 * scale``, 5 * ``scale`` taps), before Pillow's border renormalisation:
    dividing by the same transposed convolution of ones restores it, so a graph reproduces
    ``bicubic_up_rows`` on any input size (used by ``memnet export``)."""
    taps = np.zeros(5 * scale)
    for phase in range(scale):  # output pixel scale * i + phase reads input pixels i - 2 .. i + 2
        for k in range(-2, 3):
            taps[phase - scale * k + 2 * scale] = _pillow_bicubic(k + 0.5 - (phase + 0.5) / scale)
    return taps
