"""The job kernel: a prepared `Job` (input, model runner, intensity mapping, options, tiling plan),
its output, and `run_group`, the one read → run → crop → write loop of exact mode.

Every executor is built on this module: the local one (`local.py`, read-ahead and write-behind
threads), the lazy dask array (`lazy.py`) and dask.distributed (`distributed.py`). They do not
import each other; `engine.restore` picks one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np

from .arch import receptive_field
from .fingerprint import content_fingerprint
from .memory import default_tile, fit_tile
from .normalize import Intensity
from .options import RestoreOptions
from .ortgraph import onnxruntime_available
from .resample import bicubic_up_rows
from .runner import OrtRunner, Runner, auto_batch, load_cached, resolve_model
from .runtime import CPU, Cancelled, cpu_without_torch, resolve_device, stop_requested
from .sinks import job_signature, open_sink, output_format
from .sources import Source, open_input
from .tiling import Tile, TilePlan
from .zoo import TASKS, ModelInfo, find_context_model, find_model

__all__ = ["Job", "Progress", "ProgressTally", "choose_context", "context_swap", "describe_model", "open_output",
           "pick_device", "prepare", "runs_without_torch",
           "resolve_batch", "rows_per_group", "run_group", "upscaled_geometry", "zarr_target"]


@dataclass
class Progress:
    """What a restore reports after each step: tiles done of the total, seconds elapsed, output pixels written, and the
    tiles found done on resume."""

    done: int
    total: int
    elapsed: float
    pixels: int  # output pixels written so far
    skipped: int = 0  # tiles already done before this run (resume): not counted in the rate

    @property
    def fraction(self) -> float:
        """The part done, 0 to 1."""
        return self.done / self.total if self.total else 1.0

    @property
    def mpx_per_s(self) -> float:
        """Throughput in megapixels of output per second."""
        return self.pixels / self.elapsed / 1e6 if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at this run's rate (tiles skipped on resume not counted); None before the first step."""
        ran = self.done - self.skipped
        if ran <= 0:
            return None
        return self.elapsed * (self.total - self.done) / ran


class ProgressTally:
    """Counts the tiles of a run and reports a `Progress` after each step; the groups skipped on
    resume count as done but not in the rate."""

    def __init__(self, groups: list, todo: list, progress: Callable[[Progress], None] | None):
        self.total = sum(len(g[2]) for g in groups)
        self.done = self.skipped = self.total - sum(len(g[2]) for g in todo)
        self.pixels, self.t0, self.progress = 0, time.perf_counter(), progress

    def add(self, tiles: list[Tile]) -> None:
        """Count ``tiles`` as done and report the progress."""
        self.done += len(tiles)
        self.pixels += sum((t.core[0].stop - t.core[0].start) * (t.core[1].stop - t.core[1].start) for t in tiles)
        if self.progress is not None:
            self.progress(Progress(self.done, self.total, time.perf_counter() - self.t0, self.pixels, self.skipped))


def upscaled_geometry(scale: dict, translate: dict, factor: int) -> tuple[dict, dict]:
    """Pixel size and origin of a super-resolved output, per axis letter: YX pixel sizes divided by
    the factor, and the first pixel centre moved (1/s - 1)/2 input pixels (the upscaled grid starts
    before the input's first pixel centre). Identity for factor 1."""
    if factor == 1:
        return dict(scale), dict(translate)
    out_s = {a: v / factor if a in "YX" else v for a, v in scale.items()}
    out_t = dict(translate)
    for a in "YX":
        out_t[a] = out_t.get(a, 0.0) + scale.get(a, 1.0) * (0.5 / factor - 0.5)
    return out_s, out_t


@dataclass
class Job:
    """Everything a run needs, prepared once: shared by every executor. ``options`` are resolved
    (`RestoreOptions.resolved`): the tiling plan is made from them."""

    source: Source
    runner: Runner | OrtRunner
    norm: Intensity
    options: RestoreOptions
    info: ModelInfo | None = None
    plan: TilePlan = field(init=False)  # in output (upscaled) pixels
    leads: list[tuple] = field(init=False)
    yi: int = field(init=False)
    xi: int = field(init=False)
    _ring: _Ring | None = field(init=False, default=None, repr=False)  # stage 1's outputs kept for a Z-blend

    def __post_init__(self):
        o = self.options
        if o.halo == "exact":
            raise ValueError("a Job needs resolved options (RestoreOptions.resolved)")
        self.leads = self.source.leads()
        self.yi, self.xi = self.source.axes.index("Y"), self.source.axes.index("X")
        h, w = self.source.shape[self.yi] * o.scale, self.source.shape[self.xi] * o.scale
        self.plan = TilePlan(h, w, tile=o.tile, halo=o.halo, blend=o.blend)
        if self.zblend is not None:
            if o.scale != 1:
                raise ValueError("a context model with a Z-blend restores at scale 1 only")
            self._ring = _Ring(self._ring_capacity())

    @property
    def scale(self) -> int:
        """The super-resolution factor."""
        return self.options.scale

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The output's shape: the input's, with Y and X times the SR factor."""
        s = self.source.shape
        return tuple(n * self.scale if d in (self.yi, self.xi) else n for d, n in enumerate(s))

    @property
    def out_scale(self) -> dict:
        """The output's pixel size per axis letter (Y and X divided by the SR factor)."""
        return upscaled_geometry(self.source.scale, self.source.translate, self.scale)[0]

    @property
    def out_translate(self) -> dict:
        """The output's origin per axis letter (shifted for super-resolution, see `upscaled_geometry`)."""
        return upscaled_geometry(self.source.scale, self.source.translate, self.scale)[1]

    @property
    def context(self) -> int:
        """Planes on each side the model sees (0: a 2-D model)."""
        return self.runner.model.config.context

    @property
    def zblend(self):
        """A context model's second stage (`zblend.ZBlend`), or None."""
        return getattr(self.runner.model, "zblend", None)

    def _ring_capacity(self) -> int:
        """Stage-1 windows to keep so that, when the planes run in storage order, each plane's stage 1 runs once
        per pass: 2K+2 planes along the context axis, times the planes stored between two of them (e.g. the
        channels of a TZCYX stack), capped at 4 GiB (beyond it, windows are recomputed: slower, the same result)."""
        src, k = self.source, self.zblend.context
        d = src.lead_axes.index(src.context_axis)
        between = math.prod(src.lead_shape[d + 1:])
        wy, wx = self.plan.core_shape
        r = self.zblend.radius
        entry = 4 * ((wy + 2 * r) * (wx + 2 * r) if self.plan.blend is None else math.prod(self.plan.window_shape))
        return max(len(self.plan), min((2 * k + 2) * between * len(self.plan), (4 << 30) // entry))

    def read_window(self, lead: tuple, t: Tile) -> np.ndarray:
        """A tile's input window, normalised (and upscaled for super-resolution), float32 (Y, X); for a context
        model (planes, Y, X), the planes along Z (or T) around ``lead`` (`Source.context_leads`). Neighbouring
        planes' windows come from the source's chunk cache: each chunk is read once per pass, as the local
        executor runs the planes in order."""
        ys, xs = t.window
        if self.scale > 1:
            # Exact tiled bicubic: the rows of the whole-image upscaling matrix for this window,
            # applied to the input pixels they touch.
            h, w = self.source.shape[self.yi], self.source.shape[self.xi]
            my, y0, y1 = bicubic_up_rows(h, self.scale, ys.start, ys.stop)
            mx, x0, x1 = bicubic_up_rows(w, self.scale, xs.start, xs.stop)
            ys, xs = slice(y0, y1), slice(x0, x1)
        if self.zblend is not None:  # the newest stage-1 plane the tile needs; the others are kept (`predict`)
            m = self.source.context_leads(lead, self.zblend.context)[-1]
            return _Ahead(m, self._context_window(m, ys, xs))
        if self.context:  # a context model: the window of each plane it sees, (planes, Y, X)
            return self._context_window(lead, ys, xs)
        x = self._read(lead, ys, xs)
        if self.scale > 1:
            x = (my @ x.astype(np.float64) @ mx.T).astype(np.float32)
        return x

    def _context_window(self, lead: tuple, ys: slice, xs: slice) -> np.ndarray:
        """The window of each plane a context model sees for ``lead``, (planes, Y, X)."""
        return np.stack([self._read(p, ys, xs) for p in self.source.context_leads(lead, self.context)])

    def _read(self, lead: tuple, ys: slice, xs: slice) -> np.ndarray:
        """One plane's window, checked and normalised by its channel's mapping."""
        raw = self.source.read_plane(lead, ys, xs, copy=False)  # only read: forward makes the float32 copy
        if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
            bad = np.argwhere(~np.isfinite(raw))[0]
            raise ValueError(f"the input contains NaN or Inf (plane {lead}, near y={ys.start + bad[0]}, "
                             f"x={xs.start + bad[1]}): replace them (e.g. numpy.nan_to_num) before restoring")
        return self.norm.at(lead).forward(raw)

    def out_index(self, lead: tuple, ys: slice, xs: slice) -> tuple:
        """Where a block of plane ``lead`` at (``ys``, ``xs``) goes in the output (the input's axis order)."""
        return self.source.index(lead, ys, xs)

    def to_output(self, block: np.ndarray, lead: tuple = (), core: tuple | None = None) -> np.ndarray:
        """A model result (one tile's core) mapped back to the output's range and dtype. A NaN or Inf
        fails the run here, before it is written: nothing non-finite is ever marked complete."""
        if not np.isfinite(block).all():
            where = f"plane {tuple(lead)}, rows {core[0].start}:{core[0].stop}, columns {core[1].start}:" \
                    f"{core[1].stop}" if core is not None else "a tile"
            raise FloatingPointError(
                f"the model produced NaN or Inf in {where}: the weights may be broken (non-finite or diverged) "
                "or the input overflows the model (float input is taken as already in the model's range, e.g. "
                "[0, 1] for natural-image models: rescale it); nothing was marked complete")
        return self.source.to_storage(self.norm.at(lead).inverse(block))

    def run_tiles(self, lead: tuple, tiles: list[Tile], windows: list[np.ndarray]):
        """Exact mode: run one batch of windows and yield each tile's (output index, output block):
        the prediction cropped to the tile's core, mapped back to the output's range and dtype."""
        for t, pred in zip(tiles, self.predict(lead, tiles, windows)):
            crop = t.crop
            if self.zblend is not None:  # the prediction covers `_region`, not the whole window
                (ry, rx), (cy, cx) = self._region(t), t.crop
                crop = slice(cy.start - ry.start, cy.stop - ry.start), slice(cx.start - rx.start, cx.stop - rx.start)
            yield self.out_index(lead, *t.core), self.to_output(pred[crop], lead, t.core)

    def predict(self, lead: tuple, tiles: list[Tile], windows: list) -> list[np.ndarray] | np.ndarray:
        """The model's output for a batch of windows (`read_window`), float32: the whole window, or for a
        Z-blend the part of it `_region` names."""
        if self.zblend is not None:
            return self._blend(lead, tiles, windows)
        # one window (the CPU's batch): a view, not a copy
        return self.runner(windows[0][None] if len(windows) == 1 else np.stack(windows))

    def _region(self, t: Tile) -> tuple[slice, slice]:
        """Where in a window the Z-blend's output is needed: the core and the blend's radius around it (exact
        mode), the whole window (blended tiles, which use it all). Inside the window by the halo, which
        includes that radius, so stage 1 is exact there."""
        h, w = (s.stop - s.start for s in t.window)
        if self.plan.blend is not None:
            return slice(0, h), slice(0, w)
        r, (cy, cx) = self.zblend.radius, t.crop
        return slice(max(cy.start - r, 0), min(cy.stop + r, h)), slice(max(cx.start - r, 0), min(cx.stop + r, w))

    def _blend(self, lead: tuple, tiles: list[Tile], windows: list) -> list[np.ndarray]:
        """Stage 1 on the planes z-K..z+K of each tile that are not kept yet (in batches as large as this one),
        then the Z-blend of its outputs. The planes run in order keep each plane's stage 1 to one run per pass."""
        zb, ring = self.zblend, self._ring
        planes = self.source.context_leads(lead, zb.context)
        fresh: dict = {}
        todo: dict = {}
        for t, w in zip(tiles, windows):
            for m in planes:
                key = (m, t.iy, t.ix)
                if key in todo or key in fresh:
                    continue
                kept = ring.get(key)
                if kept is not None:  # held here: the ring may drop it before this batch is blended
                    fresh[key] = kept
                else:
                    todo[key] = (m, t, w.window if isinstance(w, _Ahead) and w.lead == m else None)
        items = list(todo.items())
        for i in range(0, len(items), max(1, len(tiles))):
            part = items[i: i + max(1, len(tiles))]
            xs = [w if w is not None else self._context_window(m, *t.window) for _, (m, t, w) in part]
            ring.count(len(part))
            for (key, (_, t, _)), out in zip(part, self.runner(np.stack(xs))):
                fresh[key] = out[self._region(t)].copy()  # not a view: the batch is freed
                ring.put(key, fresh[key])
        preds = []
        for t in tiles:
            keys = [(m, t.iy, t.ix) for m in planes]
            s = np.stack([fresh[k] for k in keys])
            ry, rx = self._region(t)
            (wy, wx) = t.window
            noisy = self._read(lead, slice(wy.start + ry.start, wy.start + ry.stop),
                               slice(wx.start + rx.start, wx.start + rx.stop))
            # torch runs the blend where it runs stage 1 (numpy on a GPU machine would be the bottleneck)
            preds.append(zb(s, noisy) if isinstance(self.runner, OrtRunner) else zb.on_device(s, noisy,
                                                                                              self.runner.device))
        return preds

    def groups(self, rows: int) -> list[tuple[str, tuple, list[Tile]]]:
        """Units of work and of resume: ``rows`` consecutive tile rows of one plane. Each group owns
        its output chunks; a done-marker is written once all of them are written."""
        ny, nx = self.plan.grid
        out = []
        for p, lead in enumerate(self.leads):
            for r0 in range(0, ny, rows):
                tiles = [self.plan.tile_at(iy, ix) for iy in range(r0, min(r0 + rows, ny)) for ix in range(nx)]
                out.append((f"{p}-{r0}", lead, tiles))
        return out

    def model_digest(self) -> str:
        """Identity of the weights (file content or tensors), so resume refuses a changed model."""
        if self.info is not None:
            return hashlib.sha256(self.info.path.read_bytes()).hexdigest()[:16]
        from .model import weights_digest

        return weights_digest(self.runner.model)[:16]

    def describe(self, rows_per_group: int | None = None, fingerprint: bool = True) -> dict:
        """The job record (stored in a Zarr output, compared by resume): the input (with a sample of its
        content, `content_fingerprint`, unless ``fingerprint`` is False), the model, the intensity mapping,
        the groups and every restore option."""
        return job_signature(
            input=str(self.source.path.resolve()) if self.source.path else None,
            shape=self.source.shape, dtype=str(self.source.dtype), axes=self.source.axes,
            **({"input_sha256": content_fingerprint(self.source)} if fingerprint else {}),
            model=str(self.info.path.name) if self.info else "module", model_sha256=self.model_digest(),
            rows_per_group=rows_per_group, norm=self.norm.as_dict(),
            **({"context_planes": 2 * self.context + 1, "context_axis": self.source.context_axis}
               if self.context else {}),
            **({"series": self.source.series} if self.source.series else {}),
            **({"level": self.source.level} if self.source.level else {}),
            **self.options.to_dict(),
            # the backend is speed-only, except int8: another function, never mixed into one output on resume
            arithmetic="int8" if self.options.backend == "onnxruntime-int8" else "float",
        )


def prepare(data, model="denoise", *, axes=None, series=None, level=0, pixel_size=None, units=None, translate=None,
            options: RestoreOptions | None = None, **option_kw) -> Job:
    """Open the input, load the model, fix the intensity policy and the tiling plan. The restore
    options are ``options`` with any `RestoreOptions` field given as a keyword replacing its value;
    ``pixel_size`` / ``units`` / ``translate`` calibrate the input (`io.open_input`)."""
    opts = RestoreOptions.build(options, "prepare", **option_kw)
    dev = pick_device(model, opts)
    net, policy, info = resolve_model(model, dev)
    if opts.scale > 1 and info is not None and info.task != "sr":
        raise ValueError(f"scale={opts.scale} needs a super-resolution model (task 'sr'); {info.name!r} is a "
                         f"{info.task!r} model: use model='sr'")
    if info is not None and info.task == "sr" and opts.scale == 1:
        raise ValueError(f"{info.name!r} is a super-resolution model: pass scale=2, 3 or 4 (--scale)")
    if net.config.in_channels != 1:
        raise ValueError(f"the tiled engine runs single-channel models (each channel separately); this model "
                         f"takes {net.config.in_channels} channels")
    # opened after the checks above, so a refused model leaves no file open; a swap keeps the task (no new check)
    src = open_input(data, axes=axes, series=series, level=level, pixel_size=pixel_size, units=units,
                     translate=translate)
    try:
        net, policy, info = choose_context(model, net, policy, info, src, opts.context, dev)
    except BaseException:
        src.close()  # a refused context model leaves no file open
        raise
    auto = opts.tile == "auto"
    opts = opts.resolved(job_receptive_field(net),
                         default_tile(net.config, dev, opts.memory_budget, src.plane_shape))
    norm = Intensity.for_source(src, policy)
    runner = Runner.for_options(net, dev, opts)
    # Memory up front: an explicit tile (and batch) that cannot fit is refused naming what fits; an
    # automatic one is made to fit.
    plane = (src.plane_shape[0] * opts.scale, src.plane_shape[1] * opts.scale)
    batch = None if opts.batch_size == "auto" else opts.batch_size
    tile = fit_tile(net.config, plane, opts.tile, opts.halo, batch=batch, backend=runner.backend, device=dev,
                    ensemble=opts.ensemble, auto=auto, min_tile=2 * opts.halo if opts.blend is not None else 16)
    if tile != opts.tile:
        opts = dataclasses.replace(opts, tile=tile)
    return Job(src, runner, norm, opts, info)


def job_receptive_field(net) -> int:
    """The halo an exact tiling needs for this model: its receptive field, plus a Z-blend's radius (the blend
    reads stage 1's output around each pixel)."""
    zb = getattr(net, "zblend", None)
    return receptive_field(net) + (zb.radius if zb is not None else 0)


def runs_without_torch(options: RestoreOptions) -> bool:
    """Whether these options run on ONNX Runtime on a CPU known without torch (`runtime.cpu_without_torch`: "cpu",
    or "auto" where no GPU is possible): then a model file runs as numpy arrays and torch is never imported."""
    return options.backend in ("auto", "onnxruntime", "onnxruntime-int8") and cpu_without_torch(options.device) \
        and onnxruntime_available()


def pick_device(model, options: RestoreOptions):
    """The device a job runs on: `runtime.CPU` (numpy weights on ONNX Runtime, no torch) for a model file or name
    when `runs_without_torch`; else the ``torch.device`` `runtime.resolve_device` picks."""
    if isinstance(model, (str, PathLike)) and runs_without_torch(options):
        return CPU
    return resolve_device(options.device)


def context_swap(model, config, name: str, src: Source, context: str) -> ModelInfo | None:
    """The context rule, in one place. With ``context="auto"``, a task name (``"microscopy"``) stands for the
    task's context model (`zoo.find_context_model`) when the stack has at least as many planes along Z (else
    T) as that model sees: that model's info is returned. Otherwise None (run the model as given). A context
    model given explicitly (``config.context`` > 0) needs a Z or T axis and ``context="auto"``."""
    if config.context:
        if context == "off":
            raise ValueError(f"{name} is a context model (it restores each plane from its neighbours): with "
                             "context='off' (--context off) choose a 2-D model, e.g. 'microscopy'")
        k = config.context
        if src.context_axis is None or src.context_length() <= k:
            raise ValueError(f"{name} restores a plane from {k} neighbours on each side along Z or T: the input "
                             f"(axes {src.axes!r}, shape {src.shape}) needs at least {k + 1} planes along Z or T; "
                             "use a 2-D model (e.g. 'microscopy') for it")
        return None
    if context == "off" or not isinstance(model, str) or model not in TASKS or src.context_axis is None:
        return None
    found = find_context_model(model)
    return found if found is not None and src.context_length() >= found.config.planes else None


def choose_context(model, net, policy, info, src: Source, context: str, device):
    """``(net, policy, info)`` of the model a run uses (`context_swap`)."""
    swap = context_swap(model, net.config, info.name if info else "this model", src, context)
    if swap is None:
        return net, policy, info
    net, cinfo = load_cached(swap.path, device)
    return net, cinfo.normalization, cinfo


def describe_model(data, model="denoise", *, axes=None, series=None, level=0, context: str = "auto") -> str:
    """What a restore of ``data`` with ``model`` would run, in words, without loading weights: e.g.
    "microscopy-context (5 planes along Z)" or "microscopy-M4R4C32 (2-D, plane by plane)"."""
    if "torch" in sys.modules and isinstance(model, sys.modules["torch"].nn.Module):  # a MemNet: torch is loaded
        cfg, name, blend = model.config, "the given module", model.zblend is not None
    else:
        info = find_model(model)
        cfg, name, blend = info.config, info.name, "zblend" in info.metadata
    src = open_input(data, axes=axes, series=series, level=level)
    try:
        swap = context_swap(model, cfg, name, src, context)
        if swap is not None:
            cfg, name, blend = swap.config, swap.name, "zblend" in swap.metadata
        if cfg.context:
            return f"{name} ({cfg.planes} planes along {src.context_axis}{' + Z-blend' if blend else ''})"
        return f"{name} (2-D, plane by plane)" if src.lead_axes else f"{name} (2-D)"
    finally:
        src.close()


def resolve_batch(job: Job) -> int:
    """The batch size of a run: as asked, or "auto" from the memory budget on the job's device."""
    o = job.options
    if o.batch_size != "auto":
        return o.batch_size
    return auto_batch(job.runner.model, job.plan.window_shape, job.runner.device, o.memory_budget,
                      backend=job.runner.backend, ensemble=o.ensemble)


def rows_per_group(job: Job, batch_size: int) -> int:
    """Enough tile rows per group to fill a batch."""
    return max(1, -(-batch_size // job.plan.grid[1]))


def zarr_target(output) -> Path | None:
    """``output`` as a Path when it names a Zarr store, else None."""
    if output is None or not isinstance(output, (str, PathLike)):  # in memory, or a ready `Sink`
        return None
    try:
        return Path(output) if output_format(output) == "zarr" else None
    except ValueError:  # not an output format at all
        return None


def open_output(job: Job, output, *, overwrite: bool = False, resume: bool = False, rows: int | None = None):
    """The sink for a job's output (`io.open_sink`), the groups already done (resume) and the tile rows
    per group (a resumed job keeps those it started with). Only a Zarr output can resume."""
    src = job.source
    signature = job.describe(rows, fingerprint=zarr_target(output) is not None)  # only a Zarr keeps its record
    resuming = resume and zarr_target(output) is not None and Path(output).exists()
    if resuming and job.plan.blend is not None:
        raise ValueError("resume works in exact mode only (blended tiles depend on their neighbours)")
    # On resume, options that change only the speed may differ; an option missing from an older
    # record had its default then (outputs from before the pyramid: OME-Zarr 0.4, one level).
    o = job.options
    sink = open_sink(output, job.out_shape, job.norm.out_dtype, job.plan.core_shape, src.axes,
                     scale=job.out_scale, units=src.units, translate=job.out_translate, job=signature, src=src,
                     overwrite=overwrite, resume=resume, ignore=("rows_per_group", *RestoreOptions.speed_only()),
                     defaults={**RestoreOptions().to_dict(), "ome_zarr_version": "0.4", "pyramid": 0, "context": "off",
                               "arithmetic": "float", "input_sha256": signature.get("input_sha256")},
                     ome_zarr_version=o.ome_zarr_version, pyramid=o.pyramid)
    if not resuming:
        return sink, set(), rows
    if "input_sha256" not in sink.job:  # an output started before content fingerprints: accepted, said
        warnings.warn(f"{output} was started by an older memnet that did not record the input's content: "
                      "resuming without checking that the input is unchanged", stacklevel=3)
    rows = sink.job.get("rows_per_group") or rows
    if sink.complete:  # finished before: nothing to redo (its markers were cleaned up)
        return sink, {g[0] for g in job.groups(rows or 1)}, rows
    done = sink.done_keys()
    sink.resume_rows([(p, t.iy) for p, (key, _, tiles) in _numbered(job, rows) if key in done for t in tiles])
    return sink, done, rows


def _numbered(job: Job, rows: int):
    """The groups with the number of their plane (its position in ``job.leads``)."""
    plane = {lead: p for p, lead in enumerate(job.leads)}
    return [(plane[g[1]], g) for g in job.groups(rows)]


def run_group(job: Job, group: tuple[str, tuple, list[Tile]], sink, *, batch_size: int,
              batches: Iterable[list[np.ndarray]] | None = None, cancel=None,
              on_batch: Callable[[list[Tile]], None] | None = None) -> None:
    """Exact mode: read, run, crop and write one group of tiles, batch by batch, then write the
    group's done-marker (after all its blocks, so a marked group is complete).

    ``sink`` has ``write(index, block)`` and, for a resumable output, ``mark_done(key)`` and
    ``rows_written(lead, rows)`` (the tile rows are on disk: the pyramid above them may be built).
    ``batches`` are the group's windows when read ahead elsewhere; by default they are read here.
    ``cancel`` is checked before each batch; ``on_batch(tiles)`` is called after each."""
    key, lead, tiles = group
    chunks = [tiles[i: i + batch_size] for i in range(0, len(tiles), batch_size)]
    if batches is None:
        batches = ([job.read_window(lead, t) for t in chunk] for chunk in chunks)
    for n, (chunk, windows) in enumerate(zip(chunks, batches), 1):
        if stop_requested(cancel):
            raise Cancelled("restore cancelled")
        for index, block in job.run_tiles(lead, chunk, windows):
            sink.write(index, block)
        if n == len(chunks):
            sink.mark_done(key)
            sink.rows_written(lead, sorted({t.iy for t in tiles}))
        if on_batch is not None:
            on_batch(chunk)


@dataclass
class _Ahead:
    """A Z-blend tile's read-ahead: the context window of the newest stage-1 plane it needs (``lead``)."""

    lead: tuple
    window: np.ndarray


class _Ring:
    """Stage 1's outputs of the last planes, per tile window, least recently used dropped first; thread-safe (the
    lazy and distributed executors may share a job between threads). A copy (pickled) starts empty."""

    def __init__(self, capacity: int):
        self.capacity, self._d, self._lock = capacity, OrderedDict(), threading.Lock()
        self.computed = 0  # stage-1 windows run into it (once per plane and tile in an ordered pass)

    def get(self, key):
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def count(self, n: int) -> None:
        """``n`` more stage-1 windows run (the report `computed`; threads may share the ring)."""
        with self._lock:
            self.computed += n

    def put(self, key, value) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)

    def __getstate__(self):
        return {"capacity": self.capacity}

    def __setstate__(self, state):
        self.__init__(state["capacity"])
