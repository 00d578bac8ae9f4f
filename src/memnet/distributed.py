"""The distributed executor: the same tiling plan run on dask.distributed.

What moves: the model's .safetensors bytes once per worker (scattered, broadcast), and per task a
small spec (input path, the restore options, the intensity mapping fixed on the client) and a group
of tile indices. Each task runs `run_group`, the kernel's loop: it reads its own windows (cores +
halos) from the input store, writes its output chunks straight into the output Zarr — each chunk
owned by exactly one group — then the group's done-marker. A task re-run after a worker died
rewrites the same chunks with the same values, so retries are safe.

The pyramid is the client's to schedule: it alone tracks which rows are done, and when a finished
group (or pyramid row) completes a coarser chunk row, it submits one task that builds that row from
the level above it, in the store, then writes its marker. So each coarser chunk also has one writer,
and is written only after everything it is made from.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

from .kernel import (
    Job,
    ProgressTally,
    open_output,
    resolve_batch,
    rows_per_group,
    run_group,
    runs_without_torch,
    zarr_target,
)
from .ngff import Unit
from .normalize import Intensity
from .options import RestoreOptions
from .runner import Runner, cached
from .runtime import CPU, Cancelled, resolve_device, stop_requested
from .sinks import ZarrSink
from .sources import open_input
from .zoo import load_model_bytes, load_weights_bytes, model_bytes

__all__ = ["run_distributed", "worker_report"]

_REPORT: dict = {}  # what this worker process ran: see worker_report()
_REPORT_LOCK = threading.Lock()
_RING: dict = {}  # the Z-blend ring of the run this process last worked on (`kernel.Job`)
_RING_LOCK = threading.Lock()


def worker_report() -> list[dict]:
    """What this (worker) process ran for distributed restores, one entry per job: the restore
    options it received, the device and precision its runner used, the batch size and the groups
    done. Ask a cluster with ``client.run(memnet.distributed.worker_report)``."""
    with _REPORT_LOCK:
        return [dict(r) for r in _REPORT.values()]


def _worker_job(spec: dict, weights: bytes) -> Job:
    """The job of a distributed run as a worker sees it (model, input and output cached per process)."""
    opts = RestoreOptions.from_dict(spec["options"])
    light = runs_without_torch(opts)  # numpy weights on ONNX Runtime: the worker never imports torch
    dev = CPU if light else resolve_device(opts.device)
    model = (lambda: load_weights_bytes(weights)) if light else (lambda: load_model_bytes(weights, dev))
    runner = cached(("runner", spec["digest"], str(dev), light, opts.amp, opts.ensemble, opts.backend),
                    lambda: Runner.for_options(model(), dev, opts))
    src = cached(("source", spec["input"], spec["axes"], spec["series"], spec["level"]),
                 lambda: open_input(spec["input"], axes=spec["axes"], series=spec["series"], level=spec["level"]))
    job = Job(src, runner, Intensity.from_spec(spec["norm"]), opts)
    if job._ring is not None:  # a Z-blend: this process's groups of the run share stage 1's kept planes
        with _RING_LOCK:
            if _RING.get("run") != spec["run"]:  # one run's ring per process: a new run drops the last one's
                _RING.update(run=spec["run"], ring=job._ring)
            job._ring = _RING["ring"]
    return job


def _group_task(spec: dict, weights: bytes, key: str, lead: tuple, tiles: list[tuple[int, int]]) -> str:
    """Run on a worker: restore one group of tiles and write it into the output Zarr."""
    job = _worker_job(spec, weights)
    sink = _worker_sink(spec)
    group = (key, tuple(lead), [job.plan.tile_at(iy, ix) for iy, ix in tiles])
    run_group(job, group, sink, batch_size=spec["batch"])
    with _REPORT_LOCK:
        r = _REPORT.setdefault(spec["run"], {
            "options": spec["options"], "batch": spec["batch"], "device": str(job.runner.device),
            "amp": job.runner.amp, "amp_dtype": str(job.runner.amp_dtype).replace("torch.", ""), "groups": 0})
        r["groups"] += 1
        if job._ring is not None:
            r["zblend_stage1_windows"] = job._ring.computed
    return key


def _worker_sink(spec: dict) -> ZarrSink:
    return cached(("output", spec["write_path"]),
                  lambda: ZarrSink.attach(spec["output"], spec["write_path"], spec["axes"]))


def _pyramid_task(spec: dict, unit: Unit) -> Unit:
    """Run on a worker: build one pyramid row from the level above it (all of it done)."""
    _worker_sink(spec).build(unit)
    return unit


def _spec(job: Job, sink: ZarrSink, weights: bytes, batch: int) -> dict:
    """What every task needs, JSON-safe; the options as `RestoreOptions.to_dict` writes them."""
    return {
        "input": str(job.source.path.resolve()), "axes": job.source.axes, "series": job.source.series,
        "level": job.source.level,
        # Where the chunks go (the staging copy of an overwrite) and the output they become.
        "output": str(Path(sink.path).resolve()), "write_path": str(Path(sink.write_path).resolve()),
        "digest": hashlib.sha256(weights).hexdigest()[:16], "batch": batch,
        "options": job.options.to_dict(), "run": f"{time.time_ns()}",
        "norm": job.norm.to_spec(),
    }


def _client(client, workers, scheduler):
    from distributed import Client, LocalCluster

    if client is not None:
        return client, None
    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def _check(job: Job, output, workers) -> None:
    if zarr_target(output) is None:
        raise ValueError("distributed runs write to a .zarr output (every worker writes its own chunks)")
    if job.source.path is None:
        raise ValueError("distributed runs read their input from a file (TIFF/Zarr) that every worker can open; "
                         "save the array first (memnet.save_image)")
    if job.plan.blend is not None:
        raise ValueError("distributed runs use exact tiling (halo='exact' or ≥ the receptive field)")
    if workers is not None and int(workers) < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")


def run_distributed(job: Job, output, *, client=None, workers=None, scheduler=None, progress=None, cancel=None,
                    resume=False, overwrite=False):
    """Run a prepared job on a dask cluster (an existing ``client``, a LocalCluster of ``workers``
    processes, or a ``scheduler`` address); returns the output Zarr array."""
    _check(job, output, workers)
    bs = resolve_batch(job)
    sink, done, rows = open_output(job, output, overwrite=overwrite, resume=resume, rows=rows_per_group(job, bs))
    weights = model_bytes(job.runner.model, job.info)
    spec = _spec(job, sink, weights, bs)
    groups = job.groups(rows)
    todo = [g for g in groups if g[0] not in done]
    tally = ProgressTally(groups, todo, progress)
    cluster = None
    try:
        cl, cluster = _client(client, workers, scheduler)
        _submit(cl, spec, weights, todo, tally, cancel, sink)
    except BaseException:
        sink.abort()  # not complete; the lock is released for --resume
        raise
    finally:
        if cluster is not None:
            cl.close()
            cluster.close()
    return sink.finish()


def _submit(cl, spec: dict, weights: bytes, todo: list, tally: ProgressTally, cancel, sink: ZarrSink) -> None:
    """One task per group, then one per pyramid row as the rows under it finish; progress as groups
    complete; cancel stops the rest."""
    from distributed import as_completed

    w = cl.scatter(weights, broadcast=True, hash=False)
    futures = {}

    def pyramid(units):
        for u in units:
            f = cl.submit(_pyramid_task, spec, u, pure=False, retries=3,
                          key=f"memnet-{u.key}-{spec['digest']}-{time.time_ns()}")
            futures[f] = u
            running.add(f)

    for key, lead, tiles in todo:
        f = cl.submit(_group_task, spec, w, key, tuple(int(i) for i in lead), [(t.iy, t.ix) for t in tiles],
                      pure=False, retries=3, key=f"memnet-{key}-{spec['digest']}-{time.time_ns()}")
        futures[f] = (lead, tiles)
    running = as_completed(list(futures))
    pyramid(sink.pending())  # rows an interrupted run left ready but unbuilt
    for f in running:
        f.result()
        done = futures.pop(f)
        if isinstance(done, Unit):
            pyramid(sink.ready_after(unit=done))
        else:
            tally.add(done[1])
            pyramid(sink.ready_after(done[0], sorted({t.iy for t in done[1]})))
        if stop_requested(cancel):
            cl.cancel(list(futures))
            raise Cancelled("restore cancelled")
