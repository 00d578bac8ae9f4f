"""Training options: every knob of ``memnet train``, with its one default, checked once on construction
(`memnet.finetune_modes.FinetuneConfig` does the same for ``memnet finetune``, beside the modes it names).

As `memnet.options.RestoreOptions` for restores: the CLI reads its defaults from here (`default`), the
training record stores ``asdict`` of it. Standard library only, so ``memnet --help`` needs no torch.

Vocabulary shared with restore: ``batch_size`` (patches per step here, tiles per forward pass there) and
``amp`` (`memnet.options.AMP`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .options import check_amp

__all__ = ["DEFAULT_MINUTES", "LOSSES", "NOISE_MODELS", "OPTIMIZERS", "SAMPLERS", "TASKS",
           "TrainConfig", "Z_MARGIN", "choice", "default", "int_at_least"]

TASKS = ("denoise", "sr", "jpeg", "microscopy")
OPTIMIZERS = ("adam", "sgd")  # adam: Adam + cosine (default); sgd: the paper's recipe
LOSSES = ("mse", "psnr")
# Synthetic noise for microscopy: the original narrow Poisson-Gaussian model, or "camera": the wide-range
# fluorescence camera model (see memnet.degrade.camera_noise).
NOISE_MODELS = ("poisson_gaussian", "camera", "camera-correlated")  # the last: 30 % with correlated noise
SAMPLERS = ("auto", "numpy", "device")  # where batches are made; auto: on the device for denoise on CUDA
DEFAULT_ARCH = "M4R4C32"  # CPU-sized: see training/README.md
DEFAULT_MINUTES = 5.0  # a fine-tune's CPU default: a few hundred steps of an M4R4C32 on 2 cores
Z_MARGIN = 2.0  # publish a fine-tune when mean gain - Z_MARGIN * its standard error > 0 (~97.5 % one-sided)
MIN_GAIN_DB = 1e-3  # and the gain above this (a mode for correlated noise sets a higher floor: Mode.min_gain_db)


def default(cls, name: str):
    """The default of field ``name`` of a dataclass (what the CLI shows and uses)."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``lr=None`` becomes the optimizer's default (1e-3 adam, 0.1 sgd); ``sigma`` ranges
    are normalised to pairs of floats."""

    task: str
    out: str
    data: tuple[str, ...] = ()  # folders of clean images
    pairs: tuple[str, ...] = ()  # (NOISY_DIR, CLEAN_DIR) (microscopy)
    include: str | None = None  # regex on file names
    val_root: str | None = None  # ../shared/data: validate with the published conventions
    arch: str | None = None  # default: DEFAULT_ARCH, or the init model's (a wider one grows it)
    patch: int = 48
    batch_size: int = 32  # patches per step
    steps: int = 20000
    hours: float | None = None  # stop (and checkpoint) after this much wall time
    lr: float | None = None  # default: 1e-3 for adam, 0.1 (the paper's) for sgd
    optimizer: str = "adam"
    val_every: int = 500
    log_every: int = 50
    seed: int = 0
    device: str = "auto"  # auto: CUDA, then MPS, then CPU
    threads: int | None = None
    amp: str = "auto"  # memnet.options.AMP: auto = on for CUDA and native-bf16 CPUs; on = bf16 on any CPU
    init: str | None = None  # start from these weights (e.g. the shipped model)
    bn_batches: int = 50  # batches that re-estimate BN statistics before each validation (0: off)
    warmup: int = 0  # linear lr warm-up steps (adam): spares trained weights the first big Adam steps
    loss: str = "mse"  # "mse" (the paper's) or "psnr" (mean log MSE per patch: balances noise levels)
    name: str | None = None
    sampler: str = "auto"
    sigma: tuple[tuple[float, float], ...] | None = None  # denoise: sigma ranges (0-255); None: 0-75
    noise: str = "poisson_gaussian"  # microscopy synthetic noise (NOISE_MODELS)

    def __post_init__(self):
        set_ = object.__setattr__
        choice("task", self.task, TASKS)
        for name in ("data", "pairs"):
            v = getattr(self, name)
            if isinstance(v, str) or not all(isinstance(p, str) for p in v):
                raise TypeError(f"{name} must be a list of folder paths, got {v!r}")
            set_(self, name, tuple(v))
        if self.pairs and len(self.pairs) != 2:
            raise ValueError("pairs needs two folders: NOISY_DIR CLEAN_DIR")
        for name, low in (("patch", 8), ("batch_size", 1), ("steps", 1), ("val_every", 1), ("log_every", 1)):
            int_at_least(name, getattr(self, name), low)
        int_at_least("bn_batches", self.bn_batches, 0)
        if self.threads is not None:
            int_at_least("threads", self.threads, 1)
        for name in ("hours", "lr"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ValueError(f"{name} must be a positive number or None, got {v!r}")
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("loss", self.loss, LOSSES)
        choice("sampler", self.sampler, SAMPLERS)
        choice("noise model", self.noise, NOISE_MODELS)
        set_(self, "amp", check_amp(self.amp))
        int_at_least("warmup", self.warmup, 0)
        if self.warmup >= self.steps:
            raise ValueError(f"warmup must be between 0 and steps-1 ({self.steps - 1}), got {self.warmup}")
        if self.warmup and self.optimizer != "adam":
            raise ValueError("warmup applies to the adam cosine schedule; the paper's sgd recipe has none: "
                             "drop --warmup")
        if self.sigma is not None:
            if self.task != "denoise":
                raise ValueError(f"sigma ranges apply to task denoise (Gaussian noise), not {self.task!r}: "
                                 "drop --sigma")
            set_(self, "sigma", sigma_ranges(self.sigma))
        if self.noise != "poisson_gaussian" and self.task != "microscopy":
            raise ValueError(f"--noise {self.noise} applies to task microscopy, not {self.task!r}: drop --noise")
        if self.lr is None:
            set_(self, "lr", 0.1 if self.optimizer == "sgd" else 1e-3)
        set_(self, "device", str(self.device))

    def replace(self, **kw) -> TrainConfig:
        """A copy with the given options changed, checked again."""
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        """Every option, JSON-safe (the training record)."""
        d = dataclasses.asdict(self)
        return {k: [list(r) for r in v] if k == "sigma" and v else list(v) if isinstance(v, tuple) else v
                for k, v in d.items()}


def sigma_ranges(ranges) -> tuple[tuple[float, float], ...]:
    """Validated Gaussian sigma ranges (on the 0-255 scale). Each patch picks one range at random, then
    sigma uniformly inside it: ``[(0, 75), (5, 30)]`` stays blind over 0-75 but draws half the patches
    from 5-30 (two thirds of all patches land there)."""
    if not ranges:
        return ((0.0, 75.0),)
    out = []
    for r in ranges:
        try:
            lo, hi = (float(v) for v in r)
        except (TypeError, ValueError):
            raise ValueError(f"a sigma range is two numbers LO HI on the 0-255 scale, got {r!r}") from None
        if not 0 <= lo < hi <= 255:
            raise ValueError(f"sigma range {lo:g}:{hi:g} must satisfy 0 <= LO < HI <= 255 (0-255 scale)")
        out.append((lo, hi))
    return tuple(out)


def choice(name: str, value, allowed: tuple) -> None:
    """Raise a ValueError naming ``name`` and the allowed values unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(allowed)}")


def int_at_least(name: str, value, low: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a whole number (not a bool) of at least ``low``."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or value < low:
        raise ValueError(f"{name} must be a whole number ≥ {low}, got {value!r}")

