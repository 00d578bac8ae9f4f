# Session 24 experiment (issue #35), kept for the record: paths are this machine's (/work/...); one thread.
"""Is Neighbor2Neighbor on one pixel-shuffle phase ("pd": pairs 2 pixels apart) a better mode than n2v-corr for noise
correlated over several pixels? ACsN said yes (trajectory_average.py, EXP_MODE=pd, three seeds); these synthetic
cases say no.

python pd_vs_n2v_corr.py check                    # the noise check's excess correlation by lag, microscopy_ood
python pd_vs_n2v_corr.py toy STEPS PATCH          # smooth toy scene, noise correlated along x (box 5)
python pd_vs_n2v_corr.py w2s FOV MODE [C K]       # a W2S clean image + noise correlated along y, 3 minutes
"""

import os
import sys
import tempfile
import time

import numpy as np
import tifffile
import torch
from scipy.ndimage import uniform_filter1d

os.environ.setdefault("MEMNET_MODEL_DIR", tempfile.mkdtemp())
import memnet
import memnet.finetune as ft
import memnet.finetune_modes as fm
from memnet.evaluate import ood_pairs, percentile_normalize
from memnet.metrics import affine_fit, psnr

torch.set_num_threads(1)
DATA = "/work/shared/data"


@fm.register
class PD(fm.Nbr2Nbr):  # also trajectory_average.py's EXP_MODE=pd (its session-24 runs printed a 0.2 dB floor)
    name = "pd"
    pixel_independent = False
    decide_by = "blindspot"
    lr = 1e-4

    def batch(self, x, y, rng, ctx):
        a, b = rng.integers(0, 2, 2)
        g1, g2, _ = fm.subsample_pairs(x[:, :, a::2, b::2].contiguous(), rng)
        return g1, g2, (None, None)


def correlated(clean, rng, c=0.5, k=5, axis=0, var=lambda s: s + 25):
    """White noise plus a weight ``c`` of noise box-filtered over ``k`` pixels along ``axis``, Poisson-like."""
    w, w2 = rng.standard_normal((2, *clean.shape))
    n = (w + c * uniform_filter1d(w2, k, axis=axis) * np.sqrt(k)) / np.sqrt(1 + c * c)
    return (clean + n * np.sqrt(var(clean))).astype(np.float32)


def run(noisy, clean, mode, **cfg):
    def real(model):
        out = memnet.restore(noisy, model).astype(np.float64)
        return np.mean([psnr(affine_fit(o, c), c) for o, c in zip(out.reshape(-1, *clean.shape[-2:]),
                                                                   clean.reshape(-1, *clean.shape[-2:]))])

    t = time.time()
    p = ft.finetune(ft.FinetuneConfig(name=mode.replace("-", ""), mode=mode, device="cpu", publish="always",
                                      overwrite=True, **cfg), noisy, log=lambda s: None)
    print(mode, f"real change {real(str(p)) - real('microscopy'):+.3f} dB", p.decision.summary(),
          f"{time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "check":
        model, _ = memnet.load_model("microscopy")
        ctx = ft._Context(model.eval(), torch.device("cpu"), lambda s: None)
        for n, _ in ood_pairs(f"{DATA}/microscopy_ood"):
            x = percentile_normalize(tifffile.imread(n).astype(np.float32)).astype(np.float32)
            extent = ft._noise_check(ctx, [x], fm.get_mode("nbr2nbr"), refuse=False)
            print(n.stem, "extent", extent, "excess by lag", ctx.record["noise_check"]["excess_by_lag"])
    elif what == "toy":
        yy, xx = np.mgrid[0:192, 0:192] / 192
        clean = 40 + 160 * (0.5 + 0.5 * np.sin(9 * xx) * np.cos(7 * yy)) ** 2
        clean = np.stack([clean, clean[::-1]])
        noisy = correlated(clean, np.random.default_rng(0), axis=2)
        steps, patch = int(sys.argv[2]), int(sys.argv[3])
        for mode in ("pd", "n2v-corr"):
            run(noisy, clean, mode, steps=steps, minutes=None, val_every=steps // 3, patch=patch, interpolate=1.0)
    elif what == "w2s":
        fov, mode = sys.argv[2], sys.argv[3]
        c, k = (float(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (0.5, 5)
        clean = tifffile.imread(f"{DATA}/W2S_train_8bit/avg400_clean/target_avg400_{fov}_1.tif").astype(np.float64)
        noisy = correlated(clean, np.random.default_rng(1), c, k, axis=0, var=lambda s: 2 * s + 100)
        run(noisy, clean, mode, minutes=3)
