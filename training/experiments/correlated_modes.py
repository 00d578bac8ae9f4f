# Session 15 experiment (issue #35), kept for the record; run from the repository root with ../shared beside it.
"""Which fine-tune setting gains on the correlated-noise images (2 min of one thread each, publish always):
python training/experiments/correlated_modes.py acsn_bs21,fmd_bpae_r,fmd_r1,fmdwf0 n2v:1e-4:nocheck structn2v:1e-4:c
(IMAGE: a microscopy_ood name, or fmdwfC for channel C of the FMD widefield sample; MODE:LR:nocheck|c)."""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

os.environ.setdefault("MEMNET_MODEL_DIR", "runs/exp-corr/models")
import memnet
import memnet.finetune as ft
from memnet.evaluate import percentile_normalize, predictor
from memnet.metrics import affine_fit, psnr

DATA = Path("../shared/data")
OUT = Path("runs/exp-corr")
torch.set_num_threads(1)


def load(name: str, clean: bool = False) -> np.ndarray:
    if name.startswith("fmdwf"):
        from PIL import Image

        f = "gt/WideField_BPAE_gt_rgb_new1.png" if clean else "raw/WideField_BPAE_raw_rgb_new1.png"
        return np.asarray(Image.open(DATA / "FMD_samples" / f)).astype(np.float64)[..., int(name[-1])]
    return tifffile.imread(DATA / "microscopy_ood" / ("clean" if clean else "noisy") / f"{name}.tif").astype(np.float64)


def score(model, x, c):
    return psnr(affine_fit(predictor(model)(percentile_normalize(x)), c), c)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    configs = [(a, float(b), c == "nocheck") for a, b, c in (s.split(":") for s in sys.argv[2:])]
    for name in sys.argv[1].split(","):
        x, c = load(name), load(name, clean=True)
        start = score(memnet.load_model("microscopy")[0], x, c)
        for mode, lr, nocheck in configs:
            key = f"{name}-{mode}-{lr:g}{'-nc' if nocheck else ''}"
            if (OUT / f"{key}.json").exists():
                print((OUT / f"{key}.json").read_text(), flush=True)
                continue
            cfg = ft.FinetuneConfig(model="microscopy", mode=mode, name=f"x-{key}", minutes=2, device="cpu", lr=lr,
                                    overwrite=True, publish="always", noise_check=not nocheck)
            t0 = time.time()
            path = ft.finetune(cfg, x.astype(np.float32), log=lambda s: None)
            new = score(memnet.load_model(path)[0], x, c)
            r = {"key": key, "start": round(start, 3), "new": round(new, 3), "real": round(new - start, 3),
                 "decision": path.decision.summary(), "s": round(time.time() - t0)}
            (OUT / f"{key}.json").write_text(json.dumps(r))
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
