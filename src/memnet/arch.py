"""MemNet's architecture without torch: its config, its costs, the tensors a weights file holds, and the
weights as numpy arrays (`Weights`). What the CPU restore path on ONNX Runtime needs to read a model, check
it and build its graph, so that path never imports torch (~220 MB and ~3 s); `memnet.model` builds the torch
module from the same config."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["CONFIGS", "MemNetConfig", "Weights", "feature_bytes_per_pixel", "macs_per_pixel", "parse_arch",
           "receptive_field", "state_shapes"]


@dataclass(frozen=True)
class MemNetConfig:
    """MemNet's architecture: M memory blocks of R recursions, C feature channels, input and output channels, and for a
    context model the planes it sees on each side."""

    blocks: int = 6
    recursions: int = 6
    channels: int = 64
    in_channels: int = 1
    out_channels: int = 1
    # Planes on each side of the restored one that a context model sees (along Z, or T): its input is
    # 2 * context + 1 planes of in_channels each, its output the centre plane. 0: a 2-D model.
    context: int = 0

    def as_dict(self) -> dict:
        """The config for a weights file's metadata (``context`` only for a context model, so older readers load 2-D
        ones)."""
        d = asdict(self)
        if not d["context"]:  # a 2-D model's record stays as before context models (older readers load it)
            del d["context"]
        return d

    @property
    def planes(self) -> int:
        """Input planes per output plane: 1 for a 2-D model, 2k+1 for a context model."""
        return 2 * self.context + 1


# Named configurations. Costs are multiply-adds per output pixel (see macs_per_pixel).
CONFIGS: dict[str, MemNetConfig] = {
    # The paper's two models.
    "M6R6C64": MemNetConfig(6, 6, 64),  # 80 layers, ~2.89 M MAC/px
    "M10R10C64": MemNetConfig(10, 10, 64),  # 212 layers, ~8.0 M MAC/px
    # CPU-sized models: same architecture, fewer blocks/channels.
    "M4R4C48": MemNetConfig(4, 4, 48),  # 38 layers, ~0.73 M MAC/px
    "M4R4C32": MemNetConfig(4, 4, 32),  # 38 layers, ~0.32 M MAC/px
    "M3R3C32": MemNetConfig(3, 3, 32),  # 23 layers, ~0.18 M MAC/px
}


def parse_arch(arch: str) -> MemNetConfig:
    """A named configuration (``M4R4C32``) or any ``MxRyCz``."""
    if arch in CONFIGS:
        return CONFIGS[arch]
    m = re.fullmatch(r"M(\d+)R(\d+)C(\d+)", arch)
    if not m or min(int(g) for g in m.groups()) < 1:
        raise ValueError(f"unknown architecture {arch!r}: one of {', '.join(CONFIGS)} or MxRyCz (e.g. M4R4C48)")
    return MemNetConfig(int(m[1]), int(m[2]), int(m[3]))


def receptive_field(model) -> int:
    """Receptive-field radius in pixels of a MemNet (or its config, or its `Weights`): one pixel per 3x3 conv on
    the longest path (FENet + 2 per recursion + reconstruction); 1x1 gates add nothing."""
    cfg = model if isinstance(model, MemNetConfig) else getattr(model, "config", None)
    if not isinstance(cfg, MemNetConfig):
        raise TypeError(f"receptive_field needs a memnet.MemNet, got {type(model).__name__}")
    return 2 + 2 * cfg.blocks * cfg.recursions


def feature_bytes_per_pixel(config: MemNetConfig) -> int:
    """fp32 bytes of the feature maps alive at once in a forward pass, per pixel: the long-term list
    (M+1 maps), the short-term one (R) and a few temporaries. Sizes batches, tiles and ONNX Runtime's arena."""
    return (config.blocks + config.recursions + 6) * config.channels * 4


def macs_per_pixel(config: MemNetConfig) -> int:
    """Multiply-adds per output pixel (shared convs count once per application)."""
    c, m_, r = config.channels, config.blocks, config.recursions
    fenet = config.in_channels * config.planes * c * 9
    recursions = m_ * r * 2 * c * c * 9
    gates = sum((m + r) * c * c for m in range(1, m_ + 1))
    recon = m_ * c * config.out_channels * 9
    return fenet + recursions + gates + recon


def state_shapes(config: MemNetConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor of a MemNet's state dict (what its weights file holds), from the
    config alone (tests check it against `memnet.MemNet`)."""
    c, r, planes = config.channels, config.recursions, config.in_channels * config.planes
    out: dict[str, tuple[int, ...]] = {}

    def bn(name: str, n: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.{k}"] = (n,)
        out[f"{name}.num_batches_tracked"] = ()

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    bn("fenet.bn", planes)
    conv("fenet.conv", c, planes, 3)
    for m in range(config.blocks):
        p = f"blocks.{m}"
        conv(f"{p}.conv_a", c, c, 3)
        conv(f"{p}.conv_b", c, c, 3)
        for i in range(r):
            bn(f"{p}.bn_a.{i}", c)
            bn(f"{p}.bn_b.{i}", c)
        bn(f"{p}.gate.bn", (m + 1 + r) * c)
        conv(f"{p}.gate.conv", c, (m + 1 + r) * c, 1)
    conv("recon_conv", config.out_channels, c, 3)
    for m in range(config.blocks):
        bn(f"recon_bn.{m}", c)
    out["branch_weights"] = (config.blocks,)
    return out


@dataclass(eq=False)
class Weights:
    """A trained MemNet as numpy arrays (its state dict, read from a .safetensors file without torch) and its
    config: what the CPU path on ONNX Runtime runs (`memnet.ortgraph`)."""

    config: MemNetConfig
    tensors: dict[str, np.ndarray] = field(repr=False)
    zblend: object = field(default=None, repr=False)  # a context model's second stage (`zblend.ZBlend`), or None
    _digest: str | None = field(default=None, repr=False)

    def digest(self) -> str:
        """SHA-256 of the tensors (names and values), equal to `memnet.model.weights_digest` of the same model."""
        if self._digest is None:
            h = hashlib.sha256()
            for k, v in sorted(self.tensors.items()):
                h.update(k.encode())
                h.update(np.ascontiguousarray(v).tobytes())
            if self.zblend is not None:
                h.update(self.zblend.digest().encode())
            self._digest = h.hexdigest()
        return self._digest
