"""CAREamics Noise2Void in 3-D trained on each stack of the stacks benchmark alone, for a wall-clock budget: the
self-supervised 3-D peer a lab would train on its own stack (bench/stacks.py reads its results with --careamics).

Input: the stacks `python bench/stacks.py --save-stacks DIR` wrote (NN-noisy.npy, NN-target.npy, names.json).
CAREamics' defaults for 3-D N2V (axes ZYX; a time-lapse's T taken as the third axis, as x-y-t denoisers do;
its UNet, masking and augmentations), patches 8x64x64 (8x32x32 on the 128² nuclei stacks), batch 8,
one thread; Lightning's `max_time` ends training after --minutes. Scored as bench/stacks.py scores: the
least-squares affine fit of the result to the target over the whole stack, PSNR peak 1. One JSON line per stack.

Runs in its own venv (see bench/careamics_n2v.py):
  /work/careamics-venv/bin/python bench/careamics_stacks.py DIR --minutes 2 > careamics-stacks.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

sys.path.insert(0, str(Path(__file__).parent))
from w2s_careamics import affine_fit, psnr  # noqa: E402  (numpy only: no memnet in this venv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stacks", help="the folder bench/stacks.py --save-stacks wrote")
    ap.add_argument("--minutes", type=float, default=2.0, help="wall-clock training budget per stack")
    ap.add_argument("--only", nargs="*", type=int, help="only these stack numbers")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work-dir", default="/tmp/careamics-stacks")
    args = ap.parse_args()

    import torch
    from careamics import CAREamist
    from careamics.config import create_advanced_n2v_config

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    root = Path(args.stacks)
    names = json.loads((root / "names.json").read_text())
    for i, name in enumerate(names):
        if args.only and i not in args.only:
            continue
        noisy = np.load(root / f"{i:02d}-noisy.npy").astype(np.float32)
        target = np.load(root / f"{i:02d}-target.npy").astype(np.float64)
        work = Path(args.work_dir) / f"{i:02d}"
        shutil.rmtree(work, ignore_errors=True)
        # 8x64x64 leaves it no training patches on a 128² stack (after its validation split): 8x32x32 there
        side = 64 if min(noisy.shape[1:]) >= 192 else 32
        config = create_advanced_n2v_config(
            experiment_name=f"stack_{i:02d}", data_type="array", axes="ZYX", patch_size=[8, side, side], batch_size=8,
            num_epochs=100_000, num_workers=0, seed=args.seed,  # epochs never reached: max_time ends training
            trainer_params={"max_time": {"seconds": args.minutes * 60}, "accelerator": "cpu", "devices": 1})
        careamist = CAREamist(config, work_dir=work, enable_progress_bar=False)
        t0 = time.perf_counter()
        careamist.train(train_data=noisy)
        train_s = time.perf_counter() - t0
        final = work / "final.ckpt"
        careamist.trainer.save_checkpoint(final)
        t0 = time.perf_counter()
        z, h, w = noisy.shape  # its UNet needs sides that are multiples of 4 (8 in Z): pad whole, crop the result
        padded = np.pad(noisy, ((0, -z % 8), (0, -h % 4), (0, -w % 4)), mode="reflect")
        preds, _ = careamist.predict(padded, axes="ZYX", data_type="array", batch_size=1, num_workers=0,
                                     checkpoint=final)
        pred = np.concatenate([np.asarray(p, np.float64).reshape(-1, *padded.shape) for p in preds])[0][:z, :h, :w]
        print(json.dumps({"name": name, "psnr": round(psnr(affine_fit(pred, target), target, peak=1.0), 3),
                          "minutes": args.minutes, "train_s": round(train_s, 1),
                          "steps": careamist.trainer.global_step, "predict_s": round(time.perf_counter() - t0, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
