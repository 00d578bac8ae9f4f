"""Lower precision on the CPU against ONNX Runtime fp32, interleaved A/B in one process (a busy machine slows
every candidate alike): int8 (`--backend onnxruntime-int8`) and, bare only, PyTorch bf16 autocast.

  python bench/int8.py                                   # microscopy (M4R4C32), 2x1024² planes, tile 512
  python bench/int8.py --model M4R4C32 --planes 2 --size 1024 --tile 512 --repeat 5

Prints the CPU's int8/bf16 instruction sets, then per round and as medians over rounds:
  bare <backend>   one window (tile + 2 x radius) in memory through the backend, Mpx/s of core pixels
  engine <backend> memnet.restore of the in-memory float32 stack (exact mode, the given tile)
and each candidate's median speed ratio to onnxruntime fp32 and its max|diff| / range against it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import bench_model, machine

import memnet
from memnet.inference import fold, make_backend

FLAGS = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")


def cpu_flags() -> str:
    try:
        have = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return "unknown (no /proc/cpuinfo)"
    return ", ".join(f"{f} {'yes' if f in have else 'no'}" for f in FLAGS)


def stack(planes: int, size: int) -> np.ndarray:
    """Noisy fluorescence-like planes in the normalised frame (a float input is taken as normalised)."""
    from memnet.degrade import CAMERA_MIX_BEFORE_HEAVY_CLIP, camera_noise
    from memnet.synthstack import simulate_stack

    rng = np.random.default_rng(5)
    clean = simulate_stack(rng, planes=max(planes, 4), size=size).clean[:planes]
    return camera_noise(clean, rng, CAMERA_MIX_BEFORE_HEAVY_CLIP)[0].astype(np.float32)  # as its figures were measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="microscopy", help="zoo name, .safetensors path or architecture")
    ap.add_argument("--planes", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds [3]")
    ap.add_argument("--no-engine", action="store_true", help="bare windows only")
    ap.add_argument("--no-bf16", action="store_true", help="skip PyTorch bf16")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads [2]")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    model = bench_model(args.model)
    r = memnet.receptive_field(model)
    w = args.tile + 2 * r
    print(f"# {machine()}\n# CPU: {cpu_flags()}")
    print(f"# {args.model}: radius {r}, window {w}², stack {args.planes}x{args.size}², tile {args.tile}")

    t0 = time.perf_counter()
    fns = {b: make_backend(model, cpu, b)[0] for b in ("onnxruntime", "onnxruntime-int8")}
    print(f"# build (export + calibrate + quantize): {time.perf_counter() - t0:.0f} s")
    if not args.no_bf16:
        net = fold(model).to(memory_format=torch.channels_last)

        def bf16(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net(x.contiguous(memory_format=torch.channels_last)).float()

        fns["torch-bf16"] = bf16
    x = torch.from_numpy(stack(1, w))[None]
    data = stack(args.planes, args.size)
    with torch.inference_mode():
        ref = fns["onnxruntime"](x).numpy()
        diff = {k: float(np.abs(f(x).numpy() - ref).max() / (ref.max() - ref.min())) for k, f in fns.items()}
    engines = [] if args.no_engine else ["onnxruntime", "onnxruntime-int8"]
    times: dict[str, list[float]] = {**{f"bare {k}": [] for k in fns}, **{f"engine {k}": [] for k in engines}}
    outs = {}
    for rnd in range(args.repeat + 1):  # round 0 warms up and is not counted
        for k, f in fns.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                f(x)
            if rnd:
                times[f"bare {k}"].append(time.perf_counter() - t0)
        for b in engines if rnd else []:  # the engine needs no warm-up: its backends are built
            t0 = time.perf_counter()
            outs[b] = memnet.restore(data, model, tile=args.tile, device="cpu", backend=b)
            if rnd:
                times[f"engine {b}"].append(time.perf_counter() - t0)
        if rnd:
            print(f"# round {rnd}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    if engines:
        span = float(outs["onnxruntime"].max() - outs["onnxruntime"].min())
        diff["engine onnxruntime-int8"] = float(np.abs(outs["onnxruntime-int8"] - outs["onnxruntime"]).max() / span)
    print(f"{'':28} {'Mpx/s':>8} {'vs fp32':>8} {'max|diff|/range':>16}")
    for k, v in times.items():
        kind, b = k.split(" ")
        px = args.tile**2 if kind == "bare" else data.size
        base = np.array(times[f"{kind} onnxruntime"])
        ratio = float(np.median(base / np.array(v)))  # per round: both ran under the same load
        d = diff.get(b) if kind == "bare" else diff.get(k)
        print(f"{k:28} {px / np.median(v) / 1e6:8.4f} {ratio:7.2f}x "
              f"{'' if d is None else f'{d:16.1e}'}")


if __name__ == "__main__":
    main()
