"""Blended mode: max difference to whole-image inference and throughput as a function of the
halo N, on a trained model (seams are the failure this measures).

  python bench/blend_halo.py --model runs/microscopy-m4r4c32/best.safetensors --halos 0 4 8 16 24 exact
"""

from __future__ import annotations

import argparse

import numpy as np
import tifffile
import torch
from _common import machine, timed

import memnet
from memnet.normalize import Normalizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained model (name or .safetensors)")
    ap.add_argument("--image", help="a 2-D/3-D TIFF (default: the bundled noisy sample)")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--halos", nargs="+", default=["0", "4", "8", "16", "24", "exact"])
    args = ap.parse_args()
    from napari_memnet._sample_data import NOISY

    raw = tifffile.imread(args.image or NOISY)
    model, info = memnet.load_model(args.model)
    r = memnet.receptive_field(model)
    x = Normalizer.for_data(raw, info.normalization).forward(raw)
    x = x.reshape(-1, *x.shape[-2:])
    with torch.inference_mode():
        whole = torch.cat([model(torch.from_numpy(p)[None, None]) for p in x])[:, 0].numpy()
    span = float(np.percentile(whole, 99.9) - np.percentile(whole, 0.1))
    print(f"# {machine()}; model {info.name} (radius {r}); image {x.shape}; tile {args.tile}; "
          "diff in model range, relative to the 0.1-99.9 percentile span of the output")
    print(f"{'halo':>6} {'mode':>8} {'max |diff|':>11} {'/ span':>9} {'mean |diff|':>12} {'Mpx/s':>7}")
    for h in args.halos:
        halo = "exact" if h == "exact" else int(h)
        out = {}

        def run(out=out, halo=halo):
            out["y"] = memnet.restore(x, model, tile=args.tile, halo=halo, device="cpu")

        t = timed(run)
        d = np.abs(out["y"] - whole)
        mode = "exact" if halo == "exact" or halo >= r else "blended"
        print(f"{h:>6} {mode:>8} {d.max():11.2e} {d.max() / span:9.2e} {d.mean():12.2e} {x.size / t / 1e6:7.3f}")


if __name__ == "__main__":
    main()
