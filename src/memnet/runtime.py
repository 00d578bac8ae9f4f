"""The bottom floor every run stands on: how a run is stopped (`Cancelled`, `stop_requested`) and which
device it runs on (`resolve_device`). Restore, training and fine-tuning import these from here, never
from each other."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import threading
from pathlib import Path

__all__ = ["CPU", "Cancelled", "available_devices", "cpu_without_torch", "deferred_module", "gpu_possible",
           "resolve_device", "stop_requested"]


class Cancelled(Exception):
    """Raised when a run is cancelled; the output is left marked incomplete (or removed).
    Not a RuntimeError on purpose: Qt worker threads treat RuntimeError as a deleted worker."""


def stop_requested(stop) -> bool:
    """``stop``: None, a ``threading.Event`` (or anything with ``is_set``) or a callable returning True."""
    if stop is None:
        return False
    if isinstance(stop, threading.Event) or hasattr(stop, "is_set"):
        return bool(stop.is_set())
    return bool(stop())


def resolve_device(device="auto"):
    """A ``torch.device`` for "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N", ...; a ValueError
    naming what this machine has otherwise."""
    import torch

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


class _HostCPU:
    """The CPU, chosen without importing torch: the device of the ONNX Runtime path, with what the engine reads of
    a ``torch.device`` (``type``, ``index``, its name)."""

    type = "cpu"
    index = None

    def __str__(self) -> str:
        return "cpu"

    def __repr__(self) -> str:
        return "device(type='cpu')"


CPU = _HostCPU()


def _torch_build() -> dict[str, bool] | None:
    """Which GPU backends the installed torch was built with ({"cuda": ..., "hip": ..., "xpu": ...}), read from its
    ``version.py`` without importing it; None when torch is not installed or the file says nothing clear."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except (OSError, StopIteration):
        return None
    found = {}
    for name in ("cuda", "hip", "xpu"):
        m = re.search(rf"^{name}\s*(?::[^=]*)?=\s*(.+)$", text, re.M)
        if m is None and name == "xpu":  # older torch: no XPU builds
            found[name] = False
            continue
        if m is None:
            return None
        found[name] = m.group(1).strip() != "None"
    return found


def gpu_possible() -> bool:
    """Whether ``device="auto"`` could pick a GPU on this machine, decided without importing torch (~3 s) where
    that is certain: False when torch is not installed, when it is a CPU-only build (on Linux and Windows; macOS
    has MPS), or, on Linux, when no GPU device node is there for its build (NVIDIA: /dev/nvidia*, /proc/driver/
    nvidia, WSL's /dev/dxg; ROCm: /dev/kfd). True otherwise: torch is then asked, as before."""
    if sys.platform == "darwin":
        return True
    build = _torch_build()
    if build is None:
        return importlib.util.find_spec("torch") is not None  # installed but unreadable: ask torch
    if not build["cuda"] and not build["hip"]:
        return False
    if not sys.platform.startswith("linux"):
        return True
    nodes = (["/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"] if build["cuda"] else []) \
        + (["/dev/kfd"] if build["hip"] else [])
    return any(Path(p).exists() for p in nodes)


def cpu_without_torch(device) -> bool:
    """Whether ``device`` ("auto", "cpu", ...) means the CPU and that is known without importing torch: "cpu",
    or "auto" where no GPU is possible (`gpu_possible`). A GPU machine always goes to torch's choice."""
    return isinstance(device, str) and (device == "cpu" or (device == "auto" and not gpu_possible()))


def available_devices() -> list[str]:
    """The devices this machine can run on, as --device accepts them (without importing torch where it has no GPU
    backend and no MPS is possible)."""
    build = _torch_build()
    if sys.platform != "darwin" and (build is None and importlib.util.find_spec("torch") is None
                                     or build is not None and not any(build.values())):
        return ["auto", "cpu"]
    import torch

    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        out.append("xpu")
    return out


class deferred_module:  # noqa: N801 (stands in for a module)
    """A module imported on first attribute use: lets a module that needs torch only inside its functions
    be imported (its names, help texts, registries read) without loading torch."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)
