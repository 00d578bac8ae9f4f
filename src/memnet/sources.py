"""Inputs: `Source`, the one reader of pixels (planes, windows with their halo, Z/T neighbours, in any
axis order), opened lazily from TIFF, Zarr and OME-Zarr files or numpy, dask, zarr and torch arrays, with
axes and physical calibration. `FORMATS` is the table of input formats: a new format is its opener and its
row here (plus a test and the napari manifest's file pattern)."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np

from .normalize import sample_plan
from .tiling import mirror_index

__all__ = ["FORMATS", "ChunkCache", "InputFormat", "RawArray", "Source", "axes_from_labels", "full_index",
           "input_format", "is_zarr_path", "is_zarr_store", "ngff_unit", "normalize_axes", "open_input",
           "plane_indices", "short_unit"]


# One unit table: each spelling met in files and layers -> the NGFF (UDUNITS-2) name; and the NGFF
# name -> the symbol OME-TIFF and ImageJ use.
_UNIT_NAMES = {"µm": "micrometer", "um": "micrometer", "micron": "micrometer", "\\u00B5m": "micrometer",
               "nm": "nanometer", "mm": "millimeter", "s": "second", "ms": "millisecond", "min": "minute"}
_UNIT_SYMBOLS = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm", "second": "s", "millisecond": "ms",
                 "minute": "min"}


def ngff_unit(u: str) -> str:
    """A unit as OME-Zarr (and napari, through pint) names it: "µm" -> "micrometer"."""
    return _UNIT_NAMES.get(u, u)


def short_unit(u: str) -> str:
    """A unit as OME-TIFF and ImageJ write it: "micrometer", "micron" -> "µm"."""
    return _UNIT_SYMBOLS.get(ngff_unit(u), u)


class ChunkCache:
    """Decoded chunks of a chunked array (Zarr; a TIFF through tifffile's Zarr store, one chunk per page
    or strip), least recently used out first: the halo windows of neighbouring tiles, and neighbouring
    planes, decode each chunk once instead of once per window (a plane-sized TIFF chunk was decoded
    16 times for a 2048² plane in 512² tiles). Thread-safe: the read-ahead threads share it."""

    MAX_CHUNK = 64 * 2**20  # larger chunks are not cached (a contiguous TIFF's pages are read as RawArray)

    def __init__(self, array, budget: int = 256 * 2**20):
        import threading

        self.array, self.chunks, self.shape = array, tuple(int(c) for c in array.chunks), tuple(array.shape)
        self.budget, self.nbytes = budget, 0
        self.lock = threading.Lock()
        self.blocks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.inflight: dict[tuple, Future] = {}

    @classmethod
    def wrap(cls, array) -> ChunkCache | None:
        """A cache for ``array`` when it pays: chunks of ints (not numpy, not dask), each big enough that
        decoding it per window costs more than a lookup, and small enough to keep a few."""
        chunks = getattr(array, "chunks", None)
        if not isinstance(chunks, tuple) or not all(isinstance(c, (int, np.integer)) for c in chunks):
            return None
        nbytes = int(np.prod(chunks)) * np.dtype(array.dtype).itemsize
        return cls(array) if 256 * 2**10 <= nbytes <= cls.MAX_CHUNK else None

    def __getitem__(self, idx: tuple) -> np.ndarray:
        """``array[idx]`` for ints and slices (a step is allowed), from cached chunks."""
        return self.get(idx)

    def get(self, idx: tuple, copy: bool = True) -> np.ndarray:
        """``array[idx]``; with ``copy`` False, a window inside one chunk is a read-only view of it."""
        spans, picks = [], []
        for ix, c, n in zip(idx, self.chunks, self.shape):
            if isinstance(ix, slice):
                start, stop, step = ix.indices(n)
                if stop <= start:
                    return np.asarray(self.array[idx])  # empty: nothing to cache
                spans.append(range(start // c, (stop - 1) // c + 1))
                picks.append((start, stop, step))
            else:
                spans.append(range(int(ix) // c, int(ix) // c + 1))
                picks.append(int(ix))
        lo = [r.start * c for r, c in zip(spans, self.chunks)]
        local = tuple(slice(p[0] - a, p[1] - a, p[2]) if isinstance(p, tuple) else p - a for p, a in zip(picks, lo))
        if all(len(r) == 1 for r in spans):  # inside one chunk: a copy of the window, not of the chunk
            window = self._chunk(tuple(r.start for r in spans))[local]
            if copy:
                return window.copy()
            window.flags.writeable = False
            return window
        # The region the window spans (not the whole chunks it touches), filled from each chunk's part of it.
        a0 = [p[0] if isinstance(p, tuple) else p for p in picks]
        a1 = [p[1] if isinstance(p, tuple) else p + 1 for p in picks]
        region = np.empty([b - a for a, b in zip(a0, a1)], dtype=self.array.dtype)
        for key in product(*spans):
            block = self._chunk(key)
            lo_k = [k * c for k, c in zip(key, self.chunks)]
            src = tuple(slice(max(a, b) - b, min(e, b + m) - b) for a, e, b, m in zip(a0, a1, lo_k, block.shape))
            region[tuple(slice(s.start + b - a, s.stop + b - a) for s, a, b in zip(src, a0, lo_k))] = block[src]
        return region[tuple(slice(None, None, p[2]) if isinstance(p, tuple) else 0 for p in picks)]

    ROW_MAX = 16 * 2**20  # a miss decodes the chunks beside it along the last axis up to this many bytes

    def _chunk(self, key: tuple) -> np.ndarray:
        with self.lock:
            if key in self.blocks:
                self.blocks.move_to_end(key)
                return self.blocks[key]
            fut = self.inflight.get(key)
            if fut is None:  # claim it, and the chunks of its row not cached nor being decoded
                mine = self._claim_row(key)
        if fut is not None:
            return fut.result()  # another reader is decoding it
        first, last = min(k[-1] for k in mine), max(k[-1] for k in mine)
        c, n = self.chunks[-1], self.shape[-1]
        try:
            # One read for the whole run of chunks: one call into the array (a Zarr call per chunk costs
            # about as much as decoding it), each chunk a view of the run.
            at = tuple(slice(k * ch, min((k + 1) * ch, m)) for k, ch, m in zip(key[:-1], self.chunks, self.shape))
            run = np.asarray(self.array[at + (slice(first * c, min((last + 1) * c, n)),)])
        except BaseException as e:
            with self.lock:
                for k in mine:
                    self.inflight.pop(k).set_exception(e)
            raise
        blocks = {k: run[..., (k[-1] - first) * c: (k[-1] - first + 1) * c] for k in mine}
        with self.lock:
            for k, block in blocks.items():
                self.blocks[k] = block
                self.nbytes += block.nbytes
            while self.nbytes > self.budget and len(self.blocks) > 1:
                self.nbytes -= self.blocks.popitem(last=False)[1].nbytes
            futures = [self.inflight.pop(k) for k in mine]
        for k, f in zip(mine, futures):
            f.set_result(blocks[k])
        return blocks[key]

    def _claim_row(self, key: tuple) -> list[tuple]:
        """Under the lock: ``key`` and its row's free chunks (next to each other with it), marked in flight."""
        c, n = self.chunks[-1], self.shape[-1]
        row_chunks = -(-n // c)
        per_chunk = int(np.prod(self.chunks)) * np.dtype(self.array.dtype).itemsize
        width = max(1, min(row_chunks, self.ROW_MAX // max(per_chunk, 1)))
        start = key[-1] // width * width  # the row split into fixed runs: two readers never overlap
        mine = [k for k in (key[:-1] + (i,) for i in range(start, min(start + width, row_chunks)))
                if k == key or (k not in self.blocks and k not in self.inflight)]
        lo = hi = mine.index(key)  # only the run of free chunks that holds key: one contiguous read
        while lo > 0 and mine[lo - 1][-1] == mine[lo][-1] - 1:
            lo -= 1
        while hi + 1 < len(mine) and mine[hi + 1][-1] == mine[hi][-1] + 1:
            hi += 1
        mine = mine[lo: hi + 1]
        for k in mine:
            self.inflight[k] = Future()
        return mine


class RawArray:
    """An uncompressed TIFF series stored contiguously, read by byte ranges: a window reads its rows (in bands
    of at most 2 MB), not the page. For pages larger than the chunk cache takes, which tifffile's Zarr store
    decodes whole for every window (an 8192² uint16 plane: 128 MB per window read). Thread-safe; the file
    is reopened after pickling."""

    _BAND = 2 * 2**20  # bytes per read: what a read holds beside its window (per reader thread)

    def __init__(self, path: Path, offset: int, shape: tuple, dtype: np.dtype):
        self.path, self.offset, self.shape = Path(path), int(offset), tuple(int(n) for n in shape)
        self.file_dtype, self.dtype = np.dtype(dtype), np.dtype(dtype).newbyteorder("=")
        self.ndim = len(self.shape)
        self._fh, self._lock = None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fh": None, "_lock": None}

    def close(self) -> None:
        """Close the file (reopened by the next read)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _read(self, offset: int, out: np.ndarray) -> None:
        import threading

        if self._lock is None:
            self._lock = threading.Lock()
        with self._lock:
            if self._fh is None:
                self._fh = open(self.path, "rb")  # noqa: SIM115  (kept open: closed by close())
            self._fh.seek(offset)
            got = self._fh.readinto(memoryview(out).cast("B"))
        if got != out.nbytes:
            raise OSError(f"{self.path}: {out.nbytes - got} bytes missing at offset {offset} (a truncated file)")

    def __getitem__(self, idx) -> np.ndarray:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if idx.count(Ellipsis) == 1:  # `...` stands for the axes not named
            at = idx.index(Ellipsis)
            idx = idx[:at] + (slice(None),) * (self.ndim - len(idx) + 1) + idx[at + 1:]
        if len(idx) > self.ndim or not all(isinstance(i, (slice, int, np.integer)) for i in idx):
            raise IndexError(f"RawArray takes at most {self.ndim} ints or slices, got {idx!r}")
        idx = idx + (slice(None),) * (self.ndim - len(idx))
        picks = [range(*i.indices(n)) if isinstance(i, slice) else range(int(i) % n, int(i) % n + 1)
                 for i, n in zip(idx, self.shape)]
        out = np.empty([len(r) for r in picks], self.dtype)
        h, w = self.shape[-2:]
        row_bytes = w * self.file_dtype.itemsize
        rows = picks[-2]
        cols = idx[-1] if isinstance(idx[-1], slice) else slice(picks[-1].start, picks[-1].start + 1)
        per_read = max(1, self._BAND // row_bytes // abs(rows.step))  # rows picked per band read
        for at in product(*(range(len(r)) for r in picks[:-2])):
            plane = int(np.ravel_multi_index([r[i] for r, i in zip(picks[:-2], at)], self.shape[:-2])) \
                if self.ndim > 2 else 0
            for j in range(0, len(rows) if out.size else 0, per_read):
                sub = rows[j: j + per_read]
                lo = min(sub[0], sub[-1])
                band = np.empty((max(sub[0], sub[-1]) + 1 - lo, w), self.file_dtype)
                self._read(self.offset + (plane * h + lo) * row_bytes, band)
                # rows picked by a view (a fancy index would copy the whole band first)
                picked = band[::sub.step] if sub.step > 0 else band[::-1][::-sub.step]
                out[at][j: j + len(sub)] = picked[:, cols]
        drop = tuple(d for d, i in enumerate(idx) if not isinstance(i, slice))
        return out.squeeze(axis=drop) if drop else out


@dataclass
class Source:
    """An opened input: a lazily sliceable array plus what we know about its axes."""

    array: object  # numpy, zarr.Array or dask.array: anything with shape/dtype/__getitem__
    axes: str  # one upper-case letter per dimension, containing Y and X
    scale: dict[str, float] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    translate: dict[str, float] = field(default_factory=dict)
    path: Path | None = None
    series: int = 0  # which series of a multi-series TIFF (OME-TIFF with several images)
    n_series: int = 1
    level: int = 0  # which resolution level of a multiscale OME-Zarr
    n_levels: int = 1
    _closers: list = field(default_factory=list, repr=False)
    _cache: ChunkCache | None = field(default=None, init=False, repr=False)
    _cached_array: object = field(default=None, init=False, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape, in ``axes`` order."""
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        """The pixels' dtype."""
        return np.dtype(self.array.dtype)

    @property
    def lead_axes(self) -> str:
        """The axes other than Y and X, in the array's order: what enumerates the planes."""
        return "".join(a for a in self.axes if a not in "YX")

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """The sizes of the lead axes (`lead_axes`)."""
        return tuple(n for a, n in zip(self.axes, self.shape) if a not in "YX")

    @property
    def plane_shape(self) -> tuple[int, int]:
        """(height, width) of a plane."""
        return self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")]

    @property
    def context_axis(self) -> str | None:
        """The axis along which a plane's neighbours lie: Z, else T; None for a single plane."""
        return next((a for a in "ZT" if a in self.lead_axes), None)

    def leads(self) -> list[tuple]:
        """Every plane, as its index over `lead_axes`, in storage order: how every reader enumerates planes."""
        return plane_indices(self.shape, self.axes)

    @property
    def channel_at(self) -> tuple[int, ...]:
        """Where the channel axes (C, and RGB samples S) sit in a plane's lead index."""
        return tuple(d for d, a in enumerate(self.lead_axes) if a in "CS")

    def channel(self, lead: tuple) -> tuple:
        """The plane's indices along its channel axes: () without channels."""
        return tuple(lead[d] for d in self.channel_at)

    def neighbour(self, lead: tuple, step: int, axis: str | None = None) -> tuple | None:
        """The lead of the plane ``step`` planes away along ``axis`` (default `context_axis`), or None
        past the first or last plane."""
        axis = axis or self.context_axis
        if axis is None or axis not in self.lead_axes:
            return None
        d = self.lead_axes.index(axis)
        k = lead[d] + step
        return lead[:d] + (k,) + lead[d + 1:] if 0 <= k < self.lead_shape[d] else None

    def context_length(self) -> int:
        """Planes along `context_axis` (1 without one)."""
        axis = self.context_axis
        return self.lead_shape[self.lead_axes.index(axis)] if axis else 1

    def context_leads(self, lead: tuple, context: int) -> list[tuple]:
        """The 2 * ``context`` + 1 planes a context model sees for ``lead``, in order along `context_axis`,
        mirrored at the first and last planes without repeating them (plane -1 is plane 1): the boundary
        rule of every context model, in training and restore alike (`tiling.mirror_index`)."""
        axis = self.context_axis
        if axis is None:
            raise ValueError("a context model needs a stack with a Z or T axis")
        d, n = self.lead_axes.index(axis), self.context_length()
        if n <= context:
            raise ValueError(f"a context model seeing {context} planes on each side needs at least {context + 1} "
                             f"planes along {axis}, got {n}")
        return [lead[:d] + (mirror_index(lead[d] + s, n),) + lead[d + 1:] for s in range(-context, context + 1)]

    def index(self, lead: tuple, ys: slice = slice(None), xs: slice = slice(None)) -> tuple:
        """The full storage index of a window of one plane (also valid in an output with these axes)."""
        return full_index(lead, self.axes, ys, xs)

    @property
    def x_first(self) -> bool:
        """X is stored before Y: windows are transposed on the way in and out."""
        return self.axes.index("Y") > self.axes.index("X")

    def read_plane(self, lead: tuple = (), ys: slice = slice(None), xs: slice = slice(None), *,
                   copy: bool = True) -> np.ndarray:
        """A window of one plane, as a (Y, X) array whatever the array's axis order: the one place that
        reads pixels. ``lead``: one index per axis in ``lead_axes``; ``ys``/``xs`` may carry a step. With
        ``copy`` False the result may be a read-only view of a cached chunk (for a reader that only reads it)."""
        try:
            reader, index = self._reader(), self.index(tuple(int(i) for i in lead), ys, xs)
            p = np.asarray(reader.get(index, copy=False) if not copy and isinstance(reader, ChunkCache)
                           else reader[index])
        except Exception as e:
            where = self.path or "the input array"
            raise OSError(f"{where}: cannot read plane {tuple(lead)}, rows {ys.start}:{ys.stop}, columns "
                          f"{xs.start}:{xs.stop} ({type(e).__name__}: {e}); the file may be truncated or "
                          "corrupt") from e
        return p.T if self.x_first else p

    def __getstate__(self) -> dict:
        """Pickled (a lazy restore's graph sent to dask workers) without the chunk cache and its locks."""
        return {**self.__dict__, "_cache": None, "_cached_array": None}

    def _reader(self):
        """The array, through a chunk cache where one pays (made again if ``array`` was replaced)."""
        if self._cached_array is not self.array:
            self._cache, self._cached_array = ChunkCache.wrap(self.array), self.array
        return self._cache if self._cache is not None else self.array

    def to_storage(self, block: np.ndarray) -> np.ndarray:
        """A (Y, X) block in this input's storage order (the inverse of `read_plane`'s transpose)."""
        return block.T if self.x_first else block

    def sample(self, leads: list[tuple] | None = None, max_samples: int | None = None) -> list[np.ndarray]:
        """A regular sample of the pixels of ``leads`` (default: every plane) for intensity statistics:
        the same pixels whatever the axis order."""
        leads = self.leads() if leads is None else leads
        h, w = self.plane_shape
        picks, stride = sample_plan(len(leads), h * w, *(() if max_samples is None else (max_samples,)))
        every = slice(None, None, stride)
        return [self.read_plane(leads[k], every, every) for k in picks]

    def close(self) -> None:
        """Close the files the source opened (a source from a path); safe to call twice."""
        for c in self._closers:
            c()
        self._closers.clear()


def normalize_axes(axes: str, ndim: int) -> str:
    """Validate an axes string against the data's dimensions. Letters: T Z C Y X (plus S for
    samples/RGB, Q for anything else); YX must be present and each letter appears once."""
    if not isinstance(axes, str):
        raise TypeError(f"axes must be a string like 'TZYX', got {type(axes).__name__}")
    ax = axes.upper()
    if len(ax) != ndim:
        example = "TZYX" if ndim == 4 else "ZYX" if ndim == 3 else "YX" if ndim == 2 else "…YX"
        raise ValueError(f"expected axes like {example} for a {ndim}-D array, got {axes!r} ({len(ax)} letters)")
    bad = sorted(set(ax) - set("TZCYXSQ"))
    if bad:
        raise ValueError(f"unknown axis letter(s) {''.join(bad)!r} in {axes!r}: use T, Z, C, Y, X (S for RGB samples)")
    if len(set(ax)) != len(ax):
        raise ValueError(f"axes {axes!r} name an axis twice")
    if "Y" not in ax or "X" not in ax:
        raise ValueError(f"axes {axes!r} must contain Y and X (the spatial axes that are tiled)")
    return ax


def axes_from_labels(labels, ndim: int) -> str | None:
    """Axis letters from axis names (napari's axis_labels: "z", "y", "x", "time"...), the first letter
    of each; None unless they name T, C, Z, Y, X once each and include Y and X."""
    letters = "".join(str(a)[:1].upper() for a in labels or ())
    if not set(letters) <= set("TCZYX"):
        return None
    try:
        return normalize_axes(letters, ndim)
    except ValueError:
        return None


def _default_axes(ndim: int) -> str:
    if ndim < 2:
        raise ValueError(f"need at least a 2-D image (YX), got a {ndim}-D array")
    if ndim > 6:
        raise ValueError(f"{ndim}-D arrays are not supported (at most 6 dimensions, e.g. TCZYX plus one)")
    return "QTCZYX"[-ndim:] if ndim > 5 else "TCZYX"[-ndim:] if ndim != 3 else "ZYX"


def is_zarr_path(p: str | os.PathLike) -> bool:
    """A Zarr store, by its name or its content."""
    return FORMATS["zarr"].matches(Path(p))


def input_format(p: str | os.PathLike) -> str | None:
    """The name of the input format (`FORMATS`) that reads path ``p`` (by its name, or a folder's Zarr
    metadata), else None."""
    return next((name for name, fmt in FORMATS.items() if fmt.matches(Path(p))), None)


def open_input(data, axes: str | None = None, series: int | None = None, level: int = 0, *,
               pixel_size: dict | None = None, units: dict | None = None, translate: dict | None = None) -> Source:
    """Open ``data`` lazily: a path to a TIFF / Zarr / OME-Zarr, or a numpy / dask / zarr array.

    Axes come from the file's metadata (OME, ImageJ, OME-Zarr) when present, else from ``axes``,
    else a default (the last two dimensions are YX). An explicit ``axes`` must match the data.
    ``series``: of a multi-series TIFF; ``level``: of a multiscale OME-Zarr (0: full resolution), with
    that level's pixel size and origin.
    ``pixel_size`` / ``units`` / ``translate``: the calibration, as {axis letter: value} (e.g.
    ``{"Z": 0.5, "Y": 0.1, "X": 0.1}``, ``{"Y": "µm"}``); for an array they are its calibration, for a
    file they replace what the file says for the axes they name.
    """
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0:
        raise ValueError(f"level must be a whole number ≥ 0 (0: full resolution), got {level!r}")
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        fmt = input_format(path)
        if fmt is None:
            raise ValueError(f"cannot read {path.name!r}: expected a .tif/.tiff file or a .zarr directory")
        src = FORMATS[fmt].open(path, series, int(level))
        src.path = path
    else:
        if type(data).__module__.split(".")[0] == "torch" and hasattr(data, "detach"):
            data = _tensor_to_numpy(data)
        if not hasattr(data, "shape") or not hasattr(data, "dtype"):
            raise TypeError(f"expected a numpy/dask/zarr array or a path, got {type(data).__name__}")
        src = Source(array=data, axes="")
    if level and src.n_levels == 1:
        raise ValueError(f"--level {level} (level={level}): only a multiscale OME-Zarr input has resolution levels; "
                         "this input has one (level 0)")
    ndim = len(src.shape)
    if ndim < 2:
        raise ValueError(f"need at least a 2-D image (YX), got a {ndim}-D array of shape {src.shape}")
    if ndim > 6:
        raise ValueError(f"{ndim}-D arrays are not supported (at most 6 dimensions, e.g. TCZYX plus one): "
                         f"shape {src.shape}; reshape or split it first")
    if axes is None and not src.axes and ndim == 3 and src.shape[-1] in (3, 4) and min(src.shape[:2]) > 4:
        raise ValueError(f"ambiguous shape {src.shape}: it looks like an RGB(A) image (YXC); pass axes='YXC' "
                         f"to restore each colour channel, or axes='ZYX' if it is a stack of {src.shape[0]} images")
    if axes is not None:
        user = normalize_axes(axes, ndim)
        if src.axes and src.axes != user and src.path is not None:
            # Metadata said otherwise: trust the user (relabel), metadata can be wrong.
            src.scale = {user[i]: src.scale[a] for i, a in enumerate(src.axes) if a in src.scale}
            src.units = {user[i]: src.units[a] for i, a in enumerate(src.axes) if a in src.units}
        src.axes = user
    elif not src.axes:
        src.axes = _default_axes(ndim)
    else:
        src.axes = normalize_axes(src.axes, ndim)
    if 0 in src.shape:
        raise ValueError(f"the input is empty (shape {src.shape})")
    _calibrate(src, pixel_size, units, translate)
    return src


def _calibrate(src: Source, pixel_size: dict | None, units: dict | None, translate: dict | None) -> None:
    """Set the given calibration on ``src`` (over the file's), checking each axis letter and value."""
    for what, given, target in (("pixel_size", pixel_size, src.scale), ("units", units, src.units),
                                ("translate", translate, src.translate)):
        for key, v in (given or {}).items():
            a = str(key).upper()
            if a not in src.axes:
                raise ValueError(f"{what} names axis {key!r}, which the input does not have (axes {src.axes})")
            if what == "units":
                target[a] = str(v)
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{what}[{key!r}] must be a number, got {v!r}") from None
            if not np.isfinite(v) or (what == "pixel_size" and v <= 0):
                raise ValueError(f"{what}[{key!r}] must be a finite{' positive' if what == 'pixel_size' else ''} "
                                 f"number, got {v!r}")
            target[a] = v


def _tensor_to_numpy(t) -> np.ndarray:
    """A torch tensor as a numpy array on the CPU (a copy from a GPU; bfloat16, which numpy lacks, as
    float32): restoring reads it tile by tile like any other array."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _open_tiff(path: Path, index: int | None = None, level: int = 0) -> Source:
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:  # tifffile raises several types for damaged files
        raise ValueError(f"{path}: not a readable TIFF ({e})") from None
    if not tif.series or len(tif.pages) == 0:
        tif.close()
        raise ValueError(f"{path}: not a readable TIFF (no image found: the file is truncated or corrupt)")
    n = len(tif.series)
    asked, index = index is not None, 0 if index is None else index
    if not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        tif.close()
        raise ValueError(f"series {index!r} does not exist: {path} holds {n} series (0 to {n - 1})")
    if n > 1 and not asked:
        import warnings

        shapes = ", ".join(f"{i}: {tuple(s.shape)}" for i, s in enumerate(tif.series[:6]))
        warnings.warn(f"{path.name} holds {n} series ({shapes}); using series {index}: pick another with "
                      "--series N (series=N)", stacklevel=3)
    try:
        series = tif.series[index]
        axes = series.axes.upper()
        store = tif.aszarr(series=int(index), level=0)
        arr = zarr.open(store, mode="r")
    except Exception as e:
        tif.close()
        raise ValueError(f"{path}: cannot read the TIFF's image data ({e})") from None
    # tifffile letters: I (generic sequence) and others map to Q; S = RGB samples.
    axes = "".join(a if a in "TZCYXS" else "Q" for a in axes)
    if len(set(axes)) != len(axes):  # e.g. two unknown axes: fall back to generic letters
        axes = ""
    scale, units = _tiff_scale(tif, series, axes)
    closers = [store.close, tif.close]
    page_bytes = int(np.prod(arr.chunks)) * arr.dtype.itemsize
    contiguous = (series.dataoffset is not None and arr.ndim >= 2
                  and int(np.prod(arr.shape)) * arr.dtype.itemsize == series.nbytes)  # and uncompressed
    # tifffile's store can give tiny pages (1-pixel rows) chunks that do not fit the array, e.g. (1, 1, 1, 2) for
    # a (1, 2, 1, 1) TZYX series, and then fails on every read: such series are read without the store.
    broken = any(c > n for c, n in zip(arr.chunks, arr.shape, strict=True))
    if contiguous and (broken or page_bytes > ChunkCache.MAX_CHUNK):
        arr = RawArray(path, series.dataoffset, arr.shape, np.dtype(series.dtype).newbyteorder(tif.byteorder))
        closers.insert(0, arr.close)
    elif broken:  # compressed or scattered pages of a few pixels each: small enough to hold in memory
        try:
            arr = series.asarray()
        except Exception as e:
            store.close()
            tif.close()
            raise ValueError(f"{path}: cannot read the TIFF's image data ({e})") from None
    return Source(array=arr, axes=axes, scale=scale, units=units, series=int(index), n_series=n,
                  _closers=closers)


def _tiff_scale(tif, series, axes: str) -> tuple[dict, dict]:
    scale: dict[str, float] = {}
    units: dict[str, str] = {}
    try:
        if tif.is_ome:
            import xml.etree.ElementTree as ET

            root = ET.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            for a in "XYZ":
                v = pixels.get(f"PhysicalSize{a}")
                if v is not None:
                    scale[a] = float(v)
                    units[a] = pixels.get(f"PhysicalSize{a}Unit", "µm")
            if pixels.get("TimeIncrement"):
                scale["T"] = float(pixels.get("TimeIncrement"))
                units["T"] = pixels.get("TimeIncrementUnit", "s")
        else:
            page = series.pages[0] if series.pages else tif.pages[0]
            tags = page.tags
            if "XResolution" in tags:
                num, den = tags["XResolution"].value
                if num:
                    scale["X"] = den / num
            if "YResolution" in tags:
                num, den = tags["YResolution"].value
                if num:
                    scale["Y"] = den / num
            ij = tif.imagej_metadata or {}
            if "spacing" in ij:
                scale["Z"] = float(ij["spacing"])
            if "finterval" in ij:
                scale["T"] = float(ij["finterval"])
            unit = ij.get("unit")
            if unit:
                unit = short_unit(unit)
                for a in "XYZ":
                    if a in scale:
                        units[a] = unit
    except Exception:  # metadata is a bonus: never fail a read over it
        pass
    return {a: v for a, v in scale.items() if a in axes}, {a: v for a, v in units.items() if a in axes}


def _open_zarr(path: Path, series: int | None = None, level: int = 0) -> Source:
    if series:
        raise ValueError(f"series={series}: only TIFF files hold several series; {path.name!r} has one")
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:
        raise ValueError(f"{path}: not a readable Zarr store ({e})") from None
    if isinstance(node, zarr.Array):
        attrs = dict(node.attrs)
        axes = attrs.get("memnet_axes") or "".join(attrs.get("_ARRAY_DIMENSIONS", [])).upper()
        return Source(array=node, axes=axes if len(axes) == node.ndim else "")
    attrs = dict(node.attrs)
    ome = attrs.get("ome", attrs)  # OME-Zarr 0.5 nests under "ome"
    ms = ome.get("multiscales")
    if not ms:
        arrays = sorted(k for k, _ in node.arrays())
        raise ValueError(f"{path}: a Zarr group without OME multiscales metadata; open one of its arrays "
                         f"directly (e.g. {path / arrays[0]})" if arrays else f"{path}: an empty Zarr group")
    m0 = ms[0]
    n = len(m0["datasets"])
    if level >= n:
        has = f"levels 0..{n - 1}" if n > 1 else "one level (0)"
        raise ValueError(f"{path}: the input has {has}; got --level {level} (level={level})")
    ds0 = m0["datasets"][level]
    arr = node[ds0["path"]]
    axes, scale, units, translate = "", {}, {}, {}
    if "axes" in m0:
        names = [a["name"] if isinstance(a, dict) else a for a in m0["axes"]]
        axes = "".join(n[0].upper() if n.lower() in "tczyx" else "Q" for n in names)
        for a, ax in zip(axes, m0["axes"]):
            if isinstance(ax, dict) and ax.get("unit"):
                units[a] = ax["unit"]
    for tr in ds0.get("coordinateTransformations", []):
        if tr.get("type") == "scale":
            scale = dict(zip(axes, map(float, tr["scale"])))
        if tr.get("type") == "translation":
            translate = dict(zip(axes, map(float, tr["translation"])))
    return Source(array=arr, axes=axes, scale=scale, units=units, translate=translate, level=level, n_levels=n)


def plane_indices(shape: tuple, axes: str) -> list[tuple]:
    """Every index over the axes other than Y and X, in order: the planes, numbered by their position."""
    return [tuple(p) for p in product(*[range(n) for a, n in zip(axes, shape) if a not in "YX"])]


def full_index(lead: tuple, axes: str, ys: slice, xs: slice) -> tuple:
    """The indexing tuple, in ``axes`` order, of the window (``ys``, ``xs``) of the plane at ``lead``."""
    it = iter(lead)
    return tuple(ys if a == "Y" else xs if a == "X" else next(it) for a in axes)


@dataclass(frozen=True)
class InputFormat:
    """A readable file format: the names it is recognised by and its opener ``open(path, series, level)``,
    which returns a `Source` (axes and calibration from the file's metadata where it has them)."""

    suffixes: tuple[str, ...]
    open: Callable[[Path, int | None, int], Source]
    is_store: Callable[[Path], bool] = lambda p: False  # a folder recognised by its content, whatever its name

    def matches(self, path: Path) -> bool:
        """Whether ``path`` is of this format: by its suffix, or, for a store, by its content."""
        return str(path).rstrip("/\\").lower().endswith(self.suffixes) or self.is_store(path)


def is_zarr_store(p: Path) -> bool:
    """A folder holding Zarr metadata (v2 or v3), whatever its name."""
    return (p / ".zgroup").exists() or (p / ".zarray").exists() or (p / "zarr.json").exists()


# The input formats, in the order they are tried.
FORMATS: dict[str, InputFormat] = {
    "tiff": InputFormat((".tif", ".tiff", ".btf", ".tf8", ".tf2"), _open_tiff),
    "zarr": InputFormat((".zarr", ".ome.zarr"), _open_zarr, is_zarr_store),
}
