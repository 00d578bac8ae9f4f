"""Intensity policy: how raw data map to the model's range and back.

The policy comes from the model's metadata ("normalization"), never from the caller:

- ``{"mode": "natural"}`` (natural-image models, and bare modules): uint8 maps by /255 and results
  return as uint8 (rounded, clipped); other integers by their dtype's full range; float is taken as
  already in [0, 1] and returned as float32.
- ``{"mode": "percentile", "low": 1.0, "high": 99.8}`` (microscopy): low/high percentiles computed
  ONCE over the whole stack (sampled, never per tile: per-tile statistics draw seams), data mapped
  so those percentiles become 0 and 1, and results mapped back to the input's range and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dtypes import saturating_cast

__all__ = ["Normalizer", "sample_percentiles"]

_SAMPLE_TARGET = 2_000_000  # values drawn for percentiles: exact enough, cheap on 100 GB stacks


def sample_percentiles(data, low: float, high: float, max_samples: int = _SAMPLE_TARGET) -> tuple[float, float]:
    """Percentiles of a (possibly lazy, larger-than-RAM) array from a regular sample of planes
    and pixels. Reads at most about ``max_samples`` values."""
    shape = data.shape
    if int(np.prod(shape)) == 0:
        raise ValueError("cannot compute intensity percentiles of an empty array")
    lead = shape[:-2]
    n_planes = int(np.prod(lead)) if lead else 1
    plane_px = shape[-2] * shape[-1]
    # Choose how many planes to read and the pixel stride within each.
    planes_wanted = max(1, min(n_planes, 64))
    stride = max(1, int(np.sqrt(plane_px * planes_wanted / max_samples)))
    picks = np.unique(np.linspace(0, n_planes - 1, planes_wanted).round().astype(int))
    vals = []
    for flat in picks:
        idx = np.unravel_index(flat, lead) if lead else ()
        plane = np.asarray(data[idx + (slice(None, None, stride), slice(None, None, stride))])
        vals.append(plane.astype(np.float64, copy=False).ravel())
    v = np.concatenate(vals)
    if not np.all(np.isfinite(v)):
        raise ValueError("the data contain NaN or Inf values: clean or mask them before restoring")
    lo, hi = np.percentile(v, [low, high])
    return float(lo), float(hi)


@dataclass
class Normalizer:
    """Maps raw values to model range (``forward``) and model output back (``inverse``)."""

    scale: float  # model = (raw - offset) / scale
    offset: float
    out_dtype: np.dtype
    clip: tuple[float, float] | None  # clip of the inverse, in raw units (integer outputs)

    @classmethod
    def for_data(cls, data, policy: dict | None) -> Normalizer:
        dtype = np.dtype(data.dtype)
        policy = policy or {"mode": "natural"}
        mode = policy.get("mode", "natural")
        if dtype.kind == "b":
            raise TypeError("the input is boolean (a mask, not an intensity image): nothing to restore; "
                            "convert it to uint8 if you really mean it")
        if dtype.kind == "c":
            raise TypeError(f"complex data ({dtype}) cannot be restored: pass the magnitude or the real part")
        if dtype.kind not in "iuf":
            raise TypeError(f"unsupported dtype {dtype}: expected an integer or float image")
        if dtype.kind == "f" and dtype.itemsize > 8:
            raise TypeError(f"unsupported dtype {dtype}: use float32 or float64")
        out_dtype = dtype  # the dtype policy: uint8 stays uint8, uint16 stays uint16, float stays float
        clip = (float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)) if dtype.kind in "iu" else None
        if mode == "percentile":
            lo, hi = sample_percentiles(data, float(policy.get("low", 1.0)), float(policy.get("high", 99.8)))
            span = hi - lo
            # A flat image (or one whose spread is below float64 resolution at its magnitude): any
            # positive scale keeps it flat; one relative to the magnitude keeps 1e30 finite.
            if not span > 1e-12 * max(abs(lo), abs(hi), 1.0):
                span = max(abs(lo), abs(hi), 1.0)
            return cls(scale=span, offset=lo, out_dtype=out_dtype, clip=clip)
        if mode == "natural":
            if dtype.kind == "f":
                return cls(scale=1.0, offset=0.0, out_dtype=out_dtype, clip=None)
            info = np.iinfo(dtype)
            return cls(scale=float(info.max) - float(info.min), offset=float(info.min), out_dtype=out_dtype, clip=clip)
        raise ValueError(f"unknown normalization mode {mode!r} in the model's metadata")

    def forward(self, raw: np.ndarray) -> np.ndarray:
        """Raw -> model range, float32 (computed in float64 so uint16/uint32 keep their precision)."""
        return ((np.asarray(raw, dtype=np.float64) - self.offset) / self.scale).astype(np.float32)

    def inverse(self, model_out: np.ndarray) -> np.ndarray:
        out = np.asarray(model_out, dtype=np.float64) * self.scale + self.offset
        if self.out_dtype.kind in "iu":
            out = np.rint(out)
            if self.clip is not None:
                np.clip(out, *self.clip, out=out)
            return saturating_cast(out, self.out_dtype)  # int64/uint64 max: no wrap
        return out.astype(self.out_dtype)

    def as_dict(self) -> dict:
        return {"scale": self.scale, "offset": self.offset, "dtype": str(self.out_dtype)}
