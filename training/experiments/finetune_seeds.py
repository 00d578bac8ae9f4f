"""One `finetune` run on one image with --publish always (issue #35, session 19): its decision, and the real PSNR
change over the shipped model of the half-way (published) model and of the run's best checkpoint, as one JSON line.
For the spread over seeds and precisions.

  PYTHONPATH=src python training/experiments/finetune_seeds.py acsn_bs21 --seed 1 [--amp on] [--minutes 3]
  PYTHONPATH=src python training/experiments/finetune_seeds.py W2S:037_1 --seed 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import tifffile
import torch

DATA = Path("../shared/data")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", help="a microscopy_ood name, or W2S:FOV_CHANNEL")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--amp", default="off")
    ap.add_argument("--minutes", type=float, default=3.0)
    args = ap.parse_args()
    os.environ["MEMNET_MODEL_DIR"] = tempfile.mkdtemp(prefix="memnet-seeds-")  # before memnet reads it
    import memnet
    from memnet.evaluate import percentile_normalize, predictor
    from memnet.finetune import FinetuneConfig, finetune
    from memnet.metrics import affine_fit, psnr
    from memnet.zoo import user_model_dir

    torch.set_num_threads(1)
    if args.image.startswith("W2S:"):
        f = args.image[4:]
        noisy = DATA / f"W2S_train_8bit/avg1_noisy/input_avg1_{f}.tif"
        clean = DATA / f"W2S_train_8bit/avg400_clean/target_avg400_{f}.tif"
    else:
        noisy, clean = (DATA / "microscopy_ood" / k / f"{args.image}.tif" for k in ("noisy", "clean"))
    x, c = (tifffile.imread(p).astype(np.float64) for p in (noisy, clean))
    xn = percentile_normalize(x)

    def change(model) -> float:
        return psnr(affine_fit(predictor(model)(xn), c), c) - start

    start = 0.0
    start = change(memnet.load_model("microscopy")[0])
    cfg = FinetuneConfig(model="microscopy", name="seeds", minutes=args.minutes, device="cpu", overwrite=True,
                         publish="always", amp=args.amp, seed=args.seed)
    path = finetune(cfg, x.astype(np.float32), log=lambda s: None)
    best = user_model_dir() / ".runs" / "seeds" / "best.safetensors"
    print(json.dumps({"image": args.image, "seed": args.seed, "amp": args.amp, "decision": path.decision.summary(),
                      "half": round(change(memnet.load_model(path)[0]), 3),
                      "checkpoint": round(change(memnet.load_model(best)[0]), 3)}), flush=True)


if __name__ == "__main__":
    main()
