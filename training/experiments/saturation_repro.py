"""Issue #35 item 3 (session 20): the second `microscopy` model's loss on the 3D-RCAN crops, reproduced on W2S.

W2S 035/031/033 channel-1 clean images under Poisson noise (peak 6 or 20 photons, read noise 0.8), rendered to
8 bits with the display range at percentiles lo/hi of the noisy counts (the 3D-RCAN crops have 3-43 % of their
pixels at 0 and 8-45 % at 255). Prints each model's PSNR (affine fit to the clean image, peak 255).

  git show b60d8b7:src/memnet/weights/microscopy-M4R4C32.safetensors > /tmp/first.safetensors
  git show 47987fa:src/memnet/weights/microscopy-M4R4C32.safetensors > /tmp/second.safetensors
  PYTHONPATH=src python training/experiments/saturation_repro.py /tmp/first.safetensors /tmp/second.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tifffile
import torch

import memnet
from memnet.evaluate import percentile_normalize, predictor
from memnet.metrics import affine_fit, psnr

DATA = Path("../shared/data")
RANGES = ((0.0, 1.0), (0.4, 1.0), (0.0, 0.8), (0.4, 0.8), (0.25, 0.75))  # display range, as quantiles


def main() -> None:
    torch.set_num_threads(1)
    preds = {Path(m).stem: predictor(memnet.load_model(m)[0]) for m in sys.argv[1:]}
    rng = np.random.default_rng(0)
    for fov in ("035", "031", "033"):
        c = tifffile.imread(DATA / f"W2S_train_8bit/avg400_clean/target_avg400_{fov}_1.tif").astype(np.float64)
        for peak in (6, 20):
            raw = rng.poisson(c / c.max() * peak).astype(float) + rng.normal(0, 0.8, c.shape)
            for lo_q, hi_q in RANGES:
                lo, hi = np.quantile(raw, [lo_q, hi_q])
                x = percentile_normalize(np.clip(np.rint((raw - lo) * 255 / (hi - lo)), 0, 255))
                cells = " | ".join(f"{k} {psnr(affine_fit(p(x), c), c):.2f}" for k, p in preds.items())
                print(f"{fov} peak {peak:3d} range {lo_q:.2f}/{hi_q:.2f} noisy {psnr(affine_fit(x, c), c):.2f} | "
                      + cells, flush=True)


if __name__ == "__main__":
    main()
