"""MemNet (Tai, Yang, Liu, Xu, ICCV 2017), faithful to the official Caffe prototxts.

Layout of the network (M memory blocks, R recursions, C channels):

    B0  = FENet(x)                    BN -> ReLU -> 3x3 conv, in_channels -> C
    Bm  = MemoryBlock_m(B(m-1))       m = 1..M
          recursive unit: ONE residual block (BN-ReLU-conv3x3, BN-ReLU-conv3x3) applied R times;
          conv weights shared by the R recursions, each recursion has its own BNs.
          gate unit: BN -> ReLU -> 1x1 conv over concat[B0..B(m-1), H1..HR], (m+R)C -> C
    y_m = x + Recon(Bm)               Recon: BN_m -> ReLU -> 3x3 conv C -> out_channels,
                                      the conv shared by all branches, one BN per branch
    y   = sum_m w_m * y_m             learned scalar weights (multi-supervision)
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

# the architecture without torch (config, costs): defined in .arch, named here too
from .arch import CONFIGS, MemNetConfig, feature_bytes_per_pixel, macs_per_pixel, parse_arch, receptive_field

__all__ = ["MemNet", "MemNetConfig", "CONFIGS", "receptive_field", "conv_weight_count", "macs_per_pixel",
           "parse_arch", "widen", "deepen", "with_context", "feature_bytes_per_pixel", "weights_digest"]


class _PreAct(nn.Module):
    """BN -> ReLU -> Conv (pre-activation), the unit the whole network is built from."""

    def __init__(self, cin: int, cout: int, kernel: int, conv: nn.Conv2d | None = None):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = conv if conv is not None else nn.Conv2d(cin, cout, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.bn(x)))


class MemoryBlock(nn.Module):
    """One memory block: a recursive unit (one residual block applied R times, its convs shared, one BN per recursion)
    and a 1×1 gate unit over the long- and short-term memories."""

    def __init__(self, index: int, recursions: int, channels: int):
        super().__init__()
        c = channels
        self.recursions = recursions
        # The residual block's two convs, shared by every recursion.
        self.conv_a = nn.Conv2d(c, c, 3, padding=1)
        self.conv_b = nn.Conv2d(c, c, 3, padding=1)
        # One BN per conv per recursion (not shared).
        self.bn_a = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(recursions))
        self.bn_b = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(recursions))
        self.gate = _PreAct((index + recursions) * c, c, 1)

    def forward(self, long_term: list[torch.Tensor]) -> torch.Tensor:
        """The block's output from ``long_term``, the outputs of FENet and of the blocks before it."""
        h = long_term[-1]
        short_term = []
        for r in range(self.recursions):
            t = self.conv_a(torch.relu(self.bn_a[r](h)))
            t = self.conv_b(torch.relu(self.bn_b[r](t)))
            h = h + t
            short_term.append(h)
        return self.gate(torch.cat(long_term + short_term, dim=1))


class MemNet(nn.Module):
    """MemNet. ``forward(x)`` returns the final output; ``forward(x, branches=True)`` returns
    ``(final, [y_1, ..., y_M])`` for the multi-supervised loss."""

    def __init__(
        self,
        blocks: int = 6,
        recursions: int = 6,
        channels: int = 64,
        in_channels: int = 1,
        out_channels: int = 1,
        context: int = 0,
    ):
        super().__init__()
        for name, v in (("blocks", blocks), ("recursions", recursions), ("channels", channels),
                        ("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MemNet {name} must be a positive integer, got {v!r}")
        if not isinstance(context, int) or isinstance(context, bool) or context < 0:
            raise ValueError(f"MemNet context must be an integer ≥ 0 (planes on each side), got {context!r}")
        if in_channels != out_channels:
            raise ValueError(
                f"MemNet's global residual (y = x + recon) needs in_channels == out_channels, "
                f"got {in_channels} and {out_channels}"
            )
        self.config = MemNetConfig(blocks, recursions, channels, in_channels, out_channels, context)
        # A context model's first layer sees the 2k+1 planes as channels; the residual is the centre plane.
        self.fenet = _PreAct(in_channels * self.config.planes, channels, 3)
        self.blocks = nn.ModuleList(MemoryBlock(m, recursions, channels) for m in range(1, blocks + 1))
        self.recon_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.recon_bn = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(blocks))
        self.branch_weights = nn.Parameter(torch.full((blocks,), 1.0 / blocks))
        # A context model's optional second stage (`zblend.ZBlend`, numpy, not a submodule: training never
        # touches it); the engine runs it on this model's outputs of neighbouring planes.
        self.zblend = None
        self._init_weights()

    def _init_weights(self) -> None:
        if self.recon_conv.weight.is_meta:  # shapes only (zoo checks a file's tensors): normal_ on the meta
            return                          # device would import torch._dynamo, ~5 s on a model's first load
        # MSRA init as in the prototxts; zero biases.
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(mod.bias)
        # Two init choices (the architecture is unchanged) that make training start from the identity
        # instead of from noise: the reconstruction conv starts at zero, so every branch output is
        # the input; and the input BN starts with a +3 shift, so its ReLU passes (nearly) every pixel
        # rather than hiding all below-mean intensities from the network.
        nn.init.zeros_(self.recon_conv.weight)
        nn.init.constant_(self.fenet.bn.bias, 3.0)

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """The restored plane of an input (N, planes * in_channels, H, W): the global residual's term."""
        k, c = self.config.context, self.config.in_channels
        return x[:, k * c: (k + 1) * c] if k else x

    def forward(self, x: torch.Tensor, branches: bool = False):
        """The restored image; with ``branches``, (final, [each memory block's output]) for the
        multi-supervised loss."""
        long_term = [self.fenet(x)]
        outputs = []
        final = None
        base = self.centre(x)
        for m, block in enumerate(self.blocks):
            b = block(long_term)
            long_term.append(b)
            y_m = base + self.recon_conv(torch.relu(self.recon_bn[m](b)))
            contrib = self.branch_weights[m] * y_m
            final = contrib if final is None else final + contrib
            if branches:
                outputs.append(y_m)
        if branches:
            return final, outputs
        return final

    @property
    def depth(self) -> int:
        """Number of conv layers on the longest path, as the paper counts: 2 + M(2R+1)."""
        c = self.config
        return 2 + c.blocks * (2 * c.recursions + 1)


@torch.no_grad()
def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's tensors (names and values): the identity of its weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    if getattr(model, "zblend", None) is not None:
        h.update(model.zblend.digest().encode())
    return h.hexdigest()


def conv_weight_count(model: nn.Module) -> int:
    """Conv weights only (no biases, no BN, no branch weights); shared weights counted once."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))


@torch.no_grad()
def widen(model: MemNet, channels: int, seed: int = 0) -> MemNet:
    """A copy of ``model`` with ``channels`` feature channels that computes exactly the same function.

    Every C-wide feature map gets new channels after the old ones. Weights from old to new channels
    (and between new ones) are freshly initialised, weights from new channels into old ones are zero,
    so the old channels, and hence the output, are unchanged, in training and in eval mode (BN is per
    channel). The zero weights receive gradients from the first step, so training can use the extra
    capacity while starting from the trained model instead of from noise."""
    c0 = model.config.channels
    if not isinstance(channels, int) or channels < c0:
        raise ValueError(f"widen: channels must be an integer >= the model's {c0}, got {channels!r}")
    cfg = model.config
    with torch.random.fork_rng(devices=[]):  # seeded fresh weights without touching the caller's RNG
        torch.manual_seed(seed)
        new = MemNet(cfg.blocks, cfg.recursions, channels, cfg.in_channels, cfg.out_channels, cfg.context)
    new = new.to(next(model.parameters()).device)
    old_sd, new_sd = model.state_dict(), new.state_dict()

    def index(n_old: int, n_new: int) -> torch.Tensor:
        """Where the old channels of an n_old-wide tensor sit in the n_new-wide one (concats of C-wide maps
        keep their order: piece i moves from i*c0 to i*channels)."""
        if n_old == n_new:
            return torch.arange(n_old)
        pieces = n_old // c0
        return torch.cat([torch.arange(c0) + i * channels for i in range(pieces)])

    for key, old in old_sd.items():
        dst = new_sd[key]
        if old.shape == dst.shape:
            dst.copy_(old)
            continue
        if old.dim() == 4:  # conv weight [out, in, k, k]
            o, i = index(old.shape[0], dst.shape[0]), index(old.shape[1], dst.shape[1])
            dst[o] = 0.0  # new inputs -> old outputs start at zero; new outputs keep their fresh init
            dst[o[:, None], i[None, :]] = old
        else:  # conv bias, BN weight/bias/running stats: per channel
            dst[index(old.shape[0], dst.shape[0])] = old
    new.load_state_dict(new_sd)
    new.train(model.training)
    return new


@torch.no_grad()
def deepen(model: MemNet, blocks: int, recursions: int, seed: int = 0) -> MemNet:
    """A copy of ``model`` with more memory blocks and/or recursions that computes exactly the same
    function (grows M4R4C64 into the paper's M6R6C64 from trained weights).

    New recursions append their short-term states at the end of each gate's input: their gate weights
    start at zero. New blocks append branches whose multi-supervision weight starts at zero. Everything
    else is copied; the new parts are freshly initialised and get gradients from the first step (the
    multi-supervised loss trains every branch output, the zero weights included)."""
    cfg = model.config
    for name, v, have in (("blocks", blocks, cfg.blocks), ("recursions", recursions, cfg.recursions)):
        if not isinstance(v, int) or v < have:
            raise ValueError(f"deepen: {name} must be an integer >= the model's {have}, got {v!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = MemNet(blocks, recursions, cfg.channels, cfg.in_channels, cfg.out_channels, cfg.context)
    new = new.to(next(model.parameters()).device)
    old_sd, new_sd = model.state_dict(), new.state_dict()
    c, r0 = cfg.channels, cfg.recursions
    for key, old in old_sd.items():
        dst = new_sd[key]
        if key.endswith("gate.conv.weight"):  # [C, (m + R) C, 1, 1]: long-term maps, then H1..HR
            m = old.shape[1] // c - r0
            dst.zero_()
            dst[:, : (m + r0) * c] = old
        elif ".gate.bn." in key and old.dim() == 1:  # BN over the gate's input: old channels first
            dst[: old.shape[0]] = old
        elif key == "branch_weights":
            dst.zero_()
            dst[: old.shape[0]] = old
        else:
            dst.copy_(old)
    new.load_state_dict(new_sd)
    new.train(model.training)
    return new


@torch.no_grad()
def with_context(model: MemNet, context: int) -> MemNet:
    """A context model (2 * ``context`` + 1 input planes) that computes exactly ``model``'s function: a 2-D
    model's first-layer weights and statistics go to the centre plane, a context model's to its planes (the
    same distance from the centre); the new planes' weights are zero. Training starts from ``model`` and
    learns what the new planes add (gradients reach the zero weights from the first step)."""
    cfg = model.config
    if not isinstance(context, int) or isinstance(context, bool) or context < max(1, cfg.context):
        raise ValueError(f"with_context: context must be an integer ≥ {max(1, cfg.context)} (planes on each side; "
                         f"this model sees {cfg.planes}), got {context!r}")
    new = MemNet(cfg.blocks, cfg.recursions, cfg.channels, cfg.in_channels, cfg.out_channels, context)
    new = new.to(next(model.parameters()).device)
    sd, c = new.state_dict(), cfg.in_channels
    lo, hi = (context - cfg.context) * c, (context + cfg.context + 1) * c  # the old planes among the new
    for key, old in model.state_dict().items():
        dst = sd[key]
        if key.startswith("fenet.bn.") and old.dim() == 1:  # per input channel: a new plane as the centre
            centre = old[cfg.context * c: (cfg.context + 1) * c]
            dst.copy_(centre.repeat(2 * context + 1))
            dst[lo:hi] = old
        elif key == "fenet.conv.weight":  # [C, planes * c, 3, 3]
            dst.zero_()
            dst[:, lo:hi] = old
        else:
            dst.copy_(old)
    new.load_state_dict(sd)
    new.train(model.training)
    return new


def self_ensemble(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Geometric self-ensemble: the mean of ``model`` over the 8 flips/rotations of ``x`` (N, C, H, W),
    each mapped back. 8x the compute for a small, free quality gain (measured in docs/models.md).
    Every member of a tile equals that member of the whole image cropped (the receptive field is
    symmetric), so tiled self-ensemble is as exact as plain tiled inference."""
    acc = None
    for k in range(4):
        for flip in (False, True):
            t = torch.rot90(x, k, (2, 3))
            if flip:
                t = torch.flip(t, (3,))
            y = model(t)
            if flip:
                y = torch.flip(y, (3,))
            y = torch.rot90(y, -k, (2, 3)).float()
            acc = y if acc is None else acc + y
    return acc / 8
