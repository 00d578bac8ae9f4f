"""The GPU suite: one command on a lent GPU, under 5 minutes, results under $OUT/gpu_suite.

  bash bench/gpu_suite.sh                 # what to run on the GPU machine (installs nothing new)
  python bench/gpu_suite.py --quick --allow-cpu   # a smoke run on the CPU (what the tests do)

For M4R4C32 and M6R6C64 in fp32, bf16 and fp16:
  bare     the model alone on a batch of windows already on the GPU (eager and the folded inference form)
  engine   memnet.restore on an in-memory stack, exact mode, default tile and batch (fp32 = amp off;
           bf16/fp16 = amp on, which picks bf16 where the GPU has it)
  monai    MONAI sliding_window_inference on the same windows (if monai is installed)
each in Mpx/s of output and as a fraction of the GPU's dense peak for that precision (datasheet
figure where the GPU is known, else the measured matmul rate). Then:
  exactness  CUDA fp32 (TF32 off) engine vs the CPU engine on the same crop, |diff| / range
  oom        the engine under an artificial memory cap with a batch that cannot fit: the OOM back-off
             must halve the batch and finish with the same result.
Everything printed is also written to $OUT/gpu_suite/results.json and results.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_model  # noqa: E402
from _common import best_time as _best  # noqa: E402

import memnet  # noqa: E402
from memnet.inference import make_backend  # noqa: E402
from memnet.memory import default_tile  # noqa: E402

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets: fp32 (no TF32), bf16, fp16.
PEAKS = {
    "H200": (67, 989, 989), "H100 SXM": (67, 989, 989), "H100 PCIe": (51, 756, 756), "H100": (67, 989, 989),
    "A100": (19.5, 312, 312), "L40S": (91.6, 362, 362), "L4": (30.3, 121, 121), "A10": (31.2, 125, 125),
    "RTX 4090": (82.6, 165, 165), "V100": (15.7, 0, 125), "T4": (8.1, 0, 65),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Log:
    def __init__(self, out: Path):
        self.out, self.rows, self.lines = out, [], []
        out.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str = "", **row):
        print(line, flush=True)
        self.lines.append(line)
        if row:
            self.rows.append(row)
        (self.out / "results.txt").write_text("\n".join(self.lines) + "\n")
        (self.out / "results.json").write_text(json.dumps(self.rows, indent=1))


def peak_tflops(device: torch.device, log: Log) -> dict[str, float]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for key, (f32, bf16, f16) in PEAKS.items():
        if key in name:
            log(f"# {name}: datasheet dense peak fp32 {f32}, bf16 {bf16}, fp16 {f16} TFLOP/s")
            return {"fp32": f32, "bf16": bf16 or None, "fp16": f16}
    peaks = {}
    n = 4096 if device.type == "cuda" else 512
    for p, dt in DTYPES.items():
        a = torch.rand(n, n, device=device, dtype=dt)
        t = _best(lambda a=a: a @ a, device)
        peaks[p] = 2 * n**3 / t / 1e12
    log(f"# {name}: not in the datasheet table; measured matmul peak " +
        ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) + " TFLOP/s")
    return peaks


def stack(planes: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    clean = 0.5 + 0.3 * np.sin(6 * np.pi * xx) * np.cos(4 * np.pi * yy)
    return np.stack([clean + 0.1 * rng.standard_normal(clean.shape) for _ in range(planes)]).astype(np.float32)


def run_model(arch: str, planes: int, size: int, device: torch.device, peaks: dict, log: Log, args) -> None:
    model = bench_model(arch).to(device)
    with torch.no_grad():
        model.recon_conv.weight.normal_(0, 0.02)
    r = memnet.receptive_field(model)
    flop_px = 2 * memnet.model.macs_per_pixel(model.config)
    tile = default_tile(model.config, device)
    win = min(size, tile + 2 * r)
    data = stack(planes, size)
    log(f"\n## {arch}: radius {r}, {flop_px / 1e6:.2f} MFLOP/px, {planes}x{size}², default tile {tile} "
        f"(window {win}²)")
    log(f"{'':28} {'Mpx/s':>9} {'of peak':>8}")

    def row(what, prec, mpx):
        peak = peaks.get(prec)
        frac = mpx * 1e6 * flop_px / (peak * 1e12) if peak else float("nan")
        log(f"{what + ' ' + prec:28} {mpx:9.3f} {frac:8.1%}", model=arch, what=what, precision=prec,
            mpx_s=round(mpx, 4), of_peak=round(frac, 4))

    bs = max(1, memnet.runner.auto_batch(model, (win, win), device, None))
    x = torch.rand(bs, 1, win, win, device=device)
    for prec, dt in DTYPES.items():
        if prec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            log(f"{prec}: not supported on this GPU")
            continue
        if device.type == "cpu" and prec == "fp16":
            continue
        def ac(dt=dt, prec=prec):
            return torch.autocast(device.type, dtype=dt, enabled=prec != "fp32")
        for label, net in (("bare eager", model.to(memory_format=torch.channels_last)),
                           ("bare folded", make_backend(model, device, "eager")[0])):
            xc = x.contiguous(memory_format=torch.channels_last)

            def go(net=net, xc=xc, ac=ac):
                with torch.inference_mode(), ac():
                    net(xc)

            row(label, prec, bs * win * win / _best(go, device) / 1e6)
        if prec != "fp16":  # the engine's amp picks bf16 where it can; fp16 is measured bare only
            t = _best(lambda p=prec: memnet.restore(data, model, device=device, amp="off" if p == "fp32" else "on"),
                      device, repeat=2)
            row("engine", prec, data.size / t / 1e6)
        try:
            from monai.inferers import sliding_window_inference
        except ImportError:
            continue
        if args.quick:
            continue
        xs = torch.from_numpy(data)[:, None].to(device)

        def mon(xs=xs, ac=ac):
            with torch.inference_mode(), ac():
                sliding_window_inference(xs, (win, win), bs, model, overlap=0.25, mode="gaussian")

        row("monai swi", prec, data.size / _best(mon, device, repeat=1) / 1e6)


def exactness(device: torch.device, log: Log, size: int = 700, arch: str = "M4R4C32") -> None:
    model = bench_model(arch)
    with torch.no_grad():
        model.recon_conv.weight.normal_(0, 0.02)
    data = stack(1, size, seed=1)
    tile = max(64, size // 3 // 16 * 16)
    cpu = memnet.restore(data, model, device="cpu", tile=tile)
    dev = memnet.restore(data, model.to(device), device=device, amp="off", tile=tile)
    whole = memnet.restore(data, model.to(device), device=device, amp="off", tile=-(-size // 16) * 16)
    span = float(cpu.max() - cpu.min())
    d_cpu, d_whole = np.abs(dev - cpu).max() / span, np.abs(dev - whole).max() / span
    log(f"\n## exactness ({arch}, {size}², fp32): {device} tiled vs CPU tiled {d_cpu:.1e}; {device} tiled vs "
        f"{device} whole image {d_whole:.1e} (of the range; target ≤ 1e-5)",
        what="exactness", vs_cpu=float(d_cpu), vs_whole=float(d_whole), ok=bool(max(d_cpu, d_whole) <= 1e-5))


def oom_backoff(device: torch.device, log: Log) -> None:
    """A batch too big for a capped memory: the runner must halve it and still give the same result."""
    model = bench_model("M4R4C32").to(device)
    with torch.no_grad():
        model.recon_conv.weight.normal_(0, 0.02)
    if device.type != "cuda":
        log("\n## oom back-off: needs CUDA (skipped)", what="oom", ok=None)
        return
    runner = memnet.engine.Runner(model, device, amp="off")
    windows = stack(32, 324, seed=2)
    ref = np.concatenate([runner(windows[i:i + 1]) for i in range(len(windows))])
    _, total = torch.cuda.mem_get_info(device)
    per_window = memnet.model.feature_bytes_per_pixel(model.config) * 324**2
    cap = (torch.cuda.memory_allocated(device) + 6 * per_window) / total
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap, device)
    try:
        out = runner(windows)
        d = float(np.abs(out - ref).max())
        ok = runner.max_batch is not None and runner.max_batch < 32 and d <= 1e-5 * float(np.ptp(ref))
        log(f"\n## oom back-off: memory capped at {cap * total / 2**30:.2f} GiB, a batch of 32 windows: "
            f"halved to {runner.max_batch}, max |diff| to one at a time {d:.1e} -> {'ok' if ok else 'FAILED'}",
            what="oom", ok=ok, max_batch=runner.max_batch, diff=d)
    except Exception as e:  # noqa: BLE001 (the suite reports and goes on)
        log(f"\n## oom back-off FAILED: {type(e).__name__}: {e}", what="oom", ok=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU (a smoke test of this script)")
    ap.add_argument("--quick", action="store_true", help="tiny images (smoke test)")
    ap.add_argument("--out", default=None, help="results folder (default: $OUT/gpu_suite, else out/gpu_suite)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_suite: no CUDA device here (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}): run it on a machine with an NVIDIA GPU and a CUDA build of torch, "
              "or pass --allow-cpu for a smoke run", file=sys.stderr)
        return 2
    device = torch.device(args.device if torch.cuda.is_available() else "cpu")
    out = Path(args.out or (Path(os.environ["OUT"]) / "gpu_suite" if os.environ.get("OUT") else "out/gpu_suite"))
    log = Log(out)
    t0 = time.perf_counter()
    log(f"# memnet GPU suite: torch {torch.__version__}, device {device}")
    peaks = peak_tflops(device, log)
    if args.quick:
        cases = [("M3R3C32", 1, 160)]
    else:
        cases = [("M4R4C32", 4, 2048), ("M6R6C64", 2, 2048)]
    for arch, planes, size in cases:
        run_model(arch, planes, size, device, peaks, log, args)
    exactness(device, log, *((200, "M3R3C32") if args.quick else ()))
    oom_backoff(device, log)
    log(f"\n# done in {time.perf_counter() - t0:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
