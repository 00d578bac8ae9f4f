"""Throughput of `memnet restore` on a dask LocalCluster with 1 vs 2 worker processes (one thread
each), against the single-process engine with the same total threads.

  python bench/dask_workers.py --model M4R4C32 --shape 4 512 512
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import tifffile
import torch
from _common import bench_model, machine, synthetic_stack

import memnet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="M4R4C32")
    ap.add_argument("--shape", type=int, nargs=3, default=(4, 512, 512))
    ap.add_argument("--tile", type=int, default=256)
    args = ap.parse_args()
    from distributed import Client, LocalCluster

    tmp = Path(tempfile.mkdtemp(prefix="memnet-dist-"))
    try:
        model = bench_model(args.model)
        mf = tmp / "m.safetensors"
        memnet.save_model(model, mf, name="bench", task="denoise")
        src = tmp / "in.tif"
        tifffile.imwrite(src, synthetic_stack(tuple(args.shape)), metadata={"axes": "ZYX"})
        n = args.shape[0] * args.shape[1] * args.shape[2]
        print(f"# {machine()}; model {args.model}; stack {'x'.join(map(str, args.shape))} uint16; tile {args.tile}")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            memnet.restore(src, mf, output=tmp / "single.zarr", tile=args.tile, device="cpu", overwrite=True)
            dt = time.perf_counter() - t0
            print(f"single process, {threads} torch thread(s): {n / dt / 1e6:.3f} Mpx/s ({dt:.1f} s)")
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                              dashboard_address=None) as cluster, Client(cluster) as client:
                client.run(lambda: __import__("torch").ones(1))  # warm the workers' imports
                t0 = time.perf_counter()
                memnet.restore(src, mf, output=tmp / f"d{workers}.zarr", tile=args.tile, device="cpu", client=client)
                dt = time.perf_counter() - t0
            print(f"LocalCluster, {workers} worker process(es) x 1 thread: {n / dt / 1e6:.3f} Mpx/s ({dt:.1f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
