"""The lazy executor: a dask array whose blocks are restored on demand, each from its own halo window
(exact mode), with the model loaded once per process. Same tiling plan as every other executor."""

from __future__ import annotations

import os
from itertools import product

import numpy as np

from .kernel import Job, prepare
from .options import RestoreOptions

__all__ = ["restore_lazy"]


def restore_lazy(data, model="denoise", *, axes=None, series=None, level=0, pixel_size=None, units=None,
                 translate=None, options: RestoreOptions | None = None, **option_kw):
    """A lazy dask array of the restored data: each output block (one plane, one YX core) is computed
    on demand from its own halo window, with the model loaded once per process. Same tiling plan as
    ``restore`` and the same options (`RestoreOptions` fields as keywords); exact mode only (blending
    needs the neighbours' windows)."""
    import dask.array as da

    opts = RestoreOptions.build(options, "restore_lazy", **option_kw)
    job = prepare(data, model, axes=axes, series=series, level=level, pixel_size=pixel_size, units=units,
                  translate=translate, options=opts)
    if job.plan.blend is not None:
        raise ValueError("lazy restore is exact-only: use halo='exact' (or a halo ≥ the receptive field)")
    ndim = len(job.out_shape)
    ch, cw = job.plan.core_shape
    chunks = []
    for d, n in enumerate(job.out_shape):
        step = ch if d == job.yi else cw if d == job.xi else 1
        chunks.append(tuple(min(step, n - i) for i in range(0, n, step)))
    name = f"memnet-restore-{os.urandom(6).hex()}"
    graph = {}
    for key in product(*[range(len(c)) for c in chunks]):
        lead = tuple(k for d, k in enumerate(key) if d not in (job.yi, job.xi))
        graph[(name, *key)] = (_lazy_block, job, lead, key[job.yi], key[job.xi], ndim)
    return da.Array(graph, name, chunks=tuple(chunks), dtype=job.norm.out_dtype)


def _lazy_block(job: Job, lead: tuple, iy: int, ix: int, ndim: int) -> np.ndarray:
    t = job.plan.tile_at(iy, ix)
    [(_, block)] = job.run_tiles(lead, [t], [job.read_window(lead, t)])  # 2-D, in storage order of Y and X
    shape = [1] * ndim
    a, b = sorted((job.yi, job.xi))
    shape[a], shape[b] = block.shape
    return block.reshape(shape)
