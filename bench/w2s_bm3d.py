"""BM3D on W2S fields of view 031-040 (the classical peer of the microscopy model), at its best case:
sigma = the std of (noisy - least-squares affine fit of the clean image to it), per image. Result
scored like our models: affine fit to the clean image, PSNR peak 255.

  python bench/w2s_bm3d.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tifffile

from memnet.evaluate import w2s_pairs
from memnet.metrics import affine_fit, psnr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--fovs", type=int, nargs=2, default=(31, 40))
    args = ap.parse_args()
    import bm3d

    vals, sigmas, t0 = [], [], time.perf_counter()
    for n, c in w2s_pairs(f"{args.data_root}/W2S_train_8bit", range(args.fovs[0], args.fovs[1] + 1)):
        noisy = tifffile.imread(n).astype(np.float64)
        clean = tifffile.imread(c).astype(np.float64)
        sigma = float(np.std(noisy - affine_fit(clean, noisy)))  # best case: the true noise level
        den = bm3d.bm3d(noisy, sigma_psd=sigma)
        vals.append(psnr(affine_fit(den, clean), clean))
        sigmas.append(sigma)
        print(f"{n.name}: sigma {sigma:.2f}, PSNR {vals[-1]:.2f} dB", flush=True)
    print(f"BM3D (best-case sigma, mean {np.mean(sigmas):.2f}) on W2S {args.fovs[0]:03d}-{args.fovs[1]:03d}: "
          f"{np.mean(vals):.2f} dB over {len(vals)} images ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
