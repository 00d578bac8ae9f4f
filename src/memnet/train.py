"""Training from scratch (``memnet train``): random patches, on-the-fly degradations, the paper's
multi-supervised loss, validation with the published conventions, checkpoints and resume."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from .degrade import (
    CAMERA_RANGES,
    bicubic_degrade,
    camera_noise,
    gaussian_noise,
    jpeg_degrade,
    poisson_gaussian_noise,
)
from .evaluate import evaluate_task, percentile_normalize, predictor
from .fitloop import FitState, atomic_save, fit
from .io import input_format, is_zarr_path
from .metrics import affine_fit, psnr
from .model import MemNet, deepen, parse_arch, widen
from .runtime import Cancelled, resolve_device, stop_requested
from .train_options import DEFAULT_ARCH, LOSSES, NOISE_MODELS, TrainConfig, sigma_ranges
from .zoo import load_model, save_model

__all__ = ["TrainConfig", "train", "recalibrate_bn", "PatchSampler", "multi_supervised_loss", "paired_target_frame",
           "DEGRADATIONS", "DevicePatchSampler"]

# What each task is trained on (also written into the model's metadata).
DEGRADATIONS = {
    "denoise": {"gaussian_sigma_255": [0, 75], "noise": "additive white Gaussian, blind"},
    "sr": {"scales": [2, 3, 4], "kernel": "bicubic (Pillow), pre-upsampled input"},
    "jpeg": {"quality": [10, 40], "encoder": "Pillow JPEG, gray/Y"},
    "microscopy": {
        "pairs": "real noisy/clean pairs when given",
        "poisson_gaussian": {"photons_at_1": [4, 400], "read_sigma": [0.0, 0.06]},
    },
}


NORMALIZATION = {
    "denoise": {"mode": "natural"},
    "sr": {"mode": "natural"},
    "jpeg": {"mode": "natural"},
    "microscopy": {"mode": "percentile", "low": 1.0, "high": 99.8},
}


def multi_supervised_loss(final: torch.Tensor, branches: list[torch.Tensor], target: torch.Tensor,
                          kind: str = "mse") -> torch.Tensor:
    """The paper's loss over every branch output and the final output, weights 1/(M+1) each.

    ``kind="mse"`` is the paper's. ``kind="psnr"`` is the mean over patches of log(MSE + 1e-4) per
    patch, i.e. each patch weighted by its own error: with plain MSE a blind denoiser's gradient is
    dominated by its sigma 50-75 patches (~6x the error of sigma 15) and it spends its capacity there.
    The 1e-4 floor (40 dB) keeps near-clean patches from taking over; the 5e-4 scale keeps gradients
    on the MSE scale, so a run can switch loss when resumed without upsetting Adam's statistics."""
    outs = branches + [final]
    if kind == "mse":
        return sum(torch.mean((o - target) ** 2) for o in outs) / len(outs)
    if kind == "psnr":
        return 5e-4 * sum(torch.log(((o - target) ** 2).mean(dim=(1, 2, 3)) + 1e-4).mean() for o in outs) / len(outs)
    raise ValueError(f"unknown loss {kind!r}: {' or '.join(LOSSES)}")


def paired_target_frame(noisy: np.ndarray, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A (noisy, clean) training pair with the clean target mapped onto the noisy image's intensity frame.

    Percentiles of a noisy image are inflated by its noise, so the two images of a pair normalised
    each by its own percentiles differ in gain by a factor that varies from image to image (W2S:
    0.53-0.94). A network trained on that must guess the gain from local content, which it cannot,
    and learns a content-dependent brightness change. The least-squares affine map of clean onto
    noisy (noise only in the regressand, so unbiased) puts the target where restore's output belongs:
    the input's own normalised range."""
    return noisy, affine_fit(clean, noisy).astype(np.float32)


def _read_image(path: Path, task: str = "denoise") -> np.ndarray:
    """A 2-D training image as float32 in the model's range: gray, or Y of colour images (BT.601);
    microscopy images by the model's percentile policy, as `restore` will map them."""
    from .evaluate import load_y

    natural = True  # 8-bit or colour: /255 as the natural-image conventions
    if input_format(path) == "tiff":
        import tifffile

        a = tifffile.imread(path)
        if a.ndim == 3 and a.shape[-1] in (3, 4):
            from .metrics import rgb_to_y

            a = rgb_to_y(a)
        elif a.dtype != np.uint8:
            natural = False
        if a.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D image, got shape {a.shape}")
    else:
        a = load_y(path)
    if task == "microscopy" or not natural:
        return percentile_normalize(a)
    return (np.asarray(a, dtype=np.float32) / 255.0).astype(np.float32)


def _raw_planes(path: Path) -> list[np.ndarray]:
    """The raw 2-D planes of an image or stack file, for paired data (read whole: a pair's intensity
    frames are matched over the whole plane)."""
    if _is_stack(path):
        return [p.src.read_plane(p.lead) for p in _stack_planes(path, "microscopy")]
    if input_format(path) == "tiff":
        import tifffile

        return [tifffile.imread(path)]
    from .evaluate import load_y

    return [load_y(path)]


class LazyPlane:
    """One 2-D (Y, X) plane of a TIFF/Zarr stack, read only where a patch is cropped, so training on
    stacks larger than memory costs one patch of I/O per sample. ``plane[y0:y1, x0:x1]`` is float32 in
    the model's range (the stack's own normaliser, computed once from a sample of its planes)."""

    def __init__(self, src, lead: tuple, normalizer):
        self.src, self.lead, self.normalizer = src, lead, normalizer
        self.shape = src.plane_shape

    def __getitem__(self, key) -> np.ndarray:
        sy, sx = key if isinstance(key, tuple) else (key, slice(None))
        return self.normalizer.forward(self.src.read_plane(self.lead, sy, sx))


def _stack_planes(path: Path, task: str) -> list[LazyPlane]:
    """Every (Y, X) plane of a stack (all other axes, channels included, enumerate planes), each mapped
    by its channel's normaliser (`Intensity.for_source`: computed once from a sample of that channel's
    planes, never per patch, which would teach the model a mapping `restore` does not apply)."""
    from .io import open_input
    from .normalize import Intensity

    src = open_input(path)
    policy = NORMALIZATION[task] if task == "microscopy" else _natural_policy(src.dtype)
    intensity = Intensity.for_source(src, policy)
    return [LazyPlane(src, lead, intensity.at(lead)) for lead in src.leads()]


def _natural_policy(dtype) -> dict:
    # As 2-D training images: uint8 by /255, other integer data by percentiles (16-bit cameras rarely
    # fill their range), float as given.
    dtype = np.dtype(dtype)
    return {"mode": "natural"} if dtype == np.uint8 or dtype.kind == "f" else NORMALIZATION["microscopy"]


def _is_stack(path: Path) -> bool:
    if path.is_dir():
        return is_zarr_path(path)
    if input_format(path) != "tiff":
        return False
    import tifffile

    with tifffile.TiffFile(path) as tif:
        shape = tif.series[0].shape if tif.series else ()
    return len(shape) > 2 and not (len(shape) == 3 and shape[-1] in (3, 4))


def _training_file(p: Path) -> bool:
    return p.suffix.lower() in _IMG or (p.is_dir() and is_zarr_path(p))


def _training_images(folder: Path, include: str | None, task: str) -> list:
    """The training planes in ``folder``: 2-D images read at once (small), stacks read lazily."""
    files = list_files(folder, include, keep=_training_file, what="images or stacks")
    out = []
    for f in files:
        out.extend(_stack_planes(f, task) if _is_stack(f) else [_read_image(f, task)])
    return out


_IMG = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")


def list_files(folder: Path, include: str | None, keep=None, what: str = "images") -> list[Path]:
    """The entries of ``folder`` that ``keep`` accepts (default: image files), sorted by name and
    filtered by the ``include`` regex; training and fine-tuning select their files the same way."""
    if not folder.is_dir():
        raise FileNotFoundError(f"training data folder not found: {folder}")
    keep = keep or (lambda p: p.suffix.lower() in _IMG)
    files = sorted(p for p in folder.iterdir() if keep(p))
    if include:
        rx = re.compile(include)
        files = [p for p in files if rx.search(p.name)]
    if not files:
        raise FileNotFoundError(f"no {what} in {folder}" + (f" matching {include!r}" if include else ""))
    return files


class PatchSampler:
    """Random patches with flips/rot90 and the task's degradation, as (input, target) batches."""

    def __init__(self, task: str, clean: list[np.ndarray], pairs: list[tuple[np.ndarray, np.ndarray]],
                 patch: int, seed: int = 0, pairs_only: bool = False, sigma=None, noise: str = "poisson_gaussian"):
        if task not in DEGRADATIONS:
            raise ValueError(f"unknown task {task!r}: expected one of {', '.join(DEGRADATIONS)}")
        if task == "sr" and patch % 12:
            raise ValueError(f"sr training needs a patch size divisible by 12 (for x2/x3/x4), got {patch}")
        self.task, self.clean, self.pairs, self.patch = task, clean, pairs, patch
        self.pairs_only = pairs_only  # fine-tuning: (input, target) pairs as given, no synthetic degradation
        self.sigma = sigma_ranges(sigma)
        if noise not in NOISE_MODELS:
            raise ValueError(f"unknown noise model {noise!r}: expected one of {', '.join(NOISE_MODELS)}")
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        usable = [im for im in clean if min(im.shape) >= patch] + [p for p in pairs if min(p[0].shape) >= patch]
        if not usable:
            raise ValueError(f"no training image is at least {patch}x{patch} pixels")

    def _crop(self, arrays):
        h, w = arrays[0].shape
        y, x = self.rng.integers(0, h - self.patch + 1), self.rng.integers(0, w - self.patch + 1)
        k, flip = int(self.rng.integers(4)), bool(self.rng.integers(2))
        out = []
        for a in arrays:
            c = a[y: y + self.patch, x: x + self.patch]
            c = np.rot90(c, k)
            out.append(np.ascontiguousarray(c[:, ::-1] if flip else c))
        return out

    def _pick(self, pool):
        while True:
            item = pool[int(self.rng.integers(len(pool)))]
            first = item[0] if isinstance(item, tuple) else item
            if min(first.shape) >= self.patch:
                return item

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.rng
        if self.pairs_only or (self.task == "microscopy" and self.pairs and (not self.clean or r.random() < 0.5)):
            noisy, clean = self._crop(self._pick(self.pairs))
            return noisy, clean
        if self.task == "microscopy" and self.noise == "camera":
            return self._camera_sample()
        (clean,) = self._crop([self._pick(self.clean)])
        if self.task == "denoise":
            lo, hi = self.sigma[int(r.integers(len(self.sigma)))] if len(self.sigma) > 1 else self.sigma[0]
            return gaussian_noise(clean, r.uniform(lo, hi), r), clean
        if self.task == "sr":
            return bicubic_degrade(clean * 255.0, int(r.choice([2, 3, 4]))) / 255.0, clean
        if self.task == "jpeg":
            return jpeg_degrade(clean, int(r.integers(10, 41))), clean
        photons = float(np.exp(r.uniform(np.log(4), np.log(400))))
        return poisson_gaussian_noise(clean, photons, r.uniform(0, 0.06), r), clean

    def _camera_sample(self) -> tuple[np.ndarray, np.ndarray]:
        # Percentiles are taken over a context twice the patch (closer to the whole-stack statistics
        # `restore` uses than the patch alone), then a patch is cut from it.
        img = self._pick(self.clean)
        ctx = min(2 * self.patch, *img.shape)
        saved, self.patch = self.patch, ctx
        try:
            (region,) = self._crop([img])
        finally:
            self.patch = saved
        noisy, target = camera_noise(region, self.rng)
        y, x = self.rng.integers(0, ctx - self.patch + 1, size=2)
        sl = (slice(y, y + self.patch), slice(x, x + self.patch))
        return np.ascontiguousarray(noisy[sl]), np.ascontiguousarray(target[sl])

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(self.sample() for _ in range(n)))
        return (torch.from_numpy(np.stack(xs).astype(np.float32))[:, None],
                torch.from_numpy(np.stack(ys).astype(np.float32))[:, None])


class DevicePatchSampler:
    """Blind Gaussian-denoising batches made on the training device: the clean images are kept there,
    and cropping, the 8 flips/rotations and the noise are a few batched tensor operations. On a GPU the
    per-patch Python of ``PatchSampler`` would otherwise starve the model. The same
    distribution as ``PatchSampler`` for ``denoise``: uniform image, position, dihedral transform and
    sigma in [0, 75] (or the ``sigma`` ranges), noise unclipped."""

    def __init__(self, clean: list[np.ndarray], patch: int, device, seed: int = 0, sigma=None):
        if not all(isinstance(im, np.ndarray) for im in clean):
            raise TypeError("DevicePatchSampler takes in-memory 2-D arrays; stacks read lazily need PatchSampler")
        ims = [im.astype(np.float32, copy=False) for im in clean if min(im.shape) >= patch]
        if not ims:
            raise ValueError(f"no training image is at least {patch}x{patch} pixels")
        h, w = max(im.shape[0] for im in ims), max(im.shape[1] for im in ims)
        buf = np.zeros((len(ims), h, w), np.float32)  # padded; crops stay inside each image's own size
        for k, im in enumerate(ims):
            buf[k, : im.shape[0], : im.shape[1]] = im
        self.device = torch.device(device)
        self.images = torch.from_numpy(buf).to(self.device)
        self.limits = torch.tensor([[im.shape[0] - patch + 1, im.shape[1] - patch + 1] for im in ims],
                                   dtype=torch.float32, device=self.device)
        self.offsets = torch.arange(patch, device=self.device)
        self.patch = patch
        ranges = sigma_ranges(sigma)
        self.sigma_lo = torch.tensor([r[0] / 255.0 for r in ranges], device=self.device)
        self.sigma_span = torch.tensor([(r[1] - r[0]) / 255.0 for r in ranges], device=self.device)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g, dev = self.gen, self.device
        i = torch.randint(len(self.images), (n,), generator=g, device=dev)
        yx = (torch.rand(n, 2, generator=g, device=dev) * self.limits[i]).long()
        rows = (yx[:, 0, None] + self.offsets)[:, :, None]
        cols = (yx[:, 1, None] + self.offsets)[:, None, :]
        c = self.images[i[:, None, None], rows, cols]
        t = torch.rand(n, 3, generator=g, device=dev)[:, :, None, None] < 0.5  # transpose x flips: all 8
        c = torch.where(t[:, 0], c.transpose(1, 2), c)
        c = torch.where(t[:, 1], c.flip(1), c)
        c = torch.where(t[:, 2], c.flip(2), c)
        k = (torch.randint(len(self.sigma_lo), (n,), generator=g, device=dev) if len(self.sigma_lo) > 1
             else torch.zeros(n, dtype=torch.long, device=dev))
        sigma = (self.sigma_lo[k] + torch.rand(n, generator=g, device=dev) * self.sigma_span[k])[:, None, None]
        noisy = c + torch.randn(c.shape, generator=g, device=dev) * sigma
        return noisy[:, None].contiguous(), c[:, None].contiguous()


def _use_device_sampler(cfg, dev: torch.device, clean, pairs) -> bool:
    fits = cfg.task == "denoise" and not pairs and all(isinstance(im, np.ndarray) for im in clean)
    if cfg.sampler == "device" and not fits:
        raise ValueError("sampler 'device' makes Gaussian-denoising batches from in-memory 2-D images only "
                         "(task denoise, no --pairs, no stacks): use 'numpy'")
    return fits and (cfg.sampler == "device" or (cfg.sampler == "auto" and dev.type == "cuda"))


def _degradation_record(cfg: TrainConfig) -> dict:
    if cfg.task == "microscopy" and cfg.noise == "camera":
        return {"pairs": DEGRADATIONS["microscopy"]["pairs"], "camera": CAMERA_RANGES}
    return DEGRADATIONS[cfg.task]


def _load_data(cfg: TrainConfig):
    clean = [im for d in cfg.data for im in _training_images(Path(d), cfg.include, cfg.task)]
    pairs = []
    if cfg.pairs:
        if len(cfg.pairs) != 2:
            raise ValueError("pairs needs two folders: NOISY_DIR CLEAN_DIR")
        keep = _training_file
        noisy_files = list_files(Path(cfg.pairs[0]), cfg.include, keep=keep, what="images or stacks")
        clean_files = list_files(Path(cfg.pairs[1]), cfg.include, keep=keep, what="images or stacks")
        if len(noisy_files) != len(clean_files):
            raise ValueError(f"{len(noisy_files)} noisy vs {len(clean_files)} clean images: pairs must match 1:1")
        for n, c in zip(noisy_files, clean_files):
            a_planes, b_planes = _raw_planes(n), _raw_planes(c)
            if len(a_planes) != len(b_planes) or any(a.shape != b.shape for a, b in zip(a_planes, b_planes)):
                raise ValueError(f"{n.name} and {c.name} do not match plane for plane: a pair needs the same shape")
            pairs += [paired_target_frame(percentile_normalize(a), percentile_normalize(b))
                      for a, b in zip(a_planes, b_planes)]
        if cfg.task == "microscopy" and not cfg.data:
            clean = [p[1] for p in pairs]  # also synthesise Poisson-Gaussian noise on the clean targets
    if not clean and not pairs:
        raise ValueError("no training data: pass --data FOLDER (clean images) and/or --pairs NOISY CLEAN")
    return clean, pairs


def _build_model(cfg: TrainConfig, log=print) -> tuple[MemNet, dict]:
    """The model to train and, when continuing from weights, their training record. With ``init`` and a
    wider ``arch`` (same blocks and recursions), the trained model is widened function-preservingly."""
    if cfg.init:
        model, info = load_model(cfg.init)
        if cfg.arch:
            want, have = parse_arch(cfg.arch), model.config
            if want.blocks < have.blocks or want.recursions < have.recursions or want.channels < have.channels:
                raise ValueError(
                    f"--arch {cfg.arch} does not fit --init {info.name} (M{have.blocks}R{have.recursions}"
                    f"C{have.channels}): trained weights can only grow (more blocks, recursions or channels); "
                    f"drop --arch to continue with the same architecture")
            if want.channels > have.channels:
                log(f"widening {info.name} from {have.channels} to {want.channels} channels (same outputs)")
                model = widen(model, want.channels, seed=cfg.seed)
            if (want.blocks, want.recursions) != (have.blocks, have.recursions):
                log(f"deepening {info.name} from M{have.blocks}R{have.recursions} to M{want.blocks}R{want.recursions}"
                    f" (same outputs)")
                model = deepen(model, want.blocks, want.recursions, seed=cfg.seed)
        return model, {**(info.metadata.get("training") or {}), "name": info.name}
    return MemNet(**parse_arch(cfg.arch or DEFAULT_ARCH).as_dict()), {}


def recalibrate_bn(model: MemNet, sampler: PatchSampler, batches: int = 50, batch: int = 32,
                   device: str | torch.device = "cpu") -> MemNet:
    """Re-estimate every BatchNorm's running mean/variance as an exact average over ``batches`` fresh
    training batches (the weights are untouched), in place; returns the model in eval mode.

    The running statistics that training leaves behind are an exponential average of the last ~10
    batches: mid-run, while the weights move fast, they lag behind them (and each batch mixes
    degradations differently), so a checkpoint would be judged with stale statistics. On the denoiser
    3,600 steps in (Set12 σ 25) recalibrating moved 28.26 to 28.79 dB; at the end of a cosine decay the
    running averages are accurate (shipped sr/jpeg: -0.01/+0.003 dB). Outputs of a model in training
    mode do not depend on these statistics, so this can be done at any time, also after training."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or batches < 1:
        return model.eval()
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    dev = torch.device(device)
    with torch.no_grad():
        for _ in range(batches):
            x, _ = sampler.batch(batch)
            model(x.to(dev).contiguous(memory_format=torch.channels_last))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)
    return model.eval() if not was_training else model


def _validate(model, cfg: TrainConfig, sampler_val) -> dict[str, float]:
    if cfg.val_root:
        return evaluate_task(cfg.task, predictor(model, cfg.device), cfg.val_root, quick=True)
    # Fixed held-out batch: PSNR in model range (peak 1).
    x, y = sampler_val
    pred = predictor(model, cfg.device)
    vals = [psnr(pred(x[i, 0].numpy()), y[i, 0].numpy(), peak=1.0) for i in range(len(x))]
    return {"holdout": float(np.mean(vals))}


def _optimizer(cfg: TrainConfig, model):
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / (cfg.warmup + 1))
            * (0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)) * 0.99 + 0.01))
    else:  # the paper: divide by 10 every 1/4 of the run (their 20 epochs of 80)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.steps // 4), gamma=0.1)
    return opt, sched


def _fit_state(st: dict) -> FitState:
    """The run's state from a checkpoint (also those written before the shared fit loop)."""
    if "fit" in st:
        return FitState.from_dict(json.loads(st["fit"]))
    return FitState(step=int(st["step"]), best=float(st["best"]), history=json.loads(st.get("history", "[]")),
                    hours_before=float(st.get("hours", 0.0)))


def _resume(out: Path, model, opt, sched, mp, log) -> FitState:
    state_path, last_path = out / "state.pt", out / "last.safetensors"
    model_l, info_l = load_model(last_path)
    model.load_state_dict(model_l.state_dict())
    st = torch.load(state_path, weights_only=True)
    state = _fit_state(st)
    w_step = (info_l.metadata.get("training") or {}).get("steps")
    if w_step is not None and int(w_step) != state.step:
        raise ValueError(f"cannot resume {out}: last.safetensors is from step {w_step} but state.pt from step "
                         f"{state.step} (a checkpoint save was interrupted). Start a new run from those weights "
                         f"with --init {last_path} (new --out), or restore both files from a backup")
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    if st.get("scaler"):
        mp.scaler.load_state_dict(st["scaler"])
    log(f"resumed from step {state.step} (best validation {state.best:.2f} dB)")
    return state


def _record(cfg: TrainConfig, arch: str) -> dict:
    return {
        "description": f"MemNet {arch} for {cfg.task}",
        "normalization": NORMALIZATION[cfg.task],
        "degradation": _degradation_record(cfg) if not cfg.sigma else {
            **DEGRADATIONS[cfg.task], "sigma_mixture_255": cfg.sigma,
            "gaussian_sigma_255": [min(r[0] for r in cfg.sigma), max(r[1] for r in cfg.sigma)]},
        "training": {"config": cfg.to_dict()},
    }


def _training_record(meta_base: dict, state: FitState, previous: dict | None, dev) -> dict:
    hours = round(state.hours, 3)
    t = {**meta_base["training"], "steps": state.step, "hours": hours, "hardware": hardware_name(dev),
         "history": state.history[-50:]}
    if previous:
        # Continued from trained weights: the record keeps the cumulative recipe across runs/sessions.
        t["continued_from"] = {k: previous.get(k) for k in ("name", "steps", "hours", "total_steps",
                                                            "total_hours", "hardware") if k in previous}
        t["total_steps"] = int(previous.get("total_steps", previous.get("steps", 0))) + state.step
        t["total_hours"] = round(float(previous.get("total_hours", previous.get("hours", 0))) + hours, 3)
    return t


def train(cfg: TrainConfig, resume: bool = False, log=print, cancel=None) -> Path:
    """Train; returns the path of the best model (``OUT/best.safetensors``). ``cancel``: a
    ``threading.Event`` or a callable returning True, as for ``restore`` and ``finetune``; when it fires
    before the last step the run validates, saves a checkpoint (as ``--hours`` does) and raises
    ``Cancelled``; ``resume=True`` continues it."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dev = resolve_device(cfg.device)
    cfg = cfg.replace(device=str(dev))  # validation and the saved record use the device actually used
    state_path, last_path, best_path = out / "state.pt", out / "last.safetensors", out / "best.safetensors"
    mp = MixedPrecision(cfg.amp, dev)  # before loading data: a bad value fails at once
    sampler, make_sampler, val_batch = _samplers(cfg, dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: let cuDNN pick its fastest kernels
    model, previous = _build_model(cfg, log)
    c = model.config
    arch = f"M{c.blocks}R{c.recursions}C{c.channels}"
    model = model.to(dev).to(memory_format=torch.channels_last)
    opt, sched = _optimizer(cfg, model)
    state = FitState()
    if resume and state_path.exists() and last_path.exists():
        state = _resume(out, model, opt, sched, mp, log)
        sampler = make_sampler(cfg.seed + state.step)
    elif resume:
        log(f"nothing to resume in {out}: starting from " + (f"--init {cfg.init}" if cfg.init else "scratch"))
    meta_base = _record(cfg, arch)
    if state.step < cfg.steps and stop_requested(cancel):
        raise Cancelled(f"training stopped before step {state.step + 1}: nothing new to save")
    rate = _RateLog(cfg, log, sched)

    def train_step(step: int):
        x, y = sampler.batch(cfg.batch_size)
        x = x.to(dev).contiguous(memory_format=torch.channels_last)
        y = y.to(dev).contiguous(memory_format=torch.channels_last)
        final, branches = mp.forward(model, x)
        loss = multi_supervised_loss(final, branches, y, cfg.loss)
        # The paper's adjustable clipping: gradients bounded by theta / (current lr), theta = 0.01.
        mp.step(loss, opt, 0.01 / sched.get_last_lr()[0] if cfg.optimizer == "sgd" else None)
        sched.step()
        rate.add(step + 1, loss)
        return loss.detach()  # no .item() per step: a host sync each step would idle a GPU

    def validate():
        if cfg.bn_batches:  # exact BN statistics for the checkpoint (own RNG: the training stream is unchanged)
            recalibrate_bn(model, make_sampler(cfg.seed + 10**6 + state.step), cfg.bn_batches, cfg.batch_size, dev)
        metrics = _validate(model, cfg, val_batch)
        model.train()
        return {"score": float(np.mean(list(metrics.values()))), **metrics}

    def checkpoint(st: FitState, improved: bool):
        metrics = {k: v for k, v in st.history[-1].items() if k not in ("step", "loss", "score")}
        save_model(model, last_path, name=cfg.name or f"{cfg.task}-{arch}", task=cfg.task,
                   metadata={**meta_base, "training": _training_record(meta_base, st, previous, dev),
                             "metrics": metrics})
        atomic_save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": mp.scaler.state_dict(),
                     "fit": json.dumps(st.as_dict())}, state_path)
        if improved:
            last_path.with_suffix(".tmp").write_bytes(last_path.read_bytes())
            last_path.with_suffix(".tmp").replace(best_path)
        log(f"validation at step {st.step}: " + ", ".join(f"{k} {v:.2f} dB" for k, v in metrics.items())
            + ("  (best)" if improved else ""))

    model.train()
    fit(state, steps=cfg.steps, val_every=cfg.val_every, seconds=None if cfg.hours is None else cfg.hours * 3600,
        train_step=train_step, validate=validate, checkpoint=checkpoint, stop=cancel, log=log)
    if state.ended == "time budget":
        log(f"time budget of {cfg.hours} h reached at step {state.step}: checkpoint saved, resume with --resume")
    elif state.ended == "stopped":
        raise Cancelled(f"training stopped at step {state.step}: checkpoint saved, resume with --resume")
    return best_path


class _RateLog:
    """The training log line every ``log_every`` steps: loss, patches/s, lr, elapsed, ETA."""

    def __init__(self, cfg: TrainConfig, log, sched):
        self.cfg, self.log, self.sched = cfg, log, sched
        self.t0 = self.t_log = time.time()
        self.n, self.acc = 0, 0.0

    def add(self, step: int, loss) -> None:
        cfg = self.cfg
        self.acc += loss.detach()
        self.n += 1
        if step % cfg.log_every and step != cfg.steps:
            return
        rate = self.n * cfg.batch_size / max(time.time() - self.t_log, 1e-9)
        eta = (cfg.steps - step) * cfg.batch_size / rate if rate > 0 else 0
        self.log(f"step {step}/{cfg.steps}  loss {float(self.acc) / self.n:.5f}  {rate:.1f} patches/s  "
                 f"lr {self.sched.get_last_lr()[0]:.2e}  elapsed {(time.time() - self.t0) / 60:.1f} min  "
                 f"ETA {eta / 60:.1f} min")
        self.t_log, self.n, self.acc = time.time(), 0, 0.0


def _samplers(cfg: TrainConfig, dev):
    """The training sampler, a factory for re-seeded ones, and the held-out batch (None with a validation
    set: ~5% of the images are held out when none is given)."""
    clean, pairs = _load_data(cfg)
    val_batch = None
    if not cfg.val_root:
        vs = PatchSampler(cfg.task, clean[: max(1, len(clean) // 20)], pairs[: max(1, len(pairs) // 20)] if pairs
                          else [], cfg.patch, seed=12345)
        val_batch = vs.batch(64)
        clean = clean[max(1, len(clean) // 20):] or clean
        pairs = pairs[max(1, len(pairs) // 20):] or pairs
    on_device = _use_device_sampler(cfg, dev, clean, pairs)

    def make_sampler(seed: int):
        if on_device:
            return DevicePatchSampler(clean, cfg.patch, dev, seed=seed, sigma=cfg.sigma)
        return PatchSampler(cfg.task, clean, pairs, cfg.patch, seed=seed, sigma=cfg.sigma, noise=cfg.noise)

    return make_sampler(cfg.seed), make_sampler, val_batch


class MixedPrecision:
    """The forward/backward of one training step under ``amp`` ("auto": on for CUDA; "on": also bf16 on
    CPU; "off"), shared by training and fine-tuning."""

    def __init__(self, amp: str, dev: torch.device):
        if amp not in ("auto", "on", "off"):
            raise ValueError(f"amp must be 'auto', 'on' or 'off', got {amp!r}")
        self.dev, self.dtype = dev, None
        if amp == "on" or (amp == "auto" and dev.type == "cuda"):
            # CPU: bf16 via oneDNN, about 2x faster where the CPU has native bf16 (AVX512-BF16/AMX).
            cuda_fp16 = dev.type == "cuda" and not torch.cuda.is_bf16_supported()
            self.dtype = torch.float16 if cuda_fp16 else torch.bfloat16
        # fp16 needs loss scaling against underflowing gradients; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.dtype == torch.float16)

    def forward(self, model, x):
        """``model(x, branches=True)`` with outputs in fp32: the residuals the loss compares are small
        next to the image."""
        with torch.autocast(self.dev.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            final, branches = model(x, branches=True)
        return final.float(), [b.float() for b in branches]

    def step(self, loss, opt, clip: float | None = None):
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if clip is not None:
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        self.scaler.step(opt)
        self.scaler.update()


def hardware_name(dev: torch.device) -> str:
    import os
    import platform

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads of {os.cpu_count()})"
