"""Issue #35 item 3 (session 19): why the shipped `microscopy` loses to the previous model on two 3D-RCAN crops.

1. Each model's PSNR as is and after its own oracle monotone curve (is the loss an intensity mapping?).
2. On the noisiest crops, a Gaussian blur of each output and the outputs' high-frequency energy (under-smoothing?).
3. W2S clean images with Poisson-Gaussian noise at ~15 dB, rendered with or without a black level that floors
   40 % of the pixels (is it the clipping?).

  git show b60d8b7:src/memnet/weights/microscopy-M4R4C32.safetensors > /tmp/micro-prev.safetensors
  PYTHONPATH=src python training/experiments/rcan_undersmoothing.py /tmp/micro-prev.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy.ndimage import gaussian_filter

import memnet
from memnet.evaluate import ood_pairs, percentile_normalize, predictor
from memnet.metrics import affine_fit, psnr

sys.path.insert(0, str(Path(__file__).parent))
from monotone_calibration import fit_monotone  # noqa: E402

DATA = Path("../shared/data")


def score(y: np.ndarray, c: np.ndarray) -> float:
    return psnr(affine_fit(y, c), c)


def main() -> None:
    torch.set_num_threads(1)
    preds = {"previous": predictor(memnet.load_model(sys.argv[1])[0]),
             "shipped": predictor(memnet.load_model("microscopy")[0])}
    for noisy_path, clean_path in ood_pairs(DATA / "microscopy_ood"):
        x = percentile_normalize(tifffile.imread(noisy_path).astype(np.float64))
        c = tifffile.imread(clean_path).astype(np.float64)
        cells = []
        for name, pred in preds.items():
            y = pred(x)
            blur = gaussian_filter(y, 1.0)
            cells.append(f"{name} {score(y, c):.2f} (oracle curve {score(fit_monotone(y, c)(y), c):.2f}, "
                         f"blur 1 {score(blur, c):.2f}, hf {np.std(y - blur):.4f})")
        print(f"{noisy_path.stem:18s} " + " | ".join(cells), flush=True)
    rng = np.random.default_rng(0)
    for fov in ("035", "031"):
        c = tifffile.imread(DATA / f"W2S_train_8bit/avg400_clean/target_avg400_{fov}_1.tif").astype(np.float64)
        raw = rng.poisson(c / c.max() * 6).astype(float) + rng.normal(0, 0.8, c.shape)  # a few photons
        floored = np.clip((raw - np.quantile(raw, 0.4)) * 60, 0, 255)
        for tag, img in (("unclipped", raw * 40 + 20), ("black level", floored)):
            x = percentile_normalize(img)
            cells = [f"{name} {score(pred(x), c):.2f} (blur 1 {score(gaussian_filter(pred(x), 1.0), c):.2f})"
                     for name, pred in preds.items()]
            print(f"W2S {fov}_1 {tag:11s} noisy {score(x, c):.2f} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
