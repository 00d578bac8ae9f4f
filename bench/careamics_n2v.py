"""CAREamics Noise2Void trained on each image of ../shared/data/microscopy_ood alone, for a wall-clock budget:
the self-supervised peer a lab would train on its own single image, at the same minutes and cores as our
`memnet finetune` (bench/ood_microscopy.py --finetune). Prints one JSON line per image:
{"image", "psnr", "train_s", "steps", "predict_s"}; bench/ood_microscopy.py --careamics FILE reads them.

CAREamics' defaults for 2-D N2V (its UNet: depth 2, 32 initial filters; 64x64 patches; its masking and
augmentations; batch 16 as the careamics-napari plugin), one thread, no dataloader workers; Lightning's
`max_time` stops training after --minutes. The final weights predict the whole image. Scored like our
models: least-squares affine fit of the result to the clean image, PSNR peak 255.

Runs in its own venv (CAREamics needs torch <= 2.11; it must not share the project's .venv):

  python3 -m venv /work/careamics-venv
  /work/careamics-venv/bin/pip install torch==2.9.1 torchvision==0.24.1 careamics==0.3.5
  /work/careamics-venv/bin/python bench/careamics_n2v.py --data-root ../shared/data --minutes 3 > careamics.jsonl
  /work/careamics-venv/bin/python bench/careamics_n2v.py --data-root ../shared/data --minutes 3 \
      --w2s 31 32 33 34 35 36 37 38 39 40 > careamics-w2s.jsonl
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
from w2s_careamics import affine_fit, psnr, w2s_pairs  # noqa: E402  (numpy only: no memnet in this venv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget per image")
    ap.add_argument("--images", nargs="*", help="only these microscopy_ood names (default: all)")
    ap.add_argument("--w2s", nargs="+", type=int, metavar="FOV",
                    help="W2S fields of view instead of microscopy_ood, e.g. 31 32 ... 40 (named 'W2S 031_1')")
    ap.add_argument("--w2s-channel", type=int, default=1, help="W2S channel with --w2s [1]")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work-dir", default="/tmp/careamics-ood")
    ap.add_argument("--precision", default="32-true",
                    help="Lightning's training precision: its default 32-true, or bf16-mixed (as `memnet finetune "
                    "--amp on`, or `memnet train` on a CPU with native bf16) [32-true]")
    ap.add_argument("--save-outputs", metavar="DIR", help="also write each restored image as DIR/<name>.tif (float32)")
    args = ap.parse_args()

    import tifffile
    import torch
    from careamics import CAREamist
    from careamics.config import create_advanced_n2v_config

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    if args.w2s:
        rows = [("W2S " + n.stem.replace("input_avg1_", ""), n, c)
                for n, c in w2s_pairs(Path(args.data_root) / "W2S_train_8bit", args.w2s, [args.w2s_channel])]
    else:
        root = Path(args.data_root) / "microscopy_ood"
        names = args.images or sorted(p.stem for p in (root / "noisy").glob("*.tif"))
        rows = [(n, root / "noisy" / f"{n}.tif", root / "clean" / f"{n}.tif") for n in names]
    for name, noisy_path, clean_path in rows:
        noisy = tifffile.imread(noisy_path).astype(np.float32)
        clean = tifffile.imread(clean_path).astype(np.float64)
        work = Path(args.work_dir) / name.replace(" ", "_")
        shutil.rmtree(work, ignore_errors=True)
        config = create_advanced_n2v_config(
            experiment_name=f"ood_{name.replace(' ', '_')}", data_type="array", axes="YX", patch_size=[64, 64],
            batch_size=args.batch_size, num_epochs=100_000,  # never reached: max_time ends training
            num_workers=0, seed=args.seed,
            trainer_params={"max_time": {"seconds": args.minutes * 60}, "accelerator": "cpu", "devices": 1,
                            "precision": args.precision})
        careamist = CAREamist(config, work_dir=work, enable_progress_bar=False)
        t0 = time.perf_counter()
        careamist.train(train_data=noisy)
        train_s = time.perf_counter() - t0
        final = work / "final.ckpt"  # the weights as they were at the time limit
        careamist.trainer.save_checkpoint(final)
        t0 = time.perf_counter()
        # Its UNet needs sides that are multiples of 4: reflect-pad the image whole, crop the result.
        h, w = noisy.shape
        padded = np.pad(noisy, ((0, -h % 4), (0, -w % 4)), mode="reflect")
        preds, _ = careamist.predict(padded, axes="YX", data_type="array", batch_size=1, num_workers=0,
                                     checkpoint=final)
        pred = np.concatenate([np.asarray(p, np.float64).reshape(-1, *padded.shape) for p in preds])[0][:h, :w]
        if args.save_outputs:
            Path(args.save_outputs).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(Path(args.save_outputs) / f"{name.replace(' ', '_')}.tif", pred.astype(np.float32))
        print(json.dumps({"image": name, "psnr": round(psnr(affine_fit(pred, clean), clean), 3),
                          "train_s": round(train_s, 1), "steps": careamist.trainer.global_step,
                          "predict_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
