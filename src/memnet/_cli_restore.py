"""The `memnet restore INPUT -o OUTPUT ...` subcommand."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from . import _cli_types as T
from .options import BACKENDS, CONTEXT, OME_ZARR_VERSIONS, RestoreOptions


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class ProgressBar:
    """A one-line bar on stderr: tiles, Mpx/s, elapsed and ETA. Redraws at most 5 times a second."""

    def __init__(self, stream=None, width: int = 28):
        # sys.stderr as it is now, not as it was at import (a test harness or a GUI may have replaced it)
        self.stream, self.width, self.last = stream or sys.stderr, width, 0.0
        self.open = False  # a line drawn and not yet ended

    def end_line(self) -> None:
        """End an unfinished bar, so a message that follows gets a line of its own."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False

    def __call__(self, p) -> None:
        now = time.monotonic()
        if p.done < p.total and now - self.last < 0.2:
            return
        self.last = now
        filled = int(self.width * p.fraction)
        bar = "#" * filled + "-" * (self.width - filled)
        line = (f"\r[{bar}] {p.done}/{p.total} tiles  {p.mpx_per_s:.2f} Mpx/s  "
                f"elapsed {_fmt_time(p.elapsed)}  ETA {_fmt_time(p.eta)}")
        self.stream.write(line)
        self.open = p.done < p.total
        if not self.open:
            self.stream.write("\n")
        self.stream.flush()


class Terminated(BaseException):
    """SIGTERM (what `timeout` and batch schedulers send), raised in the main thread like Ctrl-C, so the
    run cleans up as it does for SIGINT: a TIFF's partial file is removed, a Zarr stays incomplete."""


def _on_sigterm():
    def handler(signum, frame):
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (called from a GUI or a worker): leave signals alone
        return None


def cmd_restore(args: argparse.Namespace) -> int:
    from .engine import Cancelled, describe_model, restore

    if not args.quiet:
        what = describe_model(args.input, args.model, axes=args.axes, series=args.series, level=args.level,
                              context=args.context)
        print(f"model: {what}", file=sys.stderr)
    bar = None if args.quiet else ProgressBar()
    t0 = time.perf_counter()
    options = RestoreOptions(**{f: getattr(args, f) for f in _OPTIONS if f not in _ZARR_ONLY})
    zarr_only = {f: getattr(args, f) for f in _ZARR_ONLY if getattr(args, f) is not None}  # only when given
    previous = _on_sigterm()
    try:
        restore(args.input, args.model, output=args.output, axes=args.axes, series=args.series, level=args.level,
                options=options, **zarr_only, progress=bar, overwrite=args.overwrite, resume=args.resume,
                workers=args.workers, scheduler=args.scheduler)
    except Cancelled:
        if bar is not None:
            bar.end_line()
        print("cancelled: the output is not marked complete", file=sys.stderr)
        return 130
    except Terminated:
        if bar is not None:
            bar.end_line()
        what = "left marked incomplete (continue with --resume)" if str(args.output).rstrip("/").endswith(
            ".zarr") else "removed"
        print(f"terminated (SIGTERM): the partial output was {what}", file=sys.stderr)
        return 143
    except BaseException:  # reported by main() on a line of its own
        if bar is not None:
            bar.end_line()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not args.quiet:
        print(f"wrote {args.output} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


# The RestoreOptions fields set on the command line (the others keep their defaults).
_OPTIONS = ("tile", "halo", "blend", "scale", "amp", "ensemble", "device", "batch_size", "backend", "ome_zarr_version",
            "pyramid", "write_threads", "context")
_ZARR_ONLY = ("ome_zarr_version", "pyramid")  # refused with a TIFF output when given, so None by default
_D = RestoreOptions()  # the defaults, shown in --help


def register(sub) -> None:
    p = sub.add_parser(
        "restore",
        help="restore an image or stack tile by tile (TIFF/Zarr in, Zarr/TIFF out)",
        description="Restore a TIFF / Zarr / OME-Zarr image or stack tile by tile, out of core. Exact mode "
        "(default) gives the same result as whole-image inference; a smaller --halo blends overlapping tiles.",
    )
    p.add_argument("input", help="input .tif/.tiff, .zarr or OME-Zarr (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .zarr (OME-Zarr) or .tif")
    p.add_argument("--model", default="denoise",
                   help="task (denoise, sr, jpeg, microscopy), model name (see `memnet models`) or .safetensors path")
    p.add_argument("--scale", type=T.sr_scale, default=_D.scale,
                   help="super-resolution factor (2, 3 or 4) for sr models")
    p.add_argument("--tile", type=T.auto_or(T.count(16, "a tile size in pixels")), default=_D.tile,
                   help="output tile (= Zarr chunk) size in pixels; auto: from the model's receptive field and "
                   f"the device (CPU: a window of about 640 px; GPU: at most 1.3x halo work) [{_D.tile}]")
    p.add_argument("--halo", type=T.halo, default=_D.halo,
                   help=f"'exact' (receptive field: seam-free, equal to whole-image inference) or pixels [{_D.halo}]")
    p.add_argument("--blend", choices=("cosine", "linear"), default=_D.blend,
                   help=f"ramp for blended mode (halo below the receptive field) [{_D.blend}]")
    p.add_argument("--series", type=T.count(0, "a series index"), default=None,
                   help="which series of a multi-series (OME-)TIFF to restore; a warning lists the others [0]")
    p.add_argument("--level", type=T.count(0, "a level index"), default=0,
                   help="which resolution level of a multiscale OME-Zarr input to restore (0: full resolution) [0]")
    p.add_argument("--axes", default=None, help="axis letters, e.g. TZCYX (default: from file metadata)")
    p.add_argument("--device", default=_D.device, help=f"auto, cpu, cuda or cuda:N [{_D.device}]")
    p.add_argument("--batch-size", type=T.batch_size, default=_D.batch_size,
                   help=f"tiles per forward pass [{_D.batch_size}]")
    p.add_argument("--amp", choices=("auto", "on", "off"), default=_D.amp,
                   help=f"mixed precision (bf16/fp16) on CUDA; auto: on for CUDA [{_D.amp}]")
    p.add_argument("--backend", choices=BACKENDS, default=_D.backend,
                   help="what runs the model: onnxruntime (CPU, ~3x eager here), onnxruntime-int8 (CPU, int8 "
                   "convolutions: lossy, see docs/performance.md), eager PyTorch, or torch.compile "
                   f"(~30 s to compile, then fast); auto: onnxruntime on CPU when installed, else eager [{_D.backend}]")
    p.add_argument("--ensemble", action="store_true", default=_D.ensemble,
                   help="self-ensemble: average over the 8 flips/rotations of each tile (8x slower, a little "
                   "better; exact mode stays exact)")
    p.add_argument("--ome-zarr-version", choices=OME_ZARR_VERSIONS, default=None,
                   help=f"OME-Zarr version of a .zarr output: 0.5 (Zarr v3) or 0.4 (Zarr v2, for older readers) "
                   f"[{_D.ome_zarr_version}]")
    p.add_argument("--pyramid", type=T.count(0, "a size in pixels"), default=None,
                   help="a .zarr output's resolution pyramid: levels halving Y and X (2x2 means), written while "
                   f"restoring, until one fits in PX x PX; 0: level 0 only [{_D.pyramid}]", metavar="PX")
    p.add_argument("--write-threads", type=T.auto_or(T.count(1, "a number of threads")), default=_D.write_threads,
                   help="threads compressing and writing a .zarr output's chunks (a GPU outruns one core's "
                   f"compression: give it more cores); auto: the cores, at most 4 [{_D.write_threads}]")
    p.add_argument("--context", choices=CONTEXT, default=_D.context,
                   help="auto: a task name (e.g. microscopy) restores a stack with enough planes along Z (else T) "
                        "with its context model, which uses the neighbouring planes; off: every plane on its own "
                        f"[{_D.context}]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into the same .zarr output (same parameters required)")
    dist = p.add_mutually_exclusive_group()
    dist.add_argument("--workers", type=T.count(1, "a number of workers"),
        help="run on a local dask cluster of N worker processes")
    dist.add_argument("--scheduler", help="run on an existing dask.distributed scheduler (ADDRESS)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_restore)
