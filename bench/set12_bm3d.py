"""BM3D on Set12 (the classical peer of the denoise model), scored exactly like our models: the same
noisy images (memnet.evaluate.eval_denoise, fixed seeds) and PSNR, BM3D given the true sigma.

  python bench/set12_bm3d.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import time

from memnet.evaluate import eval_denoise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--sigmas", type=int, nargs="+", default=(15, 25, 50))
    args = ap.parse_args()
    import bm3d

    t0 = time.perf_counter()
    for sigma in args.sigmas:
        # eval_denoise hands images in [0, 1]; bm3d takes sigma in the same units.
        res = eval_denoise(lambda x, s=sigma: bm3d.bm3d(x, sigma_psd=s / 255.0), f"{args.data_root}/Set12",
                           sigmas=(sigma,))
        print(f"BM3D Set12 sigma {sigma}: {res[f'sigma{sigma}']:.2f} dB ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
