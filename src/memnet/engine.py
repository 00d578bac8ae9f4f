"""`restore()`: prepare a job once, then run it with the executor the call asks for.

The pieces, each in its own module:

- `options.py`: `RestoreOptions`, every option with its one default;
- `runner.py`: devices, the model cache, `Runner` (batches through the model), the automatic batch;
- `kernel.py`: `Job`, `prepare`, the output (`open_output`), `run_group` (read → run → crop → write);
- executors, which never import each other: `local.py` (read-ahead and write-behind threads),
  `lazy.py` (a dask array), `distributed.py` (dask.distributed).

The names below are re-exported here for callers that import them from ``memnet.engine``.
"""

from __future__ import annotations

from .distributed import run_distributed
from .kernel import Job, Progress, describe_model, prepare, upscaled_geometry, zarr_target
from .lazy import restore_lazy
from .local import run_local
from .options import RestoreOptions, check_bool
from .runner import Runner
from .runtime import Cancelled, available_devices, gpu_possible, resolve_device
from .sinks import PlaneSink, recorded_job

__all__ = ["restore", "restore_lazy", "restore_plane", "describe_model", "Cancelled", "Job", "Progress",
           "RestoreOptions", "Runner",
           "available_devices", "gpu_possible", "resolve_device", "prepare", "upscaled_geometry"]


def restore(data, model="denoise", *, output=None, axes=None, series=None, level=0, pixel_size=None, units=None,
            translate=None, progress=None, cancel=None,
            overwrite=False, lazy=False, resume=False, client=None, workers=None, scheduler=None,
            options: RestoreOptions | None = None, **option_kw):
    """Restore an image or stack, tile by tile.

    Parameters
    ----------
    data : numpy / dask / zarr array, or a path to a TIFF, Zarr or OME-Zarr.
    model : a task name ("denoise", "sr", "jpeg", "microscopy"), a model name from
        ``memnet.list_models()``, a ``.safetensors`` path, or a ``memnet.MemNet`` module (taken as a
        natural-image model working on [0, 1]).
    output : None for an in-memory result, or a ``.zarr`` / ``.tif`` path written block by block
        (never the input; an existing output needs ``overwrite=True``).
    axes : axis letters (e.g. "TZYX"); default from the file's metadata, else the last two are YX.
        Every axis other than Y and X is iterated.
    series : which series of a multi-series TIFF (default: the first, with a warning naming the others).
    level : which resolution level of a multiscale OME-Zarr input (default 0, full resolution); the
        output has that level's size, pixel size and origin.
    pixel_size, units, translate : the input's calibration as {axis letter: value}, e.g.
        ``pixel_size={"Z": 0.5, "Y": 0.1, "X": 0.1}, units={"Z": "µm", "Y": "µm", "X": "µm"}``: an array's
        calibration, or, for a file, replacing what the file says for those axes. A ``.zarr`` / ``.tif``
        output carries it (``scale`` is the super-resolution factor, not the pixel size).
    progress : callable receiving a ``Progress`` after every batch.
    cancel : a ``threading.Event`` or a callable returning True to stop; raises ``Cancelled``.
    lazy : return a lazy dask array instead (see ``restore_lazy``).
    resume : continue an interrupted run into the same ``.zarr`` output: groups with a done-marker
        are skipped; the job (input, model, intensity mapping, and every option but device, batch_size
        and memory_budget) must match or it is refused.
    client / workers / scheduler : run on dask.distributed (an existing ``Client``, a LocalCluster
        of N worker processes, or a scheduler address); output must be a ``.zarr`` path.
    options : a ``RestoreOptions``; any of its fields may also be given as a keyword, replacing it:

        tile : output core size in pixels (chunk size of a Zarr output).
        halo : "exact" (receptive-field radius: equal to whole-image inference) or a number of pixels;
            below the radius, overlapping tiles are blended with ``blend`` ("cosine" or "linear") ramps.
        scale : super-resolution factor (2, 3 or 4) for a super-resolution model.
        amp : mixed precision on CUDA, "auto" (on for CUDA), "on" or "off".
        ensemble : geometric self-ensemble: average the model over the 8 flips/rotations of every tile
            (8x slower; in exact mode still equal to whole-image inference; gains in docs/models.md).
        device : "auto", "cpu", "cuda", "cuda:N"; batch_size : tiles per forward pass, or "auto" (``memory_budget``).
        ome_zarr_version : a ``.zarr`` output's OME-Zarr version, "0.5" (Zarr v3) or "0.4" (Zarr v2).
        pyramid : a ``.zarr`` output's resolution pyramid: 2x2-mean levels, written while restoring,
            until one fits in pyramid × pyramid pixels (0: level 0 only).
        write_threads : threads compressing and writing the output's blocks, or "auto" (speed only).
        context : "auto": a task name runs its context model on a stack with enough planes along Z (else T);
            "off": plane by plane.
        The defaults are those of ``RestoreOptions``.

    Returns a numpy array, the opened zarr array (``.zarr`` output) or the path (``.tif`` output).
    """
    overwrite, resume, lazy = (check_bool(n, v) for n, v in (("overwrite", overwrite), ("resume", resume),
                                                               ("lazy", lazy)))
    opts = RestoreOptions.build(options, "restore", **option_kw)
    if zarr_target(output) is None:  # a TIFF or in-memory result has no pyramid and no OME-Zarr version
        asked = [k for k in ("pyramid", "ome_zarr_version") if k in option_kw
                 or (options is not None and getattr(options, k) != getattr(RestoreOptions, k))]
        if asked:
            what = " and ".join(f"{k} (--{k.replace('_', '-')})" for k in asked)
            raise ValueError(f"{what} {'apply' if len(asked) > 1 else 'applies'} to a .zarr output only, not to "
                             f"{'an in-memory result' if output is None else output}: drop it or write a .zarr output")
    if resume and opts.tile == "auto" and zarr_target(output) is not None:
        rec = recorded_job(output)  # resume the tiling the run started with (auto may differ on this device)
        if rec is not None and isinstance(rec[1].get("tile"), int):
            opts = RestoreOptions.build(opts, tile=rec[1]["tile"])
    if lazy:
        if output is not None:
            raise ValueError("lazy=True returns a dask array: write it with da.to_zarr, or drop output=")
        return restore_lazy(data, model, axes=axes, series=series, level=level, pixel_size=pixel_size, units=units,
                            translate=translate, options=opts)
    job = prepare(data, model, axes=axes, series=series, level=level, pixel_size=pixel_size, units=units,
                  translate=translate, options=opts)
    try:
        if client is not None or workers or scheduler:
            return run_distributed(job, output, client=client, workers=workers, scheduler=scheduler,
                                   progress=progress, cancel=cancel, resume=resume, overwrite=overwrite)
        return run_local(job, output, overwrite=overwrite, resume=resume, progress=progress, cancel=cancel)
    finally:
        if output is not None:
            job.source.close()


def restore_plane(data, model="denoise", lead: tuple = (), *, axes=None, series=None, level=0, progress=None,
                  cancel=None, options: RestoreOptions | None = None, **option_kw):
    """One plane of what `restore` gives for ``data``, as a (Y, X) array: the same pixels, for a preview.
    Only that plane is restored, but each channel's intensity mapping is the whole input's (a plane
    restored on its own would be mapped by its own percentiles and differ from the full result).

    ``lead``: the plane's index over the axes other than Y and X, in the input's order (`Source.leads`);
    the other arguments as for `restore`."""
    opts = RestoreOptions.build(options, "restore_plane", **option_kw)
    job = prepare(data, model, axes=axes, series=series, level=level, options=opts)
    try:
        lead = tuple(int(i) for i in lead)
        if lead not in set(job.leads):
            src = job.source
            raise ValueError(f"plane {lead} is not in the input: its planes are indexed over "
                             f"{src.lead_axes or 'no axes'} of sizes {src.lead_shape or '()'}")
        job.leads = [lead]
        h, w = job.out_shape[job.yi], job.out_shape[job.xi]
        return run_local(job, PlaneSink(job.source, (h, w), job.norm.out_dtype), progress=progress, cancel=cancel)
    finally:
        job.source.close()
