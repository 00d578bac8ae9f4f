"""Restore options: every knob of a tiled restore, with its one default, checked once.

A `RestoreOptions` is built by `memnet.restore` (from its keyword arguments), by the CLI and by the
napari widget; it travels inside the `Job` and is serialised once (`to_dict`), into the job record
that ``--resume`` compares and into the spec every distributed worker runs from. Standard library
only, so the CLI and the widget can read the defaults without importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["AMP", "BACKENDS", "CONTEXT", "OME_ZARR_VERSIONS", "RestoreOptions", "check_amp", "check_bool"]

OME_ZARR_VERSIONS = ("0.5", "0.4")  # 0.5: Zarr v3; 0.4: Zarr v2, for readers that predate 0.5

BACKENDS = ("auto", "eager", "compile", "onnxruntime", "onnxruntime-int8")  # what memnet.inference builds
# Mixed precision, one vocabulary for restore, training and fine-tuning: "auto" = on where it is safe and
# fast (CUDA: bf16, else fp16); "on" = wherever the step supports it (CUDA; training and fine-tuning also
# bf16 on CPU, fast on CPUs with AVX512-BF16/AMX; restore's CPU backends run fp32); "off" = fp32 throughout.
AMP = ("auto", "on", "off")
# Context models (which see a plane's neighbours along Z, else T): "auto" = a task name picks its context model
# for a stack with enough planes along Z or T; "off" = every plane on its own (2-D models only).
CONTEXT = ("auto", "off")
_AMP = {"auto": "auto", "on": "on", "off": "off", True: "on", False: "off"}


def check_amp(value) -> str:
    """``value`` as one of `AMP` (True/False as "on"/"off"); a ValueError naming the choices otherwise."""
    if not isinstance(value, (str, bool)) or value not in _AMP:
        raise ValueError(f"amp must be 'auto', 'on' or 'off', got {value!r}")
    return _AMP[value]


def check_bool(name: str, value) -> bool:
    """``value`` as a bool when it is one (Python or numpy), else a TypeError naming ``name``: a truthy
    string such as "no" must never be taken as yes."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def _speed_only(default):
    """An option that changes how fast a run goes, not its result: recorded, not compared on resume."""
    return field(default=default, metadata={"resume": False})


@dataclass(frozen=True)
class RestoreOptions:
    """How to restore. After `resolved` (done by `prepare`), ``halo`` is in pixels and ``blend`` is
    None in exact mode: the values the tiling plan is made from."""

    # Output core size in pixels (the chunk size of a Zarr output); "auto": from the model's receptive
    # field and the device (`memnet.memory.default_tile`), fixed by `resolved`.
    tile: int | str = "auto"
    halo: int | str = "exact"  # "exact" (the receptive field) or pixels; below the radius: blended
    blend: str | None = "cosine"  # ramp of blended mode: "cosine" or "linear"
    scale: int = 1  # super-resolution factor (1, or 2/3/4 with an sr model)
    amp: str = "auto"  # mixed precision (AMP): "auto" (on for CUDA), "on", "off"
    ensemble: bool = False  # geometric self-ensemble (8 flips/rotations per tile, averaged)
    ome_zarr_version: str = "0.5"  # of a Zarr output: "0.5" or "0.4"
    pyramid: int = 1024  # a Zarr output's coarser levels (2x2 means) until one fits in pyramid² px; 0: none
    context: str = "auto"  # "auto" or "off": see CONTEXT
    device: str = _speed_only("auto")  # "auto", "cpu", "cuda", "cuda:N" ("auto": each worker its own)
    batch_size: int | str = _speed_only("auto")  # tiles per forward pass, or "auto" from the memory budget
    # "auto" (ONNX Runtime on CPU when installed, else eager PyTorch), "eager", "compile", "onnxruntime",
    # "onnxruntime-int8" (lossy: resume compares it, see Job.describe).
    backend: str = _speed_only("auto")
    # Bytes for "auto" batches (None: half the free GPU memory, 2 GiB on CPU).
    memory_budget: int | None = _speed_only(None)
    # Threads that compress and write a Zarr (or in-memory) output's blocks; "auto": the cores, at most 4.
    write_threads: int | str = _speed_only("auto")

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "ensemble", check_bool("ensemble", self.ensemble))
        if self.tile != "auto":
            if _as_int(self.tile) is None or _as_int(self.tile) < 16:
                raise ValueError(f"tile must be 'auto' or an integer ≥ 16 pixels, got {self.tile!r}")
            set_(self, "tile", _as_int(self.tile))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        set_(self, "halo", _check_halo(self.halo))
        if self.blend not in ("cosine", "linear", None):
            raise ValueError(f"blend must be 'cosine' or 'linear', got {self.blend!r}")
        if self.scale is None:
            set_(self, "scale", 1)
        elif not _is_int(self.scale) or self.scale not in (1, 2, 3, 4):
            raise ValueError(f"scale must be 2, 3 or 4 for super-resolution, got {self.scale!r}")
        set_(self, "scale", int(self.scale))
        set_(self, "amp", check_amp(self.amp))
        set_(self, "device", str(self.device))
        set_(self, "ome_zarr_version", str(self.ome_zarr_version))
        if self.ome_zarr_version not in OME_ZARR_VERSIONS:
            raise ValueError(f"ome_zarr_version must be {' or '.join(map(repr, OME_ZARR_VERSIONS))}, "
                             f"got {self.ome_zarr_version!r}")
        if self.context not in CONTEXT:
            raise ValueError(f"context must be 'auto' or 'off', got {self.context!r}")
        if not _is_int(self.pyramid) or self.pyramid < 0:
            raise ValueError(f"pyramid must be a number of pixels ≥ 0 (0: no coarser levels), got {self.pyramid!r}")
        set_(self, "pyramid", int(self.pyramid))
        if self.batch_size != "auto":
            bs = _as_int(self.batch_size)
            if bs is None or bs < 1:
                raise ValueError(f"batch_size must be ≥ 1 or 'auto', got {self.batch_size!r}")
            set_(self, "batch_size", bs)
        if self.write_threads != "auto":
            n = _as_int(self.write_threads)
            if n is None or n < 1:
                raise ValueError(f"write_threads must be ≥ 1 or 'auto', got {self.write_threads!r}")
            set_(self, "write_threads", n)
        if self.memory_budget is not None:
            if isinstance(self.memory_budget, bool) or not isinstance(self.memory_budget, (int, float)) \
                    or not 1 <= self.memory_budget < float("inf"):
                raise ValueError(f"memory_budget must be a number of bytes ≥ 1 or None, got {self.memory_budget!r}")
            set_(self, "memory_budget", int(self.memory_budget))

    @classmethod
    def build(cls, options: RestoreOptions | None = None, where: str = "restore", **kw) -> RestoreOptions:
        """``options`` (default: all defaults) with the keyword arguments ``kw`` replacing fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        for k in kw:
            if k not in names:
                raise TypeError(f"{where}() got an unexpected keyword argument {k!r}; the restore options "
                                f"are {', '.join(sorted(names))}")
        return dataclasses.replace(options or cls(), **kw)

    def resolved(self, radius: int, auto_tile: int | None = None) -> RestoreOptions:
        """The options for a model of receptive-field ``radius``: the halo in pixels, the blend only
        where tiles really are blended (halo below the radius), and ``tile="auto"`` as ``auto_tile``."""
        if self.tile == "auto":
            if auto_tile is None:
                raise ValueError("tile='auto' needs the model and device's tile (memnet.memory.default_tile)")
            self = dataclasses.replace(self, tile=auto_tile)
        if self.halo == "exact" or self.halo >= radius:
            halo = radius if self.halo == "exact" else self.halo  # a wider halo is exact too
            return dataclasses.replace(self, halo=halo, blend=None)
        if 2 * self.halo > self.tile:
            raise ValueError(f"a blended halo of {self.halo} px needs tile ≥ {2 * self.halo} (got {self.tile})")
        return dataclasses.replace(self, blend=self.blend or "cosine")

    def to_dict(self) -> dict:
        """Every option, JSON-safe: the job record and the workers' spec."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RestoreOptions:
        """The options `to_dict` describes."""
        return cls(**d)

    @classmethod
    def speed_only(cls) -> tuple[str, ...]:
        """The options a resumed run may change (they change the speed, not the result)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume") is False)


def _is_int(v) -> bool:
    return not isinstance(v, bool) and hasattr(v, "__index__")


def _as_int(v) -> int | None:
    """An int, a numpy integer or a string of digits as int; None for anything else."""
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            return None
    return int(v) if _is_int(v) else None


def _check_halo(halo):
    if halo == "exact" or halo is None:
        return "exact"
    if _as_int(halo) is None:
        raise ValueError(f"halo must be 'exact' or a number of pixels, got {halo!r}")
    halo = _as_int(halo)
    if halo < 0:
        raise ValueError(f"halo must be ≥ 0, got {halo}")
    return int(halo)
