"""The tiled restore engine: stream windows from the input, run them through the model in batches,
write each output core once. Read-ahead threads and a write-behind thread overlap I/O with compute.

Everything (CLI, napari widget, lazy dask arrays, distributed runs) goes through `TilePlan` and
`Runner` here: one tiling plan, one way to run a batch.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import torch

from .degrade import bicubic_up_rows
from .io import MemorySink, Source, TiffSink, ZarrSink, is_zarr_path, job_signature, open_input
from .model import MemNet, receptive_field, self_ensemble
from .normalize import Normalizer
from .tiling import Tile, TilePlan
from .zoo import ModelInfo, load_model

__all__ = ["restore", "restore_lazy", "Cancelled", "Progress", "Runner", "resolve_device", "prepare",
           "upscaled_geometry"]


class Cancelled(Exception):
    """Raised when a run is cancelled; the output is left marked incomplete (or removed).
    Not a RuntimeError on purpose: Qt worker threads treat RuntimeError as a deleted worker."""


@dataclass
class Progress:
    done: int
    total: int
    elapsed: float
    pixels: int  # output pixels written so far
    skipped: int = 0  # tiles already done before this run (resume): not counted in the rate

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def mpx_per_s(self) -> float:
        return self.pixels / self.elapsed / 1e6 if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        ran = self.done - self.skipped
        if ran <= 0:
            return None
        return self.elapsed * (self.total - self.done) / ran


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N; "
                         f"available here: {', '.join(available_devices())}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda" and dev.index is not None and 0 < torch.cuda.device_count() <= dev.index:
        raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) found; "
                         f"available here: {', '.join(available_devices())}")
    if str(dev) not in available_devices() and dev.type not in {d.split(":")[0] for d in available_devices()}:
        raise ValueError(f"device {device!r} requested but {dev.type.upper()} is not available here; "
                         f"available: {', '.join(available_devices())} (e.g. --device cpu)")
    return dev


def available_devices() -> list[str]:
    """The devices this machine can run on, as --device accepts them."""
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        out.append("xpu")
    return out


_MODEL_CACHE: dict = {}
_MODEL_LOCK = threading.Lock()


def _load_cached(path: Path, device: torch.device) -> tuple[MemNet, ModelInfo]:
    """One copy of each model per process and device (lazy blocks and workers reuse it)."""
    key = (str(path.resolve()), path.stat().st_mtime_ns, str(device))
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = load_model(path, device=device)
        return _MODEL_CACHE[key]


def _resolve_model(model, device: torch.device) -> tuple[MemNet, dict, ModelInfo | None]:
    if isinstance(model, MemNet):
        return model.to(device).eval(), {"mode": "natural"}, None
    if isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a memnet.MemNet, a model name or a .safetensors path, got {type(model).__name__}"
        )
    from .zoo import _resolve

    info = _resolve(model)
    net, info = _load_cached(info.path, device)
    return net, info.normalization, info


class Runner:
    """Runs batches of normalised float32 windows (B, H, W) through a model on one device:
    inference_mode, channels_last, AMP (bf16, else fp16) on CUDA, halving the batch on OOM."""

    def __init__(self, model: MemNet, device: torch.device, amp: bool | str = "auto", channels_last: bool = True,
                 ensemble: bool = False):
        self.model = model.to(device).eval()
        self.device = device
        self.ensemble = bool(ensemble)  # 8 flips/rotations per window, averaged (self_ensemble)
        self.channels_last = channels_last  # 1.6x faster on CPU too (oneDNN), measured
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if amp == "auto":
            amp = device.type == "cuda"
        if amp and device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.amp_dtype = None
        self.max_batch: int | None = None  # lowered after an OOM

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.max_batch is not None and len(batch) > self.max_batch:
            return np.concatenate([self(batch[i: i + self.max_batch]) for i in range(0, len(batch), self.max_batch)])
        try:
            return self._run(batch)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise MemoryError("out of device memory with a single tile: use a smaller --tile") from None
            torch.cuda.empty_cache()
            self.max_batch = max(1, len(batch) // 2)
            return self(batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch[:, None]))
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.amp_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.amp_dtype):
                    y = self._forward(x)
            else:
                y = self._forward(x)
        return y.float()[:, 0].cpu().numpy()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self_ensemble(self.model, x) if self.ensemble else self.model(x)


def _auto_batch(model: MemNet, window: tuple[int, int], device: torch.device, budget: int | None) -> int:
    c = model.config
    # Live feature maps in a forward pass: long-term list (M+1) + short-term (R) + a few temporaries.
    per_window = (c.blocks + c.recursions + 6) * c.channels * window[0] * window[1] * 4
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * 0.5)
        else:
            budget = 2 * 1024**3
    n = int(max(1, min(32, budget // max(per_window, 1))))
    if device.type == "cpu":
        # CPU convolutions run best on ~0.25 Mpx per call (cache-bound beyond; measured in bench/).
        n = min(n, max(1, round(262_144 / (window[0] * window[1]))))
    return n


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


def _lead_indices(shape: tuple[int, ...], axes: str) -> tuple[list[tuple], int, int]:
    """All index tuples over the non-YX axes, plus the positions of Y and X."""
    yi, xi = axes.index("Y"), axes.index("X")
    lead_dims = [range(n) for i, n in enumerate(shape) if i not in (yi, xi)]
    return [tuple(p) for p in product(*lead_dims)], yi, xi


def _full_index(lead: tuple, yi: int, xi: int, ys: slice, xs: slice, ndim: int) -> tuple:
    it = iter(lead)
    return tuple(ys if d == yi else xs if d == xi else next(it) for d in range(ndim))


@dataclass
class Job:
    """Everything a run needs, prepared once: shared by restore(), restore_lazy() and distributed runs."""

    source: Source
    runner: Runner
    norm: Normalizer
    plan: TilePlan
    info: ModelInfo | None
    radius: int
    leads: list[tuple]
    yi: int
    xi: int
    scale: int = 1  # super-resolution factor: the plan is in output (upscaled) pixels
    device_request: str = "auto"  # as asked ("auto" lets each distributed worker pick its own GPU)

    @property
    def out_shape(self) -> tuple[int, ...]:
        s = self.source.shape
        return tuple(n * self.scale if d in (self.yi, self.xi) else n for d, n in enumerate(s))

    @property
    def out_scale(self) -> dict:
        return upscaled_geometry(self.source.scale, self.source.translate, self.scale)[0]

    @property
    def out_translate(self) -> dict:
        return upscaled_geometry(self.source.scale, self.source.translate, self.scale)[1]

    def read_window(self, lead: tuple, t: Tile) -> np.ndarray:
        ys, xs = t.window
        if self.scale > 1:
            # Exact tiled bicubic: the rows of the whole-image upscaling matrix for this window,
            # applied to the input pixels they touch.
            h, w = self.source.shape[self.yi], self.source.shape[self.xi]
            my, y0, y1 = bicubic_up_rows(h, self.scale, ys.start, ys.stop)
            mx, x0, x1 = bicubic_up_rows(w, self.scale, xs.start, xs.stop)
            ys, xs = slice(y0, y1), slice(x0, x1)
        idx = _full_index(lead, self.yi, self.xi, ys, xs, len(self.out_shape))
        try:
            raw = np.asarray(self.source.array[idx])
        except Exception as e:
            where = self.source.path or "the input array"
            raise OSError(f"{where}: cannot read plane {lead}, rows {ys.start}:{ys.stop}, columns "
                          f"{xs.start}:{xs.stop} ({type(e).__name__}: {e}); the file may be truncated or "
                          "corrupt") from e
        if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
            bad = np.argwhere(~np.isfinite(raw))[0]
            raise ValueError(f"the input contains NaN or Inf (plane {lead}, near y={ys.start + bad[0]}, "
                             f"x={xs.start + bad[1]}): replace them (e.g. numpy.nan_to_num) before restoring")
        if self.yi > self.xi:  # X before Y in storage order
            raw = raw.T
        x = self.norm.forward(raw)
        if self.scale > 1:
            x = (my @ x.astype(np.float64) @ mx.T).astype(np.float32)
        return x

    def out_index(self, lead: tuple, ys: slice, xs: slice) -> tuple:
        return _full_index(lead, self.yi, self.xi, ys, xs, len(self.out_shape))

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
        out = self.norm.inverse(block)
        return out.T if self.yi > self.xi else out

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
        import hashlib

        h = hashlib.sha256()
        if self.info is not None:
            h.update(self.info.path.read_bytes())
        else:
            for k, v in sorted(self.runner.model.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self, rows_per_group: int | None = None) -> dict:
        return job_signature(
            input=str(self.source.path.resolve()) if self.source.path else None,
            shape=self.source.shape, dtype=str(self.source.dtype), axes=self.source.axes,
            model=str(self.info.path.name) if self.info else "module", model_sha256=self.model_digest(),
            rows_per_group=rows_per_group,
            tile=self.plan.tile, halo=self.plan.halo, blend=self.plan.blend, norm=self.norm.as_dict(),
            scale=self.scale,
            # Only when on, so outputs of earlier versions (no such key) still resume.
            **({"ensemble": True} if self.runner.ensemble else {}),
            **({"series": self.source.series} if self.source.series else {}),
        )


def prepare(data, model="denoise", *, axes=None, tile=256, halo="exact", blend="cosine", device="auto",
            scale=None, amp="auto", ensemble=False, series=None) -> Job:
    """Open the input, load the model, fix the intensity policy and the tiling plan."""
    if not isinstance(ensemble, (bool, np.bool_)):
        raise ValueError(f"ensemble must be True or False, got {ensemble!r}")
    dev = resolve_device(device)
    net, policy, info = _resolve_model(model, dev)
    sr_model = info is None or info.task == "sr"
    if scale in (None, 1):
        scale = 1
    elif not isinstance(scale, (int, np.integer)) or scale not in (2, 3, 4):
        raise ValueError(f"scale must be 2, 3 or 4 for super-resolution, got {scale!r}")
    elif not sr_model:
        raise ValueError(f"scale={scale} needs a super-resolution model (task 'sr'); {info.name!r} is a "
                         f"{info.task!r} model: use model='sr'")
    if info is not None and info.task == "sr" and scale == 1:
        raise ValueError(f"{info.name!r} is a super-resolution model: pass scale=2, 3 or 4 (--scale)")
    if net.config.in_channels != 1:
        raise ValueError(f"the tiled engine runs single-channel models (each channel separately); this model "
                         f"takes {net.config.in_channels} channels")
    src = open_input(data, axes=axes, series=series)
    radius = receptive_field(net)
    if not isinstance(tile, (int, np.integer)) or tile < 16:
        raise ValueError(f"tile must be an integer ≥ 16 pixels, got {tile!r}")
    if halo == "exact" or halo is None:
        h, blend_kind = radius, None
    else:
        if isinstance(halo, str):
            try:
                halo = int(halo)
            except ValueError:
                raise ValueError(f"halo must be 'exact' or a number of pixels, got {halo!r}") from None
        if halo < 0:
            raise ValueError(f"halo must be ≥ 0, got {halo}")
        if halo >= radius:
            h, blend_kind = int(halo), None  # as exact: disjoint cores, wider halo
        else:
            if 2 * halo > tile:
                raise ValueError(f"a blended halo of {halo} px needs tile ≥ {2 * halo} (got {tile})")
            h, blend_kind = int(halo), blend
    leads, yi, xi = _lead_indices(src.shape, src.axes)
    H, W = src.shape[yi] * scale, src.shape[xi] * scale
    plan = TilePlan(H, W, tile=int(tile), halo=h, blend=blend_kind)
    norm = Normalizer.for_data(src.array, policy)
    runner = Runner(net, dev, amp=amp, ensemble=ensemble)
    return Job(src, runner, norm, plan, info, radius, leads, yi, xi, scale=int(scale), device_request=str(device))


def _zarr_target(output) -> Path | None:
    if output is None:
        return None
    out = Path(output)
    return out if (is_zarr_path(out) or out.suffix == ".zarr") else None


def _make_sink(job: Job, output, overwrite: bool, rows: int | None = None, resume: bool = False):
    """The output for a job, plus the groups already done (resume). Only a Zarr output can resume."""
    src = job.source
    ch, cw = job.plan.core_shape
    if output is None:
        if resume:
            raise ValueError("resume needs an on-disk .zarr output")
        return MemorySink(job.out_shape, job.norm.out_dtype), set()
    out = Path(output)
    chunks = tuple(ch if d == job.yi else cw if d == job.xi else 1 for d in range(len(job.out_shape)))
    if _zarr_target(out) is not None:
        signature = job.describe(rows)
        if resume and out.exists():
            if job.plan.blend is not None:
                raise ValueError("resume works in exact mode only (blended tiles depend on their neighbours)")
            sink = ZarrSink.reopen(out, signature, src=src, ignore=("rows_per_group",), overwrite=overwrite)
            if sink.complete:  # finished before: nothing to redo (its markers were cleaned up)
                return sink, {g[0] for g in job.groups(sink.job.get("rows_per_group") or rows or 1)}
            return sink, sink.done_keys()
        return ZarrSink(out, job.out_shape, job.norm.out_dtype, chunks, src.axes, job.out_scale, src.units,
                        job.out_translate, signature, overwrite=overwrite, src=src), set()
    if resume:
        raise ValueError(f"resume needs a .zarr output (a TIFF is written sequentially): got {out.name!r}")
    if out.suffix.lower() in (".tif", ".tiff"):
        # TIFF tiles are multiples of 16: each axis's core is one, or spans the whole axis (one tile,
        # padded), so narrow images (100x1000, 1x20000) need nothing from the user.
        if (ch % 16 and ch != job.plan.height) or (cw % 16 and cw != job.plan.width):
            t = job.plan.tile
            raise ValueError(f"TIFF output needs a tile size that is a multiple of 16, got --tile {t}: use "
                             f"{max(16, t // 16 * 16)} or {-(-t // 16) * 16}, or write a .zarr output")
        ty, tx = -(-ch // 16) * 16, -(-cw // 16) * 16
        return TiffSink(out, job.out_shape, job.norm.out_dtype, (ty, tx), src.axes, job.out_scale, src.units,
                        overwrite=overwrite, src=src), set()
    raise ValueError(f"unsupported output {out.name!r}: use a .zarr directory or a .tif file")


def _batches(job: Job, groups, batch_size: int, readers: int):
    """Batches of windows that never span two groups (so a group's results do not depend on where a
    run was resumed), read ahead across groups by a thread pool. Yields (group key or None when the
    batch does not finish its group, [(lead, tile, window)])."""
    plan = []
    for key, lead, tiles in groups:
        for i in range(0, len(tiles), batch_size):
            chunk = tiles[i: i + batch_size]
            plan.append((key if i + batch_size >= len(tiles) else None, [(lead, t) for t in chunk]))
    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="memnet-read") as pool:
        pending: list = []
        it = iter(plan)

        def fill():
            while len(pending) < 3:
                try:
                    key, items = next(it)
                except StopIteration:
                    return
                pending.append((key, [(lead, t, pool.submit(job.read_window, lead, t)) for lead, t in items]))

        fill()
        while pending:
            key, items = pending.pop(0)
            fill()
            yield key, [(lead, t, fut.result()) for lead, t, fut in items]


_MARK = object()


class _Writer:
    """Write-behind: one thread writes finished blocks; the queue bound caps memory."""

    def __init__(self, sink, maxsize: int = 32):
        self.sink = sink
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="memnet-write", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    if item[0] is _MARK:
                        self.sink.mark_done(item[1])
                    else:
                        self.sink.write(*item)
                except BaseException as e:
                    self.error = e

    def mark(self, key: str) -> None:
        """Queued after the group's blocks: written only once they are all on disk."""
        if hasattr(self.sink, "mark_done"):
            self.put(_MARK, key)

    def put(self, index, block):
        if self.error is not None:
            raise self.error
        self.q.put((index, block))

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def rows_per_group(job: Job, batch_size: int) -> int:
    """Enough tile rows per group to fill a batch."""
    return max(1, -(-batch_size // job.plan.grid[1]))


def resolve_batch(job: Job, batch_size, memory_budget=None) -> int:
    bs = _auto_batch(job.runner.model, job.plan.window_shape, job.runner.device, memory_budget) \
        if batch_size == "auto" else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be ≥ 1 or 'auto', got {batch_size!r}")
    return bs


def run_job(job: Job, sink, *, batch_size="auto", progress: Callable[[Progress], None] | None = None,
            cancel=None, memory_budget: int | None = None, readers: int = 2, rows: int | None = None,
            skip: set | frozenset = frozenset()):
    """Execute a prepared job into a sink, group by group, skipping the groups in ``skip`` (already
    done, on resume). Returns whatever ``sink.finish()`` returns."""
    bs = resolve_batch(job, batch_size, memory_budget)
    rows = rows or rows_per_group(job, bs)
    groups = job.groups(rows)
    todo = [g for g in groups if g[0] not in skip]
    writer = _Writer(sink)
    total = sum(len(g[2]) for g in groups)
    done = skipped = total - sum(len(g[2]) for g in todo)
    pixels, t0 = 0, time.perf_counter()
    blended = job.plan.blend is not None
    acc: dict = {}  # blended: (lead, iy, ix) -> fp32 accumulator of a core
    ny, nx = job.plan.grid

    def flush(lead, iy, ix):
        t = job.plan.tile_at(iy, ix)
        block = acc.pop((lead, iy, ix))
        writer.put(job.out_index(lead, *t.core), job.to_output(block, lead, t.core))

    try:
        for key, batch in _batches(job, todo, bs, readers):
            if _is_cancelled(cancel):
                raise Cancelled("restore cancelled")
            preds = job.runner(np.stack([w for _, _, w in batch]))
            for (lead, t, _), pred in zip(batch, preds):
                if not blended:
                    writer.put(job.out_index(lead, *t.core), job.to_output(pred[t.crop], lead, t.core))
                else:
                    _accumulate(job.plan, acc, lead, t, pred)
                    # Core row iy-1 has received every contribution once row iy is done.
                    if t.ix == nx - 1 and t.iy >= 1:
                        for jx in range(nx):
                            flush(lead, t.iy - 1, jx)
                    if t.ix == nx - 1 and t.iy == ny - 1:
                        for jx in range(nx):
                            flush(lead, t.iy, jx)
                done += 1
                pixels += (t.core[0].stop - t.core[0].start) * (t.core[1].stop - t.core[1].start)
            if key is not None and not blended:
                writer.mark(key)
            if progress is not None:
                progress(Progress(done, total, time.perf_counter() - t0, pixels, skipped))
        writer.close()
    except BaseException:
        try:
            writer.close()
        except BaseException:
            pass
        sink.abort()
        raise
    return sink.finish()


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


def restore(data, model="denoise", *, output=None, axes=None, tile=256, halo="exact", blend="cosine",
            batch_size="auto", device="auto", scale=None, progress=None, cancel=None, overwrite=False,
            amp="auto", memory_budget=None, lazy=False, resume=False, client=None, workers=None, scheduler=None,
            ensemble=False, series=None):
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
    tile : output core size in pixels (chunk size of a Zarr output).
    halo : "exact" (receptive-field radius: equal to whole-image inference) or a number of pixels;
        below the radius, overlapping tiles are blended with ``blend`` ("cosine" or "linear") ramps.
    batch_size : tiles per forward pass, or "auto" from the memory budget.
    device : "auto", "cpu", "cuda", "cuda:N".
    progress : callable receiving a ``Progress`` after every batch.
    cancel : a ``threading.Event`` or a callable returning True to stop; raises ``Cancelled``.
    ensemble : geometric self-ensemble: average the model over the 8 flips/rotations of every tile
        (8x slower; in exact mode still equal to whole-image inference; gains in docs/models.md).
    series : which series of a multi-series TIFF (default: the first, with a warning naming the others).
    lazy : return a lazy dask array instead (see ``restore_lazy``).
    resume : continue an interrupted run into the same ``.zarr`` output: groups with a done-marker
        are skipped; the job (input, model, tiling, intensity mapping, ensemble) must match or it is refused.
    client / workers / scheduler : run on dask.distributed (an existing ``Client``, a LocalCluster
        of N worker processes, or a scheduler address); output must be a ``.zarr`` path.

    Returns a numpy array, the opened zarr array (``.zarr`` output) or the path (``.tif`` output).
    """
    if lazy:
        if output is not None:
            raise ValueError("lazy=True returns a dask array: write it with da.to_zarr, or drop output=")
        return restore_lazy(data, model, axes=axes, tile=tile, halo=halo, device=device, scale=scale, amp=amp,
                            ensemble=ensemble)
    job = prepare(data, model, axes=axes, tile=tile, halo=halo, blend=blend, device=device, scale=scale, amp=amp,
                  ensemble=ensemble, series=series)
    try:
        if client is not None or workers or scheduler:
            from .distributed import run_distributed

            return run_distributed(job, output, client=client, workers=workers, scheduler=scheduler,
                                   batch_size=batch_size, progress=progress, cancel=cancel, resume=resume,
                                   overwrite=overwrite)
        bs = resolve_batch(job, batch_size, memory_budget)
        rows = rows_per_group(job, bs)
        sink, done = _make_sink(job, output, overwrite, rows=rows, resume=resume)
        rows = getattr(sink, "job", {}).get("rows_per_group") or rows  # a resumed job keeps its groups
        return run_job(job, sink, batch_size=bs, progress=progress, cancel=cancel, rows=rows, skip=done)
    finally:
        if output is not None:
            job.source.close()


def restore_lazy(data, model="denoise", *, axes=None, tile=256, halo="exact", device="auto", scale=None,
                 amp="auto", ensemble=False):
    """A lazy dask array of the restored data: each output block (one plane, one YX core) is computed
    on demand from its own halo window, with the model loaded once per process. Same tiling plan as
    ``restore``; exact mode only (blending needs the neighbours' windows)."""
    import dask.array as da

    job = prepare(data, model, axes=axes, tile=tile, halo=halo, device=device, scale=scale, amp=amp,
                  ensemble=ensemble)
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
    pred = job.runner(job.read_window(lead, t)[None])[0]
    block = job.to_output(pred[t.crop], lead, t.core)  # 2-D, in storage order of the Y and X axes
    shape = [1] * ndim
    a, b = sorted((job.yi, job.xi))
    shape[a], shape[b] = block.shape
    return block.reshape(shape)
