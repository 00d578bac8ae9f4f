"""CPU (or GPU) inference against the machine's limit: bare model, engine and MONAI, before and after.

  python bench/roofline.py                          # M4R4C32 on 2x1024², M6R6C64 on 1x512² and 1x1024²
  python bench/roofline.py --cases M4R4C32:2x1024 --compile --threads

The limit: the best measured throughput of a 64-channel 3x3 convolution on this device (PyTorch/oneDNN
and, on CPU, ONNX Runtime), in GFLOP/s, divided by the model's FLOPs per output pixel (2 x multiply-adds,
`memnet.macs_per_pixel`): the speed of a model that did nothing but its convolutions at that rate, with
no halo. Every other figure is printed as Mpx/s of output and as a fraction of that limit:

  bare <backend>        the model alone on each whole plane in memory (no tiling): eager-unfolded is the
                        trained module as it was run before the inference form; eager, compile and
                        onnxruntime run `memnet.inference.fold(model)`.
  engine <backend> t<T> memnet.restore, exact mode, a float32 TIFF on disk to an OME-Zarr on disk.
                        "before" = eager-unfolded at the old fixed tile 256; "auto" = every default.
  monai                 MONAI sliding_window_inference on the trained module (gaussian, overlap 0.25,
                        ROI = the engine's default window), if monai is installed.

max|diff| is relative to the output range of whole-image eager inference in float32.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from _common import bench_model, machine
from _common import best_time as _best

import memnet
import memnet.runner
from memnet.inference import make_backend, onnxruntime_available
from memnet.memory import default_tile


def conv_limit(device: torch.device) -> dict[str, float]:
    """GFLOP/s of a 64->64 3x3 conv on 2x64x256x256, best of a few, per implementation."""
    c, hw, n = 64, 256, 2
    flops = 2 * 9 * c * c * hw * hw * n
    conv = torch.nn.Conv2d(c, c, 3, padding=1).to(device).eval()
    x = torch.rand(n, c, hw, hw, device=device)
    out = {}
    with torch.inference_mode():
        for name, mf in (("torch nchw", torch.contiguous_format), ("torch channels_last", torch.channels_last)):
            m, xi = conv.to(memory_format=mf), x.contiguous(memory_format=mf)
            out[name] = flops / _best(lambda m=m, xi=xi: m(xi), device) / 1e9
    if device.type == "cpu" and onnxruntime_available():
        import io

        import onnxruntime as ort

        buf = io.BytesIO()
        torch.onnx.export(conv.to(memory_format=torch.contiguous_format), x[:1], buf, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}}, dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
        xn = x.numpy()
        out["onnxruntime"] = flops / _best(lambda: sess.run(None, {"x": xn}), device) / 1e9
    return out


@contextlib.contextmanager
def unfolded_eager():
    """Run the engine the way it ran before `memnet.inference`: the trained module, channels_last."""
    orig = memnet.runner.make_backend

    def old(model, device, backend="auto"):
        return model.to(memory_format=torch.channels_last), "eager-unfolded"

    memnet.runner.make_backend = old
    try:
        yield
    finally:
        memnet.runner.make_backend = orig


def image(planes: int, size: int) -> np.ndarray:
    """Smooth structure plus noise in [0, 1], float32: a float input is taken as already normalised,
    so the engine's output is the model's, unrounded and unclipped, and comparable to 1e-5."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    clean = 0.5 + 0.3 * np.sin(6 * np.pi * xx) * np.cos(4 * np.pi * yy)
    return np.stack([clean + 0.1 * rng.standard_normal(clean.shape) for _ in range(planes)]).astype(np.float32)


def run_case(arch: str, planes: int, size: int, device: torch.device, limit: float, args) -> None:
    model = bench_model(arch).to(device)
    with torch.no_grad():  # a trained-looking output path: the reconstruction conv starts at zero
        torch.manual_seed(1)
        model.recon_conv.weight.normal_(0, 0.02)
    r = memnet.receptive_field(model)
    macs = memnet.model.macs_per_pixel(model.config)
    mpx_limit = limit * 1e9 / (2 * macs) / 1e6
    data = image(planes, size)
    auto = default_tile(model.config, device, plane=(size, size))
    n_out = data.size
    print(f"\n## {arch} (radius {r}, {2 * macs / 1e6:.2f} MFLOP/px), {planes}x{size}x{size} float32; "
          f"limit {mpx_limit:.4f} Mpx/s; default tile {auto}")
    print(f"{'':34} {'Mpx/s':>8} {'of limit':>9} {'max|diff|/range':>16} {'seconds':>8}")

    norm = data
    xs = [torch.from_numpy(p)[None, None].to(device) for p in norm]
    with torch.inference_mode():
        ref = np.stack([model.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()[0, 0] for x in xs])
    span = float(ref.max() - ref.min())

    def row(label, seconds, diff=None):
        mpx = n_out / seconds / 1e6
        d = f"{diff:16.1e}" if diff is not None else f"{'':16}"
        print(f"{label:34} {mpx:8.4f} {mpx / mpx_limit:9.0%} {d} {seconds:8.1f}", flush=True)
        return mpx

    # Bare model, whole planes.
    bare = {"eager-unfolded": (model.to(memory_format=torch.channels_last), True)}
    for b in ["eager", "onnxruntime"] + (["compile"] if args.compile else []):
        if b == "onnxruntime" and (device.type != "cpu" or not onnxruntime_available()):
            continue
        t0 = time.perf_counter()
        fn, _ = make_backend(model, device, b)
        bare[b] = (fn, b != "onnxruntime")
        if b == "compile":
            cl = [x.contiguous(memory_format=torch.channels_last) for x in xs]
            with torch.inference_mode():
                fn(cl[0])
            print(f"   (compile: {time.perf_counter() - t0:.0f} s for the first shape)")
    results = {}
    for name, (fn, cl) in bare.items():
        inp = [x.contiguous(memory_format=torch.channels_last) if cl else x for x in xs]
        outs = {}

        def go(fn=fn, inp=inp, outs=outs):
            with torch.inference_mode():
                outs["y"] = np.stack([fn(x).float().cpu().numpy()[0, 0] for x in inp])

        t = _best(go, device, repeat=1)
        results[f"bare {name}"] = row(f"bare {name}", t, np.abs(outs["y"] - ref).max() / span)

    # Engine: TIFF on disk -> OME-Zarr on disk, exact.
    tmp = Path(tempfile.mkdtemp(prefix="memnet-roofline-"))
    try:
        src = tmp / "in.tif"
        tifffile.imwrite(src, data, tile=(256, 256), metadata={"axes": "ZYX"})
        runs = [("before: eager-unfolded", "eager", 256, True), ("eager", "eager", 256, False)]
        if device.type == "cpu" and onnxruntime_available():
            runs.append(("onnxruntime", "onnxruntime", 256, False))
        runs.append(("auto", "auto", "auto", False))
        for label, backend, tile, old in runs:
            out = tmp / "out.zarr"
            with unfolded_eager() if old else contextlib.nullcontext():
                t0 = time.perf_counter()
                memnet.restore(src, model, output=out, tile=tile, device=device, backend=backend, overwrite=True)
                t = time.perf_counter() - t0
            y = np.asarray(memnet.open_input(out).array[...], dtype=np.float64)
            d = np.abs(y - ref).max() / span
            results[label] = row(f"engine {label} t{tile if tile != 'auto' else auto}", t, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if args.monai:
        try:
            from monai.inferers import sliding_window_inference
        except ImportError:
            print("monai                              (not installed: pip install monai)")
        else:
            roi = min(size, auto + 2 * r)
            x = torch.from_numpy(norm)[:, None].to(device)
            m = model.to(memory_format=torch.contiguous_format)
            outs = {}

            def mon():
                with torch.inference_mode():
                    outs["y"] = sliding_window_inference(x, (roi, roi), 1, m, overlap=0.25,
                                                         mode="gaussian")[:, 0].float().cpu().numpy()

            t = _best(mon, device, repeat=1)
            row(f"monai swi roi {roi}", t, np.abs(outs["y"] - ref).max() / span)

    b, a = results["before: eager-unfolded"], results["auto"]
    print(f"engine auto / before = {a / b:.2f}x;  engine auto / bare eager-unfolded (whole image) = "
          f"{a / results['bare eager-unfolded']:.2f};  engine auto / best bare = "
          f"{a / max(v for k, v in results.items() if k.startswith('bare')):.2f}")


def threads_and_batch(device: torch.device) -> None:
    """ONNX Runtime with 1 and all threads, and batches of 1..4 windows of the default size (M4R4C32)."""
    if device.type != "cpu" or not onnxruntime_available():
        return
    model = bench_model("M4R4C32")
    w = default_tile(model.config, device) + 2 * memnet.receptive_field(model)  # the largest default window
    print(f"\n## threads and batch (M4R4C32, onnxruntime, window {w}²)")
    n_all = torch.get_num_threads()
    for threads in sorted({1, n_all}):
        torch.set_num_threads(threads)
        fn, _ = make_backend(model, device, "onnxruntime")
        for bs in (1, 2, 4):
            x = torch.rand(bs, 1, w, w)
            t = _best(lambda fn=fn, x=x: fn(x), device, repeat=2)
            print(f"threads {threads} batch {bs}: {bs * w * w / t / 1e6:.4f} Mpx/s (window pixels)", flush=True)
    torch.set_num_threads(n_all)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["M4R4C32:2x1024", "M6R6C64:1x512", "M6R6C64:1x1024"],
                    help="ARCH:PLANESxSIZE")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (about 30 s per shape on CPU)")
    ap.add_argument("--no-monai", dest="monai", action="store_false")
    ap.add_argument("--threads", action="store_true", help="also measure threads and batch shape")
    args = ap.parse_args()
    device = memnet.engine.resolve_device(args.device)
    limits = conv_limit(device)
    limit = max(limits.values())
    print(f"# {machine()}; device {device}")
    print("# 64->64 3x3 conv, GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in limits.items())
          + f"  -> limit {limit:.0f}")
    for case in args.cases:
        arch, shape = case.split(":")
        planes, size = (int(v) for v in shape.split("x"))
        run_case(arch, planes, size, device, limit, args)
    if args.threads:
        threads_and_batch(device)


if __name__ == "__main__":
    main()
