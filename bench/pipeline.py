"""The pipeline around the model, against the disk: `memnet.restore` with the model call replaced by a
copy (the model is free), beside reading the same input with tifffile/zarr and writing the same chunks
with zarr/tifffile (raw I/O). Prints Mpx/s for each and the ratio pipeline / raw (issue #34: >= 0.7).

    .venv/bin/python bench/pipeline.py                      # 24 x 2048^2 uint16, every case
    .venv/bin/python bench/pipeline.py --planes 8 --size 1024 --cases tiff-zarr --profile
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import tifffile
import zarr

import memnet
from memnet.runner import OrtRunner, Runner

CASES = ("tiff-zarr", "tiff-zarr-pyramid", "zarr-zarr", "tiff-tiff")


def make_input(root: Path, planes: int, size: int, kind: str) -> Path:
    """A Poisson-noise uint16 stack, once per shape and kind (written plane by plane)."""
    path = root / f"in-{planes}x{size}.{'tif' if kind == 'tiff' else 'zarr'}"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    base = rng.poisson(300, (size, size)).astype(np.uint16)
    if kind == "tiff":
        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            for z in range(planes):
                tw.write(np.roll(base, z, axis=0), contiguous=True, metadata={"axes": "ZYX"} if z == 0 else None)
    else:
        a = zarr.open_array(str(path), mode="w", shape=(planes, size, size), chunks=(1, 512, 512), dtype=np.uint16)
        for z in range(planes):
            a[z] = np.roll(base, z, axis=0)
    return path


def raw_io(src: Path, out: Path, tile: int) -> None:
    """The disk's share: read every plane, write it in the output's chunks (no compute)."""
    if src.suffix == ".tif":
        with tifffile.TiffFile(src) as tf:
            arr = zarr.open(tf.aszarr(), mode="r")
            _copy(arr, out, tile)
    else:
        _copy(zarr.open_array(str(src), mode="r"), out, tile)


def _copy(arr, out: Path, tile: int) -> None:
    n, h, w = arr.shape
    if out.suffix == ".zarr":
        dst = zarr.open_array(str(out), mode="w", shape=arr.shape, chunks=(1, tile, tile), dtype=arr.dtype)
        for z in range(n):
            dst[z] = arr[z]
    else:
        with tifffile.TiffWriter(out, bigtiff=True) as tw:
            tiles = (plane[y: y + tile, x: x + tile] for plane in (arr[z] for z in range(n))
                     for y in range(0, h, tile) for x in range(0, w, tile))
            tw.write(tiles, shape=arr.shape, dtype=arr.dtype, tile=(tile, tile), compression="zlib")


def pipeline(src: Path, out: Path, tile: int, pyramid: int) -> None:
    kw = {"pyramid": pyramid} if out.suffix == ".zarr" else {}  # a TIFF has no pyramid
    memnet.restore(str(src), "microscopy", output=str(out), device="cpu", tile=tile, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--planes", type=int, default=24)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--dir", help="where inputs and outputs go (default: a temporary folder)")
    ap.add_argument("--profile", action="store_true", help="cProfile the pipeline runs (top 25 by own time)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="memnet-pipeline-"))
    root.mkdir(parents=True, exist_ok=True)
    Runner._forward = lambda self, x: x  # the model is free: what is left is the pipeline
    OrtRunner.__call__ = lambda self, batch: batch if batch.ndim == 3 else batch[:, 0]  # the torch-free CPU path
    # Imports, the model and the backend built once before timing: a long run pays them once.
    memnet.restore(np.zeros((64, 64), np.uint16), "microscopy", device="cpu", tile=args.tile)
    mpx = args.planes * args.size**2 / 1e6
    print(f"{args.planes} x {args.size}^2 uint16 ({mpx:.0f} Mpx), tile {args.tile}, model replaced by a copy")
    print(f"{'case':20s} {'raw I/O Mpx/s':>14s} {'pipeline Mpx/s':>15s} {'ratio':>6s}")
    for case in args.cases.split(","):
        kind_in, kind_out = case.split("-")[:2]
        src = make_input(root, args.planes, args.size, kind_in)
        ext = ".zarr" if kind_out == "zarr" else ".tif"
        pyramid = 1024 if case.endswith("pyramid") else 0
        t_raw = _timed(partial(raw_io, src, root / f"raw{ext}", args.tile), root / f"raw{ext}")
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
        t_pipe = _timed(partial(pipeline, src, root / f"out{ext}", args.tile, pyramid), root / f"out{ext}")
        if args.profile:
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        print(f"{case:20s} {mpx / t_raw:14.1f} {mpx / t_pipe:15.1f} {t_raw / t_pipe:6.2f}", flush=True)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


def _timed(fn, out: Path) -> float:
    for p in (out, Path(str(out) + ".memnet")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
