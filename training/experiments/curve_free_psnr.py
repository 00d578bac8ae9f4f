# Session 26 experiment (issue #35), kept for the record; one thread.
"""microscopy_ood outputs scored two ways against the clean image: the usual PSNR after the affine fit, and after
the oracle monotone curve fitted per output (`monotone_calibration.fit_monotone`), which leaves out how well an
output's intensity response matches the reference's. Takes restored images (float TIFFs named like the noisy
image, e.g. `bench/careamics_n2v.py --save-outputs DIR`) and/or our models.

  PYTHONPATH=src python training/experiments/curve_free_psnr.py --images acsn_bs21 \
      --outputs /tmp/careamics-out/s1 /tmp/careamics-out/s3 --models microscopy
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import tifffile
import torch

import memnet
from memnet.evaluate import ood_pairs, percentile_normalize, predictor
from memnet.metrics import affine_fit, psnr

sys.path.insert(0, str(Path(__file__).parent))
from monotone_calibration import fit_monotone  # noqa: E402


def scores(y: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    y = np.asarray(y, np.float64)
    return psnr(affine_fit(y, clean), clean), psnr(affine_fit(fit_monotone(y, clean)(y), clean), clean)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--images", nargs="*", help="microscopy_ood names (default: all)")
    ap.add_argument("--outputs", nargs="*", default=[], help="folders of restored images, <name>.tif each")
    ap.add_argument("--models", nargs="*", default=[], help="zoo names or .safetensors paths")
    a = ap.parse_args()
    torch.set_num_threads(1)
    preds = [(m, predictor(memnet.load_model(m)[0])) for m in a.models]
    print("image\tsource\taffine\tmonotone", flush=True)
    for noisy_path, clean_path in ood_pairs(Path(a.data_root) / "microscopy_ood"):
        name = noisy_path.stem
        if a.images and name not in a.images:
            continue
        clean = tifffile.imread(clean_path).astype(np.float64)
        x = percentile_normalize(tifffile.imread(noisy_path).astype(np.float64))
        for label, pred in preds:
            print(f"{name}\t{label}\t%.2f\t%.2f" % scores(pred(x), clean), flush=True)
        for folder in a.outputs:
            f = Path(folder) / f"{name}.tif"
            if f.exists():
                print(f"{name}\t{folder}\t%.2f\t%.2f" % scores(tifffile.imread(f), clean), flush=True)


if __name__ == "__main__":
    main()
