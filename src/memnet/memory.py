"""How big a tile and a batch are: the automatic tile from the receptive field and the device
(`default_tile`), and memory up front, the peak memory one batch of windows needs and the memory there is,
so that a run that cannot fit is refused (or given a tile that fits) before it starts, not killed half-way.

The estimate builds on `model.feature_bytes_per_pixel` (fp32 feature maps alive at once), scaled by
what each backend was measured to need on top (bench/window_memory.py), plus the batch's own buffers.
"""

from __future__ import annotations

import math
import os

from .arch import MemNetConfig, feature_bytes_per_pixel, receptive_field
from .tiling import TilePlan

__all__ = ["BACKEND_OVERHEAD", "available_bytes", "batch_peak_bytes", "default_tile", "fit_tile", "fmt_bytes"]

# Measured peak of one forward pass / the feature maps (bench/window_memory.py, CPU, M4R4C32 to M6R6C64 at
# 256² and 512² windows): eager 2.3-3.0, ONNX Runtime 1.3-2.9 (the gate's concatenations and BN/ReLU
# temporaries live beside the maps). The largest ratio measured, for every backend: a refusal errs on the
# safe side. On CUDA (not measured yet) the feature maps alone, as the automatic batch always assumed.
# onnxruntime-int8: 2.95 (fp32 2.88) for M4R4C32 at a 1024² window: its BN/Add/dequantize run in float.
BACKEND_OVERHEAD = {"eager": 3.0, "compile": 3.0, "onnxruntime": 3.0, "onnxruntime-int8": 3.0}


def batch_peak_bytes(config: MemNetConfig, window: tuple[int, int], batch: int = 1, backend: str = "eager",
                     device_type: str = "cpu", ensemble: bool = False) -> int:
    """Peak bytes of one forward pass of ``batch`` windows of ``window`` (H, W) px: the feature maps
    (fp32; AMP on CUDA needs less, never more) times the backend's measured overhead, plus the
    batch's input, output and the engine's copies of both (read-ahead windows, results). The
    self-ensemble runs its 8 members one after another: one more output accumulator."""
    px = window[0] * window[1] * batch
    overhead = BACKEND_OVERHEAD.get(backend, max(BACKEND_OVERHEAD.values())) if device_type == "cpu" else 1.0
    buffers = 4 * px * (8 + 2 * bool(ensemble))  # float32: input, output, 3 read-ahead batches, results
    return int(feature_bytes_per_pixel(config) * px * overhead + buffers)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _address_space_left() -> int | None:
    """RLIMIT_AS (soft) minus the address space this process already maps, where a limit is set."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    used = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - used)


def available_bytes(device=None) -> int | None:
    """Bytes a run may still use on ``device`` (a torch.device; None or CPU: RAM), None where unknown.
    ``MEMNET_MEMORY_LIMIT`` (bytes, or with a K/M/G suffix) caps it: for a machine whose limit the process
    cannot see (some containers), and for tests. CPU: the smaller of MemAvailable (/proc/meminfo) and
    what RLIMIT_AS leaves; CUDA: the free device memory."""
    limits = []
    env = os.environ.get("MEMNET_MEMORY_LIMIT")
    if env:
        limits.append(_parse_bytes(env))
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        import torch

        if torch.cuda.is_available():
            limits.append(int(torch.cuda.mem_get_info(device)[0]))
    elif device is None or getattr(device, "type", "cpu") == "cpu":
        limits += [v for v in (_meminfo_available(), _address_space_left()) if v is not None]
    return min(limits) if limits else None


def _parse_bytes(s: str) -> int:
    s = s.strip().upper().removesuffix("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(s[-1:], 1)
    try:
        return int(float(s[:-1] if mult > 1 else s) * mult)
    except ValueError:
        raise ValueError(f"MEMNET_MEMORY_LIMIT must be a number of bytes (e.g. 8G or 500M), got {s!r}") from None


def fit_tile(config: MemNetConfig, plane: tuple[int, int], tile: int, halo: int, *, batch: int | None = None,
             backend: str = "eager", device=None, ensemble: bool = False, auto: bool = False,
             min_tile: int = 16) -> int:
    """The tile to run with: ``tile`` when one batch of its windows fits the memory there is
    (`available_bytes`); else, with ``auto``, the largest multiple of 16 that fits; else a ValueError in
    one line naming what fits. ``batch`` None ("auto"): one window must fit (the batch adapts);
    ``plane``: the (output) plane, which bounds the windows; ``min_tile``: a blended halo's 2 × halo."""
    avail = available_bytes(device)
    if avail is None:
        return tile
    dev = getattr(device, "type", "cpu") if device is not None else "cpu"
    usable = int(avail * 0.9)  # the engine's queues and the Python heap beside the batch

    def need(t: int, n: int = 1) -> tuple[int, tuple[int, int]]:
        win = TilePlan(plane[0], plane[1], tile=t, halo=halo).window_shape
        return batch_peak_bytes(config, win, n, backend, dev, ensemble), win

    n = batch or 1
    needed, win = need(tile, n)
    if needed <= usable:
        return tile
    fits = next((t for t in range(tile // 16 * 16, max(16, min_tile) - 1, -16) if need(t, n)[0] <= usable), None)
    if auto and fits is not None:
        return fits
    model = f"M{config.blocks}R{config.recursions}C{config.channels}"
    what = (f"{n} windows" if n > 1 else "one window") + f" of {win[0]}×{win[1]} px"
    head = (f"not enough memory: tile {tile} needs about {fmt_bytes(needed)} for {what} of {model} ({backend}, "
            f"{dev.upper()}), and about {fmt_bytes(avail)} is available")
    if n > 1 and need(tile, 1)[0] <= usable:
        most = max(k for k in range(1, n) if need(tile, k)[0] <= usable)
        raise ValueError(f"{head}: use batch_size {most} or less (--batch-size {most})")
    if fits is None:
        raise ValueError(f"{head}, and not even the smallest tile fits: free memory, or raise the limit "
                         "(MEMNET_MEMORY_LIMIT, ulimit -v)")
    raise ValueError(f"{head}: use tile {fits} or less (--tile {fits}), or tile 'auto'")


def fmt_bytes(n: int) -> str:
    """Bytes as "1.2 GB" (or "300 MB" below a GiB), for memory messages."""
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def default_tile(config: MemNetConfig, device, memory_budget: int | None = None,
                 plane: tuple[int, int] | None = None) -> int:
    """The output tile size for ``tile="auto"``, a multiple of 64, from the receptive field and the device.

    CPU: windows up to about 640² px, the largest that keep the measured speed per pixel (bench/roofline.py;
    beyond, the feature maps leave the cache and the speed falls): tile ≤ 640 - 2 × radius, ≥ 256. Given
    the ``plane`` (height, width), the tile in that range whose windows cover the least area (a 1024² plane
    takes 2 × 2 tiles of 512, not 2 × 2 of 576 with their wider windows).
    GPU: the smallest tile whose window costs at most 1.3× its core in halo work, capped by memory."""
    r = receptive_field(config)
    if device.type == "cpu":
        cap = max(256, _round64(640 - 2 * r))
        if plane is None:
            return cap

        def area(t: int) -> int:  # pixels the model sees for one plane at tile t
            p = TilePlan(plane[0], plane[1], tile=t, halo=r)
            return p.grid[0] * p.grid[1] * p.window_shape[0] * p.window_shape[1]

        return min(range(cap, 255, -64), key=area)  # the first (largest) of equals: fewer, bigger chunks
    tile = _round64(2 * r / (math.sqrt(1.3) - 1), up=True)
    if device.type == "cuda":
        import torch

        if torch.cuda.is_available():
            budget = memory_budget or int(torch.cuda.mem_get_info(device)[0] * 0.5)
            per_px = feature_bytes_per_pixel(config)  # fp32 maps: safe under any amp
            while tile > 256 and per_px * (tile + 2 * r) ** 2 > budget:
                tile -= 64
    return tile


def _round64(v: float, up: bool = False) -> int:
    return int(64 * (math.ceil(v / 64) if up else round(v / 64)))
