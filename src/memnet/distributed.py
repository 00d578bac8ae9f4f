"""The same tiling plan run on dask.distributed.

What moves: the model's .safetensors bytes once per worker (scattered, broadcast), and per task a
small spec (input path, a group of tile indices, the intensity mapping fixed on the client). Each
task reads its own windows (cores + halos) from the input store, writes its output chunks straight
into the output Zarr — each chunk owned by exactly one group — then the group's done-marker. A task
re-run after a worker died rewrites the same chunks with the same values, so retries are safe.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np

from .engine import (
    Cancelled,
    Job,
    Progress,
    Runner,
    _is_cancelled,
    _make_sink,
    _zarr_target,
    resolve_batch,
    resolve_device,
    rows_per_group,
)
from .io import ngff_index, open_input
from .normalize import Normalizer
from .outputs import write_marker
from .tiling import TilePlan
from .zoo import load_model_bytes, model_bytes

__all__ = ["run_distributed"]

_CACHE: dict = {}
_LOCK = threading.Lock()


def _cached(key, make):
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = make()
        return _CACHE[key]


def _group_task(spec: dict, weights: bytes, key: str, lead: tuple, tiles: list[tuple[int, int]]) -> str:
    """Run on a worker: restore one group of tiles and write it into the output Zarr."""
    import zarr

    dev = resolve_device(spec["device"])
    ens = bool(spec.get("ensemble", False))
    runner = _cached(("model", spec["digest"], str(dev), ens),
                     lambda: Runner(load_model_bytes(weights, dev), dev, ensemble=ens))
    src = _cached(("source", spec["input"], spec["axes"], spec["series"]),
                  lambda: open_input(spec["input"], axes=spec["axes"], series=spec["series"]))
    out = _cached(("output", spec["output"]), lambda: zarr.open_group(spec["output"], mode="r+")["0"])
    perm = spec["perm"]
    norm = Normalizer(scale=spec["norm"]["scale"], offset=spec["norm"]["offset"],
                      out_dtype=np.dtype(spec["norm"]["dtype"]),
                      clip=tuple(spec["norm"]["clip"]) if spec["norm"]["clip"] else None)
    yi, xi = src.axes.index("Y"), src.axes.index("X")
    plan = TilePlan(*spec["plan"])
    job = Job(src, runner, norm, plan, None, spec["radius"], [], yi, xi, scale=spec["scale"])
    bs = spec["batch"]
    tl = [plan.tile_at(iy, ix) for iy, ix in tiles]
    for i in range(0, len(tl), bs):
        chunk = tl[i: i + bs]
        preds = runner(np.stack([job.read_window(tuple(lead), t) for t in chunk]))
        for t, pred in zip(chunk, preds):
            out[ngff_index(job.out_index(tuple(lead), *t.core), perm)] = job.to_output(pred[t.crop], tuple(lead),
                                                                                      t.core)
    write_marker(Path(spec["done_dir"]), key)
    return key


def _client(client, workers, scheduler):
    from distributed import Client, LocalCluster

    if client is not None:
        return client, None
    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def run_distributed(job: Job, output, *, client=None, workers=None, scheduler=None, batch_size="auto",
                    progress=None, cancel=None, resume=False, overwrite=False):
    """Run a prepared job on a dask cluster; returns the output Zarr array."""
    if _zarr_target(output) is None:
        raise ValueError("distributed runs write to a .zarr output (every worker writes its own chunks)")
    if job.source.path is None:
        raise ValueError("distributed runs read their input from a file (TIFF/Zarr) that every worker can open; "
                         "save the array first (memnet.save_image)")
    if job.plan.blend is not None:
        raise ValueError("distributed runs use exact tiling (halo='exact' or ≥ the receptive field)")
    if workers is not None and int(workers) < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    bs = resolve_batch(job, batch_size)
    rows = rows_per_group(job, bs)
    sink, done = _make_sink(job, output, overwrite, rows=rows, resume=resume)
    rows = sink.job.get("rows_per_group") or rows
    weights = model_bytes(job.runner.model, job.info)
    spec = {
        "input": str(job.source.path.resolve()), "axes": job.source.axes, "series": job.source.series,
        # Where the chunks go (the staging copy of an overwrite) and where the resume markers go.
        "output": str(Path(sink.write_path).resolve()), "done_dir": str(Path(sink.done_dir).resolve()),
        "perm": list(sink.perm),
        "digest": hashlib.sha256(weights).hexdigest()[:16], "device": job.device_request,
        "radius": job.radius, "scale": job.scale, "batch": bs, "ensemble": job.runner.ensemble,
        "plan": (job.plan.height, job.plan.width, job.plan.tile, job.plan.halo, None),
        "norm": {"scale": job.norm.scale, "offset": job.norm.offset, "dtype": str(job.norm.out_dtype),
                 "clip": list(job.norm.clip) if job.norm.clip else None},
    }
    groups = job.groups(rows)
    total = sum(len(g[2]) for g in groups)
    todo = [g for g in groups if g[0] not in done]
    n_done = skipped = total - sum(len(g[2]) for g in todo)
    from distributed import as_completed

    t0, pixels = time.perf_counter(), 0
    cluster = None
    try:
        cl, cluster = _client(client, workers, scheduler)
        w = cl.scatter(weights, broadcast=True, hash=False)
        futures = {}
        for key, lead, tiles in todo:
            f = cl.submit(_group_task, spec, w, key, tuple(int(i) for i in lead),
                          [(t.iy, t.ix) for t in tiles], pure=False, retries=3, key=f"memnet-{key}-{spec['digest']}"
                          f"-{time.time_ns()}")
            futures[f] = tiles
        for f in as_completed(list(futures)):
            f.result()
            tiles = futures[f]
            n_done += len(tiles)
            pixels += sum((t.core[0].stop - t.core[0].start) * (t.core[1].stop - t.core[1].start) for t in tiles)
            if progress is not None:
                progress(Progress(n_done, total, time.perf_counter() - t0, pixels, skipped))
            if _is_cancelled(cancel):
                cl.cancel(list(futures))
                raise Cancelled("restore cancelled")
    except BaseException:
        sink.abort()  # not complete; the lock is released for --resume
        raise
    finally:
        if cluster is not None:
            cl.close()
            cluster.close()
    return sink.finish()
