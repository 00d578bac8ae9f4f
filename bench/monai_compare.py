"""The same model and image through MONAI's sliding_window_inference (gaussian, overlap 0.25) and
through memnet's exact tiling: throughput and max difference to whole-image inference.

  python bench/monai_compare.py --model M4R4C32 --size 1024 --planes 2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import bench_model, machine, timed

import memnet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="M4R4C32")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--planes", type=int, default=2)
    ap.add_argument("--tile", type=int, default=512)
    args = ap.parse_args()
    from monai.inferers import sliding_window_inference

    model = bench_model(args.model)
    r = memnet.receptive_field(model)
    rng = np.random.default_rng(0)
    # A smooth image plus noise: realistic statistics for a restoration model.
    yy, xx = np.mgrid[0: args.size, 0: args.size] / args.size
    clean = 0.5 + 0.3 * np.sin(6 * np.pi * xx) * np.cos(4 * np.pi * yy)
    x = np.stack([clean + 0.1 * rng.standard_normal(clean.shape) for _ in range(args.planes)]).astype(np.float32)
    with torch.inference_mode():
        whole = torch.cat([model(torch.from_numpy(p)[None, None]) for p in x])[:, 0].numpy()
    rng_out = float(whole.max() - whole.min())
    n = x.size
    roi = min(args.size, args.tile + 2 * r)  # the same window shape our engine feeds the model
    bs = memnet.runner.auto_batch(model, (roi, roi), torch.device("cpu"), None)

    ours = {}

    def run_ours():
        ours["y"] = memnet.restore(x, model, tile=args.tile, device="cpu", batch_size=bs)

    def run_monai():
        with torch.inference_mode():
            ours["m"] = sliding_window_inference(torch.from_numpy(x)[:, None], (roi, roi), bs, model,
                                                 overlap=0.25, mode="gaussian")[:, 0].numpy()

    t_ours, t_monai = timed(run_ours), timed(run_monai)
    d_ours = np.abs(ours["y"] - whole).max() / rng_out
    d_monai = np.abs(ours["m"] - whole).max() / rng_out
    print(f"# {machine()}; model {args.model} (radius {r}); {args.planes}x{args.size}x{args.size} float32; "
          f"window {roi}, batch {bs}")
    print(f"{'':24} {'Mpx/s':>8} {'max |diff| / range':>20}")
    print(f"{'memnet exact (tile ' + str(args.tile) + ')':24} {n / t_ours / 1e6:8.3f} {d_ours:20.2e}")
    print(f"{'MONAI gaussian 0.25':24} {n / t_monai / 1e6:8.3f} {d_monai:20.2e}")
    print(f"speed ratio memnet / MONAI = {t_monai / t_ours:.2f}")


if __name__ == "__main__":
    main()
