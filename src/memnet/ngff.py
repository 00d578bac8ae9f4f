"""OME-Zarr (NGFF) outputs: the multiscales metadata, built and validated with ome-zarr-models (the
spec's maintained Pydantic models, for 0.4 and 0.5), and the resolution pyramid written while restoring.

The pyramid: level 0 is the restored data; level k+1 is level k with Y and X halved, each pixel the
mean of a 2×2 block (of the pixels there are, at an odd edge), rounded to the data type, until a level
fits in ``fit``×``fit`` pixels. Every level has level 0's chunk shape (clipped), so a chunk row of level
k+1 is made of whole chunk rows of level k. The unit of pyramid work is one chunk row of one plane of
one level: it is built (read from level k, written to level k+1, chunk by chunk) once every chunk row
of level k under it is finished, by one owner, and then gets a done-marker like a group of tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .dtypes import saturating_cast
from .options import OME_ZARR_VERSIONS as VERSIONS

__all__ = ["VERSIONS", "Level", "Pyramid", "PyramidTracker", "Unit", "axis_type", "mean2x2", "multiscales_attrs",
           "ngff_index", "ngff_order", "validate", "zarr_format"]

_ZARR_FORMAT = {"0.5": 3, "0.4": 2}
_AXIS_TYPES = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}
_NGFF_RANK = {"time": 0, "channel": 1, "custom": 1, "space": 2}


def axis_type(letter: str) -> str:
    """NGFF's type of an axis letter; our S (samples) and Q (other) are "custom"."""
    return _AXIS_TYPES.get(letter.upper(), "custom")


def zarr_format(version: str) -> int:
    """The Zarr format (2 or 3) an OME-Zarr ``version`` is stored in; a ValueError for an unknown version."""
    if version not in VERSIONS:
        raise ValueError(f"ome_zarr_version must be one of {', '.join(VERSIONS)}, got {version!r}")
    return _ZARR_FORMAT[version]


def ngff_order(axes: str) -> list[int]:
    """The permutation that puts ``axes`` in the order NGFF requires (time, then channel, then space;
    each group in its own order), e.g. ImageJ's TZCYX -> TCZYX. Y and X keep their order, so a 2-D
    block written at a permuted index needs no transpose."""
    return sorted(range(len(axes)), key=lambda d: _NGFF_RANK[axis_type(axes[d])])


def ngff_index(index: tuple, perm: list[int]) -> tuple:
    """An index in the source's axis order, as an index into the NGFF-ordered output."""
    return tuple(index[d] for d in perm) if perm and len(perm) == len(index) else index


# Metadata ------------------------------------------------------------------------------------------


def _models(version: str):
    """ome-zarr-models' classes for ``version``: (Axis, Dataset, Multiscale, ImageAttrs, Image)."""
    if version == "0.5":
        from ome_zarr_models.v05.axes import Axis
        from ome_zarr_models.v05.image import Image, ImageAttrs
        from ome_zarr_models.v05.multiscales import Dataset, Multiscale
    else:
        from ome_zarr_models.v04.axes import Axis
        from ome_zarr_models.v04.image import Image, ImageAttrs
        from ome_zarr_models.v04.multiscales import Dataset, Multiscale
    return Axis, Dataset, Multiscale, ImageAttrs, Image


def level_transform(scale: list[float], translate: list[float], axes: str, k: int) -> tuple[list, list]:
    """Pixel size and origin of level k: Y and X pixels 2^k times larger, the first pixel centred on
    the 2^k × 2^k block of level 0 it averages."""
    f = 2 ** k
    s = [v * f if a in "YX" else v for a, v in zip(axes, scale)]
    t = [t0 + s0 * (f - 1) / 2 if a in "YX" else t0 for a, s0, t0 in zip(axes, scale, translate)]
    return s, t


def multiscales_attrs(version: str, name: str, axes: str, units: dict, scale: dict, translate: dict,
                      levels: int) -> dict:
    """The group attributes of an OME-Zarr image of ``levels`` levels (paths "0", "1", ...), built with
    ome-zarr-models' classes, which check them against the spec. ``axes``: letters in storage (NGFF)
    order; ``units`` as NGFF names. Raises ValueError for axes the spec cannot describe."""
    zarr_format(version)
    Axis, Dataset, Multiscale, ImageAttrs, _ = _models(version)
    s0 = [float(scale.get(a, 1.0)) for a in axes]
    t0 = [float(translate.get(a, 0.0)) for a in axes]
    datasets = []
    for k in range(levels):
        s, t = level_transform(s0, t0, axes, k)
        datasets.append(Dataset.build(path=str(k), scale=s, translation=t if any(t) else None))
    ax = [Axis(name=a.lower(), type=axis_type(a),
               unit=units.get(a) if axis_type(a) in ("space", "time") else None) for a in axes]
    extra = {"version": "0.4"} if version == "0.4" else {}
    try:
        ms = Multiscale(axes=ax, datasets=datasets, name=name, type="mean", **extra,
                        metadata={"description": "each level after 0: 2x2 mean (Y, X) of the one before, "
                                                 "rounded to the data type", "written_by": "memnet"})
        attrs = (ImageAttrs(multiscales=[ms], version="0.5") if version == "0.5"
                 else ImageAttrs(multiscales=[ms]))
    except ValueError as e:  # pydantic's ValidationError: the spec's rules on axes
        raise ValueError(f"OME-Zarr cannot describe axes {axes!r}: it holds 2 to 5 axes, at most one time, "
                         "one channel and one other axis, then 2 or 3 spatial axes (Z, Y, X); write a .tif "
                         f"output, or give axes that fit ({_first_line(e)})") from None
    d = attrs.model_dump(mode="json", exclude_none=True)
    return {"ome": d} if version == "0.5" else d


def _first_line(e: Exception) -> str:
    """Pydantic's message without its links and echoed inputs."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("For further")]
    return (lines[-1] if lines else str(e)).split(" [type=")[0].removeprefix("Value error, ")


def validate(group, version: str) -> None:
    """Read ``group`` back with ome-zarr-models: its Image model checks the metadata and the arrays it
    names (present, of the axes' dimensionality, and for 0.5 their dimension names). Raises ValueError."""
    *_, ImageAttrs, Image = _models(version)
    try:
        Image.from_zarr(group)
        return
    except Exception as e:
        if not _model_unusable(e):
            raise ValueError(f"{group.store}: not a valid OME-Zarr {version} image ({_first_line(e)})") from e
    # ome-zarr-models 1.6's v0.4 Image model cannot be built under pydantic >= 2.13 (1.7 pins pydantic
    # < 2.13, which napari's stack outgrows): check the metadata with its model, the arrays here.
    attrs = dict(group.attrs)
    try:
        meta = ImageAttrs.model_validate(attrs.get("ome", attrs))
    except ValueError as e:
        raise ValueError(f"{group.store}: not a valid OME-Zarr {version} image ({_first_line(e)})") from e
    for ms in meta.multiscales:
        for d in ms.datasets:
            a = group.get(d.path)
            if a is None or not hasattr(a, "shape") or len(a.shape) != len(ms.axes):
                raise ValueError(f"{group.store}: not a valid OME-Zarr {version} image (no {len(ms.axes)}-D array "
                                 f"at {d.path!r})")


def _model_unusable(e: Exception) -> bool:
    """The library's own model failed to build (a pydantic incompatibility), not our data."""
    return type(e).__name__ == "PydanticUserError" and getattr(e, "code", None) == "class-not-fully-defined"


# The pyramid ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One pyramid level: its plane size and its chunk size."""

    height: int
    width: int
    chunk_h: int
    chunk_w: int

    @property
    def rows(self) -> int:
        """Chunk rows."""
        return -(-self.height // self.chunk_h)


class Unit(NamedTuple):
    """Pyramid work: chunk row ``row`` of level ``level`` (≥ 1) of plane ``plane`` (``lead``: its
    index over the non-YX axes, in the source's order)."""

    level: int
    plane: int
    row: int
    lead: tuple

    @property
    def key(self) -> str:
        """The resume marker's name of this unit."""
        return f"L{self.level}-{self.plane}-{self.row}"


class Pyramid:
    """The levels' geometry and which chunk rows of level k-1 make a chunk row of level k."""

    def __init__(self, levels: list[Level]):
        self.levels = list(levels)

    @classmethod
    def plan(cls, height: int, width: int, chunk_h: int, chunk_w: int, fit: int) -> Pyramid:
        """Level 0 of (height, width) in chunks (chunk_h, chunk_w), then halved levels until one fits in
        fit × fit (``fit`` 0: level 0 only)."""
        lv = [Level(height, width, min(chunk_h, height), min(chunk_w, width))]
        while fit and max(lv[-1].height, lv[-1].width) > fit:
            h, w = -(-lv[-1].height // 2), -(-lv[-1].width // 2)
            lv.append(Level(h, w, min(chunk_h, h), min(chunk_w, w)))
        return cls(lv)

    def __len__(self) -> int:
        return len(self.levels)

    def children(self, k: int, row: int) -> slice:
        """The chunk rows of level k-1 that chunk row ``row`` of level k is computed from."""
        lo, up = self.levels[k], self.levels[k - 1]
        a, b = 2 * row * lo.chunk_h, min(2 * (row + 1) * lo.chunk_h, up.height)
        return slice(a // up.chunk_h, -(-b // up.chunk_h))

    def parent(self, k: int, row: int) -> int:
        """The chunk row of level k+1 that chunk row ``row`` of level k goes into."""
        return row * self.levels[k].chunk_h // 2 // self.levels[k + 1].chunk_h

    def regions(self, k: int, row: int):
        """For each chunk of chunk row ``row`` of level k: ((ys, xs) in level k-1, (ys, xs) in level k)."""
        lo, up = self.levels[k], self.levels[k - 1]
        ys = slice(row * lo.chunk_h, min((row + 1) * lo.chunk_h, lo.height))
        for x0 in range(0, lo.width, lo.chunk_w):
            xs = slice(x0, min(x0 + lo.chunk_w, lo.width))
            src = (slice(2 * ys.start, min(2 * ys.stop, up.height)), slice(2 * xs.start, min(2 * xs.stop, up.width)))
            yield src, (ys, xs)


class PyramidTracker:
    """Which pyramid units may be built: one flag per chunk row of every level and plane (done, and
    for levels ≥ 1 handed out), so each unit is handed out once, only after all it is made from."""

    def __init__(self, pyramid: Pyramid, leads: list[tuple]):
        self.pyramid, self.leads = pyramid, list(leads)
        n = len(self.leads)
        self.done = [np.zeros((n, lv.rows), bool) for lv in pyramid.levels]
        self.issued = [np.zeros((n, lv.rows), bool) for lv in pyramid.levels]

    def unit(self, k: int, p: int, row: int) -> Unit:
        """The unit of level ``k``, plane index ``p`` and chunk row ``row``, with that plane's lead index."""
        return Unit(k, p, row, tuple(self.leads[p]))

    def restore_state(self, rows0, built_keys) -> None:
        """On resume: level-0 chunk rows (plane, row) already written, and the units with markers."""
        for p, row in rows0:
            self.done[0][p, row] = True
        for key in built_keys:
            if key.startswith("L"):
                k, p, row = map(int, key[1:].split("-"))
                if k < len(self.done):
                    self.done[k][p, row] = self.issued[k][p, row] = True

    def ready(self) -> list[Unit]:
        """Every unit not handed out whose rows below are all done (after `restore_state`)."""
        out = []
        for k in range(1, len(self.pyramid)):
            for row in range(self.pyramid.levels[k].rows):
                below = self.done[k - 1][:, self.pyramid.children(k, row)].all(axis=1)
                for p in np.flatnonzero(below & ~self.issued[k][:, row]):
                    self.issued[k][p, row] = True
                    out.append(self.unit(k, int(p), row))
        return out

    def mark(self, k: int, p: int, row: int) -> list[Unit]:
        """Chunk row ``row`` of level k, plane p, is on disk: the unit above it, if now ready."""
        self.done[k][p, row] = True
        if k + 1 >= len(self.pyramid):
            return []
        up = self.pyramid.parent(k, row)
        if self.issued[k + 1][p, up] or not self.done[k][p, self.pyramid.children(k + 1, up)].all():
            return []
        self.issued[k + 1][p, up] = True
        return [self.unit(k + 1, p, up)]

    def finish_all(self) -> None:
        """A complete output: everything done (its markers are gone)."""
        for d, i in zip(self.done, self.issued):
            d[:], i[:] = True, True

    @property
    def complete(self) -> bool:
        """Every unit built (level 0 is the executors' to check)."""
        return all(d.all() for d in self.done[1:])


def mean2x2(block: np.ndarray) -> np.ndarray:
    """Halve a 2-D block: each output pixel the mean of a 2×2 block (of the 1 or 2 pixels there are at
    an odd edge), computed in float64 and rounded (half to even) for integer data, in the block's dtype."""
    h, w = block.shape
    if block.dtype.kind in "iu" and block.dtype.itemsize <= 4 and h > 1 and w > 1:
        return _mean2x2_int(block)
    return _mean2x2_float(block)


def _mean2x2_int(block: np.ndarray) -> np.ndarray:
    """`mean2x2` of 8- to 32-bit integers in integer arithmetic (the pyramid's hot path), the same values:
    4-pixel sums exact in int32 (16-bit data) or int64, rounded half to even as float64's rint does."""
    h, w = block.shape
    he, we = h // 2 * 2, w // 2 * 2
    out = np.empty((-(-h // 2), -(-w // 2)), block.dtype)
    total = block[0:he:2, 0:we:2].astype(np.int32 if block.dtype.itemsize <= 2 else np.int64)
    total += block[1:he:2, 0:we:2]
    total += block[0:he:2, 1:we:2]
    total += block[1:he:2, 1:we:2]
    q = total >> 2  # floor(total / 4), also below 0; the remainder total & 3 is in 0..3
    r = total & 3
    q += (r > 2) | ((r == 2) & (q & 1 == 1))  # a quarter rounds down, three up, a half to the even one
    out[: he // 2, : we // 2] = q
    if w > we:
        out[:, -1:] = _mean2x2_float(block[:, -1:])
    if h > he:
        out[-1:, :] = _mean2x2_float(block[-1:, :])
    return out


def _mean2x2_float(block: np.ndarray) -> np.ndarray:
    h, w = block.shape
    total = np.zeros((-(-h // 2), -(-w // 2)))
    count = np.zeros_like(total)
    for dy in (0, 1):
        for dx in (0, 1):
            part = block[dy::2, dx::2]
            total[: part.shape[0], : part.shape[1]] += part
            count[: part.shape[0], : part.shape[1]] += 1
    mean = total / count
    if block.dtype.kind in "iu":
        return saturating_cast(np.rint(mean), block.dtype)  # int64/uint64 max stays max
    if block.dtype.kind == "b":
        mean = np.rint(mean)
    return mean.astype(block.dtype)
