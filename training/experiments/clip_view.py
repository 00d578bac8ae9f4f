# Session 24 experiment (issue #35), kept for the record: paths are this machine's (/work/...); one thread.
"""Where is CAREamics ahead of the shipped model on microscopy_ood, and what does an output clipped to the input's
range (an integer output file) keep? Reads CAREamics' outputs saved by `bench/careamics_n2v.py --save-outputs DIR`.

python clip_view.py DIR
"""

import sys

import numpy as np
import tifffile
import torch

import memnet
from memnet.evaluate import ood_pairs, percentile_normalize, predictor
from memnet.metrics import affine_fit, psnr

torch.set_num_threads(1)
care_dir = sys.argv[1]
ours = predictor(memnet.load_model("microscopy")[0])
print("| image | noisy at its max (%) | ours | ours, clipped | CAREamics | CAREamics, clipped |")
for n, c in ood_pairs("/work/shared/data/microscopy_ood"):
    x, clean = tifffile.imread(n).astype(np.float64), tifffile.imread(c).astype(np.float64)
    xn = percentile_normalize(x)
    y, care = ours(xn), tifffile.imread(f"{care_dir}/{n.stem}.tif").astype(np.float64)
    scores = [psnr(affine_fit(a, clean), clean) for a in (y, np.clip(y, xn.min(), xn.max()), care,
                                                           np.clip(care, x.min(), x.max()))]
    print(f"| {n.stem} | {np.mean(x == x.max()) * 100:.1f} | " + " | ".join(f"{s:.2f}" for s in scores) + " |")
    if n.stem == "acsn_bs21":  # each one's squared error (after the fit) by the noisy pixel's value, per pixel
        bands = {"at 255": x >= 255, "200-254": (x >= 200) & (x < 255), "below 200": x < 200}
        for name, a in (("ours", y), ("CAREamics", care)):
            e = (affine_fit(a, clean) - clean) ** 2
            print("  ", name, ", ".join(f"{b} {e[m].sum() / e.size:.1f}" for b, m in bands.items()))
