"""Engine throughput vs the bare model, and the halo overhead.

  python bench/throughput.py --model M4R4C32 --shape 2 1024 1024 --tile 512 [--backend onnxruntime-int8]

Prints, for the same device in the same run:
  bare-core   : the model on in-memory tiles of the core size (no halo): the yardstick
  bare-window : the model on in-memory windows (core + halo), counted per output pixel
  engine      : memnet.restore streaming a TIFF from disk to an OME-Zarr on disk (exact mode)
and the ratios engine/bare-window (pipeline efficiency, target >= 0.9) and bare-window/bare-core
(the cost of exactness: the halo overhead on its own).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from _common import bench_model, machine, synthetic_stack, timed

import memnet
from memnet.tiling import TilePlan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="M4R4C32")
    ap.add_argument("--shape", type=int, nargs=3, default=(2, 1024, 1024), metavar=("Z", "Y", "X"))
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--backend", default="auto", help="restore backend, e.g. onnxruntime-int8 [auto]")
    args = ap.parse_args()
    dev = memnet.engine.resolve_device(args.device)
    model = bench_model(args.model).to(dev)
    r = memnet.receptive_field(model)
    z, h, w = args.shape
    plan = TilePlan(h, w, tile=args.tile, halo=r)
    runner = memnet.engine.Runner(model, dev, backend=args.backend)
    bs = memnet.runner.auto_batch(model, plan.window_shape, dev, None) if args.batch_size == "auto" \
        else int(args.batch_size)
    n_out = z * h * w
    print(f"# {machine()}; device {dev}; model {args.model} (radius {r}); stack {z}x{h}x{w} uint16; "
          f"tile {args.tile}, window {plan.window_shape}, batch {bs}, backend {runner.backend}")

    # Bare model on in-memory tiles.
    tiles = len(plan) * z
    core = np.random.default_rng(0).random((bs, *plan.core_shape), dtype=np.float32)
    win = np.random.default_rng(0).random((bs, *plan.window_shape), dtype=np.float32)
    runner(core[:1])  # warm-up
    n_batches = -(-tiles // bs)
    t_core = timed(lambda: [runner(core) for _ in range(n_batches)])
    t_win = timed(lambda: [runner(win) for _ in range(n_batches)])
    core_px = n_batches * bs * plan.core_shape[0] * plan.core_shape[1]
    bare_core = core_px / t_core / 1e6
    bare_win = core_px / t_win / 1e6  # same work as the engine, per output pixel

    tmp = Path(tempfile.mkdtemp(prefix="memnet-bench-"))
    try:
        src = tmp / "in.tif"
        tifffile.imwrite(src, synthetic_stack((z, h, w)), tile=(256, 256), metadata={"axes": "ZYX"})
        out = tmp / "out.zarr"

        def engine():
            memnet.restore(src, model, output=out, tile=args.tile, device=dev, batch_size=bs, overwrite=True,
                           backend=args.backend)

        t_eng = timed(engine)
        eng = n_out / t_eng / 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"bare-core    {bare_core:8.3f} Mpx/s")
    area = (plan.window_shape[0] * plan.window_shape[1]) / (plan.core_shape[0] * plan.core_shape[1])
    print(f"bare-window  {bare_win:8.3f} Mpx/s  (halo overhead: x{bare_core / bare_win:.2f} time, "
          f"window/core area x{area:.2f})")
    print(f"engine       {eng:8.3f} Mpx/s  TIFF -> OME-Zarr, exact")
    print(f"engine / bare-window = {eng / bare_win:.2f}   engine / bare-core = {eng / bare_core:.2f}")


if __name__ == "__main__":
    main()
