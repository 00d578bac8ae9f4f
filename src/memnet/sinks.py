"""Outputs: the `Sink` protocol and its three sinks (memory, OME-Zarr with its pyramid and resume markers,
tiled OME-TIFF), opened by `open_sink` from the output's name (`OUTPUT_FORMATS`), plus `save_image`. Each
sink receives whole output blocks (one plane index, one YX core) exactly once."""

from __future__ import annotations

import errno
import json
import os
import threading
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
from .options import RestoreOptions, check_bool
from .outputs import OutputLock, check_output_path, read_markers, remove_tree, sidecar, write_marker
from .sources import Source, full_index, is_zarr_path, is_zarr_store, ngff_unit, open_input, plane_indices, short_unit

__all__ = ["OUTPUT_FORMATS", "MemorySink", "PlaneSink", "Sink", "TiffSink", "ZarrSink", "job_signature", "open_sink",
           "output_format", "recorded_job", "save_image"]

# The output formats: the names each is written with.
OUTPUT_FORMATS = {"zarr": (".zarr", ".ome.zarr"), "tiff": (".tif", ".tiff")}


def output_format(p: str | os.PathLike) -> str:
    """"zarr" or "tiff": the format an output path is written in (an existing Zarr store is Zarr
    whatever its name)."""
    if is_zarr_path(p):
        return "zarr"
    if Path(p).suffix.lower() in OUTPUT_FORMATS["tiff"]:
        return "tiff"
    raise ValueError(f"unsupported output {Path(p).name!r}: use a .zarr directory or a .tif file")


class Sink:
    """What every executor writes to: each output block once (``write``), then ``finish`` (returns the
    result) or ``abort`` (on failure or cancel). A resumable sink also records progress, and the executors
    call these for every sink (a plain one ignores them): ``mark_done(key)`` once a group's blocks are all
    written, ``rows_written(lead, rows)`` once tile rows are on disk (the pyramid above them may be built),
    ``pending()`` / ``build_ready(units)`` for pyramid rows left by an interrupted run. ``parallel_writes``:
    different blocks may be written from several threads at once; ``row_writes``: the blocks of a tile row
    may come joined, as one block (fewer, larger writes)."""

    parallel_writes = False
    row_writes = False

    def write(self, index: tuple, block: np.ndarray) -> None:
        """Write ``block`` at ``index`` (its place, in the input's axis order); each block is written once."""
        raise NotImplementedError

    def finish(self):
        """Complete the output and return the result (an array, a Zarr array, or the TIFF's path)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Give up: release what the sink holds; a file output is left marked incomplete or removed."""

    def mark_done(self, key: str) -> None:
        """The group ``key`` is on disk (resumable sinks keep a marker)."""

    def rows_written(self, lead: tuple, rows) -> None:
        """Tile rows ``rows`` of plane ``lead`` are on disk."""

    def pending(self) -> list:
        """Pyramid rows an interrupted run left ready but unbuilt."""
        return []

    def build_ready(self, units) -> None:
        """Build these pyramid rows (their sources are on disk)."""


class MemorySink(Sink):
    """The result as one numpy array in memory."""

    parallel_writes = True  # blocks are disjoint: threads may write them at once

    def __init__(self, shape, dtype):
        self.array = np.empty(shape, dtype=dtype)

    def write(self, index: tuple, block: np.ndarray) -> None:
        """Put ``block`` in the array."""
        self.array[index] = block

    def finish(self):
        """The array."""
        return self.array


class PlaneSink(Sink):
    """One plane of a result, as a (Y, X) array: the blocks of other planes are not expected (restore
    only the plane's groups), those of this plane are put back in (Y, X) order."""

    parallel_writes = True

    def __init__(self, src: Source, shape: tuple[int, int], dtype):
        self.src, self.array = src, np.empty(shape, dtype=dtype)
        self.yi, self.xi = src.axes.index("Y"), src.axes.index("X")

    def write(self, index: tuple, block: np.ndarray) -> None:
        """Put ``block`` in the plane."""
        self.array[index[self.yi], index[self.xi]] = self.src.to_storage(block)  # its own inverse

    def finish(self):
        """The (Y, X) array."""
        return self.array


def _check_output_path(out: Path, src: Source | None, overwrite: bool) -> None:
    check_output_path(out, [src.path] if src is not None else [])
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists: pass overwrite=True (--overwrite) or choose another path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise FileNotFoundError(f"the output's folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to {parent}: the folder is read-only")


def recorded_job(path) -> tuple[Path, dict] | None:
    """Where a restore output's chunks are (the output, or the staging copy of an interrupted
    overwrite) and its job record; None when it has none."""
    path = Path(path)
    staging = sidecar(path) / "staging.zarr"
    write_path = staging if is_zarr_store(staging) else path
    try:
        import zarr

        return write_path, dict(zarr.open_group(str(write_path), mode="r").attrs)["memnet"]["job"]
    except Exception:
        return None


class ZarrSink(Sink):
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

    parallel_writes = True  # each chunk has one writer: threads may write different chunks at once
    row_writes = True  # a whole chunk row per write: one call, its chunks encoded together

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
        # The same arrays without zarr's check for chunks equal to the fill value (a compare of every chunk,
        # about 15 % of writing it): used for blocks whose chunks all hold a non-zero pixel (`_write`).
        self._dense = [a.with_config({"write_empty_chunks": True}) if a.fill_value == 0 else a for a in self.levels]
        base = self.array.shape
        src_shape = tuple(base[self.perm.index(d)] for d in range(len(base)))
        self.tracker = PyramidTracker(self.pyramid, plane_indices(src_shape, self.axes)) if tracked else None
        self._plane = {lead: p for p, lead in enumerate(self.tracker.leads)} if tracked else {}
        # Whole chunk rows just written, (level, plane, row) -> block, kept until the row above is built from
        # them: the pyramid is built from memory instead of reading level 0 back (only where the rows are
        # built, i.e. in the process that tracks them).
        self._kept: dict[tuple, np.ndarray] | None = {} if tracked and len(self.pyramid) > 1 else None
        self._kept_lock = threading.Lock()
        yi, xi = self.axes.index("Y"), self.axes.index("X")
        self._yx, self._y_axis = (yi, xi), int(yi > xi)  # Y's axis in a 2-D block

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
        """The folder of the resume markers (groups and pyramid rows)."""
        return sidecar(self.path) / "done"

    @classmethod
    def reopen(cls, path: Path, job: dict, src: Source | None = None, ignore=(), overwrite: bool = False,
               defaults: dict | None = None) -> ZarrSink:
        """Open an existing output to resume it, after checking it belongs to the same job (an
        interrupted overwrite resumes into its staging copy). Keys in ``ignore`` are not compared;
        a key of ``defaults`` missing from the stored record (an older version's) stands for its default."""
        check_output_path(path, [src.path] if src is not None else [])
        try:
            lock = OutputLock(path).acquire()
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):  # not a read-only mount or folder
                raise
            lock = _read_only_lock(path, e)
        try:
            try:
                write_path, stored = recorded_job(path)
                self = cls._existing(path, write_path, stored["axes"], "r" if lock.read_only else "r+")
            except Exception:
                raise ValueError(f"cannot resume {path}: it is not an output of `memnet restore` "
                                 "(no job record); choose another output or pass --overwrite") from None
            then = {**(defaults or {}), **stored}
            diff = sorted(k for k in set(then) | set(job) if k not in ignore and then.get(k) != job.get(k))
            if "input_sha256" in diff and then.get("shape") == job.get("shape"):
                raise ValueError(f"cannot resume {path}: the input changed since the run started (same shape "
                                 f"and dtype, other pixels): restore again with --overwrite (without --resume)")
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
        elif lock.read_only:
            raise PermissionError(f"cannot resume {path}: {lock.why}; an unfinished output needs write access: "
                                  "copy it to a writable place and resume there")
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
        """Whether every block of every level was written (the store's ``memnet.complete`` flag)."""
        return bool(dict(self.root.attrs).get("memnet", {}).get("complete"))

    def done_keys(self) -> set[str]:
        """The done-markers' names: the groups and pyramid rows finished so far."""
        # Markers of earlier versions lived inside the store (.memnet_done): still honoured.
        return read_markers(self.done_dir, self.write_path / ".memnet_done")

    def mark_done(self, key: str) -> None:
        """A group's done-marker, written (atomically) after all of the group's chunks."""
        write_marker(self.done_dir, key)

    def write(self, index: tuple, block: np.ndarray) -> None:
        """Write ``block`` to level 0, in the store's (NGFF) axis order."""
        self._write(0, index, block)
        if self._kept is not None:
            self._keep(0, index, block)

    def _write(self, k: int, index: tuple, block: np.ndarray) -> None:
        """Write ``block`` to level ``k``. A chunk holding a non-zero pixel differs from the fill value (0)
        and zarr would store it: a block whose chunks all do is written without zarr's own check (one
        any() per chunk instead of a compare); one with an all-zero chunk goes through zarr, which leaves
        that chunk out as always. The same files either way."""
        lv, yi, xi = self.pyramid.levels[k], *self._yx
        ys, xs = index[yi], index[xi]
        ch = (lv.chunk_h, lv.chunk_w) if yi < xi else (lv.chunk_w, lv.chunk_h)
        dense = block.ndim == 2 and all(
            block[r: r + ch[0], c: c + ch[1]].any() for r in range(0, block.shape[0], ch[0])
            for c in range(0, block.shape[1], ch[1])) and (ys.start % lv.chunk_h, xs.start % lv.chunk_w) == (0, 0)
        (self._dense if dense else self.levels)[k][ngff_index(index, self.perm)] = block

    def _keep(self, k: int, index: tuple, block: np.ndarray) -> None:
        """Keep ``block`` for the level above if it is one whole chunk row of level ``k``."""
        yi, xi = self._yx
        ys, xs, lv = index[yi], index[xi], self.pyramid.levels[k]
        if (block.ndim == 2 and xs.start == 0 and xs.stop == lv.width and ys.start % lv.chunk_h == 0
                and ys.stop == min(ys.start + lv.chunk_h, lv.height)):
            lead = tuple(i for d, i in enumerate(index) if d not in self._yx)
            with self._kept_lock:
                self._kept[(k, self._plane[lead], ys.start // lv.chunk_h)] = block

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
        with self._kept_lock:  # writer threads may finish rows at once
            if unit is not None:
                return self.tracker.mark(unit.level, unit.plane, unit.row)
            return [u for r in rows for u in self.tracker.mark(0, self._plane[tuple(lead)], r)]

    def build(self, unit: Unit) -> None:
        """Write one pyramid row, then its done-marker: in one write from the rows below when this run
        wrote them all (kept in memory), else chunk by chunk read back from the level below (4 chunks
        read per chunk written). The same values either way: 2×2 means never straddle a chunk."""
        k = unit.level
        up, lo = self.pyramid.levels[k - 1], self.pyramid.levels[k]
        kids = range(*self.pyramid.children(k, unit.row).indices(up.rows))
        with self._kept_lock:
            kept = [self._kept.pop((k - 1, unit.plane, r), None) for r in kids] if self._kept is not None else [None]
        ys = slice(unit.row * lo.chunk_h, min((unit.row + 1) * lo.chunk_h, lo.height))
        # The rows below are exactly 2 * ys (whole chunk rows); of even heights but the last, each row's
        # means are its own (no 2x2 block straddles two rows).
        if all(b is not None for b in kept) and kids.start * up.chunk_h == 2 * ys.start \
                and all(b.shape[self._y_axis] % 2 == 0 for b in kept[:-1]):
            means = [mean2x2(b) for b in kept]
            row = np.concatenate(means, axis=self._y_axis) if len(means) > 1 else means[0]
            index = full_index(unit.lead, self.axes, ys, slice(0, lo.width))
            self._write(k, index, row)
            if k + 1 < len(self.pyramid):
                self._keep(k, index, row)
        else:
            self._build_read_back(unit)
        write_marker(self.done_dir, unit.key)

    def _build_read_back(self, unit: Unit) -> None:
        src = self.levels[unit.level - 1]
        for (ys0, xs0), (ys, xs) in self.pyramid.regions(unit.level, unit.row):
            block = np.asarray(src[self._at(unit.lead, ys0, xs0)])
            self._write(unit.level, full_index(unit.lead, self.axes, ys, xs), mean2x2(block))

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
        return ngff_index(full_index(lead, self.axes, ys, xs), self.perm)

    def finish(self):
        """Mark the store complete (after checking every pyramid row is built), swap an overwrite in, release the lock;
        returns level 0."""
        import zarr

        self._kept = None
        if self.lock is not None and self.lock.read_only:  # a complete output resumed: nothing to write
            return self.array
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
        """Wait for writes in flight and release the lock; the store stays marked incomplete, for --resume."""
        self._kept = None
        _settle_zarr()
        self.lock.release()  # "complete" stays false: a reader (and --resume) can tell


class _ReadOnly:
    """Stands for the lock of a complete output on a read-only mount: resuming it writes nothing."""

    read_only = True

    def __init__(self, why: str):
        self.why = why

    def release(self) -> None:
        pass


def _read_only_lock(path: Path, e: OSError) -> _ReadOnly:
    rec = recorded_job(path)
    why = f"its folder is read-only ({e.strerror or e})"
    if rec is None or rec[0] != path:  # not a restore output, or an interrupted overwrite's staging copy
        raise PermissionError(f"cannot resume {path}: {why}: copy it to a writable place and resume there") from None
    return _ReadOnly(why)


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


class TiffSink(Sink):
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
        """Queue ``block`` (one TIFF tile, padded at the edges) for the writer thread; raises the writer's error if it
        failed."""
        if self.error is not None:
            raise OSError(f"writing {self.tmp} failed: {self.error}") from self.error
        ty, tx = self.tile
        if block.shape[-2:] != (ty, tx):  # edge tiles are padded to the full TIFF tile
            pad = np.zeros(block.shape[:-2] + (ty, tx), dtype=block.dtype)
            pad[..., : block.shape[-2], : block.shape[-1]] = block
            block = pad
        self.q.put(np.ascontiguousarray(block.reshape(ty, tx)))

    def finish(self):
        """Wait for the writer, rename ``NAME.partial`` to the output and release the lock; returns the output path."""
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
        """Stop the writer, remove ``NAME.partial`` and release the lock (an overwritten output keeps its old file)."""
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
    done-markers (``mark_done``) and builds its pyramid as level-0 rows are reported (``rows_written``).
    A `Sink` given as ``path`` is used as it is (e.g. `PlaneSink`)."""
    if isinstance(path, Sink):
        if resume:
            raise ValueError("resume needs an on-disk .zarr output")
        return path
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

    overwrite = check_bool("overwrite", overwrite)
    tile = 256 if tile in (None, "auto") else tile  # no model here to size tiles from
    src = open_input(data, axes=axes)
    yi, xi = src.axes.index("Y"), src.axes.index("X")
    plan = TilePlan(src.shape[yi], src.shape[xi], tile=tile, halo=0)
    sink = open_sink(Path(path), src.shape, src.dtype, plan.core_shape, src.axes, scale=scale, units=units,
                     translate=translate, job={"saved_by": "memnet.save_image"}, overwrite=overwrite,
                     ome_zarr_version=ome_zarr_version, pyramid=pyramid)
    try:
        for lead in src.leads():
            for t in plan:
                sink.write(src.index(lead, *t.core), src.to_storage(src.read_plane(lead, *t.core)))
                if t.ix == plan.grid[1] - 1:
                    sink.rows_written(lead, [t.iy])
    except BaseException:
        sink.abort()
        raise
    return sink.finish()
