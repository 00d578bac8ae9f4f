"""Open inputs lazily (TIFF, Zarr, OME-Zarr, numpy, dask) with their axes and physical scale, and
create outputs (Zarr / OME-Zarr, tiled TIFF) without assembling anything in RAM."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .options import RestoreOptions
from .outputs import OutputLock, check_output_path, read_markers, remove_tree, sidecar, write_marker

__all__ = ["Source", "open_input", "save_image", "normalize_axes", "axes_from_labels", "open_sink", "ZarrSink",
           "TiffSink", "MemorySink", "FORMATS", "input_format", "output_format", "is_zarr_path", "ngff_unit",
           "short_unit"]

_AXIS_NAMES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}

# The formats, in one table: the suffixes each is written with, and those it is read from.
FORMATS = {
    "zarr": {"write": (".zarr", ".ome.zarr"), "read": (".zarr", ".ome.zarr")},
    "tiff": {"write": (".tif", ".tiff"), "read": (".tif", ".tiff", ".btf", ".tf8", ".tf2")},
}

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
    _closers: list = field(default_factory=list, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def lead_axes(self) -> str:
        """The axes other than Y and X, in the array's order: what enumerates the planes."""
        return "".join(a for a in self.axes if a not in "YX")

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return tuple(n for a, n in zip(self.axes, self.shape) if a not in "YX")

    @property
    def plane_shape(self) -> tuple[int, int]:
        return self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")]

    def read_plane(self, lead: tuple = (), ys: slice = slice(None), xs: slice = slice(None)) -> np.ndarray:
        """A window of one plane, as a (Y, X) array whatever the array's axis order. ``lead``: one index
        per axis in ``lead_axes``."""
        lead = iter(lead)
        idx = tuple(ys if a == "Y" else xs if a == "X" else int(next(lead)) for a in self.axes)
        p = np.asarray(self.array[idx])
        return p.T if self.axes.index("Y") > self.axes.index("X") else p

    def close(self) -> None:
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
    s = str(p).rstrip("/\\")
    return s.endswith(FORMATS["zarr"]["read"]) or (Path(s) / ".zgroup").exists() or \
        (Path(s) / ".zarray").exists() or (Path(s) / "zarr.json").exists()


def _is_tiff(p: Path) -> bool:
    return p.suffix.lower() in FORMATS["tiff"]["read"]


def input_format(p: str | os.PathLike) -> str | None:
    """"tiff" or "zarr" for a path we can read (by its name, or a folder's Zarr metadata), else None."""
    return "tiff" if _is_tiff(Path(p)) else "zarr" if is_zarr_path(p) else None


def output_format(p: str | os.PathLike) -> str:
    """"zarr" or "tiff": the format an output path is written in (an existing Zarr store is Zarr
    whatever its name)."""
    if is_zarr_path(p):
        return "zarr"
    if Path(p).suffix.lower() in FORMATS["tiff"]["write"]:
        return "tiff"
    raise ValueError(f"unsupported output {Path(p).name!r}: use a .zarr directory or a .tif file")


def open_input(data, axes: str | None = None, series: int | None = None) -> Source:
    """Open ``data`` lazily: a path to a TIFF / Zarr / OME-Zarr, or a numpy / dask / zarr array.

    Axes come from the file's metadata (OME, ImageJ, OME-Zarr) when present, else from ``axes``,
    else a default (the last two dimensions are YX). An explicit ``axes`` must match the data.
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        if _is_tiff(path):
            src = _open_tiff(path, series)
        elif series:
            raise ValueError(f"series={series}: only TIFF files hold several series; {path.name!r} has one")
        elif is_zarr_path(path):
            src = _open_zarr(path)
        else:
            raise ValueError(f"cannot read {path.name!r}: expected a .tif/.tiff file or a .zarr directory")
        src.path = path
    else:
        if not hasattr(data, "shape") or not hasattr(data, "dtype"):
            raise TypeError(f"expected a numpy/dask/zarr array or a path, got {type(data).__name__}")
        src = Source(array=data, axes="")
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
    return src


def _open_tiff(path: Path, index: int | None = None) -> Source:
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
    return Source(array=arr, axes=axes, scale=scale, units=units, series=int(index), n_series=n,
                  _closers=[store.close, tif.close])


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


def _open_zarr(path: Path) -> Source:
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
    ds0 = m0["datasets"][0]
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
    return Source(array=arr, axes=axes, scale=scale, units=units, translate=translate)


# ---------------------------------------------------------------------------------------------------
# Outputs. Each sink receives whole output blocks (one plane index, one YX core) exactly once.


class MemorySink:
    def __init__(self, shape, dtype):
        self.array = np.empty(shape, dtype=dtype)

    def write(self, index: tuple, block: np.ndarray) -> None:
        self.array[index] = block

    def finish(self):
        return self.array

    def abort(self) -> None:
        pass


def _check_output_path(out: Path, src: Source | None, overwrite: bool) -> None:
    check_output_path(out, [src.path] if src is not None else [])
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists: pass overwrite=True (--overwrite) or choose another path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise FileNotFoundError(f"the output's folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to {parent}: the folder is read-only")


_NGFF_RANK = {"time": 0, "channel": 1, "custom": 1, "space": 2}


def ngff_order(axes: str) -> list[int]:
    """The permutation that puts ``axes`` in the order NGFF requires (time, then channel, then space;
    each group in its own order), e.g. ImageJ's TZCYX -> TCZYX. Y and X keep their order, so a 2-D
    block written at a permuted index needs no transpose."""
    return sorted(range(len(axes)), key=lambda d: _NGFF_RANK[_AXIS_NAMES.get(axes[d].lower(), "custom")])


def ngff_index(index: tuple, perm: list[int]) -> tuple:
    """An index in the source's axis order, as an index into the NGFF-ordered output."""
    return tuple(index[d] for d in perm) if perm and len(perm) == len(index) else index


def _ome_axes(axes: str, units: dict) -> list[dict]:
    out = []
    for a in axes:
        d = {"name": a.lower(), "type": _AXIS_NAMES.get(a.lower(), "custom")}
        if a in units and d["type"] in ("space", "time"):
            d["unit"] = ngff_unit(units[a])
        out.append(d)
    return out


class ZarrSink:
    """OME-Zarr 0.4 (Zarr v2 format, the most widely readable) with one multiscale level.

    The store carries ``memnet: {"complete": false}`` until every block is written; only then is it
    set to true. Chunks are the tiling's core blocks, so each chunk has exactly one writer. The run
    holds the output's lock from start to finish; resume markers live in ``NAME.memnet/done``. An
    overwrite is written beside the old output (``NAME.memnet/staging.zarr``) and swapped in only
    when complete, so a failed or interrupted overwrite keeps the old output.
    """

    def __init__(self, path: Path, shape, dtype, chunks, axes: str, scale: dict, units: dict,
                 translate: dict, job: dict, overwrite: bool = False, src: Source | None = None):
        import zarr

        _check_output_path(path, src, overwrite)
        self.path, self.job = path, job
        self.perm = ngff_order(axes)  # stored in NGFF's axis order: time, channel, then space
        axes = "".join(axes[d] for d in self.perm)
        shape, chunks = tuple(shape[d] for d in self.perm), tuple(chunks[d] for d in self.perm)
        self.lock = OutputLock(path).acquire()
        created = None
        try:
            remove_tree(self._staging())  # a failed earlier overwrite
            remove_tree(self.done_dir)
            self.write_path = created = self._staging() if path.exists() else path
            self.root = zarr.open_group(str(self.write_path), mode="w", zarr_format=2)
            self.array = self.root.create_array(
                "0", shape=shape, dtype=dtype, chunks=chunks, fill_value=0,
                chunk_key_encoding={"name": "v2", "separator": "/"},
            )
            sc = [float(scale.get(a, 1.0)) for a in axes]
            transforms = [{"type": "scale", "scale": sc}]
            if any(translate.get(a) for a in axes):
                transforms.append({"type": "translation",
                                   "translation": [float(translate.get(a, 0.0)) for a in axes]})
            self.root.attrs.update({
                "multiscales": [{
                    "version": "0.4",
                    "name": path.stem,
                    "axes": _ome_axes(axes, units),
                    "datasets": [{"path": "0", "coordinateTransformations": transforms}],
                }],
                "memnet": {"complete": False, "job": job},
            })
        except BaseException:
            # Nothing is written yet (e.g. a disk full from the start): leave no half-made store behind.
            _settle_zarr()
            if created is not None:
                remove_tree(created)
            self.lock.release()
            raise

    def _staging(self) -> Path:
        return sidecar(self.path) / "staging.zarr"

    @property
    def done_dir(self) -> Path:
        return sidecar(self.path) / "done"

    @classmethod
    def reopen(cls, path: Path, job: dict, src: Source | None = None, ignore=(), overwrite: bool = False,
               defaults: dict | None = None) -> ZarrSink:
        """Open an existing output to resume it, after checking it belongs to the same job (an
        interrupted overwrite resumes into its staging copy). Keys in ``ignore`` are not compared;
        a key of ``defaults`` missing from the stored record (an older version's) stands for its default."""
        import zarr

        check_output_path(path, [src.path] if src is not None else [])
        self = cls.__new__(cls)
        self.path = path
        self.lock = OutputLock(path).acquire()
        try:
            staging = self._staging()
            self.write_path = staging if (staging / ".zgroup").exists() else path
            try:
                root = zarr.open_group(str(self.write_path), mode="r+")
                stored = dict(root.attrs)["memnet"]["job"]
                array = root["0"]
            except Exception:
                raise ValueError(f"cannot resume {path}: it is not an output of `memnet restore` "
                                 "(no job record); choose another output or pass --overwrite") from None
            then = {**(defaults or {}), **stored}
            diff = sorted(k for k in set(then) | set(job) if k not in ignore and then.get(k) != job.get(k))
            if diff:
                detail = "; ".join(f"{k}: {then.get(k)!r} then, {job.get(k)!r} now" for k in diff[:4])
                again = ("drop --resume to start over (with --overwrite)" if overwrite
                         else "start over with --overwrite (without --resume)")
                raise ValueError(f"cannot resume {path}: it was started with different parameters ({detail}); "
                                 f"rerun with the original parameters, or {again}")
        except BaseException:
            self.lock.release()
            raise
        self.root, self.array, self.job = root, array, stored
        self.perm = ngff_order(stored.get("axes") or "")
        return self

    @classmethod
    def attach(cls, path, write_path, perm) -> ZarrSink:
        """An output opened (locked, checked) by another process, e.g. the client of a distributed
        run, for a worker to write its chunks and done-markers into."""
        import zarr

        self = cls.__new__(cls)
        self.path, self.write_path, self.perm = Path(path), Path(write_path), list(perm)
        self.root = zarr.open_group(str(self.write_path), mode="r+")
        self.array, self.job, self.lock = self.root["0"], None, None
        return self

    @property
    def complete(self) -> bool:
        return bool(dict(self.root.attrs).get("memnet", {}).get("complete"))

    def done_keys(self) -> set[str]:
        # Markers of earlier versions lived inside the store (.memnet_done): still honoured.
        return read_markers(self.done_dir, self.write_path / ".memnet_done")

    def mark_done(self, key: str) -> None:
        """A group's done-marker, written (atomically) after all of the group's chunks."""
        write_marker(self.done_dir, key)

    def write(self, index: tuple, block: np.ndarray) -> None:
        self.array[ngff_index(index, self.perm)] = block

    def finish(self):
        import zarr

        attrs = dict(self.root.attrs)
        attrs["memnet"] = {**attrs["memnet"], "complete": True}
        self.root.attrs.update(attrs)
        if self.write_path != self.path:  # an overwrite: swap the complete result in, then drop the old one
            old = sidecar(self.path) / "old"
            remove_tree(old)
            os.replace(self.path, old)
            os.replace(self.write_path, self.path)
            remove_tree(old)
            self.write_path = self.path
            self.root = zarr.open_group(str(self.path), mode="r")
            self.array = self.root["0"]
        remove_tree(self.done_dir)
        remove_tree(self.path / ".memnet_done")
        self.lock.release()
        return self.array

    def abort(self) -> None:
        _settle_zarr()
        self.lock.release()  # "complete" stays false: a reader (and --resume) can tell


def _settle_zarr(timeout: float = 60.0) -> None:
    """Wait for zarr's writes still in flight. When one write of a batch fails (a full disk), zarr raises
    at once while the batch's other writes go on in its event-loop thread: a cleanup would race them, and a
    process exiting meanwhile prints asyncio's "exception was never retrieved" tracebacks."""
    import asyncio

    from zarr.core.sync import sync

    async def settle():
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=timeout)

    try:
        sync(settle())
    except Exception:  # best effort: never hide the error being reported
        pass


class TiffSink:
    """Tiled (Big)TIFF written tile by tile from a generator, in page/row-major order, by one
    background thread; written as ``NAME.partial`` and renamed when complete."""

    def __init__(self, path: Path, shape, dtype, tile: tuple[int, int], axes: str, scale: dict,
                 units: dict, overwrite: bool = False, src: Source | None = None):
        import queue
        import threading

        import tifffile

        _check_output_path(path, src, overwrite)
        self.path = path
        self.lock = OutputLock(path).acquire()  # also keeps two runs off the same NAME.partial
        self.tmp = path.with_name(path.name + ".partial")
        self.shape, self.dtype, self.tile = tuple(shape), np.dtype(dtype), tile
        self.axes = axes
        self.q: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        nbytes = int(np.prod(shape)) * self.dtype.itemsize
        yx = axes.index("Y"), axes.index("X")
        if yx != (len(axes) - 2, len(axes) - 1):
            self.lock.release()
            raise ValueError(f"TIFF output needs Y and X as the last axes, got {axes!r}: write to .zarr instead")
        kwargs = dict(
            shape=self.shape, dtype=self.dtype, tile=tile, bigtiff=nbytes > 2**31, compression="zlib",
            photometric="minisblack",
        )
        if set(axes) <= set("TCZYX"):
            # OME-TIFF carries axes and physical sizes in a form every reader (and ours) understands.
            meta = {"axes": axes}
            for a in "XYZ":
                if scale.get(a):
                    meta[f"PhysicalSize{a}"] = float(scale[a])
                    meta[f"PhysicalSize{a}Unit"] = short_unit(units.get(a, "µm"))
            if scale.get("T"):
                meta["TimeIncrement"] = float(scale["T"])
            kwargs.update(ome=True, metadata=meta)
        else:
            kwargs.update(metadata={"axes": axes})

        def run():
            try:
                tifffile.imwrite(self.tmp, data=self._tiles(), **kwargs)
            except BaseException as e:  # reported by finish()/write()
                self.error = e

        self.thread = threading.Thread(target=run, name="memnet-tiff-writer", daemon=True)
        self.thread.start()

    _DONE = object()

    def _tiles(self):
        while True:
            item = self.q.get()
            if item is self._DONE:
                return
            yield item

    def write(self, index: tuple, block: np.ndarray) -> None:
        if self.error is not None:
            raise OSError(f"writing {self.tmp} failed: {self.error}") from self.error
        ty, tx = self.tile
        if block.shape[-2:] != (ty, tx):  # edge tiles are padded to the full TIFF tile
            pad = np.zeros(block.shape[:-2] + (ty, tx), dtype=block.dtype)
            pad[..., : block.shape[-2], : block.shape[-1]] = block
            block = pad
        self.q.put(np.ascontiguousarray(block.reshape(ty, tx)))

    def finish(self):
        self.q.put(self._DONE)
        self.thread.join()
        try:
            if self.error is not None:
                self.tmp.unlink(missing_ok=True)
                raise OSError(f"writing {self.path} failed: {self.error}") from self.error
            os.replace(self.tmp, self.path)  # atomic: an overwritten TIFF is replaced only when complete
        finally:
            self.lock.release()
        return self.path

    def abort(self) -> None:
        # Unblock the writer with an exception so it stops, then remove the partial file.
        self.error = self.error or RuntimeError("cancelled")
        while True:
            try:
                self.q.get_nowait()
            except Exception:
                break
        self.q.put(self._DONE)
        self.thread.join(timeout=30)
        self.tmp.unlink(missing_ok=True)
        self.lock.release()


def job_signature(**kw) -> dict:
    """A JSON-safe description of a job (input, model, tiling) for resume checks."""
    return json.loads(json.dumps(kw, default=str))


def open_sink(path, shape, dtype, core: tuple[int, int], axes: str, *, scale: dict | None = None,
              units: dict | None = None, translate: dict | None = None, job: dict | None = None,
              src: Source | None = None, overwrite: bool = False, resume: bool = False, ignore=(),
              defaults: dict | None = None):
    """The sink of every output, by its format (`output_format`): ``path`` None -> in memory, a Zarr
    store (created, or reopened when ``resume`` and it exists: see `ZarrSink.reopen` for ``job``,
    ``ignore`` and ``defaults``), a tiled TIFF. ``core``: the (Y, X) block every write brings, which
    is a Zarr output's chunk; ``axes``, ``scale``, ``units``, ``translate``: the data's, per letter."""
    if path is None:
        if resume:
            raise ValueError("resume needs an on-disk .zarr output")
        return MemorySink(shape, dtype)
    path = Path(path)
    fmt = output_format(path)
    scale, units, translate = scale or {}, units or {}, translate or {}
    yi, xi = axes.index("Y"), axes.index("X")
    if fmt == "zarr":
        if resume and path.exists():
            return ZarrSink.reopen(path, job, src=src, ignore=ignore, overwrite=overwrite, defaults=defaults)
        chunks = tuple(core[0] if d == yi else core[1] if d == xi else 1 for d in range(len(shape)))
        return ZarrSink(path, shape, dtype, chunks, axes, scale, units, translate, job, overwrite=overwrite, src=src)
    if resume:
        raise ValueError(f"resume needs a .zarr output (a TIFF is written sequentially): got {path.name!r}")
    # TIFF tiles are multiples of 16: each axis's core is one, or spans the whole axis (one tile, padded),
    # so narrow images (100x1000, 1x20000) need nothing from the user.
    (ch, cw), (h, w) = core, (shape[yi], shape[xi])
    if (ch % 16 and ch != h) or (cw % 16 and cw != w):
        t = ch if ch % 16 and ch != h else cw
        raise ValueError(f"TIFF output needs a tile size that is a multiple of 16, got --tile {t}: use "
                         f"{max(16, t // 16 * 16)} or {-(-t // 16) * 16}, or write a .zarr output")
    return TiffSink(path, shape, dtype, (-(-ch // 16) * 16, -(-cw // 16) * 16), axes, scale, units,
                    overwrite=overwrite, src=src)


def save_image(data, path, *, axes: str | None = None, scale: dict | None = None, units: dict | None = None,
               translate: dict | None = None, tile: int | None = None, overwrite: bool = False):
    """Write an array (numpy or dask) to OME-Zarr (``.zarr``) or tiled OME-TIFF (``.tif``), one
    plane-tile at a time (a dask array is never computed whole), in chunks of ``tile`` pixels (default:
    the restore default). Marked complete only at the end."""
    from itertools import product

    from .tiling import TilePlan

    tile = RestoreOptions.tile if tile is None else tile
    src = open_input(data, axes=axes)
    yi, xi = src.axes.index("Y"), src.axes.index("X")
    plan = TilePlan(src.shape[yi], src.shape[xi], tile=tile, halo=0)
    sink = open_sink(Path(path), src.shape, src.dtype, plan.core_shape, src.axes, scale=scale, units=units,
                     translate=translate, job={"saved_by": "memnet.save_image"}, overwrite=overwrite)
    lead_dims = [range(n) for d, n in enumerate(src.shape) if d not in (yi, xi)]
    try:
        for lead in product(*lead_dims):
            for t in plan:
                it = iter(lead)
                idx = tuple(t.core[0] if d == yi else t.core[1] if d == xi else next(it)
                            for d in range(len(src.shape)))
                sink.write(idx, np.asarray(src.array[idx]))
    except BaseException:
        sink.abort()
        raise
    return sink.finish()
