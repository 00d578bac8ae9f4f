"""Peak memory of a restore, two modes.

  python bench/peak_rss.py --cli                      # what a user runs: memnet restore, shipped model
  python bench/peak_rss.py --cli --shapes 512 2x2048  # some of the shapes (8192 takes ~6 CPU-minutes)
  python bench/peak_rss.py --gb 0.5 2 4               # stacks several times larger than the memory budget
  python bench/peak_rss.py --cli --free-model --shapes 8192   # the pipeline's share: the model is a copy

--cli: for each shape (a 512², 2048² and 8192² plane, a 2 × 2048² stack; uint16 TIFF written as a user
would, tifffile.imwrite of the whole array), runs `memnet restore IN -o OUT --model microscopy` with the
default options in a fresh process, to OME-Zarr and to TIFF, and prints that process's peak RSS (VmHWM,
which the process reports on exit; not ru_maxrss from wait4, which also holds the parent's peak), the peak
RSS of a process that only imports what a restore imports (`--imports`), and the wall time. With
--free-model the model call is replaced by a copy (as in bench/pipeline.py): what is left is the pipeline's
memory (reads, intensity mapping, writes, the pyramid), measured in seconds instead of the model's minutes.

--gb: for each size, generates a uint16 stack on disk (Zarr and BigTIFF, written plane by plane, never
held in RAM), then restores it in a fresh subprocess (exact mode, output OME-Zarr and TIFF) and
prints the subprocess's peak RSS. A tiny model keeps it quick: the engine's buffers, not the
model's activations, are what is measured. Everything is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time, torch, memnet
torch.manual_seed(0)
src, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = memnet.MemNet(1, 1, 4).eval()
base = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
t0 = time.perf_counter()
memnet.restore(src, m, output=out, tile=512, device="cpu", memory_budget=budget)
dt = time.perf_counter() - t0
peak = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
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


SHAPES = {"512": (512, 512), "2048": (2048, 2048), "8192": (8192, 8192), "2x2048": (2, 2048, 2048)}

IMPORTS = r"""
import resource, sys
import memnet.cli, memnet.engine
from memnet.kernel import pick_device
from memnet.options import RestoreOptions
from memnet.runtime import CPU
dev = pick_device("microscopy", RestoreOptions())
if dev is CPU:  # ONNX Runtime on numpy weights: no torch
    backend = "onnxruntime"
else:
    from memnet.inference import choose_backend
    backend = choose_backend("auto", dev)
if backend.startswith("onnxruntime"):
    import onnxruntime
print(backend + ("" if "torch" in sys.modules else "/np"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


# `memnet restore` in a process that reports its own peak RSS (VmHWM) on exit; with the model call replaced
# by a copy (bench/pipeline.py's free model) when the first argument is "free".
CLI = r"""
import atexit, sys
def _peak():
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print("VmHWM_kB", hwm.split()[1], file=sys.stderr)
atexit.register(_peak)
if sys.argv.pop(1) == "free":
    from memnet.runner import Runner
    Runner.__call__ = lambda self, b: b[:, b.shape[1] // 2] if b.ndim == 4 else b
from memnet.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` (a `CLI` process) to its end; (its peak RSS in MiB, seconds). The peak is the one the
    process reports (VmHWM): a child's ru_maxrss also holds its parent's peak (Linux records the parent's
    high-water mark at exec), and this bench's parent held a whole 8192² image to write the input."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    kb = next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("VmHWM_kB"))
    return int(kb) / 1024, dt


def cli_mode(args) -> None:
    import tifffile

    res = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True)
    backend, imports_mb = res.stdout.split()
    extra = [a for a in args.extra.split() if a]
    print(f"# memnet restore IN -o OUT --model {args.model} {' '.join(extra)}".rstrip()
          + f"; {os.cpu_count()} cores visible" + ("; the model replaced by a copy" if args.free_model else ""))
    print(f"{'shape':>14} {'output':>8} {'backend':>12} {'peak RSS MiB':>12} {'imports MiB':>11} {'s':>7}")
    rng = np.random.default_rng(0)
    for name in args.shapes:
        shape = SHAPES[name]
        tmp = Path(tempfile.mkdtemp(prefix="memnet-rss-"))
        try:
            src = tmp / "in.tif"
            img = rng.poisson(rng.uniform(50, 400, size=shape[-2:]).astype(np.float32)).astype(np.uint16) + 100
            tifffile.imwrite(src, np.broadcast_to(img, shape), metadata={"axes": "ZYX"[-len(shape):]})
            del img
            for suffix in args.outputs:
                out = tmp / f"out{suffix}"
                cmd = [sys.executable, "-c", CLI, "free" if args.free_model else "model", "restore", str(src),
                       "-o", str(out), "--model", args.model, "-q", *extra]
                peak, dt = _run_measured(cmd)
                print(f"{' x '.join(map(str, shape)):>14} {suffix:>8} {backend:>12} {peak:12.0f} "
                      f"{float(imports_mb):11.0f} {dt:7.1f}", flush=True)
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cli", action="store_true", help="measure `memnet restore` on the shapes (see above)")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--outputs", nargs="+", choices=(".zarr", ".tif"), default=[".zarr", ".tif"])
    ap.add_argument("--model", default="microscopy")
    ap.add_argument("--extra", default="", help="more `memnet restore` options, e.g. '--backend eager'")
    ap.add_argument("--free-model", action="store_true", help="--cli with the model call replaced by a copy")
    ap.add_argument("--gb", type=float, nargs="+", default=[0.5, 2.0])
    ap.add_argument("--budget-mb", type=int, default=256, help="the engine's memory_budget for batches")
    args = ap.parse_args()
    if args.cli:
        cli_mode(args)
        return
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
