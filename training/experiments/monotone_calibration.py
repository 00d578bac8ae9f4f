"""How much of the error on microscopy_ood is an intensity mapping (issue #35, session 19): the shipped model's
output passed through a monotone curve fitted (a) to the clean image, an oracle bound, and (b) self-supervised,
the curve that maps the model's output on one 2x2 sub-image to the noisy neighbouring pixels. PSNR after the
usual affine fit; prints the change over the shipped model per image.

  PYTHONPATH=src python training/experiments/monotone_calibration.py [MODEL]
"""

from __future__ import annotations

import sys

import numpy as np
import tifffile
import torch

import memnet
from memnet.evaluate import ood_pairs, percentile_normalize, predictor
from memnet.metrics import affine_fit, psnr


def _pool_adjacent_violators(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``y`` in weighted least squares."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            a, b = blocks.pop(), blocks.pop()
            blocks.append([(a[0] * a[1] + b[0] * b[1]) / (a[1] + b[1]), a[1] + b[1], a[2] + b[2]])
    return np.concatenate([np.full(k, m) for m, _, k in blocks])


def fit_monotone(f: np.ndarray, t: np.ndarray, bins: int = 64):
    """A monotone piecewise-linear map g with g(f) close to t: bin means over quantiles of f, made monotone."""
    f, t = np.ravel(f), np.ravel(t)
    edges = np.quantile(f, np.linspace(0, 1, bins + 1))
    idx = np.clip(np.searchsorted(edges, f, side="right") - 1, 0, bins - 1)
    n = np.bincount(idx, minlength=bins).astype(float)
    ok = n > 0
    xs = np.bincount(idx, f, minlength=bins)[ok] / n[ok]
    ys = _pool_adjacent_violators(np.bincount(idx, t, minlength=bins)[ok] / n[ok], n[ok])
    return lambda z: np.interp(z, xs, ys)


def main() -> None:
    torch.set_num_threads(1)
    pred = predictor(memnet.load_model(sys.argv[1] if len(sys.argv) > 1 else "microscopy")[0])
    for noisy_path, clean_path in ood_pairs("../shared/data/microscopy_ood"):
        x = percentile_normalize(tifffile.imread(noisy_path).astype(np.float64))
        c = tifffile.imread(clean_path).astype(np.float64)
        y = pred(x)
        p0 = psnr(affine_fit(y, c), c)
        oracle = psnr(affine_fit(fit_monotone(y, c)(y), c), c)
        h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
        f1 = pred(x[0:h:2, 0:w:2]).ravel()  # one sub-image; its two neighbouring sub-images are the targets
        g = fit_monotone(np.concatenate([f1, f1]), np.concatenate([x[1:h:2, 1:w:2].ravel(), x[0:h:2, 1:w:2].ravel()]))
        selfsup = psnr(affine_fit(g(y), c), c)
        print(f"{noisy_path.stem:20s} shipped {p0:.2f}  oracle monotone {oracle - p0:+.2f}  "
              f"self-supervised {selfsup - p0:+.2f}", flush=True)


if __name__ == "__main__":
    main()
