# Session 24 experiment (issue #35), kept for the record: paths are this machine's (/work/...); one thread.
"""ACsN's fine-tuned models: the real change after the usual affine fit and after the oracle monotone curve
(`monotone_calibration.fit_monotone`, fitted to the clean image per model). If the affine-fit ranking is mostly the
tone curve, the two disagree.

python acsn_tone_curve.py MODEL.safetensors ...
"""

import sys
from pathlib import Path

import numpy as np
import tifffile
import torch

import memnet
from memnet.evaluate import percentile_normalize, predictor
from memnet.metrics import affine_fit, psnr

sys.path.insert(0, str(Path(__file__).parent))
from monotone_calibration import fit_monotone  # noqa: E402

torch.set_num_threads(1)
D = "/work/shared/data/microscopy_ood/"
x = tifffile.imread(D + "noisy/acsn_bs21.tif").astype(np.float64)
clean = tifffile.imread(D + "clean/acsn_bs21.tif").astype(np.float64)
xn = percentile_normalize(x)


def both(model):
    y = predictor(model)(xn)
    return psnr(affine_fit(y, clean), clean), psnr(affine_fit(fit_monotone(y, clean)(y), clean), clean)


a0, m0 = both(memnet.load_model("microscopy")[0])
print(f"start: affine {a0:.2f}, monotone {m0:.2f}")
for path in sys.argv[1:]:
    a, m = both(memnet.load_model(path)[0])
    print(f"{a - a0:+.3f} {m - m0:+.3f} {path}", flush=True)
