"""Training throughput: patches/s of one `memnet train` step (forward with branches, multi-supervised
loss, backward, Adam), batches made as training makes them.

  python bench/train_throughput.py --arch M4R4C48 --batch 32 --device cpu --threads 2
  python bench/train_throughput.py --arch M4R4C48 --batch 128 --device cuda --fit-seconds 450

Prints one line per (batch, sampler): steps/s and patches/s after warm-up (cuDNN autotuning and
allocator growth stay out of the figure). ``--fit-seconds S`` also prints ``STEPS=N``: the steps of
the first configuration that fit in S seconds, used to size a cosine schedule to a fixed time budget.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import machine

import memnet
from memnet.engine import resolve_device
from memnet.fitloop import MixedPrecision, multi_supervised_loss
from memnet.model import parse_arch
from memnet.trainset import DevicePatchSampler, PatchSampler


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(arch: str, batch: int, sampler_kind: str, dev: torch.device, amp: str, patch: int,
        warmup: int, steps: int) -> float:
    rng = np.random.default_rng(0)
    images = [rng.random((180, 180), dtype=np.float32) for _ in range(64)]  # speed does not depend on content
    if sampler_kind == "device":
        sampler = DevicePatchSampler(images, patch, dev, seed=0)
    else:
        sampler = PatchSampler("denoise", images, [], patch, seed=0)
    torch.manual_seed(0)
    model = memnet.MemNet(**parse_arch(arch).as_dict()).to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    mp = MixedPrecision(amp, dev, cpu_auto=True)  # as `memnet train`
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def step():
        x, y = sampler.batch(batch)
        x = x.to(dev).contiguous(memory_format=torch.channels_last)
        y = y.to(dev).contiguous(memory_format=torch.channels_last)
        final, branches = mp.forward(model, x)
        mp.step(multi_supervised_loss(final, branches, y, "psnr"), opt)

    for _ in range(warmup):
        step()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    return steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="M4R4C48")
    ap.add_argument("--batch", type=int, nargs="+", default=[32])
    ap.add_argument("--sampler", nargs="+", default=["auto"], choices=("auto", "numpy", "device"))
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--fit-seconds", type=float)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else machine()
    print(f"{args.arch}, patch {args.patch}, amp {args.amp}, on {name}")
    first = None
    for b in args.batch:
        for s in args.sampler:
            kind = s if s != "auto" else ("device" if dev.type == "cuda" else "numpy")
            rate = run(args.arch, b, kind, dev, args.amp, args.patch, args.warmup, args.steps)
            first = first or rate
            print(f"batch {b:4d}  sampler {kind:6s}  {rate:8.2f} steps/s  {rate * b:10.1f} patches/s", flush=True)
    if args.fit_seconds:
        print(f"STEPS={int(first * args.fit_seconds)}")


if __name__ == "__main__":
    main()
