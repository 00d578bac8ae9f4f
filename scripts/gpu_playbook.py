"""GPU playbook: train the paper-size MemNet M6R6C64 for each task on a lent GPU, in resumable chunks.

A lent machine gives about 10-15 minutes in all, so every chunk is a complete short run: it starts from
the best weights we have and ends with a finished cosine and a checkpoint, and the next chunk (the next
device call, or the next session) starts from that checkpoint. The first chunk grows the shipped CPU
model to M6R6C64 with `memnet.widen` (channels) and `memnet.deepen` (blocks, recursions): the grown
model computes exactly what the shipped one does, so no chunk starts from noise.

Here (no GPU), pack the data the chunk needs (the device gets the repository only, at most 64 MiB):

  python scripts/gpu_playbook.py pack --data-root ../shared/data --tasks denoise sr jpeg
  python scripts/gpu_playbook.py pack --data-root ../shared/data --tasks microscopy   # its own call: 40 MB

On the device (`run` tool, carry [".gpudata"]), about 2.5 minutes of training per task:

  python3 scripts/gpu_playbook.py run --tasks denoise sr jpeg --minutes 2.5

It writes $OUT/TASK.safetensors (the chunk's best weights) and $OUT/logs.tar.gz (logs, throughput,
GPU). Back here: copy each TASK.safetensors to .gpudata/ckpt/TASK.safetensors to continue from it in
the next chunk, and let `scripts/ship_model.py` decide what ships:

  python scripts/ship_model.py /work/.device/.../sr.safetensors --name sr-M6R6C64 --data-root ../shared/data

`--arch`, `--batch` and `--steps` make a CPU smoke test possible (tests/test_gpu_playbook.py runs
two steps of a tiny model); do not train the paper-size model on a CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("denoise", "sr", "jpeg", "microscopy")
W2S_TRAIN = r"_(0[0-2][0-9]|030)_"

# What each task reads from --data-root. BSD200 (50 MB) stays behind: T91 alone trains sr/jpeg on the GPU.
PACK = {
    "denoise": [("Train400", None), ("Set12", None)],
    "sr": [("T91", None), ("Set14", None)],
    "jpeg": [("T91", None), ("Set14", None)],
    "microscopy": [("W2S_train_8bit/avg1_noisy", W2S_TRAIN), ("W2S_train_8bit/avg400_clean", W2S_TRAIN),
                   ("W2S_train_8bit/avg1_noisy", r"_(03[1-9]|040)_1\."),  # quick validation: channel 1
                   ("W2S_train_8bit/avg400_clean", r"_(03[1-9]|040)_1\."),
                   ("microscopy_ood/noisy", None), ("microscopy_ood/clean", None)],
}


def _train_args(task: str, data: Path) -> list[str]:
    if task == "denoise":
        return ["--data", str(data / "Train400"), "--loss", "psnr"]
    if task in ("sr", "jpeg"):
        return ["--data", str(data / "T91")]
    w = data / "W2S_train_8bit"
    return ["--pairs", str(w / "avg1_noisy"), str(w / "avg400_clean"), "--include", W2S_TRAIN,
            "--noise", "camera"]


def pack(args) -> None:
    import re

    src, dest = Path(args.data_root), ROOT / args.dest
    for task in args.tasks:
        for folder, include in PACK[task]:
            out = dest / folder
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted((src / folder).iterdir()):
                if f.is_file() and (include is None or re.search(include, f.name)):
                    shutil.copyfile(f, out / f.name)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"packed {', '.join(args.tasks)} into {dest}: {size / 2**20:.1f} MiB "
          f"(the device takes the repository and carried paths up to 64 MiB in all)")
    ignore = ROOT / ".git" / "info" / "exclude"  # git must not see it, but the device call carries it
    entry = f"/{args.dest.strip('/')}/\n"
    if not Path(args.dest).is_absolute() and ignore.parent.is_dir() and entry not in (
            ignore.read_text() if ignore.exists() else ""):
        with ignore.open("a") as fh:
            fh.write(entry)


def _init_for(task: str, data: Path) -> str:
    ckpt = data / "ckpt" / f"{task}.safetensors"
    return str(ckpt) if ckpt.exists() else task  # the previous chunk's best, else the shipped model


def _steps_for(arch: str, batch: int, seconds: float, device: str) -> int:
    """Steps that fit in ``seconds`` (a short measurement of this machine), leaving room for validation."""
    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import run

    from memnet.engine import resolve_device

    rate = run(arch, batch, "numpy", resolve_device(device), "auto", 48, warmup=5, steps=10)
    print(f"{arch} batch {batch}: {rate:.2f} steps/s measured", flush=True)
    return max(2, int(rate * seconds * 0.75))


def run_chunks(args) -> None:
    from memnet.train import TrainConfig, train

    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = ROOT / args.data
    work = Path(args.work)
    logs = []
    for task in args.tasks:
        seconds = args.minutes * 60
        steps = args.steps or _steps_for(args.arch, args.batch, seconds, args.device)
        log_path = work / f"{task}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        logs.append(log_path)
        with log_path.open("w") as fh:
            def log(s, fh=fh, task=task):
                print(f"[{task}] {s}", flush=True)
                fh.write(s + "\n")
                fh.flush()

            t0 = time.time()
            init = _init_for(task, data)
            log(f"chunk: {task} {args.arch} from {init}, {steps} steps of {args.batch}, {args.minutes} min")
            from memnet.cli import build_parser

            ns = build_parser().parse_args(["train", "--task", task, "--out", "-", *_train_args(task, data)])
            cfg = TrainConfig(task=task, out=str(work / task), data=ns.data or (), pairs=ns.pairs or (),
                              include=ns.include, val_root=str(data), arch=args.arch, patch=48, batch_size=args.batch,
                              steps=steps, warmup=min(100, steps // 10), hours=seconds / 3600,
                              lr=args.lr, val_every=max(1, steps // 3), device=args.device, init=init,
                              name=f"{task}-{args.arch}", loss=ns.loss, noise=ns.noise,
                              bn_batches=args.bn_batches)
            best = train(cfg, log=log)
            shutil.copyfile(best, out / f"{task}.safetensors")
            log(f"chunk done in {(time.time() - t0) / 60:.1f} min: {out / f'{task}.safetensors'}")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for p in logs:
            tar.add(p, arcname=p.name)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="copy the data the tasks need into the repository (here, before the call)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--dest", default=".gpudata")
    r = sub.add_parser("run", help="one chunk per task (on the device)")
    r.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    r.add_argument("--minutes", type=float, default=2.5, help="training time per task")
    r.add_argument("--arch", default="M6R6C64")
    r.add_argument("--batch", type=int, default=128)
    r.add_argument("--lr", type=float, default=2e-4)
    r.add_argument("--steps", type=int, help="fixed step count (default: sized to --minutes by a measurement)")
    r.add_argument("--bn-batches", type=int, default=50)
    r.add_argument("--device", default="auto")
    r.add_argument("--data", default=".gpudata")
    r.add_argument("--work", default="/tmp/memnet-playbook")
    r.add_argument("--out", default="out/playbook", help="used when $OUT is not set")
    args = ap.parse_args(argv)
    pack(args) if args.cmd == "pack" else run_chunks(args)


if __name__ == "__main__":
    main()
