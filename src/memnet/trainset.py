"""Training data: the images and stacks a run reads (2-D images at once, stacks plane by plane, lazily),
their intensity mapping, and the samplers that cut random patches and degrade them on the fly
(`PatchSampler` on the CPU, `DevicePatchSampler` on the training device). Used by `train` and `finetune`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .degrade import bicubic_degrade, camera_noise, camera_ranges, gaussian_noise, jpeg_degrade, poisson_gaussian_noise
from .evaluate import percentile_normalize
from .metrics import affine_fit
from .sources import input_format, is_zarr_path
from .train_options import NOISE_MODELS, sigma_ranges

__all__ = ["DEGRADATIONS", "NORMALIZATION", "DevicePatchSampler", "LazyPlane", "PatchSampler", "is_stack",
           "list_files", "load_data", "paired_target_frame", "raw_planes", "read_image", "stack_planes",
           "training_images", "use_device_sampler"]

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


def paired_target_frame(noisy: np.ndarray, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A (noisy, clean) training pair with the clean target mapped onto the noisy image's intensity frame.

    Percentiles of a noisy image are inflated by its noise, so the two images of a pair normalised
    each by its own percentiles differ in gain by a factor that varies from image to image (W2S:
    0.53-0.94). A network trained on that must guess the gain from local content, which it cannot,
    and learns a content-dependent brightness change. The least-squares affine map of clean onto
    noisy (noise only in the regressand, so unbiased) puts the target where restore's output belongs:
    the input's own normalised range."""
    return noisy, affine_fit(clean, noisy).astype(np.float32)


def read_image(path: Path, task: str = "denoise") -> np.ndarray:
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


def raw_planes(path: Path) -> list[np.ndarray]:
    """The raw 2-D planes of an image or stack file, for paired data (read whole: a pair's intensity
    frames are matched over the whole plane)."""
    if is_stack(path):
        return [p.src.read_plane(p.lead) for p in stack_planes(path, "microscopy")]
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
        if isinstance(key, tuple) and key and key[0] is Ellipsis:  # plane[..., ys, xs], as a sampler crops
            key = key[1:]
        sy, sx = key if isinstance(key, tuple) else (key, slice(None))
        return self.normalizer.forward(self.src.read_plane(self.lead, sy, sx))


def stack_planes(path: Path, task: str) -> list[LazyPlane]:
    """Every (Y, X) plane of a stack (all other axes, channels included, enumerate planes), each mapped
    by its channel's normaliser (`Intensity.for_source`: computed once from a sample of that channel's
    planes, never per patch, which would teach the model a mapping `restore` does not apply)."""
    from .normalize import Intensity
    from .sources import open_input

    src = open_input(path)
    policy = NORMALIZATION[task] if task == "microscopy" else natural_policy(src.dtype)
    intensity = Intensity.for_source(src, policy)
    return [LazyPlane(src, lead, intensity.at(lead)) for lead in src.leads()]


def natural_policy(dtype) -> dict:
    """The normalisation policy of a training image of this dtype for the natural-image tasks."""
    # As 2-D training images: uint8 by /255, other integer data by percentiles (16-bit cameras rarely
    # fill their range), float as given.
    dtype = np.dtype(dtype)
    return {"mode": "natural"} if dtype == np.uint8 or dtype.kind == "f" else NORMALIZATION["microscopy"]


def is_stack(path: Path) -> bool:
    """Whether ``path`` holds more than one plane (a Zarr store, or a TIFF beyond 2-D other than one RGB(A) image), to
    be read plane by plane."""
    if path.is_dir():
        return is_zarr_path(path)
    if input_format(path) != "tiff":
        return False
    import tifffile

    with tifffile.TiffFile(path) as tif:
        shape = tif.series[0].shape if tif.series else ()
    return len(shape) > 2 and not (len(shape) == 3 and shape[-1] in (3, 4))


def training_file(p: Path) -> bool:
    """Whether ``p`` is a training image or stack by its name (an image suffix or a Zarr store)."""
    return p.suffix.lower() in IMAGE_SUFFIXES or (p.is_dir() and is_zarr_path(p))


def training_images(folder: Path, include: str | None, task: str) -> list:
    """The training planes in ``folder``: 2-D images read at once (small), stacks read lazily."""
    files = list_files(folder, include, keep=training_file, what="images or stacks")
    out = []
    for f in files:
        out.extend(stack_planes(f, task) if is_stack(f) else [read_image(f, task)])
    return out


IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")


def list_files(folder: Path, include: str | None, keep=None, what: str = "images") -> list[Path]:
    """The entries of ``folder`` that ``keep`` accepts (default: image files), sorted by name and
    filtered by the ``include`` regex; training and fine-tuning select their files the same way."""
    if not folder.is_dir():
        raise FileNotFoundError(f"training data folder not found: {folder}")
    keep = keep or (lambda p: p.suffix.lower() in IMAGE_SUFFIXES)
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
        # Pairs may be (planes, Y, X) stacks (a context model's input): patches are cut in the last two axes.
        usable = [im for im in clean if min(im.shape) >= patch] + [p for p in pairs if min(p[0].shape[-2:]) >= patch]
        if not usable:
            raise ValueError(f"no training image is at least {patch}x{patch} pixels")

    def _crop(self, arrays):
        h, w = arrays[0].shape[-2:]
        y, x = self.rng.integers(0, h - self.patch + 1), self.rng.integers(0, w - self.patch + 1)
        k, flip = int(self.rng.integers(4)), bool(self.rng.integers(2))
        out = []
        for a in arrays:
            c = a[..., y: y + self.patch, x: x + self.patch]
            c = np.rot90(c, k, axes=(-2, -1))
            out.append(np.ascontiguousarray(c[..., ::-1] if flip else c))
        return out

    def _pick(self, pool):
        while True:
            item = pool[int(self.rng.integers(len(pool)))]
            first = item[0] if isinstance(item, tuple) else item
            if min(first.shape[-2:]) >= self.patch:
                return item

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """One (input, target) training pair: a cropped, flipped/rotated patch and its degradation for the task (a real
        noisy/clean pair where given)."""
        r = self.rng
        if self.pairs_only or (self.task == "microscopy" and self.pairs and (not self.clean or r.random() < 0.5)):
            noisy, clean = self._crop(self._pick(self.pairs))
            return noisy, clean
        if self.task == "microscopy" and self.noise.startswith("camera"):
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
        noisy, target = camera_noise(region, self.rng, camera_ranges(self.noise))
        y, x = self.rng.integers(0, ctx - self.patch + 1, size=2)
        sl = (slice(y, y + self.patch), slice(x, x + self.patch))
        return np.ascontiguousarray(noisy[sl]), np.ascontiguousarray(target[sl])

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` pairs as float32 tensors (N, 1, p, p), on the CPU ((N, planes, p, p) for stacks)."""
        xs, ys = zip(*(self.sample() for _ in range(n)))

        def tensor(arrs):
            t = torch.from_numpy(np.stack(arrs).astype(np.float32))
            return t[:, None] if t.ndim == 3 else t

        return tensor(xs), tensor(ys)


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
        """``n`` (noisy, clean) patches as tensors (N, 1, p, p), made on the device."""
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


def use_device_sampler(cfg, dev: torch.device, clean, pairs) -> bool:
    """Whether to make batches on the device (`DevicePatchSampler`): only for Gaussian denoising of in-memory 2-D
    images, by default on CUDA; a ValueError when asked for where it cannot serve."""
    fits = cfg.task == "denoise" and not pairs and all(isinstance(im, np.ndarray) for im in clean)
    if cfg.sampler == "device" and not fits:
        raise ValueError("sampler 'device' makes Gaussian-denoising batches from in-memory 2-D images only "
                         "(task denoise, no --pairs, no stacks): use 'numpy'")
    return fits and (cfg.sampler == "device" or (cfg.sampler == "auto" and dev.type == "cuda"))


def load_data(cfg) -> tuple[list, list]:
    """The clean images and (noisy, clean) pairs of a `TrainConfig` (task, data, pairs, include)."""
    clean = [im for d in cfg.data for im in training_images(Path(d), cfg.include, cfg.task)]
    pairs = []
    if cfg.pairs:
        if len(cfg.pairs) != 2:
            raise ValueError("pairs needs two folders: NOISY_DIR CLEAN_DIR")
        keep = training_file
        noisy_files = list_files(Path(cfg.pairs[0]), cfg.include, keep=keep, what="images or stacks")
        clean_files = list_files(Path(cfg.pairs[1]), cfg.include, keep=keep, what="images or stacks")
        if len(noisy_files) != len(clean_files):
            raise ValueError(f"{len(noisy_files)} noisy vs {len(clean_files)} clean images: pairs must match 1:1")
        for n, c in zip(noisy_files, clean_files):
            a_planes, b_planes = raw_planes(n), raw_planes(c)
            if len(a_planes) != len(b_planes) or any(a.shape != b.shape for a, b in zip(a_planes, b_planes)):
                raise ValueError(f"{n.name} and {c.name} do not match plane for plane: a pair needs the same shape")
            pairs += [paired_target_frame(percentile_normalize(a), percentile_normalize(b))
                      for a, b in zip(a_planes, b_planes)]
        if cfg.task == "microscopy" and not cfg.data:
            clean = [p[1] for p in pairs]  # also synthesise Poisson-Gaussian noise on the clean targets
    if not clean and not pairs:
        raise ValueError("no training data: pass --data FOLDER (clean images) and/or --pairs NOISY CLEAN")
    return clean, pairs


