"""Microscopy models on microscopes they never saw: every image of ../shared/data/microscopy_ood, and
W2S 031-040 (channels 0-2) as the in-distribution check. Prints one markdown row per image: the noisy
input, BM3D at its best-case sigma (with --bm3d, needs `pip install bm3d`), then each model, with the
seconds each took. Scored like W2S: percentile-normalised input, least-squares affine fit of the result
to the clean image, PSNR peak 255. The rcan_* targets are deconvolved high-SNR images: compare rows,
not absolute values.

  python bench/ood_microscopy.py --data-root ../shared/data --models microscopy runs/x/best.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
from _common import machine

import memnet
from memnet.degrade import affine_fit, psnr
from memnet.evaluate import ood_pairs, percentile_normalize, predictor, w2s_pairs


def _bm3d(noisy: np.ndarray, clean: np.ndarray) -> np.ndarray:
    import bm3d

    sigma = float(np.std(noisy - affine_fit(clean, noisy)))  # best case: the true noise level
    return bm3d.bm3d(noisy, sigma_psd=sigma)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--models", nargs="+", default=["microscopy"], help="zoo names or .safetensors paths")
    ap.add_argument("--bm3d", action="store_true", help="add BM3D at its best-case sigma (slow)")
    ap.add_argument("--no-w2s", action="store_true", help="skip W2S 031-040")
    args = ap.parse_args()
    root = Path(args.data_root)
    methods = {"noisy": lambda x, c: x}
    if args.bm3d:
        methods["BM3D best σ"] = lambda x, c: _bm3d(x, c)
    for spec in args.models:
        model, info = memnet.load_model(spec)
        pred = predictor(model)
        label = info.name if spec == info.name or not spec.endswith(".safetensors") else f"{info.name} ({spec})"
        methods[label] = lambda x, c, pred=pred: pred(percentile_normalize(x))
    rows = [(n.stem, n, c) for n, c in ood_pairs(root / "microscopy_ood")]
    if not args.no_w2s:
        rows += [("W2S " + n.stem.replace("input_avg1_", ""), n, c)
                 for n, c in w2s_pairs(root / "W2S_train_8bit", range(31, 41))]
    print(f"# {machine()}")
    print("| image | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    scores = {m: {} for m in methods}
    secs = {m: 0.0 for m in methods}
    for name, n, c in rows:
        noisy = tifffile.imread(n).astype(np.float64)
        clean = tifffile.imread(c).astype(np.float64)
        cells = []
        for m, fn in methods.items():
            t0 = time.perf_counter()
            res = fn(noisy, clean)
            secs[m] += time.perf_counter() - t0
            scores[m][name] = psnr(affine_fit(res, clean), clean)
            cells.append(f"{scores[m][name]:.2f}")
        if not name.startswith("W2S"):
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    ood = [r[0] for r in rows if not r[0].startswith("W2S")]
    w2s = [r[0] for r in rows if r[0].startswith("W2S")]
    print("| **OOD mean** | " + " | ".join(f"**{np.mean([scores[m][k] for k in ood]):.2f}**" for m in methods) + " |")
    if w2s:
        print(f"| W2S 031-040 mean ({len(w2s)}) | " + " | ".join(f"{np.mean([scores[m][k] for k in w2s]):.2f}"
                                                            for m in methods) + " |")
    print("| seconds (all rows) | " + " | ".join(f"{secs[m]:.0f}" for m in methods) + " |")
    models = list(methods)[len(methods) - len(args.models):]
    for m in models[1:]:
        ahead = sum(scores[m][k] > scores[models[0]][k] for k in ood)
        print(f"# {m}: ahead of {models[0]} on {ahead}/{len(ood)} OOD images")


if __name__ == "__main__":
    main()
