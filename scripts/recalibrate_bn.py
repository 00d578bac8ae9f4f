"""Re-estimate a trained model's BatchNorm statistics on its own training distribution (weights
untouched) and save the result beside it; then measure it with scripts/ship_model.py.

Training leaves each BN with an exponential average of its last ~10 batches, a noisy estimate when
every batch mixes degradations differently (see ``memnet.train.recalibrate_bn``). Models trained
before `memnet train` recalibrated its checkpoints gain from this without any training.

  python scripts/recalibrate_bn.py src/memnet/weights/sr-M4R4C32.safetensors -o runs/sr-bn.safetensors
"""

from __future__ import annotations

import argparse
import time

import memnet
from memnet.train import TrainConfig, recalibrate_bn
from memnet.trainset import PatchSampler, load_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--data", nargs="+", help="clean training images [the model's own training data]")
    ap.add_argument("--pairs", nargs=2, metavar=("NOISY_DIR", "CLEAN_DIR"))
    ap.add_argument("--include")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--patch", type=int, help="patch size [the model's training patch]")
    ap.add_argument("--batch", type=int, help="patches per batch [the model's training batch]")
    ap.add_argument("--seed", type=int, default=4321)
    args = ap.parse_args()
    model, info = memnet.load_model(args.weights)
    cfg0 = (info.metadata.get("training") or {}).get("config") or {}
    data = args.data if args.data or args.pairs else cfg0.get("data") or []
    pairs = args.pairs or ([] if args.data else cfg0.get("pairs") or [])
    include = args.include if args.include is not None else cfg0.get("include")
    cfg = TrainConfig(task=info.task, out="", data=data, pairs=pairs, include=include,
                      patch=args.patch or int(cfg0.get("patch", 48)),
                      batch_size=args.batch or int(cfg0.get("batch_size", cfg0.get("batch", 32))))
    clean, pair_list = load_data(cfg)
    t = time.time()
    sampler = PatchSampler(cfg.task, clean, pair_list, cfg.patch, seed=args.seed)
    recalibrate_bn(model, sampler, args.batches, cfg.batch_size)
    meta = dict(info.metadata)
    for k in ("format", "name", "task", "config", "created"):
        meta.pop(k, None)
    meta["training"] = {**meta.get("training", {}), "bn_recalibrated": {
        "batches": args.batches, "patches": args.batches * cfg.batch_size, "patch": cfg.patch,
        "data": data or pairs,
        "include": include}}
    meta.pop("metrics", None)  # measured again by ship_model
    memnet.save_model(model, args.output, name=info.name, task=info.task, metadata=meta)
    print(f"recalibrated {info.name} on {args.batches} x {cfg.batch_size} patches in {time.time() - t:.0f} s: "
          f"{args.output}")


if __name__ == "__main__":
    main()
