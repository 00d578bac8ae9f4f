"""Fine-tuning modes: one small object each, read by the fit loop, the CLI and the widget.

A mode says what data it needs, turns normalised planes into (input, target) training items, turns a
sampled batch into what the network sees, and gives the loss. Its ``criterion`` says how a held-out part
of the user's data judges a model: ``"target"`` (PSNR against the held-out clean or second noisy view)
or ``"subsample"`` (noisy data alone: predict one neighbour sub-image from the other, see
``subsample_pairs``). The same criterion scores the starting model, so a fine-tune is published only when
it beats the model it started from on the user's own data.

To add a mode: subclass ``Mode``, register it with ``@register``, add its test.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .options import check_amp, check_bool
from .runtime import deferred_module
from .train_options import DEFAULT_MINUTES, MIN_GAIN_DB, Z_MARGIN, choice, int_at_least

# torch loads on first use: `memnet --help` lists the modes (and their help) without it.
torch = deferred_module("torch")
F = deferred_module("torch.nn.functional")

__all__ = ["AUTO", "FinetuneConfig", "MAX_EXCESS_CORRELATION", "MODES", "Mode", "STRONG_EXCESS_CORRELATION",
           "blind_spot", "fit_noise_model", "get_mode", "neighbour_correlation", "register", "self_supervised_modes",
           "strided_pairs", "struct_blind_spot", "subsample_pairs"]

# Sub-sampling and blind-spot modes assume the noise of neighbouring pixels is independent. Where it is
# not, they learn the correlated part of the noise as signal, and their own held-out score (from the
# same neighbours) rises while the image gets worse. The check: the neighbour correlation of the
# starting model's residual, minus the same for white noise of the same local strength run through the
# same model (a denoiser's residual of white noise is itself slightly anti-correlated), per axis. Measured
# with the shipped model: |excess| ≤ 0.008 on W2S 031-039 and ≤ 0.020 on the six 3D-RCAN crops; 0.052-0.056
# on ACsN and the two FMD images, exactly where nbr2nbr lost 0.26-0.51 dB with a rising held-out score.
MAX_EXCESS_CORRELATION = 0.03
# Beyond this excess correlation (a residual's lag-1 correlation above white noise's) `auto` trains structured
# blind spots; between the two thresholds, plain blind spots judged at full resolution (``n2v-corr``). Set on
# few images: the real microscopes here measured |excess| 0.04-0.06 (n2v-corr gained there, structn2v lost
# 0.3-0.4 dB), synthetic 3x3-blurred noise 0.30 (structn2v +4.4 dB, plain blind spots -0.1).
STRONG_EXCESS_CORRELATION = 0.15
MAX_LAG = 4  # the longest correlation the structured blind spot masks (a (2*4+1)^2 block)

AUTO = "auto"  # not a mode: nbr2nbr, or n2v-corr / structn2v where the noise check finds weak / strong correlation

MODES: dict[str, Mode] = {}


def register(cls):
    """Class decorator: add an instance of the mode to ``MODES`` under its ``name``."""
    MODES[cls.name] = cls()
    return cls


def get_mode(name: str) -> Mode:
    """The registered mode called ``name``; a ValueError listing the modes for any other."""
    if name not in MODES:
        raise ValueError(f"unknown fine-tuning mode {name!r}: expected one of {', '.join(MODES)}")
    return MODES[name]


def self_supervised_modes() -> list[str]:
    """Modes that learn from the noisy data alone (what the widget offers first)."""
    return [n for n, m in MODES.items() if m.needs is None]


class Mode:
    """A fine-tuning mode, the base class: a mode sets the attributes and overrides the methods that differ, and is
    added with ``@register``."""

    name = ""
    help = ""
    needs: str | None = None  # None (the noisy data alone), "target" (clean images) or "noisy2"
    takes_target = False  # clean images (--target) are used, required or not
    criterion = "subsample"
    stack_pairs = False  # items are neighbouring planes of the user's stacks
    patch_scale = 1  # training patches are this many times --patch (sub-sampling modes halve them)
    pixel_independent = False  # needs noise independent between neighbouring pixels (checked first)
    lr = 3e-5  # the learning rate when none is given: low, to adapt what the pretrained model knows
    # What decides publication when not the criterion itself: "blindspot" (the whole model, some pixels
    # blinded); the check beside it (`check`) can only veto.
    decide_by: str | None = None
    # What is published: the starting weights moved this fraction of the way to the fine-tuned ones. A noisy
    # criterion cannot see a loss of a few hundredths of a dB; half way keeps most of a gain and turns most
    # such losses into gains (training/README.md, session 18). "auto": 0.5, or 0.75 where the held-out check at
    # full resolution rates it clearly higher (session 23; 0.5 where the mode has no check). Clean targets see
    # the real change: all the way.
    interpolate: float | str = "auto"
    # Where the fine-tuned weights come from: "average", the mean of the iterates over the second half of the run
    # (every `memnet.finetune.AVERAGE_EVERY` steps), or "best", the checkpoint the held-out score chose. With the
    # whole budget used, the average moved half way gained more than the noisy score's best checkpoint
    # (training/README.md, session 22). Clean targets score the real error: their best checkpoint.
    weights = "average"
    # The smallest held-out gain (dB) that publishes, besides the standard-error test: a held-out score carries
    # the bias of its criterion, which is ~0 where the noise is independent between pixels.
    min_gain_db = MIN_GAIN_DB

    @property
    def check(self) -> str | None:
        """The second held-out criterion, which vetoes a clear loss: "blindspot" for the sub-sampling criterion
        (half resolution), "strided" for a blind-spot decision, None otherwise."""
        if self.decide_by == "blindspot":
            return "strided"
        return "blindspot" if self.criterion == "subsample" else None

    @property
    def held_out_scale(self) -> int:
        """Held-out bands and crops are this many times --patch (a sub-sampling criterion shrinks them)."""
        return 1 if self.criterion == "target" else 2

    def items(self, planes: list[np.ndarray], others: list[np.ndarray] | None, ctx) -> list[tuple]:
        """(input, target) arrays the sampler crops patches from."""
        return [(p, p) for p in planes]

    def batch(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, ctx):
        """What the network is trained on: (input, target, extra), from a sampled (input, target) batch."""
        return x, y, None

    def loss(self, model, mp, x, y, extra) -> torch.Tensor:
        """The training loss: the multi-supervised loss of the network's final and branch outputs against ``y``
        (``extra`` unused here)."""
        from .fitloop import multi_supervised_loss

        final, branches = mp.forward(model, x)
        return multi_supervised_loss(final, branches, y)

    def held_out(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, draws: int) -> list[tuple]:
        """How held-out crops (input, target) score a model: (network input, target, mask or None) per
        draw; the per-crop error is the mean squared error over the draws (where the mask is 1)."""
        if self.criterion == "subsample":
            # One neighbour sub-image predicts the other: their noises are independent, so the noise of
            # the target only adds a constant to the error, the same for every model.
            return [subsample_pairs(x, rng)[:2] + (None,) for _ in range(draws)]
        return [(x, y, None)]


@register
class Paired(Mode):
    name = "paired"
    help = "noisy images with clean references of the same fields"
    needs = "target"
    takes_target = True
    criterion = "target"
    interpolate = 1.0
    weights = "best"

    def items(self, planes, others, ctx):
        from .trainset import paired_target_frame

        # The clean target in the noisy plane's intensity frame (see paired_target_frame).
        return [paired_target_frame(p, q) for p, q in zip(planes, others)]


@register
class N2N(Mode):
    name = "n2n"
    help = "two independent noisy acquisitions of the same fields (Noise2Noise)"
    needs = "noisy2"
    criterion = "target"
    weights = "best"

    def items(self, planes, others, ctx):
        # No affine fit between two noisy images: noise on both sides of the fit shrinks the gain.
        return list(zip(planes, others))

    def batch(self, x, y, rng, ctx):
        return (y, x, None) if rng.random() < 0.5 else (x, y, None)


@register
class Adjacent(N2N):
    name = "adjacent"
    help = ("a stack alone: neighbouring planes (Z, else T) as the two noisy views (Noise2Noise without a "
            "second acquisition; for stacks whose planes change little from one to the next)")
    needs = None
    criterion = "target"
    stack_pairs = True


@register
class Nbr2Nbr(Mode):
    name = "nbr2nbr"
    help = ("the noisy data alone: two sub-images from neighbouring pixels of each 2x2 cell predict each "
            "other (Neighbor2Neighbor); keeps the centre pixel, so it refines a pretrained model instead "
            "of blinding it")
    # Weight of Neighbor2Neighbor's consistency term against the full-resolution output (Huang et al., CVPR 2021).
    # 0 because, fine-tuning a pretrained model for minutes, every lower weight did better (2 < 1 < 1/2 < 0 on six
    # images) and skipping the term's 4x-pixel forward buys ~1.6-2.7x the steps: training/README.md, session 21.
    gamma = 0.0
    patch_scale = 2
    pixel_independent = True

    def batch(self, x, y, rng, ctx):
        g1, g2, idx = subsample_pairs(x, rng)
        return g1, g2, (x, idx)

    def loss(self, model, mp, x, y, extra):
        from .fitloop import multi_supervised_loss

        full, idx = extra
        final, branches = mp.forward(model, x)
        if not self.gamma:
            return multi_supervised_loss(final, branches, y)
        with torch.no_grad():
            was = model.training
            model.eval()
            with mp.autocast():  # the step's precision: in fp32 this forward of 4x the pixels costs most of a step
                f1, f2 = _gather(model(full.to(x.device)).float(), idx)
            model.train(was)
        return multi_supervised_loss(final, branches, y) + self.gamma * torch.mean((final - y - (f1 - f2)) ** 2)


@register
class N2V(Mode):
    name = "n2v"
    help = "the noisy data alone, blind-spot masking (Noise2Void: masked pixels replaced by a random neighbour)"
    fraction = 0.015
    pixel_independent = True

    def batch(self, x, y, rng, ctx):
        xi, mask = blind_spot(x, self.fraction, rng, "random")
        return xi, y, mask

    def loss(self, model, mp, x, y, mask):
        final, branches = mp.forward(model, x)
        mask = mask.to(final.device)
        outs = branches + [final]
        return sum(((o - y) ** 2 * mask).sum() / mask.sum() for o in outs) / len(outs)


@register
class N2V2(N2V):
    name = "n2v2"
    help = ("the noisy data alone, blind-spot masking with the N2V2 fix against checkerboard artefacts: "
            "masked pixels replaced by the median of their 5x5 neighbourhood without the pixel itself")
    fraction = 0.005

    def batch(self, x, y, rng, ctx):
        xi, mask = blind_spot(x, self.fraction, rng, "median")
        return xi, y, mask


@register
class StructN2V(N2V):
    name = "structn2v"
    help = ("the noisy data alone, for noise correlated between neighbouring pixels (confocal and resonant "
            "scanners, sCMOS, processed images): each masked pixel hides a block around it as wide as the "
            "correlation the noise check measured (structured blind spot, as structN2V), so the network "
            "cannot learn the noise from its neighbours; chosen by --mode auto when the check finds it")
    fraction = 0.003  # masked centres per pixel; each hides a (2r+1)^2 block
    extent = 1  # r: the correlation length in pixels (set from the noise check)
    criterion = "strided"
    min_gain_db = 0.2  # carried over from n2v-corr (measured there, on ACsN), untested for structn2v itself

    def batch(self, x, y, rng, ctx):
        xi, mask = struct_blind_spot(x, self.extent, self.fraction, rng)
        return xi, y, mask

    @property
    def held_out_scale(self) -> int:
        return 2 * (self.extent + 1)

    def held_out(self, x, y, rng, draws):
        # Not the masked pixels (a model trained on masks learns the masks themselves, and that score rose
        # while fmd_bpae_r lost 0.28 dB): the full model on a grid extent+1 apart.
        return strided_pairs(x, self.extent + 1, rng, draws)


@register
class N2VCorr(N2V):
    name = "n2v-corr"
    help = ("the noisy data alone, for mildly correlated noise (confocal scanners, sCMOS, resampled images): "
            "blind spots as n2v at a higher learning rate, published only when the whole model, some pixels "
            "blinded, gains clearly and pixels 3 apart (whose noise is nearly independent) do not say it lost; "
            "chosen by --mode auto when the check finds weak correlation (structn2v for strong)")
    pixel_independent = False
    # 1e-4: +0.72 to +0.83 dB on the FMD images in 2 minutes; 3e-4 learned the noise (ACsN -0.25 dB). 3e-5 did as
    # well on the three correlated OOD images (training/README.md, session 16) but is not yet checked elsewhere.
    lr = 1e-4
    decide_by = "blindspot"
    # On ACsN, five runs' held-out gains (-0.24 to +0.11 dB) did not track the real change (-0.09 to +0.86), while
    # the FMD images' +0.40 to +0.66 did (training/README.md, session 20): under 0.2 dB is not evidence here.
    min_gain_db = 0.2


@register
class Synthetic(Mode):
    name = "synthetic"
    help = ("a Poisson-Gaussian noise model fitted on the noisy data against the starting model's output; "
            "trains on that output (or on given clean images) with calibrated noise added")
    takes_target = True  # optional: clean images of the same kind, any fields

    def items(self, planes, others, ctx):
        pred = ctx.predictions(planes)
        a, b = fit_noise_model(np.concatenate([p.ravel() for p in planes]), np.concatenate([q.ravel() for q in pred]))
        ctx.log(f"noise model: variance = {a:.4g}·signal + {b:.4g} (normalised units)")
        ctx.noise_model = (a, b)
        ctx.record["noise_model"] = {"variance": "a*signal + b (normalised units)", "a": a, "b": b}
        return [(q, q) for q in (others if others is not None else pred)]

    def batch(self, x, y, rng, ctx):
        a, b = ctx.noise_model
        var = np.clip(a * y.numpy(), 0, None) + b
        return y + torch.from_numpy((rng.standard_normal(y.shape) * np.sqrt(var)).astype(np.float32)), y, None


# The order the CLI lists and the widget offers: single-image self-supervised modes first, best first.
MODES.update({n: MODES.pop(n) for n in ("nbr2nbr", "n2v2", "n2v", "n2v-corr", "structn2v", "adjacent", "synthetic",
                                         "paired", "n2n")})


def fit_noise_model(noisy: np.ndarray, signal: np.ndarray, bins: int = 32) -> tuple[float, float]:
    """Fit var(noisy - signal) = a·signal + b by least squares over intensity bins (robust to
    structure left in the residual because it uses the median absolute deviation per bin)."""
    s, r = signal.ravel(), (noisy - signal).ravel()
    edges = np.quantile(s, np.linspace(0.02, 0.98, bins + 1))
    xs, vs = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (s >= lo) & (s < hi)
        if m.sum() > 50:
            xs.append(s[m].mean())
            vs.append((1.4826 * np.median(np.abs(r[m] - np.median(r[m])))) ** 2)
    if len(xs) < 2:
        return 0.0, float(np.var(r))
    a, b = np.polyfit(np.array(xs), np.array(vs), 1)
    return max(float(a), 0.0), max(float(b), 1e-8)


def blind_spot(x: torch.Tensor, fraction: float, rng: np.random.Generator, replace: str = "random"):
    """Mask ~``fraction`` of the pixels of each patch: replaced by a random 5x5 neighbour (never the pixel
    itself) or by the median of the 24 neighbours. Returns the masked input and the mask."""
    b, _, h, w = x.shape
    n = max(1, int(round(fraction * h * w)))
    xi, mask = x.clone(), torch.zeros_like(x)
    xp = F.pad(x, (2, 2, 2, 2), mode="reflect") if replace == "median" else None
    for i in range(b):
        ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
        if replace == "median":
            win = torch.stack([xp[i, 0, ys + dy, xs + dx] for dy in range(5) for dx in range(5)
                               if (dy, dx) != (2, 2)])
            xi[i, 0, ys, xs] = win.median(dim=0).values
        else:
            dy, dx = rng.integers(-2, 3, n), rng.integers(-2, 3, n)
            dx[(dy == 0) & (dx == 0)] = 1  # never the pixel itself
            xi[i, 0, ys, xs] = x[i, 0, np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)]
        mask[i, 0, ys, xs] = 1.0
    return xi, mask


def struct_blind_spot(x: torch.Tensor, extent: int, fraction: float, rng: np.random.Generator):
    """Structured blind spots: ~``fraction`` of the pixels of each patch become masked centres, and the
    (2·extent+1)² block around each is replaced by pixels drawn at random from the two-pixel ring just
    outside it (whose noise, beyond the correlation length, is independent of the centre's). Returns the
    masked input and the mask of the centres (where the loss is taken)."""
    b, _, h, w = x.shape
    r = int(extent)
    n = max(1, int(round(fraction * h * w)))
    offs = np.arange(-r - 2, r + 3)
    dy, dx = np.meshgrid(offs, offs, indexing="ij")
    inside = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    block = np.stack([dy[inside], dx[inside]], 1)
    ring = np.stack([dy[~inside], dx[~inside]], 1)
    xi, mask = x.clone(), torch.zeros_like(x)
    for i in range(b):
        cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
        by, bx = cy[:, None] + block[None, :, 0], cx[:, None] + block[None, :, 1]
        pick = ring[rng.integers(0, len(ring), by.shape)]
        sy = np.clip(cy[:, None] + pick[..., 0], 0, h - 1)
        sx = np.clip(cx[:, None] + pick[..., 1], 0, w - 1)
        ok = (by >= 0) & (by < h) & (bx >= 0) & (bx < w)
        xi[i, 0, by[ok], bx[ok]] = x[i, 0, sy[ok], sx[ok]]
        mask[i, 0, cy, cx] = 1.0
    return xi, mask


_PAIRS = np.array([[0, 1], [1, 0], [2, 3], [3, 2], [0, 2], [2, 0], [1, 3], [3, 1]])  # neighbours in a 2x2 cell


def _cells(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x[:, :, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // 2, w // 2, 4)


def _gather(x: torch.Tensor, idx) -> tuple[torch.Tensor, torch.Tensor]:
    cells = _cells(x)
    i1, i2 = (i.to(x.device) for i in idx)
    return torch.gather(cells, 4, i1[..., None])[..., 0], torch.gather(cells, 4, i2[..., None])[..., 0]


def strided_pairs(x: torch.Tensor, step: int, rng: np.random.Generator, draws: int) -> list[tuple]:
    """Held-out draws on a grid ``step`` pixels apart (one random phase per draw), where one neighbour
    sub-image predicts the other (`subsample_pairs`): their noise is (nearly) independent when ``step``
    exceeds its correlation length, and what correlation is left favours a model that keeps more noise."""
    out = []
    for _ in range(draws):
        py, px = rng.integers(0, step, 2)
        out.append(subsample_pairs(x[:, :, py::step, px::step].contiguous(), rng)[:2] + (None,))
    return out


def subsample_pairs(x: torch.Tensor, rng: np.random.Generator):
    """Neighbour sub-sampling: from each 2x2 cell two different, adjacent pixels, one into each of two
    half-size images. Their signals nearly agree and their noises are independent, so predicting one from
    the other trains (and, held out, scores) a denoiser from the noisy data alone.

    ``x`` with several channels is a context model's input, the planes around a centre plane: every plane
    is sub-sampled at the same pixels (the first image), and the second image is the centre plane's other
    pixels, whose noise none of the input planes carries. Returns ``(g1, g2, idx)``, ``idx`` for one plane."""
    b, c, h, w = x.shape
    k = torch.from_numpy(rng.integers(0, len(_PAIRS), (b, 1, h // 2, w // 2)))
    pairs = torch.from_numpy(_PAIRS)
    idx = (pairs[k, 0], pairs[k, 1])
    if c == 1:
        g1, g2 = _gather(x, idx)
        return g1, g2, idx
    g1, _ = _gather(x, tuple(i.expand(b, c, -1, -1) for i in idx))
    _, g2 = _gather(x[:, c // 2: c // 2 + 1], idx)
    return g1, g2, idx


def neighbour_correlation(residuals: list[np.ndarray], lag: int = 1) -> tuple[float, float]:
    """The correlation between vertically and between horizontally neighbouring pixels (``lag`` apart) of
    the noise estimates ``residuals`` (e.g. noisy minus a denoised output), pooled over the planes: (y, x)."""
    out = []
    for axis in (0, 1):
        num = den_a = den_b = 0.0
        for r in residuals:
            r = np.asarray(r, np.float64)
            r = r - r.mean()
            a, b = (r[:-lag], r[lag:]) if axis == 0 else (r[:, :-lag], r[:, lag:])
            num += float((a * b).sum())
            den_a += float((a * a).sum())
            den_b += float((b * b).sum())
        out.append(num / np.sqrt(den_a * den_b) if den_a > 0 and den_b > 0 else 0.0)
    return out[0], out[1]


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. ``mode`` is a registered mode (`memnet.finetune_modes.MODES`) or ``"auto"``."""

    model: str = "microscopy"
    mode: str = "auto"  # nbr2nbr, or structn2v where the noise is correlated between neighbours
    name: str = "finetuned"
    minutes: float | None = DEFAULT_MINUTES  # time budget of this session; None: steps only
    steps: int | None = None  # a step limit (with or without the time budget)
    patch: int = 32  # small, cheap steps: more of them, and more validations, in a CPU's minutes
    batch_size: int = 8  # patches per step
    lr: float | None = None  # None: the mode's (3e-5, low: adapt what the pretrained model knows; n2v-corr 1e-4)
    val_fraction: float = 0.2  # held-out crops: the publish decision's paired test needs several
    val_every: int = 25
    val_seconds: float | None = None  # also validate this often (None: 8 times in a time-only run)
    patience: int | None = None  # validation rounds without improvement before stopping (None: the whole budget)
    mask_fraction: float | None = None  # blind-spot modes: masked pixels per patch (None: the mode's default)
    bn: str = "frozen"  # "frozen": BatchNorm keeps the pretrained statistics; "train": batch statistics
    publish: str = "improved"  # "improved": only a model that clearly beats the starting one; "always"
    axes: str | None = None
    include: str | None = None  # regex on file names when the data are folders
    device: str = "auto"
    amp: str = "auto"  # memnet.options.AMP: auto = on for CUDA and CPUs with native bf16; on = any CPU too; off
    seed: int = 0
    max_planes: int = 64  # planes sampled from large stacks
    overwrite: bool = False  # replace an existing user model of the same name
    noise_check: bool = True  # check the noise before a mode that needs it independent between pixels
    z: float = Z_MARGIN  # publish when gain - z * standard error > 0
    interpolate: float | str | None = None  # publish start + this fraction of the change, or "auto" (None: the mode's)
    weights: str | None = None  # "average" (of the run's second half) or "best" (checkpoint); None: the mode's

    def __post_init__(self):
        set_ = object.__setattr__
        if self.mode != AUTO and self.mode not in MODES:
            raise ValueError(f"unknown fine-tuning mode {self.mode!r}: expected one of {AUTO}, {', '.join(MODES)}")
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/\\:"):
            raise ValueError(f"invalid model name {self.name!r}: use letters, digits, '-' or '_'")
        if self.minutes is None and self.steps is None:
            raise ValueError("a fine-tune needs a time budget (minutes) or a number of steps")
        if self.minutes is not None and (isinstance(self.minutes, bool) or not isinstance(self.minutes, (int, float))
                                         or not self.minutes > 0):
            raise ValueError(f"minutes must be positive, got {self.minutes!r}")
        for name, low in (("patch", 8), ("batch_size", 1), ("val_every", 1), ("max_planes", 1)):
            int_at_least(name, getattr(self, name), low)
        if self.patience is not None:
            int_at_least("patience", self.patience, 1)
        if self.weights is not None:
            choice("weights", self.weights, ("average", "best"))
        if self.steps is not None:
            int_at_least("steps", self.steps, 1)
        for name, lo, hi in (("val_fraction", 0.0, 1.0), ("mask_fraction", 0.0, 1.0)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v < hi):
                raise ValueError(f"{name} must be a fraction between 0 and 1, got {v!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not self.lr >= 0):
            raise ValueError(f"lr must be a number ≥ 0, got {self.lr!r}")
        if isinstance(self.z, bool) or not isinstance(self.z, (int, float)) or not self.z >= 0:
            raise ValueError(f"z must be a number ≥ 0, got {self.z!r}")
        if self.interpolate not in (None, "auto") and (isinstance(self.interpolate, bool) or not isinstance(
                self.interpolate, (int, float)) or not 0 < self.interpolate <= 1):
            raise ValueError(f"interpolate must be a fraction in (0, 1] or 'auto', got {self.interpolate!r}: 1 "
                             "publishes the fine-tuned weights as they are, 0.5 half way from the starting ones, "
                             "'auto' 0.5, or 0.75 where the held-out check rates it clearly higher")
        choice("bn", self.bn, ("frozen", "train"))
        choice("publish", self.publish, ("improved", "always"))
        set_(self, "amp", check_amp(self.amp))
        for name in ("overwrite", "noise_check"):
            set_(self, name, check_bool(name, getattr(self, name)))
        set_(self, "device", str(self.device))

    def replace(self, **kw) -> FinetuneConfig:
        """A copy with the given options changed, checked again."""
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        """Every option, JSON-safe (the fine-tune record)."""
        return dataclasses.asdict(self)
