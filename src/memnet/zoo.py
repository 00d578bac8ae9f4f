"""Model zoo: weights as .safetensors with their metadata, shipped and per-user.

A weights file holds the state dict and one metadata entry, ``memnet``, a JSON document:

    format: 1, name, task, description, config (MemNetConfig fields),
    normalization ({"mode": "natural"} or {"mode": "percentile", "low": 1, "high": 99.8}; early files say
    {"mode": "range", "in_range": [0, 255]}, read as natural),
    degradation (what it was trained on), training (data, recipe, steps, hours, hardware),
    metrics (validation figures), rank (higher wins when a task name picks a model),
    package_version, created.

Loading never unpickles: safetensors parses a JSON header and raw tensors only.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open

from .arch import MemNetConfig, Weights, macs_per_pixel, receptive_field, state_shapes
from .zblend import PREFIX as ZBLEND_PREFIX
from .zblend import ZBlend, check_spec, zblend_shapes

if TYPE_CHECKING:  # torch loads with the first torch model, not with the zoo (the ONNX Runtime path needs none)
    import torch

    from .model import MemNet

__all__ = [
    "TASKS",
    "ModelInfo",
    "ModelFileError",
    "list_models",
    "find_context_model",
    "unusable_models",
    "reserved_names",
    "check_user_model_name",
    "find_model",
    "load_model",
    "load_weights",
    "load_weights_bytes",
    "save_model",
    "read_info",
    "user_model_dir",
    "shipped_model_dir",
]

TASKS = ("denoise", "sr", "jpeg", "microscopy")
FORMAT_VERSION = 1
_META_KEY = "memnet"


class ModelFileError(ValueError):
    """A weights file that cannot be used: unreadable, not safetensors, or not matching its metadata."""


@dataclass
class ModelInfo:
    """A model of the list (`list_models`): its name, task, weights file, where it comes from, its architecture and the
    metadata stored in the file."""

    name: str
    task: str
    path: Path
    source: str  # "shipped" or "user"
    config: MemNetConfig
    metadata: dict = field(repr=False)

    @property
    def size_bytes(self) -> int:
        """The weights file's size."""
        return self.path.stat().st_size

    @property
    def macs_per_pixel(self) -> int:
        """Multiply-adds per output pixel."""
        return macs_per_pixel(self.config)

    @property
    def receptive_field(self) -> int:
        """The receptive-field radius in pixels."""
        zb = self.metadata.get("zblend")  # a second stage reads stage 1's output around each pixel
        return receptive_field(self.config) + (max(zb["radii"]) if zb else 0)

    @property
    def metrics(self) -> dict:
        """The validation figures stored with the model."""
        return self.metadata.get("metrics", {})

    @property
    def normalization(self) -> dict:
        """How inputs are mapped to the model's range (the metadata's normalisation policy; natural range when
        absent)."""
        policy = self.metadata.get("normalization", {"mode": "natural"})
        # "range" is what early files called the natural mapping (by the dtype's range): same thing.
        return {"mode": "natural"} if policy.get("mode") == "range" else policy

    @property
    def rank(self) -> float:
        """The model's priority when a task name picks among several (highest wins)."""
        return float(self.metadata.get("rank", 0))

    @property
    def description(self) -> str:
        """The model's one-line description from its metadata."""
        return self.metadata.get("description", "")


def shipped_model_dir() -> Path:
    """The folder of the weights shipped in the package."""
    return Path(__file__).parent / "weights"


def user_model_dir() -> Path:
    """Where fine-tuned models go. ``MEMNET_MODEL_DIR`` overrides the platform default."""
    env = os.environ.get("MEMNET_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "napari-memnet" / "models"


def _package_version() -> str:
    from . import __version__

    return __version__


def save_model(
    model: MemNet,
    path: str | os.PathLike,
    *,
    name: str,
    task: str,
    metadata: dict | None = None,
) -> ModelInfo:
    """Write ``model`` as .safetensors with its metadata; returns the file's ModelInfo.

    The file is written to a temporary name and renamed, so a crash never leaves a half file
    under the final name.
    """
    from safetensors.torch import save_file

    from .model import MemNet

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    if not isinstance(model, MemNet):
        raise TypeError(f"save_model needs a memnet.MemNet, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"weights must be saved as .safetensors, got {path.name!r}")
    if path.parent.resolve() == user_model_dir().resolve():  # where names pick models
        check_user_model_name(name)
    meta = dict(metadata or {})
    meta.update(
        format=FORMAT_VERSION,
        name=name,
        task=task,
        config=model.config.as_dict(),
        package_version=meta.get("package_version", _package_version()),
        created=meta.get("created", datetime.now(UTC).isoformat(timespec="seconds")),
    )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta.pop("zblend", None)  # metadata copied from another model: only this model's own second stage counts
    if model.zblend is not None:
        import torch

        meta["zblend"] = model.zblend.spec
        tensors.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.zblend.prefixed().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)
    return read_info(path)


def _sniff(path: Path) -> str | None:
    """A hint about what a non-safetensors file is, for the error message."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if head[:2] == b"PK":
        return "it looks like a zip/PyTorch checkpoint (torch.save)"
    if head[:1] == b"\x80":
        return "it looks like a pickle"
    return None


def _open_header(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"{path}: a folder, not a .safetensors model file")
    if path.stat().st_size < 8:
        raise ModelFileError(f"{path}: empty or truncated weights file ({path.stat().st_size} bytes)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        hint = _sniff(path)
        extra = (
            f"; {hint} — pickled checkpoints are refused because loading them can run code: "
            "convert it to .safetensors with the code that made it"
            if hint
            else ""
        )
        raise ModelFileError(f"{path}: not a readable .safetensors file ({e}){extra}") from None
    if _META_KEY not in meta:
        raise ModelFileError(
            f"{path}: .safetensors file without napari-memnet metadata (no {_META_KEY!r} entry); "
            "save models with memnet.save_model"
        )
    try:
        doc = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: corrupt metadata ({e})") from None
    return doc


# What a weights file may claim before anything is built: far above any useful MemNet (the paper's
# largest is M10R10C64), far below what would exhaust memory while building it.
_ARCH_LIMITS = {"blocks": 64, "recursions": 64, "channels": 1024, "in_channels": 4, "out_channels": 4}


def _config_from(doc: dict, path) -> MemNetConfig:
    try:
        cfg = MemNetConfig(**doc["config"])
    except (KeyError, TypeError) as e:
        raise ModelFileError(f"{path}: metadata has no valid architecture config ({e})") from None
    for k, limit in _ARCH_LIMITS.items():
        v = getattr(cfg, k)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
            raise ModelFileError(f"{path}: metadata claims {k}={v!r}; a MemNet has 1 to {limit}: "
                                 "the file is corrupt or not a napari-memnet model")
    if not isinstance(cfg.context, int) or isinstance(cfg.context, bool) or not 0 <= cfg.context <= 8:
        raise ModelFileError(f"{path}: metadata claims context={cfg.context!r}; a MemNet sees 0 to 8 planes on "
                             "each side: the file is corrupt or not a napari-memnet model")
    return cfg


def _check_tensors(label, cfg: MemNetConfig, shapes: dict[str, tuple], zblend: dict | None = None) -> None:
    """The tensors a file holds against the architecture its metadata claims (`arch.state_shapes`), before
    anything is built; and the architecture itself (a MemNet's global residual needs as many output channels
    as input channels)."""
    if cfg.in_channels != cfg.out_channels:
        raise ModelFileError(f"{label}: invalid architecture in metadata: MemNet's global residual (y = x + recon) "
                             f"needs in_channels == out_channels, got {cfg.in_channels} and {cfg.out_channels}")
    expected = state_shapes(cfg)
    if zblend is not None:  # a context model's second stage (metadata ``zblend``)
        if zblend["context"] > cfg.context or not cfg.context:
            raise ModelFileError(f"{label}: metadata declares a Z-blend of {2 * zblend['context'] + 1} planes on a "
                                 f"model that sees {cfg.planes}: the file is corrupt")
        expected = {**expected, **{ZBLEND_PREFIX + k: v for k, v in zblend_shapes(zblend).items()}}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k}: file {shapes[k]} vs model {v}" for k, v in expected.items() if k in shapes and shapes[k] != v]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})")
        raise ModelFileError(
            f"{label}: weights do not match the architecture in its metadata "
            f"(M{cfg.blocks}R{cfg.recursions}C{cfg.channels}): " + ", ".join(parts))


def _check_finite(label, tensors: dict[str, np.ndarray]) -> None:
    bad = [k for k, v in tensors.items() if v.dtype.kind == "f" and not bool(np.isfinite(v).all())]
    if bad:
        raise ModelFileError(f"{label}: {len(bad)} tensors hold NaN or Inf (e.g. {', '.join(bad[:3])}): the "
                             "weights are corrupt (a diverged training run?); use another file")


def _check_policy(policy, path) -> None:
    """The intensity policy in a file's metadata, checked where the file can be named."""
    if policy is None:
        return
    mode = policy.get("mode") if isinstance(policy, dict) else None
    if mode not in ("natural", "range", "percentile"):
        raise ModelFileError(f"{path}: metadata normalization {policy!r} is not one of natural, range or "
                             "percentile: the file is corrupt or from an incompatible tool")
    if mode == "percentile":
        lo, hi = policy.get("low", 1.0), policy.get("high", 99.8)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
        if not numbers or not 0 <= lo < hi <= 100:
            raise ModelFileError(f"{path}: metadata percentiles low={lo!r}, high={hi!r} must be numbers with "
                                 "0 <= low < high <= 100")


def read_info(path: str | os.PathLike, source: str = "user") -> ModelInfo:
    """Read a weights file's metadata without loading its tensors."""
    path = Path(path)
    doc = _open_header(path)
    task = doc.get("task")
    if task not in TASKS:
        raise ModelFileError(f"{path}: metadata names unknown task {task!r} (expected one of {TASKS})")
    _check_policy(doc.get("normalization"), path)
    _zblend_spec(doc, path)
    return ModelInfo(
        name=str(doc.get("name") or path.stem),
        task=task,
        path=path,
        source=source,
        config=_config_from(doc, path),
        metadata=doc,
    )


def _scan(directory: Path, source: str) -> list[ModelInfo]:
    out = []
    if not directory.is_dir():
        return out
    for p in sorted(directory.glob("*.safetensors")):
        try:
            out.append(read_info(p, source=source))
        except (ModelFileError, OSError) as e:
            warnings.warn(f"skipping unusable model file: {e}", stacklevel=3)
    return out


# Model names. Task names and shipped models' names are reserved: a user model cannot be saved under one,
# and a user file that declares one anyway (copied in by hand) is ignored with a warning, never chosen.
# Two user files declaring the same name are both unusable by that name (an error naming both files).
# A model argument is a path only when it ends in .safetensors or contains a path separator.


def reserved_names() -> set[str]:
    """The task names and the shipped models' names: no user model may take one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return set(TASKS) | {m.name for m in _scan(shipped_model_dir(), "shipped")}


def free_name(name: str) -> str:
    """A name like ``name`` that no model has and none reserves (``NAME-1``, ``NAME-2``, ...)."""
    taken = reserved_names() | {m.name for m in _scan_all()[0]} | {p.stem for p in user_model_dir().glob("*")}
    k = 1
    while f"{name}-{k}" in taken:
        k += 1
    return f"{name}-{k}"


def check_user_model_name(name: str) -> None:
    """Refuse a reserved name for a new user model, suggesting a free one."""
    if name in reserved_names():
        what = "a task name" if name in TASKS else "the name of a shipped model"
        raise ValueError(f"{name!r} is {what}, reserved for the shipped models: choose another name for your "
                         f"model, e.g. {free_name(name)!r}")


def _scan_all() -> tuple[list[ModelInfo], list[tuple[ModelInfo, str]]]:
    """The usable models (shipped, then user) and the user files that cannot be chosen, with why."""
    shipped = _scan(shipped_model_dir(), "shipped")
    reserved = set(TASKS) | {m.name for m in shipped}
    users = _scan(user_model_dir(), "user")
    usable, unusable = [], []
    for m in users:
        same = [o for o in users if o.name == m.name and o is not m]
        if m.name in reserved:
            what = "a task name" if m.name in TASKS else "a shipped model's name"
            unusable.append((m, f"ignored (its name {m.name!r} is {what})"))
        elif same:
            others = ", ".join(o.path.name for o in same)
            unusable.append((m, f"ambiguous ({others} declares the same name {m.name!r})"))
        else:
            usable.append(m)
    return shipped + usable, unusable


def list_models() -> list[ModelInfo]:
    """Shipped models, then user models (fine-tuned), each with its metadata. A user file that cannot be
    chosen by its name (a reserved name, or a name two files declare) is left out, with a warning."""
    usable, unusable = _scan_all()
    for m, why in unusable:
        warnings.warn(f"user model file {m.path} is {why}: rename it "
                      f"(e.g. {free_name(m.name)!r}: memnet finetune -o / save_model(name=...)) or remove it",
                      stacklevel=2)
    return usable


def unusable_models() -> list[tuple[ModelInfo, str]]:
    """The user model files `list_models` leaves out, each with why (for `memnet models`)."""
    return _scan_all()[1]


def _is_path(s: str) -> bool:
    return s.endswith(".safetensors") or os.sep in s or (os.altsep is not None and os.altsep in s)


def find_model(name_or_path: str | os.PathLike) -> ModelInfo:
    """The model a task name, model name or .safetensors path stands for (its info; nothing loaded).
    A name is a path only when it ends in .safetensors or contains a path separator."""
    s = str(name_or_path)
    if isinstance(name_or_path, os.PathLike) or _is_path(s):
        return read_info(Path(s).expanduser(), source="file")
    models, unusable = _scan_all()
    for info in models:
        if info.name == s:
            return info
    dup = [m for m, why in unusable if m.name == s and why.startswith("ambiguous")]
    if dup:
        raise LookupError(f"two user model files declare the name {s!r}: {' and '.join(str(m.path) for m in dup)}; "
                          "rename or remove one, or pass the file's path")
    if s in TASKS:
        candidates = [m for m in models if m.task == s and not m.config.context]  # context models: by name
        if not candidates:
            have = ", ".join(f"{m.name} ({m.task})" for m in models) or "none"
            hint = " (for fluorescence microscopy use the task 'microscopy')" if s == "denoise" else ""
            raise LookupError(
                f"no model for task {s!r} is installed{hint}; installed models: {have}. Pick one of them, "
                f"train one with `memnet train --task {s}` or pass a .safetensors path"
            )
        # Best = highest rank; shipped beats user at equal rank (user models are opt-in by name).
        return max(candidates, key=lambda m: (m.rank, m.source == "shipped"))
    known = ", ".join(sorted({m.name for m in models} | set(TASKS)))
    here = f" ({s!r} here is not a model file: pass ./{s}/... or a .safetensors path)" if Path(s).exists() else ""
    raise LookupError(f"unknown model {s!r}: expected a task ({', '.join(TASKS)}), a model name "
                      f"({known}) or a path to a .safetensors file{here}")


def find_context_model(task: str) -> ModelInfo | None:
    """The context model a task name stands for on a stack (the best ranked, shipped first at equal rank),
    or None when the task has none. A task name alone always means a 2-D model (`find_model`)."""
    candidates = [m for m in list_models() if m.task == task and m.config.context]
    return max(candidates, key=lambda m: (m.rank, m.source == "shipped")) if candidates else None


def load_weights(name_or_path: str | os.PathLike) -> tuple[Weights, ModelInfo]:
    """A model by task name, model name or .safetensors path as numpy arrays, checked (the tensors against the
    architecture in its metadata, all finite), without torch. Returns ``(weights, info)``."""
    info = find_model(name_or_path)
    spec = _zblend_spec(info.metadata, info.path)
    try:
        with safe_open(str(info.path), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            _check_tensors(info.path, info.config, shapes, spec)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(f"{info.path}: cannot read tensors ({e})") from None
    _check_finite(info.path, tensors)
    return _weights(info.config, tensors, spec), info


def _zblend_spec(doc: dict, label) -> dict | None:
    """The checked ``zblend`` metadata entry of a file, or None."""
    if "zblend" not in doc:
        return None
    try:
        return check_spec(doc["zblend"], label)
    except ValueError as e:
        raise ModelFileError(str(e)) from None


def _weights(cfg: MemNetConfig, tensors: dict[str, np.ndarray], spec: dict | None) -> Weights:
    """Checked tensors as `Weights`, the second stage's apart."""
    blend = {k: v for k, v in tensors.items() if k.startswith(ZBLEND_PREFIX)}
    stage1 = {k: v for k, v in tensors.items() if not k.startswith(ZBLEND_PREFIX)}
    return Weights(cfg, stage1, zblend=ZBlend.from_tensors(spec, blend) if spec else None)


def _module(cfg: MemNetConfig, tensors: dict[str, np.ndarray], zblend: ZBlend | None = None) -> MemNet:
    """The torch MemNet of checked numpy weights, in eval mode on the CPU."""
    import torch

    from .model import MemNet

    model = MemNet(**cfg.as_dict())
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=True)
    model.zblend = zblend
    return model.eval()


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[MemNet, ModelInfo]:
    """Load a model by task name, model name or .safetensors path.

    Returns ``(model, info)``; the model is in eval mode on ``device``.
    """
    weights, info = load_weights(name_or_path)
    return _module(info.config, weights.tensors, weights.zblend).to(device), info


def model_bytes(model: MemNet, info: ModelInfo | None) -> bytes:
    """A model as .safetensors bytes (its file, or the module serialised): what is shipped to workers."""
    if info is not None:
        return info.path.read_bytes()
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_VERSION, "name": "module", "task": "denoise", "config": model.config.as_dict(),
            "normalization": {"mode": "natural"}}
    if model.zblend is not None:
        import torch

        meta["zblend"] = model.zblend.spec
        tensors.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.zblend.prefixed().items()})
    return save(tensors, metadata={_META_KEY: json.dumps(meta)})


def load_model_bytes(data: bytes, device: str | torch.device = "cpu") -> MemNet:
    """Load a model from .safetensors bytes (header parsed as JSON, tensors as raw data: no pickle)."""
    weights = load_weights_bytes(data)
    return _module(weights.config, weights.tensors, weights.zblend).to(device)


def load_weights_bytes(data: bytes) -> Weights:
    """A model's numpy `Weights` from .safetensors bytes, checked as `load_weights` checks a file; no torch."""
    from safetensors.numpy import load

    if len(data) < 8:
        raise ModelFileError("model bytes: truncated")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8: 8 + n])
        doc = json.loads(header["__metadata__"][_META_KEY])
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except Exception as e:
        raise ModelFileError(f"model bytes: not a napari-memnet .safetensors payload ({e})") from None
    cfg = _config_from(doc, "model bytes")
    spec = _zblend_spec(doc, "model bytes")
    _check_tensors("model bytes", cfg, shapes, spec)
    tensors = load(data)
    _check_finite("model bytes", tensors)
    return _weights(cfg, tensors, spec)


def describe(info: ModelInfo) -> dict:
    """One row of `memnet models`."""
    cfg = info.config
    return {
        "name": info.name,
        "task": info.task,
        "arch": f"M{cfg.blocks}R{cfg.recursions}C{cfg.channels}" + (f" {cfg.planes} planes" if cfg.context else "")
        + (" + Z-blend" if "zblend" in info.metadata else ""),
        "size": f"{info.size_bytes / 1e6:.1f} MB",
        "MAC/px": f"{info.macs_per_pixel / 1e6:.2f} M",
        "radius": str(info.receptive_field),
        "validation": _short_metrics(info.metrics),
        "source": info.source,
    }


def _short_metrics(metrics: dict) -> str:
    if not metrics:
        return "-"
    items = []
    for k, v in metrics.items():
        items.append(f"{k} {v:.2f}" if isinstance(v, (int, float)) else f"{k} {v}")
    return "; ".join(items)
