# Session 15 experiment (issue #35), kept for the record; run after correlated_modes.py, from the repository root.
"""Held-out criteria against the real change, for the candidates of correlated_modes.py: the whole noisy image
in 64² crops, paired per-crop gain (dB) over the shipped model, mean ± SE. KINDS: bs (3 % blind spots, random
neighbour), sbsR (structured blind spots of radius R), strS (sub-sampled pairs on a grid S apart).
KINDS=bs,str2,str3 python training/experiments/correlated_criteria.py fmd_bpae_r,fmd_r1"""

import glob
import json
import os
import sys

import numpy as np
import torch

os.environ.setdefault("MEMNET_MODEL_DIR", "runs/exp-corr/models")
import memnet
from memnet.evaluate import percentile_normalize
from memnet.finetune_modes import blind_spot, strided_pairs, struct_blind_spot

sys.path.insert(0, os.path.dirname(__file__))
from correlated_modes import OUT, load  # noqa: E402

torch.set_num_threads(1)


def crops(x, s=64):
    h, w = x.shape
    tiles = [x[i:i + s, j:j + s] for i in range(0, h - s + 1, s) for j in range(0, w - s + 1, s)]
    return torch.from_numpy(np.stack(tiles).astype(np.float32))[:, None]


def draws(x, kind, rng):
    if kind == "bs":
        return [(xi, x, m) for xi, m in (blind_spot(x, 0.03, rng, "random") for _ in range(6))]
    if kind.startswith("sbs"):
        return [(xi, x, m) for xi, m in (struct_blind_spot(x, int(kind[3:]), 0.01, rng) for _ in range(6))]
    return strided_pairs(x, int(kind[3:]), rng, 8)


def errors(model, ds):
    model.eval()
    num = den = 0
    with torch.inference_mode():
        for xi, y, m in ds:
            o = model(xi)
            m = torch.ones_like(y) if m is None else m
            num = num + (((o - y) ** 2) * m).sum((1, 2, 3)).double().numpy()
            den = den + m.sum((1, 2, 3)).double().numpy()
    return num / den


def main():
    kinds = os.environ.get("KINDS", "bs,sbs1,sbs2,str2,str3").split(",")
    base = memnet.load_model("microscopy")[0]
    print("| candidate | real | " + " | ".join(kinds) + " |")
    for name in sys.argv[1].split(","):
        x = crops(percentile_normalize(load(name)))
        ds = {k: draws(x, k, np.random.default_rng(7)) for k in kinds}
        eb = {k: errors(base, ds[k]) for k in kinds}
        for js in sorted(glob.glob(str(OUT / f"{name}-*.json"))):
            r = json.load(open(js))
            m = memnet.load_model(str(OUT / "models" / f"x-{r['key']}.safetensors"))[0]
            cells = []
            for k in kinds:
                g = 10 * np.log10(eb[k] / errors(m, ds[k]))
                cells.append(f"{g.mean():+.3f} ± {g.std(ddof=1) / np.sqrt(len(g)):.3f}")
            print(f"| {r['key']} | {r['real']:+.3f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
