"""Casting float results back to an integer dtype without wrapping."""

from __future__ import annotations

import numpy as np

__all__ = ["saturating_cast"]


def saturating_cast(values: np.ndarray, dtype) -> np.ndarray:
    """Rounded float64 ``values`` as ``dtype``: integers clipped to the dtype's range. float64 cannot hold
    int64/uint64's maximum (it rounds up to 2**63 / 2**64, which a plain cast wraps to the minimum), so
    values at or above it become the maximum after the cast."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        return np.asarray(values).astype(dtype)
    info = np.iinfo(dtype)
    top = float(info.max)
    v = np.asarray(values, dtype=np.float64)
    if int(top) <= int(info.max):
        return np.clip(v, float(info.min), top).astype(dtype)
    # 64-bit: the float bound itself is out of range; cast below it, then set the top.
    out = np.clip(v, float(info.min), np.nextafter(top, 0.0)).astype(dtype)
    out[v >= top] = info.max
    return out
