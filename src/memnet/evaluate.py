"""Validation figures with the conventions of ../shared/data/README.md (see docs/models.md).

A *predictor* maps a 2-D float32 image in model range to the restored image in the same range.
``identity`` gives the classical baselines (bicubic for SR, the JPEG itself for deblocking)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .degrade import bicubic_degrade, gaussian_noise, jpeg_degrade
from .metrics import affine_fit, psnr, rgb_to_y
from .model import self_ensemble
from .normalize import Normalizer

Predictor = Callable[[np.ndarray], np.ndarray]

__all__ = ["predictor", "identity", "eval_denoise", "eval_sr", "eval_jpeg", "eval_w2s", "eval_ood", "ood_pairs",
           "evaluate_task"]

_IMG = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")


def identity(x: np.ndarray) -> np.ndarray:
    """The do-nothing predictor: scores the degraded input itself (the noisy, bicubic or JPEG baseline)."""
    return x


def predictor(model: torch.nn.Module, device: str | torch.device = "cpu", ensemble: bool = False,
              backend: str | None = None) -> Predictor:
    """Whole-image inference (validation images are small); BN in eval mode. ``ensemble``: the mean
    over the 8 flips/rotations (``memnet.self_ensemble``), as ``restore(ensemble=True)``. ``backend``: run the
    inference form on that restore backend (`memnet.inference.make_backend`) instead of the module itself."""
    dev = torch.device(device)
    net = model
    if backend is not None:
        from .inference import make_backend

        net, _ = make_backend(model, dev, backend)

    def run(x: np.ndarray) -> np.ndarray:
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None].to(dev)
            y = self_ensemble(net, t) if ensemble else net(t)
        model.train(was_training)
        return y[0, 0].float().cpu().numpy()

    return run


def _images(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMG)
    if not files:
        raise FileNotFoundError(f"no images found in {folder}")
    return files


def load_y(path: Path) -> np.ndarray:
    """Gray or Y channel in [0, 255] (float64, unrounded)."""
    return rgb_to_y(np.asarray(Image.open(path).convert("RGB" if _is_color(path) else "L")))


def _is_color(path: Path) -> bool:
    with Image.open(path) as im:
        return im.mode not in ("L", "I", "I;16", "F", "1")


def eval_denoise(pred: Predictor, folder, sigmas=(15, 25, 50), limit: int | None = None) -> dict[str, float]:
    """Mean PSNR (dB, Y channel, [0, 255]) per Gaussian noise level over the images in ``folder``; the noise is seeded
    per image and level, so runs compare."""
    out = {}
    files = _images(Path(folder))[:limit]
    for sigma in sigmas:
        vals = []
        for i, f in enumerate(files):
            clean = np.rint(load_y(f))
            rng = np.random.default_rng(1000 * sigma + i)  # fixed seed per image and sigma
            noisy = gaussian_noise(clean / 255.0, sigma, rng)
            res = np.clip(pred(noisy) * 255.0, 0, 255)
            vals.append(psnr(res, clean))
        out[f"sigma{sigma}"] = float(np.mean(vals))
    return out


def eval_sr(pred: Predictor, folder, scales=(2, 3, 4), limit: int | None = None) -> dict[str, float]:
    """Mean PSNR (dB, Y channel) per SR factor over the images in ``folder``: bicubic down and up as input, ``scale``
    pixels of border left out."""
    out = {}
    files = _images(Path(folder))[:limit]
    for s in scales:
        vals = []
        for f in files:
            y = load_y(f)
            h, w = (y.shape[0] // s) * s, (y.shape[1] // s) * s
            hr = y[:h, :w]
            inp = bicubic_degrade(hr, s) / 255.0
            res = np.rint(np.clip(pred(inp) * 255.0, 0, 255))
            vals.append(psnr(res[s:-s, s:-s], np.rint(hr)[s:-s, s:-s]))
        out[f"x{s}"] = float(np.mean(vals))
    return out


def eval_jpeg(pred: Predictor, folder, qualities=(10, 20), limit: int | None = None) -> dict[str, float]:
    """Mean PSNR (dB, Y channel) per JPEG quality over the images in ``folder``, the input encoded with Pillow."""
    out = {}
    files = _images(Path(folder))[:limit]
    for q in qualities:
        vals = []
        for f in files:
            clean = np.clip(np.rint(load_y(f)), 0, 255)
            inp = jpeg_degrade(clean / 255.0, q)
            res = np.clip(pred(inp) * 255.0, 0, 255)
            vals.append(psnr(res, clean))
        out[f"q{q}"] = float(np.mean(vals))
    return out


def w2s_pairs(root, fovs, channels=(0, 1, 2)) -> list[tuple[Path, Path]]:
    """The W2S (noisy average-of-1, clean average-of-400) file pairs of the fields of view ``fovs`` and ``channels``
    found under ``root``."""
    root = Path(root)
    pairs = []
    for fov in fovs:
        for c in channels:
            n = root / "avg1_noisy" / f"input_avg1_{fov:03d}_{c}.tif"
            t = root / "avg400_clean" / f"target_avg400_{fov:03d}_{c}.tif"
            if n.exists() and t.exists():
                pairs.append((n, t))
    if not pairs:
        raise FileNotFoundError(f"no W2S pairs for fields of view {list(fovs)} under {root}")
    return pairs


def percentile_normalize(x: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """One image by its own percentiles: the microscopy models' inference policy (memnet.normalize),
    so training, validation and restore map intensities the same way."""
    return Normalizer.for_data(x, {"mode": "percentile", "low": low, "high": high}).forward(x)


def eval_w2s(pred: Predictor, root, fovs=range(31, 41), channels=(0, 1, 2), low=1.0, high=99.8) -> dict[str, float]:
    """Noisy image normalised by its percentiles (the microscopy models' policy), restored, then the
    least-squares affine fit to the clean image; PSNR peak 255."""
    import tifffile

    vals = []
    for n, t in w2s_pairs(root, fovs, channels):
        noisy = tifffile.imread(n).astype(np.float64)
        clean = tifffile.imread(t).astype(np.float64)
        res = pred(percentile_normalize(noisy, low, high))
        vals.append(psnr(affine_fit(res, clean), clean))
    return {"W2S": float(np.mean(vals))}


def ood_pairs(root) -> list[tuple[Path, Path]]:
    """The ``microscopy_ood`` pairs (noisy, clean), same file name in both folders."""
    root = Path(root)
    noisy = sorted((root / "noisy").glob("*.tif"))
    if not noisy:
        raise FileNotFoundError(f"no microscopy_ood pairs under {root} (expected noisy/*.tif and clean/*.tif)")
    return [(n, root / "clean" / n.name) for n in noisy]


def eval_ood(pred: Predictor, root, low=1.0, high=99.8, per_image: bool = False) -> dict[str, float]:
    """Microscopes the models never saw (``microscopy_ood``): scored like W2S (percentile-normalised
    input, affine fit of the result to the clean image, PSNR peak 255). ``OOD`` is the mean over images;
    ``per_image`` adds one entry per file stem."""
    import tifffile

    out = {}
    for n, t in ood_pairs(root):
        noisy = tifffile.imread(n).astype(np.float64)
        clean = tifffile.imread(t).astype(np.float64)
        res = pred(percentile_normalize(noisy, low, high))
        out[n.stem] = psnr(affine_fit(res, clean), clean)
    return {"OOD": float(np.mean(list(out.values()))), **(out if per_image else {})}


def evaluate_task(task: str, pred: Predictor, data_root, quick: bool = False) -> dict[str, float]:
    """The validation table of one task. ``quick`` uses a subset (for per-epoch validation)."""
    root = Path(data_root)
    if task == "denoise":
        return eval_denoise(pred, root / "Set12", sigmas=(25,) if quick else (15, 25, 50))
    if task == "sr":
        return eval_sr(pred, root / "Set14", scales=(3,) if quick else (2, 3, 4), limit=6 if quick else None)
    if task == "jpeg":
        return eval_jpeg(pred, root / "Set14", qualities=(10,) if quick else (10, 20), limit=6 if quick else None)
    if task == "microscopy":
        out = eval_w2s(pred, root / "W2S_train_8bit", channels=(1,) if quick else (0, 1, 2))
        if (root / "microscopy_ood" / "noisy").is_dir():  # other microscopes: the generalisation check
            out.update(eval_ood(pred, root / "microscopy_ood"))
        return out
    raise ValueError(f"unknown task {task!r}")
