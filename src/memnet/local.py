"""The local executor: one process, one device. A thread pool reads windows ahead (across groups),
the main thread runs the model, a write-behind (`_Writer`) writes finished blocks, done-markers and pyramid rows."""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from itertools import islice

import numpy as np

from .kernel import Job, ProgressTally, open_output, resolve_batch, rows_per_group, run_group
from .runtime import Cancelled, stop_requested
from .tiling import Tile, TilePlan

__all__ = ["RowJoin", "run_local"]


def run_local(job: Job, output=None, *, overwrite: bool = False, resume: bool = False, progress=None,
              cancel=None, readers: int = 2):
    """Run a prepared job into ``output`` (None: in memory, a .zarr or a .tif path), group by group,
    skipping the groups already done on resume. Returns the result (``sink.finish()``)."""
    bs = resolve_batch(job)
    sink, done, rows = open_output(job, output, overwrite=overwrite, resume=resume, rows=rows_per_group(job, bs))
    groups = job.groups(rows)
    todo = [g for g in groups if g[0] not in done]
    tally = ProgressTally(groups, todo, progress)
    writer = _Writer(sink, writers=None if job.options.write_threads == "auto" else job.options.write_threads,
                     rows=RowJoin(job) if getattr(sink, "row_writes", False) else None)
    try:
        writer.build(sink.pending())  # pyramid rows an interrupted run left ready but unbuilt
        with closing(_read_ahead(job, todo, bs, readers)) as batches:
            if job.plan.blend is None:
                for group in todo:
                    n = -(-len(group[2]) // bs)
                    run_group(job, group, writer, batch_size=bs, batches=(w for _, _, w in islice(batches, n)),
                              cancel=cancel, on_batch=tally.add)
            else:
                _run_blended(job, batches, writer, cancel, tally)
        writer.close()
    except BaseException:
        try:
            writer.close()
        except BaseException:
            pass
        sink.abort()
        raise
    return sink.finish()


def _read_ahead(job: Job, groups, batch_size: int, readers: int):
    """Batches of windows that never span two groups (so a group's results do not depend on where a
    run was resumed), read ahead across groups by a thread pool. Yields (lead, tiles, windows)."""
    plan = [(lead, tiles[i: i + batch_size]) for _, lead, tiles in groups for i in range(0, len(tiles), batch_size)]
    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="memnet-read") as pool:
        pending: list = []
        it = iter(plan)

        def fill():
            for lead, chunk in islice(it, 3 - len(pending)):
                pending.append((lead, chunk, [pool.submit(job.read_window, lead, t) for t in chunk]))

        fill()
        while pending:
            lead, chunk, futures = pending.pop(0)
            fill()
            yield lead, chunk, [f.result() for f in futures]


def _run_blended(job: Job, batches, writer: _Writer, cancel, tally: ProgressTally) -> None:
    """Blended mode: every window's prediction, weighted by its ramps, accumulated in fp32 into the
    cores it overlaps; a core row is written once the next tile row has been added to it."""
    acc: dict = {}  # (lead, iy, ix) -> fp32 accumulator of a core
    ny, nx = job.plan.grid

    def flush(lead, iy):
        for ix in range(nx):
            t = job.plan.tile_at(iy, ix)
            writer.write(job.out_index(lead, *t.core), job.to_output(acc.pop((lead, iy, ix)), lead, t.core))
        writer.rows_written(lead, [iy])

    for lead, tiles, windows in batches:
        if stop_requested(cancel):
            raise Cancelled("restore cancelled")
        for t, pred in zip(tiles, job.predict(lead, tiles, windows)):
            _accumulate(job.plan, acc, lead, t, pred)
            # Core row iy-1 has received every contribution once row iy is done.
            if t.ix == nx - 1 and t.iy >= 1:
                flush(lead, t.iy - 1)
            if t.ix == nx - 1 and t.iy == ny - 1:
                flush(lead, t.iy)
        tally.add(tiles)


def _accumulate(plan: TilePlan, acc: dict, lead, t: Tile, pred: np.ndarray) -> None:
    sy, sx = plan.support(t)
    w = plan.weights(t)
    wy0, wx0 = t.window[0].start, t.window[1].start
    for jy, jx in plan.tiles_touching_core(t.iy, t.ix):
        c = plan.tile_at(jy, jx).core
        oy0, oy1 = max(sy.start, c[0].start), min(sy.stop, c[0].stop)
        ox0, ox1 = max(sx.start, c[1].start), min(sx.stop, c[1].stop)
        if oy0 >= oy1 or ox0 >= ox1:
            continue
        key = (lead, jy, jx)
        if key not in acc:
            acc[key] = np.zeros((c[0].stop - c[0].start, c[1].stop - c[1].start), np.float32)
        weight = w[oy0 - sy.start: oy1 - sy.start, ox0 - sx.start: ox1 - sx.start]
        pred_part = pred[oy0 - wy0: oy1 - wy0, ox0 - wx0: ox1 - wx0]
        acc[key][oy0 - c[0].start: oy1 - c[0].start, ox0 - c[1].start: ox1 - c[1].start] += pred_part * weight


_MARK, _ROWS, _BUILD = object(), object(), object()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a batch scheduler's
    cgroup), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


class RowJoin:
    """Joins the blocks of one tile row (one plane) into one block: a sink that takes them (``row_writes``:
    Zarr) writes a whole chunk row in one call, its codecs running over the row's chunks together, instead
    of paying a call per chunk. Holds the rows being filled (the blocks are copied in as they come)."""

    def __init__(self, job: Job):
        axes = job.source.axes
        self.yi, self.xi, self.width = axes.index("Y"), axes.index("X"), job.out_shape[axes.index("X")]
        self.x_axis = int(self.xi > self.yi)  # X's axis in a (2-D) block
        self.parts: dict[tuple, list] = {}

    def add(self, index: tuple, block: np.ndarray):
        """Copy ``block`` into its row; once the row is complete, the row's (index, block); else None."""
        xs = index[self.xi]
        key = tuple((i.start, i.stop) if isinstance(i, slice) else i for i in index[: self.xi] + (None,)
                    + index[self.xi + 1:])  # slices are not hashable before Python 3.12
        if key not in self.parts:
            shape = list(block.shape)
            shape[self.x_axis] = self.width
            self.parts[key] = [np.empty(shape, block.dtype), []]
        row, spans = self.parts[key]
        at = [slice(None)] * block.ndim
        at[self.x_axis] = xs
        row[tuple(at)] = block
        spans.append((xs.start, xs.stop))
        if sum(b - a for a, b in spans) < self.width:
            return None
        del self.parts[key]
        return self._index(key, 0, self.width), row

    def _index(self, key: tuple, x0: int, x1: int) -> tuple:
        return tuple(slice(x0, x1) if d == self.xi else slice(*k) if isinstance(k, tuple) else k
                     for d, k in enumerate(key))

    def flush(self):
        """The blocks of rows left incomplete, one by one (none in a run: a group is whole tile rows)."""
        left = []
        for key, (row, spans) in self.parts.items():
            for a, b in spans:
                at = [slice(None)] * row.ndim
                at[self.x_axis] = slice(a, b)
                left.append((self._index(key, a, b), row[tuple(at)]))
        self.parts.clear()
        return left


class _Writer:
    """Write-behind: one thread takes finished blocks, done-markers and the pyramid rows they complete,
    in order; the queue bound caps memory. Has the sink interface `run_group` writes to.
    A sink whose chunks are independent (``parallel_writes``: Zarr, memory) gets its blocks written by
    a pool of ``writers`` threads (compression releases the GIL; default: the usable cores, at most 4),
    and its markers and pyramid rows by one more thread, each only after every block queued before it
    is on disk (so neither this thread nor the pool waits for them). With ``rows`` (a `RowJoin`), the
    blocks of a tile row are written as one."""

    MAX_BYTES = 32 * 2**20

    def __init__(self, sink, maxsize: int = 32, writers: int | None = None, rows: RowJoin | None = None):
        self.sink, self.rows = sink, rows
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        writers = writers or min(4, usable_cores())
        self.pool = ThreadPoolExecutor(writers, thread_name_prefix="memnet-write") \
            if writers > 1 and getattr(sink, "parallel_writes", False) else None
        self.inflight: list = []
        self.limit = 2 * writers  # blocks being written at once: bounds memory like the queue
        self.marks: queue.Queue = queue.Queue()  # (futures to wait for, call, argument, its Future)
        self.mark_thread = None
        if self.pool is not None:
            self.mark_thread = threading.Thread(target=self._run_marks, name="memnet-mark", daemon=True)
            self.mark_thread.start()
        self.thread = threading.Thread(target=self._run, name="memnet-write", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if self.error is None:
                try:
                    self._do(item)
                except BaseException as e:
                    self.error = e
            if item is None:
                if self.pool is not None:
                    self.marks.put(None)
                    self.mark_thread.join()
                    self.pool.shutdown(wait=True)
                return

    def _run_marks(self):
        """Markers and pyramid rows, in order, each once the blocks queued before it are written; a failed
        write fails its marker (never written) and every later one."""
        while (job := self.marks.get()) is not None:
            before, call, arg, done = job
            try:
                for f in before:
                    f.result()
                call(arg)
                done.set_result(None)
            except BaseException as e:
                done.set_exception(e)

    def _do(self, item) -> None:
        if item is None or item[0] in (_MARK, _ROWS, _BUILD):
            for left in self.rows.flush() if self.rows is not None else ():
                self._write(*left)
        if item is None:
            self._drain()
            return
        if item[0] in (_MARK, _ROWS, _BUILD):
            call = {_MARK: self.sink.mark_done, _ROWS: lambda a: self.sink.rows_written(*a),
                    _BUILD: self.sink.build_ready}[item[0]]
            if self.pool is None:
                self._drain()
                call(item[1])
            else:
                # What a marker vouches for (a group's blocks, the rows a pyramid row is built from) is on disk
                # first: the marker thread waits for the blocks queued before it, in order, while this thread
                # goes on handing blocks to the pool (it used to wait here, and the model with it).
                self._prune()
                done = Future()
                self.marks.put(([f for f, _ in self.inflight], call, item[1], done))
                self.inflight.append((done, 0))
        elif self.rows is None:
            self._write(*item)
        else:
            row = self.rows.add(*item)
            if row is not None:
                self._write(*row)

    def _write(self, index, block) -> None:
        if self.pool is None:
            self.sink.write(index, block)
        else:
            self.inflight.append((self.pool.submit(self.sink.write, index, block), block.nbytes))
            # blocks (joined rows: up to a row of the widest plane each) being written at once, and their bytes
            self._prune()
            while sum(n > 0 for _, n in self.inflight) >= self.limit or (
                    len(self.inflight) > 1 and sum(n for _, n in self.inflight) > self.MAX_BYTES):
                self.inflight.pop(0)[0].result()

    def _prune(self) -> None:
        """Forget the tasks that are done (raising the first error among them)."""
        left = []
        for f, n in self.inflight:
            if f.done():
                f.result()
            else:
                left.append((f, n))
        self.inflight = left

    def _drain(self) -> None:
        done, self.inflight = self.inflight, []
        for f, _ in done:
            f.result()

    def mark_done(self, key: str) -> None:
        """Queued after the group's blocks: written only once they are all on disk."""
        self.write(_MARK, key)

    def rows_written(self, lead, rows) -> None:
        """Queued after the rows' blocks: the pyramid above them is built from what is on disk."""
        self.write(_ROWS, (lead, rows))

    def build(self, units) -> None:
        if units:
            self.write(_BUILD, units)

    def write(self, index, block):
        if self.error is not None:
            raise self.error
        self.q.put((index, block))

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
