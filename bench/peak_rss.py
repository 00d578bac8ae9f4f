"""Peak memory restoring stacks several times larger than the memory budget, TIFF and Zarr in.

  python bench/peak_rss.py --gb 0.5 2 4

For each size, generates a uint16 stack on disk (Zarr and BigTIFF, written plane by plane, never
held in RAM), then restores it in a fresh subprocess (exact mode, output OME-Zarr and TIFF) and
prints the subprocess's peak RSS. A tiny model keeps it quick: the engine's buffers, not the
model's activations, are what is measured. Everything is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time, torch, memnet
torch.manual_seed(0)
src, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = memnet.MemNet(1, 1, 4).eval()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
memnet.restore(src, m, output=out, tile=512, device="cpu", memory_budget=budget)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": peak / 1024, "baseline_mb": base / 1024, "seconds": dt}))
"""


def make_inputs(folder: Path, gb: float) -> tuple[Path, Path, tuple]:
    import tifffile
    import zarr

    plane = (2048, 2048)
    z = max(1, int(round(gb * 1024**3 / (plane[0] * plane[1] * 2))))
    shape = (z, *plane)
    rng = np.random.default_rng(0)
    zp = folder / "in.zarr"
    arr = zarr.create_array(str(zp), shape=shape, dtype=np.uint16, chunks=(1, 512, 512), zarr_format=2)
    noise = (rng.random(plane, dtype=np.float32) * 3000 + 100).astype(np.uint16)
    for i in range(z):
        arr[i] = np.roll(noise, i * 7, axis=1)
    tp = folder / "in.tif"
    def tiles():  # a tiled TIFF written from an iterator of tiles, plane by plane
        for i in range(z):
            plane = np.roll(noise, i * 7, axis=1)
            for y in range(0, plane.shape[0], 512):
                for x in range(0, plane.shape[1], 512):
                    yield plane[y: y + 512, x: x + 512]

    tifffile.imwrite(tp, tiles(), shape=shape, dtype=np.uint16, bigtiff=True, tile=(512, 512),
                     metadata={"axes": "ZYX"})
    return zp, tp, shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, nargs="+", default=[0.5, 2.0])
    ap.add_argument("--budget-mb", type=int, default=256, help="the engine's memory_budget for batches")
    args = ap.parse_args()
    print(f"# memory_budget {args.budget_mb} MB; tile 512; model M1R1C4 (tiny)")
    print(f"{'input':>6} {'stack':>16} {'GB':>6} {'output':>6} {'peak RSS MB':>12} {'after import MB':>16} {'s':>7}")
    for gb in args.gb:
        tmp = Path(tempfile.mkdtemp(prefix="memnet-rss-"))
        try:
            zp, tp, shape = make_inputs(tmp, gb)
            size = np.prod(shape) * 2 / 1024**3
            for src in (tp, zp):
                for suffix in (".zarr", ".tif"):
                    out = tmp / f"out{suffix}"
                    res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out),
                                          str(args.budget_mb * 1024**2)], capture_output=True, text=True)
                    if res.returncode:
                        print(res.stderr, file=sys.stderr)
                        raise SystemExit(1)
                    r = json.loads(res.stdout.strip().splitlines()[-1])
                    print(f"{src.suffix:>6} {'x'.join(map(str, shape)):>16} {size:6.2f} {suffix:>6} "
                          f"{r['peak_mb']:12.0f} {r['baseline_mb']:16.0f} {r['seconds']:7.1f}", flush=True)
                    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
