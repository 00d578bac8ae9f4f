"""Ship a trained context model (scripts/train_context.py) into src/memnet/weights/, from its stacks benchmark.

Refuses unless, on every stack of `bench/stacks.py --json`, the context model is ahead of both the 2-D model and
its 1-2-1 Z-smoothed result (its classical peer), and unless it beats the shipped context model's mean (if any).

  python bench/stacks.py --wheel WHEEL --context-model runs/context/best.safetensors --json stacks.json
  python scripts/ship_context.py runs/context/best.safetensors stacks.json --name microscopy-context
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from memnet.zoo import load_model, read_info, save_model, shipped_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("bench_json", help="bench/stacks.py --json output for these weights")
    ap.add_argument("--name", default="microscopy-context")
    ap.add_argument("--rank", type=float, default=10)
    args = ap.parse_args()

    rows = json.loads(Path(args.bench_json).read_text())["rows"]
    behind = [r["stack"] for r in rows if r["context"] <= max(r["2-D"], r["2-D + 1-2-1"])]
    if behind:
        raise SystemExit(f"not shipped: behind the 2-D model or its Z-smoothed result on {', '.join(behind)}")
    mean = float(np.mean([r["context"] for r in rows]))
    dest = shipped_model_dir() / f"{args.name}.safetensors"
    if dest.exists():
        old = read_info(dest, "shipped").metrics.get("stacks benchmark mean (dB)")
        if old is not None and mean <= old:
            raise SystemExit(f"not shipped: mean {mean:.2f} dB does not beat the shipped {old:.2f} dB")
    model, info = load_model(args.weights)
    meta = dict(info.metadata)
    meta["metrics"] = {
        "stacks benchmark mean (dB)": round(mean, 2),
        "2-D model on the same stacks (dB)": round(float(np.mean([r["2-D"] for r in rows])), 2),
        "2-D + 1-2-1 along Z/T (dB)": round(float(np.mean([r["2-D + 1-2-1"] for r in rows])), 2),
    }
    meta["validation"] = ("bench/stacks.py: simulated z-stacks at 0.5/1/2 axial FWHM and the bio-sample nuclei "
                          "z-stack and time-lapse (held-out planes), 10 and 100 e- at intensity 1; affine fit, "
                          "PSNR peak 1")
    meta["rank"] = args.rank
    for k in ("format", "name", "task", "config", "package_version", "created"):
        meta.pop(k, None)
    save_model(model, dest, name=args.name, task="microscopy", metadata=meta)
    print(f"shipped {dest} (mean {mean:.2f} dB over {len(rows)} stacks)")


if __name__ == "__main__":
    main()
