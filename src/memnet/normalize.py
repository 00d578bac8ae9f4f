"""Intensity policy: how raw data map to the model's range and back.

The policy comes from the model's metadata ("normalization"), never from the caller:

- ``{"mode": "natural"}`` (natural-image models, and bare modules): uint8 maps by /255 and results
  return as uint8 (rounded, clipped); other integers by their dtype's full range; float is taken as
  already in [0, 1] and returned as float32.
- ``{"mode": "percentile", "low": 1.0, "high": 99.8}`` (microscopy): low/high percentiles computed
  ONCE per channel over all of that channel's planes (sampled, never per tile: per-tile statistics draw
  seams; never across channels: a dim channel mapped with a bright one's range comes out wrong), data
  mapped so those percentiles become 0 and 1, and results mapped back to the input's range and dtype.

`Intensity` is an input's mapping: one `Normalizer` per channel (the C axis and RGB samples S).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .dtypes import saturating_cast

__all__ = ["Intensity", "Normalizer", "percentile_range", "sample_percentiles"]

_SAMPLE_TARGET = 2_000_000  # values drawn for percentiles: exact enough, cheap on 100 GB stacks


def sample_percentiles(data, low: float, high: float, max_samples: int = _SAMPLE_TARGET) -> tuple[float, float]:
    """Percentiles of an array whose last two axes are Y and X (e.g. planes stacked by the caller), from
    a regular sample of planes and pixels. An input with axes goes through `Intensity.for_source`."""
    shape = data.shape
    if int(np.prod(shape)) == 0:
        raise ValueError("cannot compute intensity percentiles of an empty array")
    lead = shape[:-2]
    picks, stride = sample_plan(int(np.prod(lead)) if lead else 1, shape[-2] * shape[-1], max_samples)
    every = slice(None, None, stride)
    vals = [np.asarray(data[(np.unravel_index(f, lead) if lead else ()) + (every, every)]) for f in picks]
    return percentile_range(vals, low, high)


def sample_plan(n_planes: int, plane_px: int, max_samples: int = _SAMPLE_TARGET) -> tuple[list[int], int]:
    """Which planes (positions among ``n_planes``) and which pixel stride a percentile sample reads:
    up to 64 evenly spaced planes, about ``max_samples`` values in all."""
    planes_wanted = max(1, min(n_planes, 64))
    stride = max(1, int(np.sqrt(plane_px * planes_wanted / max_samples)))
    picks = np.unique(np.linspace(0, n_planes - 1, planes_wanted).round().astype(int))
    return [int(p) for p in picks], stride


def percentile_range(samples, low: float, high: float) -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles of the values in ``samples`` (a list of arrays)."""
    v = np.concatenate([np.asarray(a).astype(np.float64, copy=False).ravel() for a in samples])
    if not np.all(np.isfinite(v)):
        raise ValueError("the data contain NaN or Inf values: clean or mask them before restoring")
    lo, hi = np.percentile(v, [low, high])
    return float(lo), float(hi)


def check_dtype(dtype: np.dtype) -> None:
    """Refuse, in the user's terms, a dtype that is not an intensity image."""
    if dtype.kind == "b":
        raise TypeError("the input is boolean (a mask, not an intensity image): nothing to restore; "
                        "convert it to uint8 if you really mean it")
    if dtype.kind == "c":
        raise TypeError(f"complex data ({dtype}) cannot be restored: pass the magnitude or the real part")
    if dtype.kind not in "iuf":
        raise TypeError(f"unsupported dtype {dtype}: expected an integer or float image")
    if dtype.kind == "f" and dtype.itemsize > 8:
        raise TypeError(f"unsupported dtype {dtype}: use float32 or float64")


@dataclass
class Normalizer:
    """Maps raw values to model range (``forward``) and model output back (``inverse``)."""

    scale: float  # model = (raw - offset) / scale
    offset: float
    out_dtype: np.dtype
    clip: tuple[float, float] | None  # clip of the inverse, in raw units (integer outputs)
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # forward's lookups

    @classmethod
    def for_data(cls, data, policy: dict | None) -> Normalizer:
        """The mapping of one channel held in ``data`` (its last two axes Y and X)."""
        def percentiles(low, high):
            return sample_percentiles(data, low, high)
        return cls.build(data.dtype, policy, percentiles)

    @classmethod
    def build(cls, dtype, policy: dict | None, percentiles) -> Normalizer:
        """The mapping for ``dtype`` under ``policy``; ``percentiles(low, high)`` samples the channel's
        values (called only for the percentile policy)."""
        dtype = np.dtype(dtype)
        policy = policy or {"mode": "natural"}
        mode = policy.get("mode", "natural")
        check_dtype(dtype)
        out_dtype = dtype  # the dtype policy: uint8 stays uint8, uint16 stays uint16, float stays float
        clip = (float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)) if dtype.kind in "iu" else None
        if mode == "percentile":
            lo, hi = percentiles(float(policy.get("low", 1.0)), float(policy.get("high", 99.8)))
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
        """Raw -> model range, float32 (computed in float64 so uint16/uint32 keep their precision). 8- and
        16-bit integers go through a table of that same computation: one lookup per pixel, same values."""
        raw = np.asarray(raw)
        if raw.dtype.kind in "iu" and raw.dtype.itemsize <= 2:
            index = raw  # the table's index is the value minus the dtype's minimum: a signed value, sign bit flipped
            if raw.dtype.kind == "i":
                index = raw.view(raw.dtype.str.replace("i", "u")) ^ (1 << (8 * raw.dtype.itemsize - 1))
            return np.take(self._table(raw.dtype), index)
        return ((np.asarray(raw, dtype=np.float64) - self.offset) / self.scale).astype(np.float32)

    def _table(self, dtype: np.dtype) -> np.ndarray:
        table = self._tables.get(dtype)
        if table is None:
            info = np.iinfo(dtype)
            values = np.arange(int(info.min), int(info.max) + 1, dtype=np.float64)
            table = self._tables[dtype] = ((values - self.offset) / self.scale).astype(np.float32)
        return table

    def inverse(self, model_out: np.ndarray) -> np.ndarray:
        """Model range -> the output dtype: scaled back, and for integers rounded and clipped to the output's range."""
        out = np.multiply(model_out, self.scale, dtype=np.float64)  # in place from here: fewer passes
        out += self.offset
        if self.out_dtype.kind in "iu":
            np.rint(out, out=out)
            if self.clip is not None:
                np.clip(out, *self.clip, out=out)
            if self.out_dtype.itemsize < 8:  # within range after the clip: a plain cast
                return out.astype(self.out_dtype)
            return saturating_cast(out, self.out_dtype)  # int64/uint64 max: no wrap
        return out.astype(self.out_dtype)

    def as_dict(self) -> dict:
        """The mapping for the job record: scale, offset and output dtype."""
        return {"scale": self.scale, "offset": self.offset, "dtype": str(self.out_dtype)}

    def to_spec(self) -> dict:
        """Everything needed to rebuild this mapping elsewhere (a dask worker): `from_spec`."""
        return {**self.as_dict(), "clip": list(self.clip) if self.clip else None}

    @classmethod
    def from_spec(cls, d: dict) -> Normalizer:
        """The mapping that `to_spec` describes."""
        return cls(scale=d["scale"], offset=d["offset"], out_dtype=np.dtype(d["dtype"]),
                   clip=tuple(d["clip"]) if d.get("clip") else None)


@dataclass(frozen=True)
class Intensity:
    """An input's intensity mapping: one `Normalizer` per channel, never one across channels.

    ``channel_at`` are the positions, in a plane's lead index (`Source.leads`), of the channel axes
    (C and RGB samples S); ``norms`` maps each channel's indices along them to its `Normalizer`. An
    input without channel axes has one, under the key ``()``."""

    norms: dict
    channel_at: tuple[int, ...] = ()

    @classmethod
    def for_source(cls, src, policy: dict | None) -> Intensity:
        """Each channel's mapping from a sample of that channel's planes (`Source.sample`)."""
        channel_at = src.channel_at
        groups: dict[tuple, list[tuple]] = {}
        for lead in src.leads():
            groups.setdefault(src.channel(lead), []).append(lead)

        def build(leads):
            return Normalizer.build(src.dtype, policy, lambda lo, hi: percentile_range(src.sample(leads), lo, hi))
        return cls({key: build(leads) for key, leads in groups.items()}, channel_at)

    def at(self, lead: tuple) -> Normalizer:
        """The mapping of the plane at ``lead``."""
        return self.norms[tuple(lead[i] for i in self.channel_at)]

    @property
    def out_dtype(self) -> np.dtype:
        """The output dtype (the same for every channel)."""
        return next(iter(self.norms.values())).out_dtype

    def as_dict(self) -> dict:
        """For the job record: a single channel's mapping as `Normalizer.as_dict`, else one per channel."""
        if not self.channel_at:
            return self.norms[()].as_dict()
        return {"channels": [[list(k), n.as_dict()] for k, n in self.norms.items()]}

    def to_spec(self) -> dict:
        """Everything needed to rebuild the per-channel mappings elsewhere (a dask worker): `from_spec`."""
        return {"channel_at": list(self.channel_at), "norms": [[list(k), n.to_spec()] for k, n in self.norms.items()]}

    @classmethod
    def from_spec(cls, d: dict) -> Intensity:
        """The mapping that `to_spec` describes."""
        return cls({tuple(k): Normalizer.from_spec(n) for k, n in d["norms"]}, tuple(d["channel_at"]))
