"""Fine-tuning a model on a lab's own data (``memnet finetune`` and the Fine-tune widget).

The modes (``memnet.finetune_modes.MODES``) range from clean pairs to the noisy data alone. Whatever the
mode, held-out crops of the user's data score the starting model first; the fine-tuned model is
published to the user model directory only if it beats the starting model clearly (``publish="improved"``,
the default): the mean per-crop gain on crops that did not choose the checkpoint must exceed twice its
standard error (a paired test, `publish_decision`), so a gain that is only noise keeps the starting
model. What is judged and published in the self-supervised modes is half way between the starting weights and
the average of the run's second half (``interpolate``, ``weights``): the held-out criteria cannot see a loss of a
few hundredths of a dB nor pick a checkpoint reliably, and on the images measured the average half way gained more
than any checkpoint they chose. A time budget in minutes bounds the run (``minutes``); steps are optional.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .finetune_modes import (
    AUTO,
    MAX_EXCESS_CORRELATION,
    MAX_LAG,
    MODES,
    STRONG_EXCESS_CORRELATION,
    FinetuneConfig,
    Mode,
    blind_spot,
    fit_noise_model,
    get_mode,
    neighbour_correlation,
    strided_pairs,
)
from .fitloop import FitState, MixedPrecision, atomic_save, fit, hardware_name
from .normalize import Intensity
from .outputs import check_output_path
from .runtime import Cancelled, resolve_device
from .sources import input_format, is_zarr_path, open_input
from .train_options import MIN_GAIN_DB, Z_MARGIN
from .trainset import PatchSampler, list_files
from .zoo import check_user_model_name, load_model, save_model, user_model_dir

__all__ = ["FinetuneConfig", "FinetuneProgress", "FinetuneResult", "Decision", "publish_decision", "finetune",
           "interpolate_weights", "MODES", "fit_noise_model", "NotImproved", "NoiseCorrelated", "sample_planes",
           "split_held_out", "choose_interpolation"]

# The check vetoes when its gain is more than one standard error below zero (two let W2S 040_1 publish a
# -0.09 dB model with a check of -0.030 ± 0.017; one kept all six 3D-RCAN gains, session 15).
CHECK_Z = 1.0
# interpolate="auto": the fractions of the way from the starting weights, tried in turn while the check rates
# the next clearly (AUTO_Z paired standard errors) above the current; without a check, FALLBACK_INTERPOLATE.
# Two standard errors, as publishing needs; not on to 1: on 3D-RCAN images the check was clearly higher at 1
# (Microtubules) or one SE higher at 0.75 (Tomm20) and the real change 0.07-0.09 dB lower (session 23).
AUTO_INTERPOLATE = (0.5, 0.75)
AUTO_Z = 2.0
FALLBACK_INTERPOLATE = 0.5


@dataclass
class Decision:
    """The publish decision: the candidate's gain over the starting model on held-out crops, in dB of the
    mode's criterion, as mean ± standard error over ``crops`` paired per-crop gains."""

    published: bool
    gain: float  # mean per-crop gain, dB
    se: float  # its standard error, dB
    crops: int
    criterion: str  # the mode's held-out criterion ("subsample", "strided", "target")
    baseline: float = float("nan")  # the starting model's score on the decision crops, dB
    score: float = float("nan")  # the candidate's
    z: float = Z_MARGIN
    forced: bool = False  # published with publish="always", whatever the test said
    # The check (`Mode.check`), which can only veto: for a sub-sampling criterion the gain on the same crops of the
    # whole model with some pixels blinded (replaced by a neighbour) and scored against their noisy values
    # ("blindspot"); for a blind-spot decision, sub-sampled pairs of pixels 3 apart ("strided"). None: no check.
    check_gain: float | None = None
    check_se: float | None = None
    check: str | None = None
    check_z: float = CHECK_Z
    min_gain: float = MIN_GAIN_DB  # the smallest gain that publishes (the mode's `min_gain_db`)

    @property
    def clear(self) -> bool:
        """Whether the gain is clear of noise: above ``min_gain`` and more than ``z`` standard errors above zero,
        and the full-resolution check (where there is one) not more than ``z`` standard errors below zero."""
        return self.gain > self.min_gain and self.gain - self.z * self.se > 0 and not self.check_failed

    @property
    def under_floor(self) -> bool:
        """Whether a gain clear of its standard error is kept only for being under the mode's ``min_gain``."""
        return self.min_gain > MIN_GAIN_DB and self.gain - self.z * self.se > 0 and self.gain <= self.min_gain

    @property
    def check_failed(self) -> bool:
        """Whether the check says the candidate is worse: more than ``check_z`` standard errors below zero."""
        return self.check_gain is not None and self.check_gain + self.check_z * self.check_se < 0

    def summary(self) -> str:
        """One line for the user: published or not, and the gain with its standard error."""
        what = "published" if self.published else "kept the starting model"
        label = {"blindspot": "full resolution", "strided": "pixels 3 apart"}.get(self.check, self.check)
        check = "" if self.check_gain is None else f" ({label} {self.check_gain:+.3f} ± {self.check_se:.3f})"
        floor = f"; under this mode's {self.min_gain:g} dB minimum" if self.under_floor and not self.published else ""
        return f"{what}: gain {self.gain:+.3f} ± {self.se:.3f} dB{check}{floor}"

    def as_dict(self) -> dict:
        """The decision as plain JSON-ready values (floats rounded), for the model's metadata and reports."""
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def publish_decision(base_mse, new_mse, *, z: float = Z_MARGIN, criterion: str = "", always: bool = False,
                     check=None, check_name: str = "blindspot", min_gain: float = MIN_GAIN_DB) -> Decision:
    """Paired test over held-out crops: ``base_mse``/``new_mse`` are the starting model's and the candidate's
    errors on the same crops. Gain per crop = 10·log10(base/new) dB; publish when its mean exceeds ``z``
    standard errors (and ``min_gain``), or ``always``. ``check``: (base, new) errors of a second criterion
    (``check_name``) that vetoes publication when its gain is more than ``CHECK_Z`` standard errors below zero."""
    g, se = _paired_gain(base_mse, new_mse)
    b, n = np.asarray(base_mse, np.float64), np.asarray(new_mse, np.float64)
    d = Decision(False, float(g.mean()), se, len(g), criterion, -10 * float(np.log10(max(b.mean(), 1e-12))),
                 -10 * float(np.log10(max(n.mean(), 1e-12))), z, min_gain=float(min_gain))
    if check is not None:
        cg, d.check_se = _paired_gain(*check)
        d.check_gain, d.check = float(cg.mean()), check_name
    d.published = d.clear or always
    d.forced = always and not d.clear
    return d


def _paired_gain(base_mse, new_mse) -> tuple[np.ndarray, float]:
    b, n = np.asarray(base_mse, np.float64), np.asarray(new_mse, np.float64)
    if b.shape != n.shape or b.ndim != 1 or not len(b):
        raise ValueError(f"publish_decision needs the two models' errors on the same crops, got {b.shape} and "
                         f"{n.shape}")
    g = 10 * np.log10(np.maximum(b, 1e-12) / np.maximum(n, 1e-12))
    return g, (float(g.std(ddof=1) / np.sqrt(len(g))) if len(g) > 1 else float("inf"))


class FinetuneResult(type(Path())):
    """The published model's path (use it wherever a path goes), with the publish ``decision``."""

    decision: Decision | None = None


class NotImproved(Exception):
    """The fine-tuned model did not beat the starting model on the held-out data: nothing was published.
    ``decision`` holds the held-out figures (None when no candidate was trained)."""

    def __init__(self, msg: str, decision: Decision | None = None):
        super().__init__(msg)
        self.decision = decision


class NoiseCorrelated(NotImproved):
    """The data's noise is correlated between neighbouring pixels, which the chosen mode cannot learn
    from without harm: nothing was trained or published."""


@dataclass
class FinetuneProgress:
    """What a fine-tune run reports to its ``progress`` callback at each step: the step, the loss, the held-out score
    and the time spent."""

    step: int
    total: int | None  # None when only the time budget bounds the run
    loss: float
    val_psnr: float | None
    elapsed: float
    history: list = field(default_factory=list)  # [(step, train loss, held-out score)]
    budget_s: float | None = None
    baseline: float | None = None  # the starting model's held-out score


def _sources(data, include: str | None) -> list:
    """The images in ``data``: one image/stack (path or array), a folder of TIFF/Zarr images (sorted by
    name, filtered by the ``include`` regex), or a list of paths."""
    if isinstance(data, (list, tuple)):
        items = list(data)
    elif isinstance(data, (str, os.PathLike)) and Path(data).is_dir() and not is_zarr_path(data):
        items = list_files(Path(data), include, what="TIFF or Zarr images",
                           keep=lambda p: input_format(p) == "tiff" or (p.is_dir() and is_zarr_path(p)))
    else:
        items = [data]
    if not items:
        raise ValueError("no input images given")
    return items


def sample_planes(data, axes, max_planes: int, policy: dict, include: str | None = None,
            neighbours: bool = False, context: int = 0) -> list:
    """Normalised 2-D planes (Y, X) from the images in ``data``: at most ``max_planes`` in all, a regular
    sample. Each image is normalised on its own, channel by channel, with the model's policy, as `restore` would.
    ``neighbours``: (plane, next plane) pairs along Z (else T, else the first other axis) instead.
    ``context`` k > 0: what a context model sees for each sampled plane, its (2k + 1, Y, X) window of planes
    along Z (else T), mirrored at the ends as `restore` does (`Source.context_leads`)."""
    sources = _sources(data, include)
    if len(sources) > max_planes:
        sources = [sources[i] for i in np.unique(np.linspace(0, len(sources) - 1, max_planes).round().astype(int))]
    per_source = max(1, max_planes // len(sources))
    out = []
    for item in sources:
        src = open_input(item, axes=axes)
        intensity = Intensity.for_source(src, policy)  # per channel, as restore maps this input
        leads = src.leads()
        axis = src.context_axis or (src.lead_axes[:1] or None)
        if context:
            need = 2 * context + 1
            if src.context_length() < need:
                raise ValueError(f"a context model ({need} planes) fine-tunes on stacks with at least {need} planes "
                                 f"along Z or T; {_describe(item)} has axes {src.axes} and shape {tuple(src.shape)}. "
                                 "Fine-tune the 2-D model (e.g. --model microscopy) on single images")
        if neighbours:
            leads = [lead for lead in leads if src.neighbour(lead, 1, axis) is not None] if axis else []
            if not leads:
                raise ValueError(f"mode 'adjacent' needs stacks with at least two planes along Z or T; "
                                 f"{_describe(item)} has axes {src.axes} and shape {tuple(src.shape)}")
        picks = np.unique(np.linspace(0, len(leads) - 1, min(len(leads), per_source)).round().astype(int))
        for lead in (leads[k] for k in picks):
            norm = intensity.at(lead)  # one frame for both views of a pair, and for a context window
            if context:
                out.append(np.stack([norm.forward(src.read_plane(n)) for n in src.context_leads(lead, context)]))
                continue
            plane = norm.forward(src.read_plane(lead))
            out.append((plane, norm.forward(src.read_plane(src.neighbour(lead, 1, axis)))) if neighbours else plane)
    return out


def split_held_out(items: list, fraction: float, rng, patch: int) -> tuple[list, list]:
    """Hold out whole planes when there are several; else bands one patch tall spread over each plane
    (validation must never see training pixels, or early stopping measures memorisation; spread, so the
    held-out crops sample the whole field, not one edge of it)."""
    if len(items) >= 4:
        k = max(1, int(round(fraction * len(items))))
        order = rng.permutation(len(items))
        val = [items[i] for i in order[:k]]
        train = [items[i] for i in order[k:]]
        return train, val
    train, val = [], []
    for it in items:
        arrs = it if isinstance(it, tuple) else (it,)
        h = arrs[0].shape[-2]  # rows: the last two axes are Y, X (a context window has planes first)
        n = h // patch
        if n < 2:
            raise ValueError(f"a {h}-row image is too small to hold out a validation strip: with --patch {patch} "
                             f"it needs at least {2 * patch} rows; give more images (4 or more hold out whole "
                             "ones) or a smaller --patch")
        k = min(n - 1, max(1, int(round(fraction * n))))
        held = {int((i + 0.5) * n / k) for i in range(k)}  # evenly spaced bands
        rows, start = [], 0
        for band in range(n + 1):  # contiguous training runs between the held-out bands
            if band == n or band in held:
                end = h if band == n else band * patch
                if end - start >= patch:
                    rows.append((start, end))
                start = (band + 1) * patch
        pieces = [(tuple(a[..., s0:s1, :] for a in arrs), train) for s0, s1 in rows]
        pieces += [(tuple(a[..., b * patch:(b + 1) * patch, :] for a in arrs), val) for b in sorted(held)]
        for part, dest in pieces:
            dest.append(part if isinstance(it, tuple) else part[0])
    return train, val


class _Context:
    """What a mode may need besides its batch: the starting model's output and the fitted noise model."""

    def __init__(self, model, dev, log):
        self.model, self.dev, self.log = model, dev, log
        self.noise_model: tuple[float, float] | None = None
        self.record: dict = {}  # what a mode adds to the new model's card (e.g. the fitted noise model)

    def predictions(self, planes: list[np.ndarray]) -> list[np.ndarray]:
        return [_predict(self.model, p, self.dev) for p in planes]


def _check(cfg: FinetuneConfig, mode: Mode, target, noisy2) -> None:
    if mode.needs == "target" and target is None:
        raise ValueError(f"mode {mode.name!r} needs clean targets (--target)")
    if mode.needs == "noisy2" and noisy2 is None:
        raise ValueError(f"mode {mode.name!r} needs a second noisy acquisition of the same field (--data2)")
    if target is not None and not mode.takes_target:
        users = " and ".join(repr(n) for n in sorted(n for n, m in MODES.items() if m.takes_target))
        raise ValueError(f"mode {mode.name!r} learns from the noisy data alone: --target is used only by {users}")
    if noisy2 is not None and mode.needs != "noisy2":
        raise ValueError(f"mode {mode.name!r} does not use a second acquisition (--data2): that is mode 'n2n'")
    check_user_model_name(cfg.name)  # task and shipped names are reserved


def _variant(mode: Mode, **attrs) -> Mode:
    """A copy of a registered mode with some attributes set (the registry's instances stay as they are)."""
    m = type(mode)()
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


CONTEXT_MODES = ("nbr2nbr",)  # what a context model fine-tunes with (``auto`` = nbr2nbr, after the noise check)


def _context_items(cfg, mode: Mode, ctx: _Context, policy, noisy, context: int) -> tuple[list, dict, Mode]:
    """A context model's items: (window, window) pairs of (2k + 1, Y, X) normalised planes; nbr2nbr learns
    the centre plane's other sub-image from the sub-sampled window (see `subsample_pairs`)."""
    if mode.name not in CONTEXT_MODES:
        raise ValueError(f"mode {cfg.mode!r} fine-tunes 2-D models; a context model ({2 * context + 1} planes) "
                         f"fine-tunes with mode auto or {' or '.join(CONTEXT_MODES)}")
    windows = sample_planes(noisy, cfg.axes, cfg.max_planes, policy, cfg.include, context=context)
    _check_not_constant(windows)
    if cfg.noise_check:
        ctx.log("checking the noise…")
        if _noise_check(ctx, windows, mode, refuse=False):
            msg = ("not fine-tuned: the noise in these images is correlated between neighbouring pixels, and a "
                   "context model fine-tunes with nbr2nbr only, which would learn that noise as signal. Fine-tune "
                   "the 2-D model instead (--model microscopy: mode auto then uses structured blind spots), or pass "
                   "--no-noise-check to train anyway")
            ctx.log(msg)
            raise NoiseCorrelated(msg)
        if cfg.mode == AUTO:
            ctx.log("auto: mode nbr2nbr (the noise is independent between neighbouring pixels)")
    return [(w, w) for w in windows], ctx.record, mode


def _items(cfg, mode: Mode, ctx: _Context, policy, noisy, target, noisy2) -> tuple[list, dict, Mode]:
    """Training items of the mode, what goes into the model's record about them, and the mode itself
    (``auto`` becomes ``structn2v`` where the noise is correlated; ``structn2v`` gets the measured extent)."""
    if ctx.model.config.context:
        return _context_items(cfg, mode, ctx, policy, noisy, ctx.model.config.context)
    if mode.stack_pairs:
        pairs = sample_planes(noisy, cfg.axes, cfg.max_planes, policy, cfg.include, neighbours=True)
        _check_not_constant([p for pair in pairs for p in pair])
        return pairs, ctx.record, mode
    planes = sample_planes(noisy, cfg.axes, cfg.max_planes, policy, cfg.include)
    _check_not_constant(planes)
    if mode.name == "structn2v":
        ctx.log("checking the noise…")
        extent = _noise_check(ctx, planes, mode, refuse=False) if cfg.noise_check else 0
        mode = _variant(mode, extent=max(1, extent))
        ctx.log(f"structn2v: blind blocks of {2 * mode.extent + 1}x{2 * mode.extent + 1} pixels")
    elif cfg.mode == AUTO and cfg.noise_check:
        ctx.log("checking the noise…")
        extent = _noise_check(ctx, planes, mode, refuse=False)
        if extent and abs(ctx.record["noise_check"]["excess"]) > STRONG_EXCESS_CORRELATION:
            mode = _variant(get_mode("structn2v"), extent=extent)
            ctx.log(f"auto: strongly correlated noise, so mode structn2v (blind blocks of {2 * extent + 1}x"
                    f"{2 * extent + 1} pixels) instead of nbr2nbr")
        elif extent:
            mode = get_mode("n2v-corr")
            ctx.log("auto: weakly correlated noise, so mode n2v-corr (blind spots, judged at full resolution and "
                    "on pixels 3 apart) instead of nbr2nbr")
        else:
            ctx.log("auto: mode nbr2nbr (the noise is independent between neighbouring pixels)")
    elif mode.pixel_independent and cfg.noise_check:
        ctx.log("checking the noise…")
        _noise_check(ctx, planes, mode)
    second = target if mode.takes_target else noisy2 if mode.needs == "noisy2" else None
    others = sample_planes(second, cfg.axes, cfg.max_planes, policy, cfg.include) if second is not None else None
    mismatch = others is not None and (len(others) != len(planes) or any(a.shape != b.shape
                                                                         for a, b in zip(planes, others)))
    if mode.needs and mismatch:  # pairs must match plane for plane; optional clean images need not
        raise ValueError(f"the {mode.name} data do not match the noisy data plane for plane "
                         f"({len(planes)} planes of {planes[0].shape} vs {len(others)} of {others[0].shape})")
    if cfg.mask_fraction is not None and hasattr(mode, "fraction"):
        mode = _variant(mode, fraction=cfg.mask_fraction)
    return mode.items(planes, others, ctx), ctx.record, mode


def _centre(a: np.ndarray) -> np.ndarray:
    """The plane a model restores: a context window's centre plane, or the plane itself."""
    return a[a.shape[0] // 2] if a.ndim == 3 else a


def _check_not_constant(planes: list[np.ndarray]) -> None:
    """Constant data hold neither signal nor noise: say so, before any check blames the noise."""
    if all(float(p.max()) == float(p.min()) for p in planes):
        raise ValueError("the images to fine-tune on are constant (every pixel of every sampled plane has the same "
                         "value): there is nothing to learn from; check the data (a blank or saturated acquisition, "
                         "the wrong channel or file?)")


def _noise_check(ctx: _Context, planes: list[np.ndarray], mode: Mode, size: int = 512, refuse: bool = True) -> int:
    """Refuse ``mode`` (with ``refuse``) when the noise is correlated between neighbouring pixels (see
    `finetune_modes.MAX_EXCESS_CORRELATION`): the starting model's residual on up to four centre crops,
    against white noise of the same local strength through the same model. Returns the correlation length:
    the longest lag (up to ``MAX_LAG``) with an excess correlation beyond the threshold on either axis, 0
    for white noise."""
    crops = []
    for p in planes[:4]:
        h, w = p.shape[-2:]
        y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
        crops.append(np.ascontiguousarray(p[..., y0:y0 + size, x0:x0 + size], dtype=np.float32))
    outs = ctx.predictions(crops)
    res = [_centre(c) - o for c, o in zip(crops, outs)]
    rng = np.random.default_rng(0)
    # White noise of the same local strength on the output (on every plane of a context window: the
    # neighbours' noise is independent of the centre's as well).
    white = [o + _local_sd(r) * rng.standard_normal(c.shape).astype(np.float32) for c, o, r in zip(crops, outs, res)]
    res0 = [_centre(w) - o for w, o in zip(white, ctx.predictions(white))]
    rho, rho0 = neighbour_correlation(res), neighbour_correlation(res0)
    excess = max((a - b for a, b in zip(rho, rho0)), key=abs)
    by_lag = [float(excess)] + [max((a - b for a, b in zip(neighbour_correlation(res, lag),
                                                          neighbour_correlation(res0, lag))), key=abs)
                                for lag in range(2, MAX_LAG + 1)]
    extent = max((lag for lag, e in enumerate(by_lag, 1) if abs(e) > MAX_EXCESS_CORRELATION), default=0)
    extent = extent if abs(excess) > MAX_EXCESS_CORRELATION else 0
    ctx.record["noise_check"] = {"neighbour_correlation_yx": [round(float(v), 4) for v in rho],
                                 "white_noise_yx": [round(float(v), 4) for v in rho0],
                                 "excess": round(float(excess), 4),
                                 "excess_by_lag": [round(float(v), 4) for v in by_lag], "extent": extent}
    ctx.log(f"noise check: neighbour correlation of the residual {rho[0]:+.3f} (y) {rho[1]:+.3f} (x), "
            f"white noise through the same model {rho0[0]:+.3f} {rho0[1]:+.3f}: excess {excess:+.3f}"
            + (f"; correlated up to {extent} px" if extent else ""))
    if refuse and abs(excess) > MAX_EXCESS_CORRELATION:
        msg = (f"not fine-tuned: the noise in these images is correlated between neighbouring pixels (excess "
               f"correlation {excess:+.3f}, beyond ±{MAX_EXCESS_CORRELATION}), and mode {mode.name!r} assumes it is "
               "not: it would learn that noise as signal and make the model worse. Use --mode auto or structn2v "
               "(structured blind spots), adjacent for a stack, paired or n2n with a second acquisition, or "
               "--no-noise-check to train anyway")
        ctx.log(msg)
        raise NoiseCorrelated(msg)
    return extent


def _local_sd(r: np.ndarray, k: int = 9) -> np.ndarray:
    """The residual's local standard deviation (k x k box): noise strength varies with the signal."""
    t = torch.from_numpy(np.asarray(r, np.float32) ** 2)[None, None]
    var = torch.nn.functional.avg_pool2d(t, k, stride=1, padding=k // 2, count_include_pad=False)
    return np.sqrt(var[0, 0].numpy())


class _HeldOut:
    """Held-out crops (non-overlapping, from data the run never trains on) and how the mode scores a model
    on them. Where there are enough crops, half choose the checkpoint (``score``: PSNR, peak 1, of the
    pooled error) and the other half decide publication (``errors``: per-crop errors for the paired test),
    so the decision is not inflated by picking the best of many validations on the same crops."""

    SELECT_DRAWS, DECIDE_DRAWS, MAX_CROPS, SPLIT_FROM, MIN_CROPS, MIN_SIZE = 2, 8, 48, 12, 8, 12
    CHECK_DRAWS, CHECK_FRACTION = 6, 0.03

    def __init__(self, mode: Mode, val_items: list, patch: int, seed: int):
        size = min(patch * mode.held_out_scale, min(min(it[0].shape[-2:]) for it in val_items))
        while True:  # smaller crops where the held-out data give too few for a standard error
            crops = []
            for it in val_items:
                arrs = it if isinstance(it, tuple) else (it, it)
                h, w = arrs[0].shape[-2:]
                crops += [tuple(a[..., y:y + size, x:x + size] for a in arrs[:2])
                          for y in range(0, h - size + 1, size) for x in range(0, w - size + 1, size)]
            if len(crops) >= self.MIN_CROPS or size < 2 * self.MIN_SIZE:
                break
            size = size // 4 * 2
        if len(crops) > self.MAX_CROPS:
            crops = [crops[i] for i in np.linspace(0, len(crops) - 1, self.MAX_CROPS).round().astype(int)]
        split = len(crops) >= self.SPLIT_FROM
        select = crops[0::2] if split else crops
        decide = crops[1::2] if split else crops
        self.mode, self.crops = mode, len(decide)
        self.select = self._draws(select, self.SELECT_DRAWS, seed + 1)
        # A sub-sampling criterion scores the model on half-resolution images: on data the starting model already
        # suits (W2S) it rose for candidates that were worse at full resolution. The blind-spot score is the whole
        # model at full resolution on the same crops, a few pixels blinded (a random neighbour's value) and
        # compared with their noisy values: unbiased for pixel-independent noise, a check that vetoes a clear
        # loss. Under weakly correlated noise it tracks the real change where the sub-sampling one does not (it
        # decides there), but overrates a model that learned the noise: pixels 3 apart then veto.
        x = torch.from_numpy(np.stack([c[0] for c in decide]).astype(np.float32))
        x = x[:, None] if x.ndim == 3 else x
        blind = self._blind_spots(x, np.random.default_rng(seed + 3)) if "blindspot" in (
            mode.decide_by, mode.check) else None
        self.decide = blind if mode.decide_by == "blindspot" else self._draws(decide, self.DECIDE_DRAWS, seed + 2)
        self.check = strided_pairs(x, 3, np.random.default_rng(seed + 4), self.DECIDE_DRAWS) \
            if mode.check == "strided" else blind if mode.check == "blindspot" else None

    def _blind_spots(self, x: torch.Tensor, rng) -> list:
        out = []
        for _ in range(self.CHECK_DRAWS):
            xi, m = blind_spot(x[:, x.shape[1] // 2: x.shape[1] // 2 + 1], self.CHECK_FRACTION, rng, "random")
            if x.shape[1] > 1:  # a context model's window: the centre plane blinded, its neighbours as they are
                xi = torch.cat([x[:, : x.shape[1] // 2], xi, x[:, x.shape[1] // 2 + 1:]], dim=1)
            out.append((xi, x[:, x.shape[1] // 2: x.shape[1] // 2 + 1], m))
        return out

    def _draws(self, crops, draws, seed):
        def tensor(arrs):  # (N, 1, s, s), or (N, planes, s, s) for a context model's windows
            t = torch.from_numpy(np.stack(arrs).astype(np.float32))
            return t[:, None] if t.ndim == 3 else t

        x, y = tensor([c[0] for c in crops]), tensor([c[1] for c in crops])
        return self.mode.held_out(x, y, np.random.default_rng(seed), draws if self.mode.criterion != "target" else 1)

    @staticmethod
    def _errors(model, dev, draws) -> np.ndarray:
        was = model.training
        model.eval()
        num = den = 0.0
        with torch.inference_mode():
            for x, y, mask in draws:
                out = torch.cat([model(x[i: i + 16].to(dev)).float().cpu() for i in range(0, len(x), 16)])
                m = torch.ones_like(y) if mask is None else mask
                num = num + (((out - y) ** 2) * m).sum(dim=(1, 2, 3)).double().numpy()
                den = den + m.sum(dim=(1, 2, 3)).double().numpy()
        model.train(was)
        return num / np.maximum(den, 1)

    def score(self, model, dev) -> float:
        return -10 * float(np.log10(max(float(self._errors(model, dev, self.select).mean()), 1e-12)))

    def errors(self, model, dev) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-crop errors on the decision crops, and of the check (None without one)."""
        check = None if self.check is None else self._errors(model, dev, self.check)
        return self._errors(model, dev, self.decide), check


def finetune(cfg: FinetuneConfig, noisy, target=None, noisy2=None, *, progress=None, cancel=None,
             resume: bool = False, log=None) -> Path:
    """Fine-tune ``cfg.model`` on the user's data; returns the saved model's path.

    ``noisy``: image/stack (array or path), a folder of images, or a list of paths. ``target``: clean
    counterpart (``paired``, matched image for image in sorted order; ``synthetic``: clean images to add
    the fitted noise to). ``noisy2``: second noisy acquisition (``n2n``). A checkpoint is kept under the
    user model directory (``.runs/NAME``) so ``resume=True`` continues an interrupted run.
    Raises ``NotImproved`` (nothing published) when the result does not beat the starting model on the
    held-out data, and ``Cancelled`` when ``cancel`` fires (the model so far is published)."""
    t_start = time.time()  # the budget counts from here: reading the data and scoring are part of it
    mode = get_mode("nbr2nbr" if cfg.mode == AUTO else cfg.mode)
    _check(cfg, mode, target, noisy2)
    log = log or (lambda s: None)
    out_path, run, resuming = _output(cfg, (noisy, target, noisy2), resume, log)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    dev = resolve_device(cfg.device)
    model, info = _starting_model(cfg, dev)
    ctx = _Context(model, dev, log)
    log("reading the data…")
    items, record, mode = _items(cfg, mode, ctx, info.normalization, noisy, target, noisy2)
    sampler, held_out = _split(cfg, mode, items, info, rng)
    base_errors = held_out.errors(model, dev)  # the starting model, for the paired publish decision

    run.dir.mkdir(parents=True, exist_ok=True)
    if not resuming:  # a fresh run: nothing of an earlier run of this name may end up in the result
        run.clear()
    opt = torch.optim.Adam(model.parameters(), lr=mode.lr if cfg.lr is None else cfg.lr)
    mp = MixedPrecision(cfg.amp, dev, cpu_auto=True)  # bf16 where the CPU has it natively: more steps per minute
    state = FitState()
    t_score = time.time()
    if resuming:
        baseline = run.load(model, opt, mp, state)
        sampler.rng = np.random.default_rng(cfg.seed + state.step)  # new patches, not a replay of the first ones
        log(f"resumed at step {state.step}")
    else:
        log(f"scoring {info.name} on the held-out data…")
        baseline = held_out.score(model, dev)
        log(f"held-out score of {info.name} before fine-tuning: {baseline:.3f} dB ({mode.criterion})")
    meta = _record(cfg, info, mode, dev, baseline, record, noisy=noisy, target=target, noisy2=noisy2)
    meta["finetune"]["mode"] = mode.name  # what "auto" chose
    meta["finetune"]["lr"] = opt.param_groups[0]["lr"]  # the mode's when none was given
    meta["finetune"]["precision"] = mp.precision
    budget, seconds, val_seconds = _schedule(cfg, t_start, 0.0 if resuming else time.time() - t_score)
    tail = TailAverage(cfg.steps, seconds) if (cfg.weights or mode.weights) == "average" else None

    def train_step(step: int):
        model.train(cfg.bn == "train")  # frozen: BN keeps the pretrained statistics (small, correlated batches)
        x, y = sampler.batch(cfg.batch_size)
        x, y, extra = mode.batch(x, y, sampler.rng, ctx)
        loss = mode.loss(model, mp, x.to(dev), y.to(dev), extra)
        mp.step(loss, opt)
        if tail is not None:
            tail.after_step(model, step + 1)
        return float(loss.detach())

    def save_state(st: FitState):
        _save(model, run.last, cfg, info, meta, st)
        atomic_save({"fit": st.as_dict(), "optimizer": opt.state_dict(), "scaler": mp.scaler.state_dict(),
                     "baseline": baseline}, run.state)

    def checkpoint(st: FitState, improved: bool):
        meta["finetune"]["hours"] = round(st.hours, 4)
        if improved:  # the best so far stays in the run folder: the user's model appears only when the run ends
            _save(model, run.best, cfg, info, {**meta, "metrics": {"val_psnr": st.best}}, st)
        save_state(st)
        h = st.history[-1]
        log(f"step {st.step}/{cfg.steps or '-'}  loss {h['loss']:.5f}  validation PSNR {h['score']:.2f} dB"
            + ("  (best)" if improved else ""))

    def on_step(st: FitState, loss, score):
        if progress is not None:
            progress(FinetuneProgress(st.step, cfg.steps, float(loss), score, time.time() - t_start,
                                      [tuple(h) for h in _history(st)], budget, baseline))

    fit(state, steps=cfg.steps, seconds=seconds, val_every=cfg.val_every, val_seconds=val_seconds,
        train_step=train_step, validate=lambda: {"score": held_out.score(model, dev)}, checkpoint=checkpoint,
        patience=cfg.patience, stop=cancel, log=log, min_delta=1e-3, validate_on_stop=False, on_step=on_step)
    if state.ended == "stopped" and state.step:
        save_state(state)  # weights and optimizer as they are: resume continues from here
    return _publish(cfg, state, run, out_path, info, baseline, log, held_out, base_errors, dev, tail)


AVERAGE_EVERY = 10  # steps between the iterates averaged (weights="average")


def _split(cfg: FinetuneConfig, mode: Mode, items: list, info, rng) -> tuple[PatchSampler, _HeldOut]:
    """The training patches' sampler and the held-out crops, from the mode's (input, target) items."""
    patch = cfg.patch * mode.patch_scale
    if min(min(it[0].shape[-2:]) for it in items) < patch:
        raise ValueError(f"images are smaller than the patch size {patch}: use a smaller --patch")
    band = min(cfg.patch * mode.held_out_scale, min(it[0].shape[-2] for it in items) // 3)  # strided: large
    train_items, val_items = split_held_out(items, cfg.val_fraction, rng, max(patch, band))
    sampler = PatchSampler(info.task, [], train_items, patch, seed=cfg.seed, pairs_only=True)
    return sampler, _HeldOut(mode, val_items, cfg.patch, cfg.seed)


class TailAverage:
    """The running mean of a model's floating-point weights (parameters and buffers), one extra copy of them: over
    the second half of a run of ``steps`` and/or ``seconds`` from now (a resumed run averages its own second half),
    every AVERAGE_EVERY steps (`after_step`), or whenever `add` is called."""

    def __init__(self, steps: int | None = None, seconds: float | None = None):
        self.steps, self.seconds, self.t0 = steps, seconds, time.time()
        self.mean: list[torch.Tensor] | None = None
        self.count, self.first, self.last = 0, None, None

    def after_step(self, model, step: int) -> None:
        """After training step number ``step`` (from 1): add the weights if it is time."""
        if step % AVERAGE_EVERY:
            return
        done = max(step / self.steps if self.steps else 0.0,
                   (time.time() - self.t0) / self.seconds if self.seconds else 0.0)
        if done >= 0.5:
            self.add(model, step)

    def add(self, model, step: int) -> None:
        with torch.no_grad():
            w = [v.detach() for v in model.state_dict().values() if v.is_floating_point()]
            if self.mean is None:
                self.mean, self.first = [v.clone() for v in w], step
            else:
                for m, v in zip(self.mean, w):
                    m.lerp_(v, 1.0 / (self.count + 1))
        self.count, self.last = self.count + 1, step

    def load_into(self, model):
        """Set ``model``'s floating-point weights to the mean (same architecture); returns ``model``."""
        with torch.no_grad():
            for v, m in zip([v for v in model.state_dict().values() if v.is_floating_point()], self.mean):
                v.copy_(m)
        return model


def interpolate_weights(model, start, alpha: float):
    """Move ``model``'s floating-point parameters and buffers back to ``start + alpha·(model − start)`` (in place;
    integer buffers such as BatchNorm's step count stay ``model``'s). Returns ``model``."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    ref = start.state_dict()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k not in ref or ref[k].shape != v.shape:
                raise ValueError(f"the fine-tuned model and its starting model differ at {k!r}: cannot interpolate")
            if v.is_floating_point():
                v.copy_(ref[k].to(v.device, v.dtype) + alpha * (v - ref[k].to(v.device, v.dtype)))
    return model


def choose_interpolation(final, start, held_out, base_errors: tuple, dev) -> tuple[float, dict, tuple]:
    """``--interpolate auto``. ``held_out.errors(model, dev)`` gives a model's per-crop held-out errors (criterion,
    check); ``base_errors`` are the starting model's. Moves ``final`` (in place) part of the way from ``start``:
    the first fraction of ``AUTO_INTERPOLATE``, then each next one while the held-out check rates it clearly above
    the current one (a paired test over the check's crops, more than ``AUTO_Z`` standard errors). Returns (the
    fraction, {fraction judged: its check gain over the start, dB}, the held-out errors of the chosen model). The
    check scores the whole model at full resolution; the sub-sampling criterion scores it on half-resolution
    pairs, the kind of data it trained on, and rates all the way highest even where that loses (training/README.md,
    session 23)."""
    fine = {k: v.detach().clone() for k, v in final.state_dict().items()}
    tried, chosen = {}, None
    for a in AUTO_INTERPOLATE:
        final.load_state_dict(fine)
        errors = held_out.errors(interpolate_weights(final, start, a), dev)
        tried[a] = round(float(_paired_gain(base_errors[1], errors[1])[0].mean()), 4)
        if chosen is not None:
            step, se = _paired_gain(chosen[1][1], errors[1])
            if not step.mean() > AUTO_Z * se:
                break
        chosen = (a, errors)
    final.load_state_dict(fine)
    interpolate_weights(final, start, chosen[0])
    return chosen[0], tried, chosen[1]


def _starting_model(cfg: FinetuneConfig, dev):
    model, info = load_model(cfg.model, device=dev)
    if info.name == cfg.name:
        raise ValueError(f"the new model needs a name different from the model it starts from ({cfg.name!r})")
    return model, info


def _schedule(cfg: FinetuneConfig, t_start: float, val_cost: float) -> tuple:
    """(the budget, the seconds left for training, the validation period in seconds or None). The budget
    counts from ``t_start`` (set-up included) and keeps ``val_cost`` for the last validation. A run bounded
    by time alone also validates on a time schedule (about 8 times), so a short budget still draws a curve."""
    if cfg.minutes is None:
        return None, None, cfg.val_seconds
    budget = cfg.minutes * 60
    seconds = max(0.0, budget - (time.time() - t_start) - val_cost)
    auto = None if cfg.steps else max(seconds, 1.0) / 8
    return budget, seconds, cfg.val_seconds if cfg.val_seconds is not None else auto


def _output(cfg: FinetuneConfig, data: tuple, resume: bool, log) -> tuple[Path, _RunFiles, bool]:
    """The model's path (never over the data, never over another model unless asked), its checkpoint
    folder, and whether this run resumes one."""
    out_path = user_model_dir() / f"{cfg.name}.safetensors"
    inputs = [p for d in data for p in (d if isinstance(d, (list, tuple)) else [d])]
    check_output_path(out_path, [p for p in inputs if isinstance(p, (str, os.PathLike))])
    run = _RunFiles(user_model_dir() / ".runs" / cfg.name)
    resuming = resume and run.state.exists() and run.last.exists()
    if resume and not resuming:  # never a silent fresh start: the user expected to continue something
        raise FileNotFoundError(f"nothing to resume for {cfg.name!r}: no interrupted fine-tune of that name in "
                                f"{run.dir.parent}; run again without --resume to start one")
    if out_path.exists() and not (resuming or cfg.overwrite):
        raise FileExistsError(f"a user model named {cfg.name!r} already exists ({out_path}): choose another name, "
                              "or overwrite it explicitly")
    return out_path, run, resuming


def _record(cfg: FinetuneConfig, info, mode: Mode, dev, baseline: float, record: dict, **data) -> dict:
    """The new model's card: where it came from, on what data, how it was judged."""
    return {
        "description": f"{info.name} fine-tuned ({mode.name}) on user data",
        "normalization": info.normalization,
        "degradation": info.metadata.get("degradation", {}),
        "finetune": {"base_model": info.name, "base_metadata_training": info.metadata.get("training", {}),
                     "config": asdict(cfg), "data": {k: _describe(v) for k, v in data.items() if v is not None},
                     "hardware": hardware_name(dev), "criterion": {"kind": mode.criterion, "baseline": baseline},
                     **record},
        "rank": info.rank - 0.5,  # a user model never silently replaces the shipped default
    }


def _publish(cfg, state: FitState, run, out_path: Path, info, baseline: float, log, held_out: _HeldOut,
             base_errors: tuple, dev, tail: TailAverage | None = None) -> FinetuneResult:
    stopped = state.ended == "stopped"
    if not run.best.exists():
        if stopped:
            raise Cancelled(f"fine-tuning stopped at step {state.step}, before its first validation: no model "
                            "saved; resume to continue")
        raise NotImproved("the run ended before its first validation: no model saved; give it more time or steps")
    final, final_info = load_model(run.best, device=dev)
    fm = dict(final_info.metadata)
    best = float(fm.get("metrics", {}).get("val_psnr", state.best))
    averaged = tail is not None and tail.count > 0  # else (a run stopped before its second half) the checkpoint
    if averaged:
        tail.load_into(final)
    weights = ({"from": "average", "iterates": tail.count, "steps": [tail.first, tail.last]} if averaged else
               {"from": "best", "step": int(fm.get("finetune", {}).get("steps", state.step))})
    mode = held_out.mode
    alpha, tried = mode.interpolate if cfg.interpolate is None else cfg.interpolate, None
    if alpha == "auto" and base_errors[1] is None:  # nothing at full resolution to choose by
        alpha = FALLBACK_INTERPOLATE
    if alpha == "auto":
        alpha, tried, errors = choose_interpolation(final, _starting_model(cfg, dev)[0], held_out, base_errors, dev)
    else:  # judge and publish what the user gets: the weights part of the way from the starting ones
        alpha = float(alpha)
        if alpha < 1:
            interpolate_weights(final, _starting_model(cfg, dev)[0], alpha)
        errors = held_out.errors(final, dev)
    (b, bc), (n, nc) = base_errors, errors
    decision = publish_decision(b, n, z=cfg.z, criterion=mode.decide_by or mode.criterion,
                                always=cfg.publish == "always", check=None if bc is None else (bc, nc),
                                check_name=mode.check, min_gain=mode.min_gain_db)
    fm["finetune"] = {**fm["finetune"], "steps_run": state.step, "ended": state.ended, "weights": weights,
                      "early_stopped": state.ended == "early stop", "history": _history(state)[-100:],
                      "hours": round(state.hours, 4),
                      "criterion": {**fm["finetune"].get("criterion", {}), "best": best},
                      "interpolate": alpha, "decision": decision.as_dict()}
    if tried:
        fm["finetune"]["interpolate_tried"] = [[a, g] for a, g in tried.items()]  # [fraction, check gain dB]
    save_model(final, run.judged, name=f"{cfg.name}-judged", task=info.task, metadata=fm)
    choice = "" if not tried else " (the check's gain " + ", ".join(f"{g:+.3f} at {a:g}" for a, g in tried.items()) \
        + " dB)"
    fine = (f"averaged over steps {tail.first}-{tail.last}" if averaged else "fine-tuned") + (
        choice if alpha == 1 else f", {alpha:g} of the way from {info.name}'s weights{choice},")
    figures = (f"gain {decision.gain:+.3f} ± {decision.se:.3f} dB on {decision.crops} held-out crops "
               f"({decision.criterion} criterion; {info.name} {decision.baseline:.3f} dB, {fine} "
               f"{decision.score:.3f})")
    where = {"blindspot": "at full resolution", "strided": "on pixels 3 apart"}.get(decision.check, "")
    if decision.check_gain is not None:
        figures += f"; {where} {decision.check_gain:+.3f} ± {decision.check_se:.3f} dB ({decision.check} check)"
    if not decision.published:
        clear = decision.gain - decision.z * decision.se > 0
        reasons = [f"below zero {where}"] if decision.check_failed and clear else []
        if decision.under_floor:
            reasons.append(f"under the {decision.min_gain:g} dB this mode needs (on correlated noise a held-out "
                           "score can be off by that much)")
        why = " and ".join(reasons) or "not clearly above zero"
        veto = "" if decision.check is None else \
            f", and the check {where} not more than {decision.check_z:g} standard error below zero"
        least = f" and above {decision.min_gain:g} dB" if decision.min_gain > MIN_GAIN_DB else ""
        msg = (f"not published: kept the starting model {info.name}: {figures}: {why} (publishing needs the gain "
               f"above {decision.z:g} standard errors{least}{veto}). Try another mode, more data or time, or "
               "publish anyway (--publish always)")
        log(msg)
        raise NotImproved(msg, decision)
    save_model(final, out_path, name=cfg.name, task=info.task, metadata=fm)
    log(f"published: {figures}" + (" (--publish always: not a clear gain)" if decision.forced else "")
        + f": saved as {cfg.name!r}")
    if stopped:
        raise Cancelled(f"fine-tuning stopped at step {state.step}: the model so far is saved as "
                        f"{cfg.name!r}; resume to continue training it")
    result = FinetuneResult(out_path)
    result.decision = decision
    return result


class _RunFiles:
    """A fine-tune's checkpoint folder: weights and optimizer state together, so a resume continues
    exactly where the run left off."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.state, self.last, self.best = folder / "state.pt", folder / "last.safetensors", folder / "best.safetensors"
        self.judged = folder / "judged.safetensors"  # what the publish decision scored, published or not

    def clear(self) -> None:
        for f in (self.state, self.last, self.best, self.judged):
            f.unlink(missing_ok=True)

    def load(self, model, opt, mp, state: FitState) -> float:
        m2, _ = load_model(self.last, device=next(model.parameters()).device)
        model.load_state_dict(m2.state_dict())
        st = torch.load(self.state, weights_only=True)
        opt.load_state_dict(st["optimizer"])
        if st.get("scaler"):
            mp.scaler.load_state_dict(st["scaler"])
        restored = FitState.from_dict(st["fit"])
        state.step, state.best, state.bad = restored.step, restored.best, restored.bad
        state.history, state.hours_before = restored.history, restored.hours_before
        return float(st["baseline"])


def _history(state: FitState) -> list:
    return [[float(h["step"]), float(h["loss"]), float(h["score"])] for h in state.history]


def _save(model, path, cfg, info, meta, state: FitState):
    m = {**meta, "finetune": {**meta["finetune"], "steps": state.step, "history": _history(state)[-100:]}}
    save_model(model, path, name=cfg.name if path.parent == user_model_dir() else f"{cfg.name}-last",
               task=info.task, metadata=m)


def _describe(data):
    """Where fine-tuning data came from, for the model's provenance (paths, or an array's shape)."""
    if isinstance(data, (list, tuple)):
        return [_describe(d) for d in data]
    if isinstance(data, (str, os.PathLike)):
        return str(Path(data).resolve())
    return {"array": list(map(int, data.shape)), "dtype": str(data.dtype)}


def _predict(model, plane: np.ndarray, dev) -> np.ndarray:
    """The model's output on a normalised plane, tile by tile (exact halo: the same as whole-plane
    inference, without its memory on large planes). A context model's (planes, Y, X) window (the noise
    check's crops, at most 512²): its centre plane's output, in one call."""
    from .engine import restore

    if plane.ndim == 3:
        was = model.training
        model.eval()
        with torch.inference_mode():
            out = model(torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32))[None].to(dev))
        model.train(was)
        return out[0, 0].float().cpu().numpy()

    out = restore(np.ascontiguousarray(plane, dtype=np.float32), model, device=dev, halo="exact")
    return np.asarray(out, dtype=np.float32)
