"""Open inputs lazily (TIFF, Zarr, OME-Zarr, numpy, dask) with their axes and physical scale, and
create outputs (Zarr / OME-Zarr, tiled TIFF) without assembling anything in RAM."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np

from .ngff import (
    Level,
    Pyramid,
    PyramidTracker,
    Unit,
    mean2x2,
    multiscales_attrs,
    ngff_index,
    ngff_order,
    validate,
    zarr_format,
)
from .options import RestoreOptions
from .outputs import OutputLock, check_output_path, read_markers, remove_tree, sidecar, write_marker

__all__ = ["Source", "open_input", "save_image", "normalize_axes", "axes_from_labels", "open_sink", "ZarrSink",
           "TiffSink", "MemorySink", "FORMATS", "input_format", "output_format", "is_zarr_path", "ngff_unit",
           "short_unit", "recorded_job"]

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
    level: int = 0  # which resolution level of a multiscale OME-Zarr
    n_levels: int = 1
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
        if _is_tiff(path):
            src = _open_tiff(path, series)
        elif series:
            raise ValueError(f"series={series}: only TIFF files hold several series; {path.name!r} has one")
        elif is_zarr_path(path):
            src = _open_zarr(path, int(level))
        else:
            raise ValueError(f"cannot read {path.name!r}: expected a .tif/.tiff file or a .zarr directory")
        src.path = path
    else:
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


def _open_zarr(path: Path, level: int = 0) -> Source:
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


def plane_indices(shape: tuple, axes: str) -> list[tuple]:
    """Every index over the axes other than Y and X, in order: the planes, numbered by their position."""
    return [tuple(p) for p in product(*[range(n) for a, n in zip(axes, shape) if a not in "YX"])]


def _full_index(lead: tuple, axes: str, ys: slice, xs: slice) -> tuple:
    it = iter(lead)
    return tuple(ys if a == "Y" else xs if a == "X" else next(it) for a in axes)


def recorded_job(path) -> tuple[Path, dict] | None:
    """Where a restore output's chunks are (the output, or the staging copy of an interrupted
    overwrite) and its job record; None when it has none."""
    path = Path(path)
    staging = sidecar(path) / "staging.zarr"
    write_path = staging if _is_store(staging) else path
    try:
        import zarr

        return write_path, dict(zarr.open_group(str(write_path), mode="r").attrs)["memnet"]["job"]
    except Exception:
        return None


def _is_store(p: Path) -> bool:
    return (p / ".zgroup").exists() or (p / "zarr.json").exists()


class ZarrSink:
    """OME-Zarr, 0.5 (Zarr v3) by default or 0.4 (Zarr v2): level 0, then the resolution pyramid
    (`ngff.Pyramid`) built while level 0 is written. The metadata is built and checked with
    ome-zarr-models (`ngff.multiscales_attrs`, `ngff.validate`).

    The store carries ``memnet: {"complete": false}`` until every block of every level is written; only
    then is it set to true. Level 0's chunks are the tiling's core blocks, so each chunk has exactly one
    writer; a coarser chunk row is built by one owner once the rows it is made from are done
    (`rows_written` here, or a distributed run's client through `ready_after` and `build`). The run
    holds the output's lock from start to finish; resume markers (groups and pyramid rows) live in
    ``NAME.memnet/done``. An overwrite is written beside the old output (``NAME.memnet/staging.zarr``)
    and swapped in only when complete, so a failed or interrupted overwrite keeps the old output.
    """

    def __init__(self, path: Path, shape, dtype, chunks, axes: str, scale: dict, units: dict,
                 translate: dict, job: dict, overwrite: bool = False, src: Source | None = None,
                 version: str = RestoreOptions.ome_zarr_version, pyramid: int = RestoreOptions.pyramid):
        import zarr

        _check_output_path(path, src, overwrite)
        self.path, self.job = path, job
        self._layout(axes, Pyramid.plan(shape[axes.index("Y")], shape[axes.index("X")], chunks[axes.index("Y")],
                                        chunks[axes.index("X")], pyramid))
        st = self.stored_axes
        # Built (and checked by the library) before anything is on disk: axes NGFF cannot describe stop here.
        attrs = multiscales_attrs(version, path.stem, st, {a: ngff_unit(u) for a, u in units.items()}, scale,
                                  translate, len(self.pyramid))
        base_shape, base_chunks = tuple(shape[d] for d in self.perm), tuple(chunks[d] for d in self.perm)
        self.lock = OutputLock(path).acquire()
        created = None
        try:
            remove_tree(self._staging())  # a failed earlier overwrite
            remove_tree(self.done_dir)
            self.write_path = created = self._staging() if path.exists() else path
            self.root = zarr.open_group(str(self.write_path), mode="w", zarr_format=zarr_format(version))
            kw = ({"dimension_names": [a.lower() for a in st]} if version == "0.5"
                  else {"chunk_key_encoding": {"name": "v2", "separator": "/"}})
            for k, lv in enumerate(self.pyramid.levels):
                self.root.create_array(str(k), shape=self._level_shape(base_shape, lv.height, lv.width), dtype=dtype,
                                       chunks=self._level_shape(base_chunks, lv.chunk_h, lv.chunk_w), fill_value=0,
                                       **kw)
            self.root.attrs.update({**attrs, "memnet": {"complete": False, "job": job}})
            validate(self.root, version)
        except BaseException:
            # Nothing is written yet (e.g. a disk full from the start): leave no half-made store behind.
            _settle_zarr()
            if created is not None:
                remove_tree(created)
            self.lock.release()
            raise
        self._open_levels(tracked=True)

    def _layout(self, axes: str, pyramid: Pyramid) -> None:
        """The source's axis order, the NGFF order the arrays are stored in, the pyramid's geometry."""
        self.axes, self.perm, self.pyramid = axes, ngff_order(axes), pyramid
        self.stored_axes = "".join(axes[d] for d in self.perm)  # NGFF order: time, channel, then space

    def _level_shape(self, base: tuple, h: int, w: int) -> tuple:
        st = self.stored_axes
        return tuple(h if a == "Y" else w if a == "X" else n for a, n in zip(st, base))

    def _open_levels(self, tracked: bool) -> None:
        """The level arrays (level 0 is ``array``) and, for the process that owns the run, the tracker
        of which pyramid rows are done."""
        self.levels = [self.root[str(k)] for k in range(len(self.pyramid))]
        self.array = self.levels[0]
        base = self.array.shape
        src_shape = tuple(base[self.perm.index(d)] for d in range(len(base)))
        self.tracker = PyramidTracker(self.pyramid, plane_indices(src_shape, self.axes)) if tracked else None
        self._plane = {lead: p for p, lead in enumerate(self.tracker.leads)} if tracked else {}

    @classmethod
    def _existing(cls, path: Path, write_path: Path, axes: str, mode: str) -> ZarrSink:
        """An existing store's levels (from its multiscales metadata) and geometry."""
        import zarr

        self = cls.__new__(cls)
        self.path, self.write_path = Path(path), Path(write_path)
        self.root = zarr.open_group(str(self.write_path), mode=mode)
        attrs = dict(self.root.attrs)
        ms = attrs.get("ome", attrs)["multiscales"][0]
        paths = [d["path"] for d in ms["datasets"]]
        if paths != [str(k) for k in range(len(paths))]:
            raise ValueError(f"{path}: unexpected level paths {paths}")
        st = "".join(axes[d] for d in ngff_order(axes))
        yi, xi = st.index("Y"), st.index("X")
        arrays = [self.root[p] for p in paths]
        self._layout(axes, Pyramid([Level(a.shape[yi], a.shape[xi], a.chunks[yi], a.chunks[xi]) for a in arrays]))
        return self

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
        check_output_path(path, [src.path] if src is not None else [])
        lock = OutputLock(path).acquire()
        try:
            try:
                write_path, stored = recorded_job(path)
                self = cls._existing(path, write_path, stored["axes"], "r+")
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
            lock.release()
            raise
        self.lock, self.job = lock, stored
        self._open_levels(tracked=True)
        if self.complete:
            self.tracker.finish_all()
        return self

    @classmethod
    def attach(cls, path, write_path, axes: str) -> ZarrSink:
        """An output opened (locked, checked) by another process, e.g. the client of a distributed
        run, for a worker to write its chunks, pyramid rows and done-markers into."""
        self = cls._existing(path, write_path, axes, "r+")
        self.job, self.lock = None, None
        self._open_levels(tracked=False)
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

    # The pyramid -----------------------------------------------------------------------------------
    def resume_rows(self, rows) -> None:
        """On resume: the level-0 chunk rows, as (plane, row), that earlier runs finished."""
        self.tracker.restore_state(rows, self.done_keys())

    def pending(self) -> list[Unit]:
        """Pyramid rows ready to build and not yet handed out (after `resume_rows`: what was left)."""
        return self.tracker.ready() if self.tracker is not None else []

    def ready_after(self, lead: tuple | None = None, rows=(), unit: Unit | None = None) -> list[Unit]:
        """Record level-0 chunk ``rows`` of plane ``lead``, or a built ``unit``, as on disk; the
        pyramid rows that completes (each handed out once)."""
        if self.tracker is None:
            return []
        if unit is not None:
            return self.tracker.mark(unit.level, unit.plane, unit.row)
        return [u for r in rows for u in self.tracker.mark(0, self._plane[tuple(lead)], r)]

    def build(self, unit: Unit) -> None:
        """Write one pyramid row, chunk by chunk from the level above (4 chunks read per chunk written),
        then its done-marker."""
        src, dst = self.levels[unit.level - 1], self.levels[unit.level]
        for (ys0, xs0), (ys, xs) in self.pyramid.regions(unit.level, unit.row):
            block = np.asarray(src[self._at(unit.lead, ys0, xs0)])
            dst[self._at(unit.lead, ys, xs)] = mean2x2(block)
        write_marker(self.done_dir, unit.key)

    def build_ready(self, units) -> None:
        """Build ``units`` here, and every row they complete in turn."""
        todo = list(units)
        while todo:
            u = todo.pop()
            self.build(u)
            todo += self.ready_after(unit=u)

    def rows_written(self, lead: tuple, rows) -> None:
        """Level-0 chunk ``rows`` of plane ``lead`` are on disk: build the pyramid rows that completes."""
        self.build_ready(self.ready_after(lead, rows))

    def _at(self, lead: tuple, ys: slice, xs: slice) -> tuple:
        return ngff_index(_full_index(lead, self.axes, ys, xs), self.perm)

    def finish(self):
        import zarr

        if self.tracker is not None and not self.tracker.complete:
            self.abort()
            raise RuntimeError(f"{self.path}: not every pyramid level was written; left marked incomplete "
                               "(--resume completes it)")
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
            self.levels = [self.root[str(k)] for k in range(len(self.pyramid))]
            self.array = self.levels[0]
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
              defaults: dict | None = None, ome_zarr_version: str = RestoreOptions.ome_zarr_version,
              pyramid: int = RestoreOptions.pyramid):
    """The sink of every output, by its format (`output_format`): ``path`` None -> in memory, a Zarr
    store (created, or reopened when ``resume`` and it exists: see `ZarrSink.reopen` for ``job``,
    ``ignore`` and ``defaults``), a tiled TIFF. ``core``: the (Y, X) block every write brings, which
    is a Zarr output's chunk; ``axes``, ``scale``, ``units``, ``translate``: the data's, per letter;
    ``ome_zarr_version`` and ``pyramid``: a new Zarr output's (see `RestoreOptions`).

    Every sink has ``write(index, block)``, ``finish()`` and ``abort()``; a Zarr sink also takes
    done-markers (``mark_done``) and builds its pyramid as level-0 rows are reported (``rows_written``)."""
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
        return ZarrSink(path, shape, dtype, chunks, axes, scale, units, translate, job, overwrite=overwrite, src=src,
                        version=ome_zarr_version, pyramid=pyramid)
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
               translate: dict | None = None, tile: int | None = None, overwrite: bool = False,
               ome_zarr_version: str = RestoreOptions.ome_zarr_version, pyramid: int = RestoreOptions.pyramid):
    """Write an array (numpy or dask) to OME-Zarr (``.zarr``, version ``ome_zarr_version``, with a
    resolution pyramid down to ``pyramid`` px) or tiled OME-TIFF (``.tif``), one plane-tile at a time
    (a dask array is never computed whole), in chunks of ``tile`` pixels (default: the restore
    default). Marked complete only at the end."""
    from .tiling import TilePlan

    tile = 256 if tile in (None, "auto") else tile  # no model here to size tiles from
    src = open_input(data, axes=axes)
    yi, xi = src.axes.index("Y"), src.axes.index("X")
    plan = TilePlan(src.shape[yi], src.shape[xi], tile=tile, halo=0)
    sink = open_sink(Path(path), src.shape, src.dtype, plan.core_shape, src.axes, scale=scale, units=units,
                     translate=translate, job={"saved_by": "memnet.save_image"}, overwrite=overwrite,
                     ome_zarr_version=ome_zarr_version, pyramid=pyramid)
    try:
        for lead in plane_indices(src.shape, src.axes):
            for t in plan:
                idx = _full_index(lead, src.axes, *t.core)
                sink.write(idx, np.asarray(src.array[idx]))
                if t.ix == plan.grid[1] - 1 and hasattr(sink, "rows_written"):
                    sink.rows_written(lead, [t.iy])
    except BaseException:
        sink.abort()
        raise
    return sink.finish()
