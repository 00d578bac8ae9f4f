"""Running a model on batches of tiles: the device, the model cache, `Runner`, the automatic batch.

One process-wide cache (`cached`) holds every loaded model (and whatever else a worker keeps between
tasks), so lazy blocks, local runs and distributed workers load each model once per device.

Two runners, one interface: `Runner` runs a torch `MemNet` on any device and backend; `OrtRunner` runs a model's
numpy `arch.Weights` on ONNX Runtime on the CPU (device `runtime.CPU`) and never imports torch. Both run the same
graph on the CPU: the same outputs, bit for bit. `Runner.for_options` picks by the model it is given.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .arch import Weights
from .memory import available_bytes, batch_peak_bytes
from .runtime import CPU
from .zoo import ModelInfo, find_model, load_model, load_weights

if TYPE_CHECKING:
    import torch

    from .model import MemNet

__all__ = ["OrtRunner", "Runner", "auto_batch", "cached", "load_cached", "resolve_model"]

_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def cached(key, make: Callable):
    """The process-wide cache: ``make()`` once per key, then the same object."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = make()
        return _CACHE[key]


def load_cached(path: Path, device) -> tuple[MemNet | Weights, ModelInfo]:
    """One copy of each model file per process and device (lazy blocks and workers reuse it): on `runtime.CPU`
    its numpy `Weights` (no torch), else the torch module on ``device``."""
    key = ("model-file", str(path.resolve()), path.stat().st_mtime_ns, str(device), device is CPU)
    if device is CPU:
        return cached(key, lambda: load_weights(path))
    return cached(key, lambda: load_model(path, device=device))


def resolve_model(model, device) -> tuple[MemNet | Weights, dict, ModelInfo | None]:
    """A model (name, path or MemNet module) on ``device``, its intensity policy and its info. On `runtime.CPU`
    (a name or a path only) the model's numpy `Weights`."""
    if device is CPU:
        net, info = load_cached(find_model(model).path, CPU)
        return net, info.normalization, info
    import torch

    from .model import MemNet

    if isinstance(model, MemNet):
        return model.to(device).eval(), {"mode": "natural"}, None
    if isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a memnet.MemNet, a model name or a .safetensors path, got {type(model).__name__}"
        )
    net, info = load_cached(find_model(model).path, device)
    return net, info.normalization, info


class Runner:
    """Runs batches of normalised float32 windows (B, H, W), or (B, planes, H, W) for a context model, through a
    model on one device: the model's
    inference form (`memnet.inference`) on the chosen backend, inference_mode, channels_last, AMP (bf16,
    else fp16) on CUDA, halving the batch on OOM."""

    def __init__(self, model: MemNet, device: torch.device, amp: bool | str = "auto", ensemble: bool = False,
                 backend: str = "auto"):
        import torch

        from .inference import make_backend

        self.model = model.to(device).eval()  # the trained model (its config sizes batches and tiles)
        self.device = device
        self.ensemble = bool(ensemble)  # 8 flips/rotations per window, averaged (self_ensemble)
        self.amp = {True: "on", False: "off"}.get(amp, amp)  # as asked: "auto", "on" or "off"
        if self.amp not in ("auto", "on", "off"):
            raise ValueError(f"amp must be 'auto', 'on' or 'off', got {amp!r}")
        if device.type == "cuda" and self.amp in ("auto", "on"):
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.amp_dtype = None
        self.net, self.backend = make_backend(self.model, device, backend)
        # channels_last: 1.6x faster than NCHW with oneDNN on CPU (measured); ONNX Runtime takes NCHW.
        self.channels_last = not self.backend.startswith("onnxruntime")
        self.max_batch: int | None = None  # lowered after an OOM

    @classmethod
    def for_options(cls, model: MemNet | Weights, device, options) -> Runner | OrtRunner:
        """The runner a job with these `RestoreOptions` uses (local and distributed alike): an `OrtRunner` for
        numpy `Weights` (on `runtime.CPU`), else a `Runner`."""
        if isinstance(model, Weights):
            return OrtRunner(model, amp=options.amp, ensemble=options.ensemble, backend=options.backend)
        return cls(model, device, amp=options.amp, ensemble=options.ensemble, backend=options.backend)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """The model's float32 output (N, Y, X) for a batch (N, Y, X) or (N, planes, Y, X) of normalised
        windows; on a CUDA out-of-memory error, halve the batch and retry."""
        import torch

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
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch[:, None] if batch.ndim == 3 else batch))
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.amp_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.amp_dtype):
                    y = self._forward(x)
            elif self.device.type == "cuda":
                # amp off means full fp32: cuDNN would otherwise run convs in TF32 (~1e-3 error on Ampere+).
                prev, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
                try:
                    y = self._forward(x)
                finally:
                    torch.backends.cudnn.allow_tf32 = prev
            else:
                y = self._forward(x)
        return y.float()[:, 0].cpu().numpy()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        from .model import self_ensemble

        return self_ensemble(self.net, x) if self.ensemble else self.net(x)


class OrtRunner:
    """Runs batches of normalised float32 windows (B, H, W), or (B, planes, H, W) for a context model, through a
    model's numpy `Weights` on ONNX Runtime on the CPU (`ortgraph.session_for`), numpy in and out, without
    torch: `Runner`'s interface and, on the same graph, its outputs bit for bit."""

    device = CPU
    amp_dtype = None  # restore's CPU backends run fp32
    channels_last = False
    max_batch = None

    def __init__(self, weights: Weights, amp: bool | str = "auto", ensemble: bool = False, backend: str = "auto"):
        from .options import check_amp
        from .ortgraph import session_for

        if backend not in ("auto", "onnxruntime", "onnxruntime-int8"):
            raise ValueError(f"OrtRunner runs the onnxruntime backends, not {backend!r}: use Runner")
        self.model = weights  # its config sizes batches and tiles
        self.ensemble = bool(ensemble)
        self.amp = check_amp(amp)
        self.backend = "onnxruntime" if backend == "auto" else backend
        self.session = session_for(weights, int8=_int8_graph if self.backend == "onnxruntime-int8" else None)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """The model's float32 output (N, Y, X) for a batch (N, Y, X) or (N, planes, Y, X) of normalised windows;
        with ``ensemble``, the mean over the 8 flips/rotations (as `model.self_ensemble` computes it)."""
        x = np.ascontiguousarray(batch[:, None] if batch.ndim == 3 else batch, np.float32)
        if not self.ensemble:
            return self.session.run(x)[:, 0]
        acc = None
        for k in range(4):
            for flip in (False, True):
                t = np.rot90(x, k, (2, 3))
                if flip:
                    t = np.flip(t, 3)
                y = self.session.run(t)
                if flip:
                    y = np.flip(y, 3)
                y = np.rot90(y, -k, (2, 3))
                acc = y if acc is None else acc + y
        return (acc / 8)[:, 0]


def _int8_graph(weights: Weights) -> bytes:
    """An int8 graph is traced by torch, then quantized (`inference.int8_graph`): only when it is not cached."""
    from .inference import int8_graph

    return int8_graph(weights)


def auto_batch(model: MemNet | Weights, window: tuple[int, int], device, budget: int | None,
               backend: str = "eager", ensemble: bool = False) -> int:
    """Windows per forward pass that fit ``budget`` bytes (None: half the free GPU memory, 2 GiB
    on CPU) and the memory there is (`memory.available_bytes`), each window costing
    `memory.batch_peak_bytes`; at most 32; on CPU about 0.25 Mpx per call."""
    per_window = batch_peak_bytes(model.config, window, 1, backend, device.type, ensemble)
    if budget is None:
        if device.type == "cuda":
            import torch

            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * 0.5)
        else:
            budget = 2 * 1024**3
    avail = available_bytes(device)
    if avail is not None:
        budget = min(budget, int(avail * 0.9))
    n = int(max(1, min(32, budget // max(per_window, 1))))
    if device.type == "cpu":
        # CPU convolutions run best on ~0.25 Mpx per call (cache-bound beyond; measured in bench/).
        n = min(n, max(1, round(262_144 / (window[0] * window[1]))))
    return n
