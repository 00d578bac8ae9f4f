# Session 14 experiment (issue #35), kept for the record: paths are this machine's (/work/...).
"""#35 experiment: which held-out criterion tracks the real PSNR change of a fine-tuned candidate?
Stage 'train': fine-tune (auto, publish always) each image; keep the candidate and the held-out items.
Stage 'score': per candidate, real change vs criteria on the held-out bands (paired per-crop gains)."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

os.environ.setdefault("MEMNET_MODEL_DIR", "/work/exp35/models")
import memnet
import memnet.finetune as ft
from memnet.evaluate import ood_pairs, percentile_normalize, predictor, w2s_pairs
from memnet.finetune_modes import _gather, blind_spot, subsample_pairs
from memnet.metrics import affine_fit, psnr

OUT = Path("/work/exp35/out")
OUT.mkdir(parents=True, exist_ok=True)
ROOT = Path("/work/shared/data")
torch.set_num_threads(1)


def rows():
    r = [
        ("W2S " + n.stem.replace("input_avg1_", ""), n, c)
        for n, c in w2s_pairs(ROOT / "W2S_train_8bit", range(31, 41), [1])
    ]
    r += [(n.stem, n, c) for n, c in ood_pairs(ROOT / "microscopy_ood") if n.stem.startswith("rcan")]
    return r


def train(minutes):
    stash = {}
    orig = ft._HeldOut.__init__

    def init(self, mode, val_items, patch, seed):
        stash["val"] = val_items
        stash["mode"] = mode.name
        orig(self, mode, val_items, patch, seed)

    ft._HeldOut.__init__ = init
    for name, n, _ in rows():
        key = name.replace(" ", "_")
        if (OUT / f"{key}.json").exists():
            continue
        x = tifffile.imread(n).astype(np.float32)
        cfg = ft.FinetuneConfig(
            model="microscopy",
            mode="auto",
            name=f"exp-{key}",
            minutes=minutes,
            device="cpu",
            overwrite=True,
            publish="always",
        )
        t0 = time.time()
        path = ft.finetune(cfg, x, log=lambda s: None)
        shutil.copy(path, OUT / f"{key}.safetensors")
        np.savez(OUT / f"{key}-val.npz", *[v if not isinstance(v, tuple) else v[0] for v in stash["val"]])
        (OUT / f"{key}.json").write_text(
            json.dumps({"decision": path.decision.as_dict(), "mode": stash["mode"], "seconds": time.time() - t0})
        )
        print(key, path.decision.summary(), stash["mode"], flush=True)


def crops_of(val, size=32):
    out = []
    for a in val:
        h, w = a.shape[-2:]
        out += [
            a[..., y : y + size, x : x + size]
            for y in range(0, h - size + 1, size)
            for x in range(0, w - size + 1, size)
        ]
    return torch.from_numpy(np.stack(out).astype(np.float32)).reshape(len(out), 1, size, size)


def run(model, x):
    with torch.inference_mode():
        return torch.cat([model(x[i : i + 64]) for i in range(0, len(x), 64)])


def crit_blind(model, bands, rng, draws, replace, frac):
    """Full-resolution blind-spot score on whole bands: masked pixels (random neighbour / median) vs the
    noisy values there; per 32-px crop errors summed over draws."""
    num = den = 0
    for _ in range(draws):
        xi, m = blind_spot(bands, frac, rng, replace)
        o = run(model, xi)
        e, mm = ((o - bands) ** 2 * m), m
        num = num + crop_sum(e)
        den = den + crop_sum(mm)
    return num / np.maximum(den, 1)


def crop_sum(t, size=32):
    b, _, h, w = t.shape
    t = t[:, :, : h // size * size, : w // size * size]
    return t.reshape(b, 1, h // size, size, w // size, size).sum(dim=(1, 3, 5)).reshape(-1).double().numpy()


def crit_sub(model, bands, rng, draws):
    num = 0
    for _ in range(draws):
        g1, g2, _ = subsample_pairs(bands, rng)
        num = num + crop_sum((run(model, g1) - g2) ** 2, 16)
    return num


def crit_fullsub(model, bands, rng, draws):
    """g1 of the full-resolution output vs g2 of the input (biased: f sees g2's noise)."""
    num = 0
    o = run(model, bands)
    for _ in range(draws):
        _, g2, idx = subsample_pairs(bands, rng)
        f1, _ = _gather(o, idx)
        num = num + crop_sum((f1 - g2) ** 2, 16)
    return num


def gain(b, n):
    g = 10 * np.log10(np.maximum(b, 1e-12) / np.maximum(n, 1e-12))
    return g.mean(), g.std(ddof=1) / np.sqrt(len(g))


def score():
    base, _ = memnet.load_model("microscopy")
    base.eval()
    res = []
    for name, n, c in rows():
        key = name.replace(" ", "_")
        if not (OUT / f"{key}.json").exists():
            continue
        rec = json.loads((OUT / f"{key}.json").read_text())
        cand, _ = memnet.load_model(str(OUT / f"{key}.safetensors"))
        cand.eval()
        x = tifffile.imread(n).astype(np.float64)
        cl = tifffile.imread(c).astype(np.float64)
        xn = percentile_normalize(x)
        real = psnr(affine_fit(predictor(cand)(xn), cl), cl) - psnr(affine_fit(predictor(base)(xn), cl), cl)
        val = np.load(OUT / f"{key}-val.npz")
        w = min(v.shape[-1] for v in val.values())
        bands = torch.from_numpy(np.stack([v[..., :w] for v in val.values()]).astype(np.float32))[:, None]
        out = {"image": name, "real": real, "sub_decision": rec["decision"]["gain"], "sub_se": rec["decision"]["se"]}
        for cname, fn in [
            ("sub8", lambda m, r, bands=bands: crit_sub(m, bands, r, 8)),
            ("blind_rand", lambda m, r, bands=bands: crit_blind(m, bands, r, 6, "random", 0.03)),
            ("fullsub", lambda m, r, bands=bands: crit_fullsub(m, bands, r, 8)),
        ]:
            b = fn(base, np.random.default_rng(5))
            nw = fn(cand, np.random.default_rng(5))
            out[cname], out[cname + "_se"] = gain(b, nw)
        res.append(out)
        print(" ".join(f"{k} {v:+.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()), flush=True)
    (OUT / "scores.json").write_text(json.dumps(res, indent=1))
    real = np.array([r["real"] for r in res])
    for k in ("sub_decision", "sub8", "blind_rand", "fullsub"):
        v = np.array([r[k] for r in res])
        print(f"{k:12s} pearson {np.corrcoef(real, v)[0, 1]:+.2f} sign {np.sum(np.sign(real) == np.sign(v))}/{len(v)}")


if __name__ == "__main__":
    train(float(sys.argv[2])) if sys.argv[1] == "train" else score()
