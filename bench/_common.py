"""Shared helpers for the benchmark scripts (figures are printed, never asserted)."""

from __future__ import annotations

import platform
import time

import numpy as np
import torch

import memnet


def bench_model(spec: str, seed: int = 0) -> memnet.MemNet:
    """A model for benchmarks: a .safetensors path / zoo name, or an architecture name with
    random weights and non-trivial BN statistics (speed does not depend on the weights)."""
    if spec in memnet.CONFIGS:
        torch.manual_seed(seed)
        m = memnet.MemNet(**memnet.CONFIGS[spec].as_dict())
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_var.uniform_(0.5, 1.5)
        return m.eval()
    model, _ = memnet.load_model(spec)
    return model


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_time(fn, device=None, repeat: int = 3) -> float:
    """Best of ``repeat`` timed calls after one warm-up call, waiting for a CUDA device to finish."""
    def sync():
        if device is not None and getattr(device, "type", "cpu") == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def synthetic_stack(shape, dtype=np.uint16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random(shape, dtype=np.float32)
    return (base * 3000 + 100).astype(dtype)
