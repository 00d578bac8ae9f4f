"""Blend a trained model with the weights it continued from: start + alpha * (trained - start), every
floating-point tensor (BatchNorm statistics included), the trained model's metadata kept and the blend recorded.

Two checkpoints of one lineage average well (no barrier between them); a continuation that gains on other
microscopes but loses a few hundredths on the validation set it was chosen on can keep most of its gain at a
smaller alpha. Measure the result with scripts/ship_model.py, which ships it only if validation improves.

  python scripts/interpolate_model.py runs/micro-sat/best.safetensors microscopy --alpha 0.7 -o runs/blend.safetensors
"""

from __future__ import annotations

import argparse

import memnet
from memnet.finetune import interpolate_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trained", help="the continued model (.safetensors)")
    ap.add_argument("start", help="the model it continued from (name or .safetensors)")
    ap.add_argument("--alpha", type=float, required=True, help="0 < alpha <= 1: the share of the continuation")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    model, info = memnet.load_model(args.trained)
    start, start_info = memnet.load_model(args.start)
    if start_info.task != info.task:
        raise SystemExit(f"{args.start} is a {start_info.task} model and {args.trained} a {info.task} one")
    interpolate_weights(model, start, args.alpha)  # checks alpha and that the architectures match
    meta = {k: v for k, v in info.metadata.items() if k not in ("format", "name", "task", "config", "created")}
    meta["training"] = {**meta.get("training", {}),
                        "interpolated": {"start": start_info.name, "start_created": start_info.metadata.get("created"),
                                         "alpha": args.alpha, "rule": "start + alpha * (trained - start)"}}
    memnet.save_model(model, args.output, name=info.name, task=info.task, metadata=meta)
    print(f"saved {args.output}: {args.alpha} x {args.trained} + {1 - args.alpha:g} x {args.start}")


if __name__ == "__main__":
    main()
