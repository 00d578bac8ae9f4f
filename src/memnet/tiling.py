"""The tiling plan — one plan for the CLI, the napari widget, lazy dask arrays and distributed runs.

Per spatial axis of length L, with core size c and halo h:

- Output cores are the chunk grid [k·c, min((k+1)·c, L)): they partition the output, and each
  output chunk is one core, so every chunk has exactly one writer.
- The input window of a core is [a - h, b + h) clipped to the image, then widened/shifted inward to
  the fixed window size w = min(L, c + 2h), so the device always sees one shape. The kept core is at
  least h pixels from every window edge that is not an image edge, and nothing is padded by us at
  image borders: with h ≥ the receptive-field radius the result equals whole-image inference.
- Blended mode (h < radius): window k is also used on the band [a - h, a + h) around each interior
  core boundary a, weighted by a ramp that rises from 0 to 1 across the band; the neighbour gets
  1 - ramp, so weights sum to one. No taper at image borders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import numpy as np

__all__ = ["AxisPlan", "TilePlan", "Tile", "ramp", "mirror_index"]


def ramp(n: int, kind: str = "cosine") -> np.ndarray:
    """Weights rising from ~0 to ~1 over n pixels, symmetric: ramp[i] + ramp[n-1-i] == 1."""
    if n <= 0:
        return np.zeros(0, np.float32)
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    if kind == "linear":
        w = t
    elif kind == "cosine":
        w = 0.5 - 0.5 * np.cos(np.pi * t)
    else:
        raise ValueError(f"unknown blend ramp {kind!r}: expected 'cosine' or 'linear'")
    return w.astype(np.float32)


@dataclass(frozen=True)
class AxisPlan:
    """The tiling of one axis: cores of ``core`` pixels partition ``length``; each core is read with ``halo`` pixels
    either side, windows shifted inward at the edges so all have one size."""

    length: int
    core: int
    halo: int

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"axis length must be ≥ 1, got {self.length}")
        if self.core < 1:
            raise ValueError(f"tile size must be ≥ 1, got {self.core}")
        if self.halo < 0:
            raise ValueError(f"halo must be ≥ 0, got {self.halo}")

    @property
    def n(self) -> int:
        """The number of tiles."""
        return math.ceil(self.length / self.core)

    @property
    def window(self) -> int:
        """The window size: core plus a halo on both sides, at most the axis length."""
        return min(self.length, self.core + 2 * self.halo)

    def core_range(self, k: int) -> tuple[int, int]:
        """[start, stop) of core k (the last one may be shorter)."""
        a = k * self.core
        return a, min(a + self.core, self.length)

    def window_range(self, k: int) -> tuple[int, int]:
        """[start, stop) of window k: the core with its halo, shifted inward at the edges to keep the size."""
        a, _ = self.core_range(k)
        s = min(max(a - self.halo, 0), self.length - self.window)
        return s, s + self.window

    def support(self, k: int) -> tuple[int, int]:
        """Where window k contributes in blended mode: its core plus half-bands of width h."""
        a, b = self.core_range(k)
        lo = a - self.halo if k > 0 else 0
        hi = b + self.halo if k < self.n - 1 else self.length
        return max(lo, 0), min(hi, self.length)

    def weights(self, k: int, kind: str = "cosine") -> np.ndarray:
        """Blend weights of window k over its support (1-D)."""
        lo, hi = self.support(k)
        p = np.arange(lo, hi)
        w = np.ones(hi - lo, np.float32)
        h = self.halo
        if h == 0:
            return w
        band = ramp(2 * h, kind)
        a, b = self.core_range(k)
        if k > 0:  # rise across the band around the left core boundary
            m = p < a + h
            w[m] = band[p[m] - (a - h)]
        if k < self.n - 1:  # fall across the band around the right core boundary
            m = p >= b - h
            w[m] = np.minimum(w[m], 1 - band[p[m] - (b - h)])
        return w


@dataclass(frozen=True)
class Tile:
    """One unit of work: a YX core of the output and the input window that produces it."""

    iy: int
    ix: int
    core: tuple[slice, slice]  # in output (= input, for scale 1) coordinates
    window: tuple[slice, slice]  # input region read and fed to the model
    crop: tuple[slice, slice]  # the core's position inside the window's output


@dataclass(frozen=True)
class TilePlan:
    """The YX tiling of one plane. Every non-YX axis is iterated outside this plan."""

    height: int
    width: int
    tile: int  # core size in pixels (memnet.RestoreOptions holds the default)
    halo: int = 0
    blend: str | None = None  # None for exact (disjoint cores); "cosine"/"linear" for blended

    def __post_init__(self):
        object.__setattr__(self, "_y", AxisPlan(self.height, min(self.tile, self.height), self.halo))
        object.__setattr__(self, "_x", AxisPlan(self.width, min(self.tile, self.width), self.halo))

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of tiles."""
        return self._y.n, self._x.n

    @property
    def core_shape(self) -> tuple[int, int]:
        """The core size (tile, clipped to the plane) along Y and X."""
        return self._y.core, self._x.core

    @property
    def window_shape(self) -> tuple[int, int]:
        """The window size (the input read for one tile) along Y and X."""
        return self._y.window, self._x.window

    def __len__(self) -> int:
        return self._y.n * self._x.n

    def tile_at(self, iy: int, ix: int) -> Tile:
        """The tile in row ``iy``, column ``ix``."""
        (ca, cb), (da, db) = self._y.core_range(iy), self._x.core_range(ix)
        (wa, wb), (va, vb) = self._y.window_range(iy), self._x.window_range(ix)
        return Tile(
            iy, ix,
            core=(slice(ca, cb), slice(da, db)),
            window=(slice(wa, wb), slice(va, vb)),
            crop=(slice(ca - wa, cb - wa), slice(da - va, db - va)),
        )

    def __iter__(self):
        for iy, ix in product(range(self._y.n), range(self._x.n)):
            yield self.tile_at(iy, ix)

    # Blended mode -----------------------------------------------------------------------------
    def support(self, t: Tile) -> tuple[slice, slice]:
        """Where tile ``t`` contributes in blended mode: its core plus half-bands of the halo."""
        (ya, yb), (xa, xb) = self._y.support(t.iy), self._x.support(t.ix)
        return slice(ya, yb), slice(xa, xb)

    def weights(self, t: Tile) -> np.ndarray:
        """Blend weights of tile ``t`` over its support (2-D)."""
        kind = self.blend or "cosine"
        return np.outer(self._y.weights(t.iy, kind), self._x.weights(t.ix, kind))

    def tiles_touching_core(self, iy: int, ix: int) -> list[tuple[int, int]]:
        """Windows whose blended support overlaps core (iy, ix): the core and its neighbours."""
        ny, nx = self.grid
        out = []
        for dy, dx in product((-1, 0, 1), repeat=2):
            jy, jx = iy + dy, ix + dx
            if 0 <= jy < ny and 0 <= jx < nx and (self.halo > 0 or (dy, dx) == (0, 0)):
                out.append((jy, jx))
        return out


def mirror_index(i: int, n: int) -> int:
    """Plane ``i`` of ``n`` under the context models' boundary rule along Z/T: mirrored at the first and last
    planes without repeating them (-1 -> 1, n -> n - 2), as numpy's ``reflect`` padding."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i = abs(i) % period
    return period - i if i >= n else i
