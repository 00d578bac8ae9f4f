"""Promote a trained model to the shipped weights (src/memnet/weights/), after measuring it on the
full validation set with the published conventions. Refuses to replace a shipped model of the same
name unless the new one validates better (quality accrues across sessions).

``--progress`` keeps a model that is not yet ahead of its classical peer in ``training/`` (in git, not in
the package, not listed by ``memnet models``), so the next session continues from it with
``memnet train --init training/NAME.safetensors`` instead of starting again; the same
"only if validation improves" rule applies.

  python scripts/ship_model.py runs/microscopy-m4r4c32/best.safetensors --name microscopy-M4R4C32 \
      --data-root ../shared/data --rank 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import memnet
from memnet.evaluate import evaluate_task, identity, predictor
from memnet.zoo import read_info, shipped_model_dir

DATA = {
    "denoise": "Train400 (cszn/DnCNN), synthetic AWGN",
    "sr": "T91 + BSD200 (the '291' set), Y channel",
    "jpeg": "T91 + BSD200 + Train400, Y channel / gray",
    "microscopy": "W2S avg1/avg400 pairs, fields of view 001-030, channels 0-2 (Zhou et al. 2020), "
                  "plus synthetic Poisson-Gaussian noise on the clean targets",
}
VALIDATION = {
    "denoise": "Set12, sigma 15/25/50, AWGN unclipped, PSNR of the clipped result (peak 255)",
    "sr": "Set14 Y, x2/x3/x4, Pillow bicubic, border of `scale` px shaved, PSNR on rounded Y",
    "jpeg": "Set14 Y, Pillow JPEG q10/q20",
    "microscopy": "W2S fields of view 031-040, channels 0-2; least-squares affine fit of the result to the "
                  "clean image (CARE normalize_minmse), PSNR peak 255",
}

# The classical peer every shipped model must beat on every row of its validation table. BM3D figures:
# the published Set12 references; W2S measured by bench/w2s_bm3d.py at its best-case sigma. Bicubic and
# the JPEG itself are computed here with the same evaluation code as the model.
PEERS = {
    "denoise": ("BM3D", {"sigma15": 32.37, "sigma25": 29.97, "sigma50": 26.72}),
    "microscopy": ("BM3D (best-case sigma)", {"W2S": 28.90}),
    "sr": ("bicubic", None),
    "jpeg": ("the JPEG itself", None),
}
# Rows a replacement must not fall below (the generalist microscopy model may trade a little W2S for the
# other microscopes, never below what the narrow model was shipped at, issue #21).
FLOORS = {"microscopy": {"W2S": 32.7}}
PROGRESS_DIR = Path(__file__).resolve().parent.parent / "training"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("--name", required=True)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--rank", type=float, default=10.0, help="higher wins when a task name picks a model")
    ap.add_argument("--progress", action="store_true",
                    help="not ready to ship: keep it in training/ (outside the package) for the next session")
    ap.add_argument("--force", action="store_true",
                    help="ship even if not ahead of the classical peer or of the shipped model")
    args = ap.parse_args()
    model, info = memnet.load_model(args.weights)
    metrics = evaluate_task(info.task, predictor(model), args.data_root)
    print(json.dumps({"model": args.name, **{k: round(v, 3) for k, v in metrics.items()}}))
    peer_name, peer = PEERS[info.task]
    if peer is None:
        peer = evaluate_task(info.task, identity, args.data_root)
    # three decimals: a miss by 0.001 dB must not print as the bar itself
    behind = {k: (round(metrics[k], 3), round(v, 2)) for k, v in peer.items() if metrics[k] <= v}
    behind.update({k: (round(metrics[k], 3), v) for k, v in FLOORS.get(info.task, {}).items() if metrics[k] < v})
    if behind and not (args.force or args.progress):
        raise SystemExit(f"not shipped: not ahead of {peer_name} (or below the floor) on {behind} "
                         f"(model, bar) dB; --progress keeps it in training/ for the next session")
    if args.progress:
        PROGRESS_DIR.mkdir(exist_ok=True)
    dest = (PROGRESS_DIR if args.progress else shipped_model_dir()) / f"{args.name}.safetensors"
    previous = read_info(dest, source="shipped").metadata.get("training", {}) if dest.exists() else {}
    if dest.exists() and not args.force:
        old = dict(read_info(dest, source="shipped").metrics)
        if any(k not in old for k in metrics):  # a row added since it shipped: measure the old model on it
            old_model, _ = memnet.load_model(dest)
            old = evaluate_task(info.task, predictor(old_model), args.data_root)
            print(json.dumps({"existing": str(dest), **{k: round(v, 3) for k, v in old.items()}}))
        common = [k for k in metrics if k in old and isinstance(old[k], (int, float))]
        if common and np.mean([metrics[k] for k in common]) <= np.mean([old[k] for k in common]):
            raise SystemExit(f"not better than the existing {dest} ({old}): keeping it")
    meta = dict(info.metadata)
    for k in ("format", "name", "task", "config", "created", "status"):  # status: set below, never carried over
        meta.pop(k, None)
    training = dict(meta.get("training", {}))
    training.pop("history", None)
    training["data"] = DATA[info.task]
    if info.task == "microscopy" and str((training.get("config") or {}).get("noise", "")).startswith("camera"):
        training["data"] = DATA[info.task].replace("synthetic Poisson-Gaussian noise on the clean targets",
                                                   "synthetic camera noise (memnet.degrade.camera_noise; the ranges "
                                                   "in 'degradation') on the clean targets and the --data images")
    if (training.get("config") or {}).get("init") and previous and "total_steps" not in training:
        # Continued from the shipped weights by an older `memnet train` that did not keep the totals itself.
        training["continued_from"] = {k: previous.get(k) for k in ("steps", "hours", "total_steps", "total_hours")}
        training["total_steps"] = previous.get("total_steps", previous.get("steps", 0)) + training.get("steps", 0)
        training["total_hours"] = round(previous.get("total_hours", previous.get("hours", 0))
                                        + training.get("hours", 0), 3)
    meta.update(
        description=f"MemNet M{info.config.blocks}R{info.config.recursions}C{info.config.channels} for "
                    f"{info.task}, trained by napari-memnet (memnet train)",
        training=training,
        metrics={k: round(v, 3) for k, v in metrics.items()},
        validation=VALIDATION[info.task],
        rank=args.rank,
        **({"status": f"in training: not yet ahead of {peer_name} on {behind} (model, bar) dB"}
           if behind else {}),
    )
    memnet.save_model(model, dest, name=args.name, task=info.task, metadata=meta)
    what = "kept for the next session" if args.progress else "shipped"
    print(f"{what}: {dest} ({dest.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
