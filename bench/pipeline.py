"""The pipeline around the model, against the disk: `memnet.restore` with the model call replaced by a
copy (the model is free), beside reading the same input with tifffile/zarr and writing the same chunks
with zarr/tifffile (raw I/O). Prints Mpx/s for each and the ratio pipeline / raw (issue #34: >= 0.7).

The raw I/O writes what the pipeline writes, the way a user would with the libraries alone: a Zarr v3
array created with zarr's defaults as the output's level 0 is (zstd level 0 = zstd's default 3, no
checksum, 512² chunks, zarr's own threads), whole planes per call; with the pyramid, the coarser levels
too (2×2 means of the plane in memory, `ngff.mean2x2`); a TIFF as the output's (tiled 512², zlib, one
writer thread, tifffile's default level). Each case runs raw and pipeline alternately, ``--repeat`` times,
and keeps the best of each: wall time, and CPU time of the process (what counts on a shared machine).

    .venv/bin/python bench/pipeline.py --planes 12 --size 2048            # every case
    taskset -c 1 .venv/bin/python bench/pipeline.py --cases tiff-zarr     # one pinned core
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
from memnet.ngff import Pyramid, mean2x2
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


def raw_io(src: Path, out: Path, tile: int, pyramid: int) -> None:
    """The disk's share: read every plane, write it in the output's chunks (no compute but the pyramid's means)."""
    if src.suffix == ".tif":
        with tifffile.TiffFile(src) as tf:
            arr = zarr.open(tf.aszarr(), mode="r")
            _copy(arr, out, tile, pyramid)
    else:
        _copy(zarr.open_array(str(src), mode="r"), out, tile, pyramid)


def _copy(arr, out: Path, tile: int, pyramid: int) -> None:
    n, h, w = arr.shape
    if out.suffix == ".zarr":
        root = zarr.open_group(str(out), mode="w", zarr_format=3)
        levels = Pyramid.plan(h, w, tile, tile, pyramid).levels
        dst = [root.create_array(str(k), shape=(n, lv.height, lv.width), dtype=arr.dtype,
                                 chunks=(1, lv.chunk_h, lv.chunk_w), fill_value=0) for k, lv in enumerate(levels)]
        for z in range(n):
            plane = arr[z]
            dst[0][z] = plane
            for level in dst[1:]:
                plane = mean2x2(plane)
                level[z] = plane
    else:
        with tifffile.TiffWriter(out, bigtiff=True) as tw:
            tiles = (plane[y: y + tile, x: x + tile] for plane in (arr[z] for z in range(n))
                     for y in range(0, h, tile) for x in range(0, w, tile))
            tw.write(tiles, shape=arr.shape, dtype=arr.dtype, tile=(tile, tile), compression="zlib")


def pipeline(src: Path, out: Path, tile: int, pyramid: int) -> None:
    kw = {"pyramid": pyramid} if out.suffix == ".zarr" else {}  # a TIFF has no pyramid
    memnet.restore(str(src), "microscopy", output=str(out), device="cpu", tile=tile, **kw)


def free_model(self, batch: np.ndarray) -> np.ndarray:
    """The model replaced by a copy: each window's (middle) plane, as the model's output would be."""
    return batch[:, batch.shape[1] // 2] if batch.ndim == 4 else batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--planes", type=int, default=24)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternating; the best kept")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--dir", help="where inputs and outputs go (default: a temporary folder)")
    ap.add_argument("--profile", action="store_true", help="cProfile the pipeline runs (top 25 by own time)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="memnet-pipeline-"))
    root.mkdir(parents=True, exist_ok=True)
    Runner.__call__ = free_model  # the model is free: what is left is the pipeline
    OrtRunner.__call__ = free_model  # (the torch-free CPU path)
    # Imports, the model and the backend built once before timing: a long run pays them once.
    memnet.restore(np.zeros((64, 64), np.uint16), "microscopy", device="cpu", tile=args.tile)
    mpx = args.planes * args.size**2 / 1e6
    print(f"{args.planes} x {args.size}^2 uint16 ({mpx:.0f} Mpx), tile {args.tile}, model replaced by a copy, "
          f"best of {args.repeat}; Mpx/s by wall time (by CPU time of the process)")
    print(f"{'case':20s} {'raw I/O Mpx/s':>18s} {'pipeline Mpx/s':>18s} {'ratio wall (CPU)':>17s}")
    for case in args.cases.split(","):
        kind_in, kind_out = case.split("-")[:2]
        src = make_input(root, args.planes, args.size, kind_in)
        ext = ".zarr" if kind_out == "zarr" else ".tif"
        pyramid = 1024 if case.endswith("pyramid") else 0
        raw, pipe = [], []
        for _ in range(args.repeat):
            raw.append(_timed(partial(raw_io, src, root / f"raw{ext}", args.tile, pyramid), root / f"raw{ext}"))
            if args.profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.enable()
            pipe.append(_timed(partial(pipeline, src, root / f"out{ext}", args.tile, pyramid), root / f"out{ext}"))
            if args.profile:
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        (rw, rc), (pw, pc) = np.min(raw, axis=0), np.min(pipe, axis=0)
        print(f"{case:20s} {mpx / rw:9.1f} ({mpx / rc:5.1f}) {mpx / pw:10.1f} ({mpx / pc:5.1f}) "
              f"{rw / pw:9.2f} ({rc / pc:4.2f})", flush=True)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


def _timed(fn, out: Path) -> tuple[float, float]:
    for p in (out, Path(str(out) + ".memnet")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


if __name__ == "__main__":
    main()
