"""napari-memnet core: MemNet image restoration, tiled and out of core. No Qt, no napari.

The public names load on first use (PEP 562), so ``memnet --help``, ``import memnet.options`` and the
napari manifest need neither torch nor ONNX Runtime until a model is touched."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-memnet")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

# Each public name and the module it lives in.
_PUBLIC = {
    "model": ("CONFIGS", "MemNet", "MemNetConfig", "conv_weight_count", "deepen", "macs_per_pixel",
              "receptive_field", "self_ensemble", "widen", "with_context"),
    "zoo": ("TASKS", "ModelFileError", "ModelInfo", "list_models", "load_model", "save_model", "user_model_dir"),
    "engine": ("Progress", "describe_model", "restore", "restore_lazy", "restore_plane", "upscaled_geometry"),
    "runtime": ("Cancelled",),
    "io": ("Source", "open_input", "save_image"),
    "options": ("RestoreOptions",),
    "outputs": ("OutputLocked", "check_output_path"),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = ["__version__", *_HOME]


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    else:  # a submodule (memnet.io, memnet.finetune, ...) reached as an attribute
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'memnet' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
