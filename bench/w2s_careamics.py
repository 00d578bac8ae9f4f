"""CAREamics Noise2Void on W2S fields of view 031-040 (the self-supervised peer of the microscopy model).

N2V is trained on the 30 noisy images only (channels 0-2 as one "SYX" stack), with CAREamics' defaults for
2-D N2V: its UNet (depth 2, 32 initial filters, batch norm), 64x64 patches, flip/rotate augmentations, its
masking (0.2 % of pixels, 11x11 neighbourhood), Adam + ReduceLROnPlateau, mean/std normalisation computed
from the data, 8 training patches held out for its validation loss. The batch size (mandatory in
CAREamics) defaults to 16, as in the careamics-napari plugin. Training runs on the CPU, one thread, no
dataloader workers, for a wall-clock budget: Lightning's `max_time` (passed through CAREamics'
`trainer_params`) stops it after --minutes, the epoch count is left unbounded. The final weights are then
saved and used to predict each noisy image whole. Results are scored like our models: least-squares affine
fit of the result to the clean image, PSNR peak 255 (the noisy input scored the same way gives 20.60 dB).

Runs in its own venv (CAREamics needs torch <= 2.11; it must not share the project's .venv):

  python3 -m venv /work/careamics-venv
  /work/careamics-venv/bin/pip install torch==2.9.1 torchvision==0.24.1 careamics==0.3.5

  /work/careamics-venv/bin/python bench/w2s_careamics.py --data-root ../shared/data --minutes 15

Checkpoints and logs go to --work-dir (default /tmp/careamics-work), never into the repository.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"


def affine_fit(result: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Least-squares a*result + b fitted to clean (as memnet.metrics.affine_fit)."""
    r, c = np.asarray(result, np.float64), np.asarray(clean, np.float64)
    rm, cm = r.mean(), c.mean()
    var = np.mean((r - rm) ** 2)
    a = np.mean((r - rm) * (c - cm)) / var if var > 0 else 0.0
    return a * (r - rm) + cm


def psnr(result: np.ndarray, clean: np.ndarray, peak: float = 255.0) -> float:
    mse = np.mean((np.asarray(result, np.float64) - np.asarray(clean, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


def w2s_pairs(root: Path, fovs, channels=(0, 1, 2)) -> list[tuple[Path, Path]]:
    pairs = [
        (root / "avg1_noisy" / f"input_avg1_{f:03d}_{c}.tif", root / "avg400_clean" / f"target_avg400_{f:03d}_{c}.tif")
        for f in fovs
        for c in channels
    ]
    missing = [str(p) for pair in pairs for p in pair if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing W2S files: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--fovs", type=int, nargs=2, default=(31, 40))
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work-dir", default="/tmp/careamics-work")
    args = ap.parse_args()

    import tifffile
    import torch
    from careamics import CAREamist
    from careamics.config import create_advanced_n2v_config
    from lightning.pytorch import Callback

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    versions = f"careamics {version('careamics')}, torch {torch.__version__.split('+')[0]}"

    pairs = w2s_pairs(Path(args.data_root) / "W2S_train_8bit", range(args.fovs[0], args.fovs[1] + 1))
    noisy = np.stack([tifffile.imread(n) for n, _ in pairs]).astype(np.float32)  # (30, 512, 512), raw 0-255
    clean = [tifffile.imread(c).astype(np.float64) for _, c in pairs]
    noisy_psnr = float(np.mean([psnr(affine_fit(n, c), c) for n, c in zip(noisy, clean)]))
    print(f"{len(pairs)} images {noisy.shape[1:]}, noisy input {noisy_psnr:.2f} dB; {versions}", flush=True)

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    config = create_advanced_n2v_config(
        experiment_name="w2s_n2v",
        data_type="array",
        axes="SYX",
        patch_size=[64, 64],
        batch_size=args.batch_size,
        num_epochs=100_000,  # never reached: max_time ends training
        num_workers=0,
        trainer_params={"max_time": {"seconds": args.minutes * 60}, "accelerator": "cpu", "devices": 1},
        seed=args.seed,
    )

    class EpochLog(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            loss = trainer.callback_metrics.get("train_loss_epoch", trainer.callback_metrics.get("train_loss"))
            val = trainer.callback_metrics.get("val_loss")
            print(f"epoch {trainer.current_epoch}: step {trainer.global_step}, {time.perf_counter() - self.t0:.0f} s, "
                  f"train loss {float(loss) if loss is not None else float('nan'):.4f}, "
                  f"val loss {float(val) if val is not None else float('nan'):.4f}", flush=True)

    careamist = CAREamist(config, work_dir=work, callbacks=[EpochLog()], enable_progress_bar=False)
    t0 = time.perf_counter()
    careamist.train(train_data=noisy)
    train_s = time.perf_counter() - t0
    trainer = careamist.trainer
    steps, per_epoch = trainer.global_step, trainer.num_training_batches
    epochs = steps / per_epoch
    print(f"trained {train_s / 60:.1f} min: {steps} steps of {args.batch_size} patches, {per_epoch} steps/epoch "
          f"= {epochs:.1f} epochs", flush=True)

    final = work / "final.ckpt"  # explicit: score the weights as they were at the time limit
    trainer.save_checkpoint(final)
    t0 = time.perf_counter()
    preds, _ = careamist.predict(noisy, axes="SYX", data_type="array", batch_size=1, num_workers=0, checkpoint=final)
    pred = np.concatenate([np.asarray(p, np.float64).reshape(-1, *noisy.shape[1:]) for p in preds])
    if pred.shape != noisy.shape:
        raise RuntimeError(f"prediction shape {pred.shape} != input {noisy.shape}")
    vals = []
    for (n, _), r, c in zip(pairs, pred, clean):
        vals.append(psnr(affine_fit(r, c), c))
        print(f"{n.name}: {vals[-1]:.2f} dB", flush=True)
    print(f"prediction {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"CAREamics N2V ({versions}, 1 thread, {train_s / 60:.1f} min training, {epochs:.1f} epochs = {steps} steps "
          f"of {args.batch_size}): W2S {args.fovs[0]:03d}-{args.fovs[1]:03d} {np.mean(vals):.2f} dB over {len(vals)} "
          f"images (noisy {noisy_psnr:.2f})")


if __name__ == "__main__":
    main()
