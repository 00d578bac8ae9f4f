"""`memnet train` and `memnet eval`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import textwrap
import threading
from contextlib import contextmanager

from . import _cli_types as T
from .options import BACKENDS


@contextmanager
def _graceful_stop(what: str):
    """The first Ctrl-C (or SIGTERM, as batch schedulers send before killing a job) sets the yielded
    event, so the run stops at its next step and saves; a second one aborts at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        # os.write, not print: a handler that prints while the main thread is inside print() raises
        # "reentrant call" and would kill the run instead of stopping it.
        os.write(1, f"\nstopping after this step: {what} (Ctrl-C again to abort)…\n".encode())

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, h in previous.items():
            if h is not None:  # None: a handler installed from C, which cannot be put back from Python
                signal.signal(sig, h)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(
        task=args.task, out=args.out, data=args.data or (), pairs=args.pairs or (), include=args.include,
        val_root=args.val_root, arch=args.arch, patch=args.patch, batch_size=args.batch_size, steps=args.steps,
        warmup=args.warmup, hours=args.hours, lr=args.lr, optimizer=args.optimizer, val_every=args.val_every,
        seed=args.seed, device=args.device, threads=args.threads, amp=args.amp, init=args.init, name=args.name,
        bn_batches=args.bn_batches, loss=args.loss, sampler=args.sampler,
        sigma=tuple(_sigma_range(r) for r in args.sigma) if args.sigma else None, noise=args.noise,
    )
    from .runtime import Cancelled

    with _graceful_stop("validation and a checkpoint first") as stop:
        try:
            best = train(cfg, resume=args.resume, log=lambda s: print(s, flush=True), cancel=stop)
        except Cancelled as e:
            print(e, flush=True)
            return 130
    print(f"best model: {best}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, NotImproved, finetune
    from .runtime import Cancelled

    cfg = FinetuneConfig(model=args.model, mode=args.mode, name=args.output, minutes=args.minutes or None,
                         steps=args.steps, patch=args.patch, batch_size=args.batch_size, lr=args.lr,
                         val_fraction=args.val_fraction, val_every=args.val_every, patience=args.patience,
                         mask_fraction=args.mask_fraction, bn=args.bn, publish=args.publish, axes=args.axes,
                         include=args.include, max_planes=args.max_planes, device=args.device, amp=args.amp,
                         seed=args.seed, overwrite=args.overwrite, noise_check=args.noise_check, z=args.z,
                         interpolate=args.interpolate, weights=args.weights)
    with _graceful_stop("the model so far is saved") as stop:
        try:
            path = finetune(cfg, args.data, target=args.target, noisy2=args.data2, resume=args.resume,
                            log=lambda s: print(s, flush=True), cancel=stop)
        except Cancelled as e:
            print(e, flush=True)
            return 130
        except NotImproved:
            return 3  # the reason is already printed
    print(f"saved {path} (listed by `memnet models` as {args.output!r})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_task, identity, predictor
    from .zoo import load_model

    if args.model == "baseline":
        if args.ensemble or args.backend:
            raise ValueError("--ensemble and --backend apply to a model, not to the 'baseline' (the degraded input "
                             "itself)")
        pred, name = identity, "baseline (bicubic / JPEG / noisy input)"
        task = args.task
        if not task:
            raise ValueError("--task is required with the model 'baseline' "
                             "(memnet eval baseline --task denoise|sr|jpeg|microscopy)")
    else:
        model, info = load_model(args.model)
        pred = predictor(model, ensemble=args.ensemble, backend=args.backend)
        name, task = info.name, args.task or info.task
        if args.ensemble:
            name += " (self-ensemble x8)"
        if args.backend:
            name += f" ({args.backend})"
    res = evaluate_task(task, pred, args.data_root, quick=args.quick)
    print(json.dumps({"model": name, "task": task, **{k: round(v, 2) for k, v in res.items()}}))
    return 0


def _sigma_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--sigma takes LO:HI on the 0-255 scale, e.g. 0:75, got {text!r}") from None
    return lo, hi


def register(sub) -> None:
    from .options import AMP
    from .train_options import LOSSES, NOISE_MODELS, OPTIMIZERS, SAMPLERS, TASKS, TrainConfig, default

    def d(name):
        return default(TrainConfig, name)

    p = sub.add_parser("train", help="train a model from scratch (or continue from weights)",
                       description="Train MemNet on random patches with on-the-fly degradations and the paper's "
                       "multi-supervised loss. Checkpoints to OUT/last.safetensors, best to OUT/best.safetensors.")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", nargs="+", help="folder(s) of clean training images")
    p.add_argument("--pairs", nargs=2, metavar=("NOISY_DIR", "CLEAN_DIR"),
                   help="folders of noisy/clean pairs, matched in sorted order (microscopy)")
    p.add_argument("--include", help="regex on file names, e.g. '_(0[0-2][0-9]|030)_' for W2S 001-030")
    p.add_argument("--val-root", help="folder with Set12/Set14/W2S_train_8bit for validation (else a held-out 5%%)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, best model)")
    p.add_argument("--arch", help="M6R6C64, M4R4C32, ... or MxRyCz [M4R4C32; with --init: the init model's, "
                   "or a wider one grown from it, e.g. --init denoise-M4R4C32 --arch M4R4C48]")
    p.add_argument("--patch", type=T.count(8, "a patch size in pixels"), default=d("patch"))
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=T.count(1, "a batch size"),
                   default=d("batch_size"), help=f"patches per step [{d('batch_size')}]")
    p.add_argument("--steps", type=T.count(1, "a number of steps"), default=d("steps"))
    p.add_argument("--hours", type=T.positive_float, help="stop and checkpoint after this wall time")
    p.add_argument("--lr", type=T.positive_float, default=d("lr"), help="learning rate [1e-3 for adam, 0.1 for sgd]")
    p.add_argument("--bn-batches", type=int, default=d("bn_batches"),
                   help="training batches that re-estimate the BatchNorm statistics before each validation and "
                        f"checkpoint (0: keep the running averages) [{d('bn_batches')}]")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d("optimizer"),
                   help="adam: Adam + cosine (default); sgd: the paper's SGD 0.9, wd 1e-4, step LR, clip 0.01/lr")
    p.add_argument("--loss", choices=LOSSES, default=d("loss"),
                   help="mse (the paper's) or psnr: mean log MSE per patch, every noise level weighs alike "
                   f"[{d('loss')}]")
    p.add_argument("--warmup", type=int, default=d("warmup"),
                   help=f"steps of linear lr warm-up before the cosine (adam), e.g. 200 when growing a model "
                   f"[{d('warmup')}]")
    p.add_argument("--val-every", type=T.count(1, "a number of steps"), default=d("val_every"))
    p.add_argument("--seed", type=int, default=d("seed"))
    p.add_argument("--device", default=d("device"), help="auto (CUDA, then MPS, then CPU), cpu, cuda or cuda:N [auto]")
    p.add_argument("--threads", type=T.count(1, "a number of threads"), default=d("threads"))
    p.add_argument("--amp", choices=AMP, default=d("amp"),
                   help="mixed precision: auto = on for CUDA (bf16, else fp16 with loss scaling) and bf16 on CPUs "
                   "with AVX512-BF16/AMX (about 2x faster); on = bf16 on any CPU (emulated: slower) [auto]")
    p.add_argument("--sampler", choices=SAMPLERS, default=d("sampler"),
                   help="where batches are made: device = on the training device (denoise from 2-D images; "
                   "keeps a GPU fed), numpy = per patch on the CPU, auto = device for denoise on CUDA [auto]")
    p.add_argument("--sigma", action="append", metavar="LO:HI",
                   help="denoise: a Gaussian sigma range on the 0-255 scale; repeat to mix, each patch picks one "
                   "range, e.g. --sigma 0:75 --sigma 5:30 (still blind; two thirds of the patches at 5-30) [0:75]")
    p.add_argument("--noise", choices=NOISE_MODELS, default=d("noise"),
                   help="microscopy: synthetic noise on the clean images. poisson_gaussian = the narrow model "
                   "(4-400 photons); camera = wide-range fluorescence cameras (1-1000 photons, background, read "
                   "noise, quantisation, sCMOS pixel variation, blur, gamma, 8-bit renderings, some saturating "
                   "up to 40 %% of the pixels) for a generalist model [poisson_gaussian]")
    p.add_argument("--init", help="start from these weights (name or .safetensors)")
    p.add_argument("--name", help="model name written into the metadata")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors + OUT/state.pt")
    p.set_defaults(func=cmd_train)
    _register_finetune(sub)
    _register_eval(sub)


def _register_finetune(sub) -> None:
    from .finetune_modes import AUTO, MODES, FinetuneConfig  # mode names and help: no torch
    from .options import AMP
    from .train_options import default

    def d(name):
        return default(FinetuneConfig, name)

    f = sub.add_parser("finetune", help=f"fine-tune a model on your own data ({', '.join(MODES)})",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune a model on your data; the result goes to the user model directory, "
                       "and only if it beats the starting model clearly on held-out crops of your data (mean gain "
                       "above --z standard errors; exit 3 when it does not: nothing is published). Modes (default "
                       "auto: nbr2nbr; where the noise is correlated between neighbours n2v-corr, or structn2v if "
                       "strongly):\n" + "\n".join(
                           textwrap.fill(m.help, 100, initial_indent=f"  {n:11s}", subsequent_indent=" " * 13)
                           for n, m in MODES.items()))
    f.add_argument("--model", default=d("model"), help=f"model to start from [{d('model')}]")
    f.add_argument("--mode", default=d("mode"), choices=(AUTO, *MODES),
                   help=f"see above; auto: nbr2nbr, or where the noise check finds correlated noise n2v-corr (weak) or "
                   f"structn2v (strong) [{d('mode')}]")
    f.add_argument("--data", required=True, help="noisy image, stack (TIFF/Zarr) or folder of them")
    f.add_argument("--target", help="clean counterpart of --data (paired; folders match in sorted order)")
    f.add_argument("--data2", help="second noisy acquisition of the same field (n2n)")
    f.add_argument("--include", help="regex on file names when the data are folders, e.g. '_(03[1-9]|040)_'")
    f.add_argument("--max-planes", type=T.count(1, "a number of planes"), default=d("max_planes"),
                   help=f"planes sampled from large stacks/folders [{d('max_planes')}]")
    f.add_argument("-o", "--output", required=True, help="name of the new model")
    f.add_argument("--minutes", type=T.non_negative_float, default=d("minutes"),
                   help=f"time budget of this run in minutes; 0 = none (then --steps) [{d('minutes'):g}]")
    f.add_argument("--steps", type=T.count(1, "a number of steps"), default=d("steps"),
                   help="stop after this many steps (with or without --minutes) [none]")
    f.add_argument("--patch", type=T.count(8, "a patch size in pixels"), default=d("patch"),
                   help=f"training patch in pixels (nbr2nbr crops twice that) [{d('patch')}]")
    f.add_argument("--batch-size", "--batch", dest="batch_size", type=T.count(1, "a batch size"),
                   default=d("batch_size"), help=f"patches per step [{d('batch_size')}]")
    f.add_argument("--lr", type=T.positive_float, default=d("lr"),
                   help="learning rate; low adapts what the pretrained model knows [the mode's: 3e-05, n2v-corr 1e-4]")
    f.add_argument("--val-fraction", type=T.fraction, default=d("val_fraction"),
                   help="share of the data held out (spread bands of each image, or whole images) to judge the "
                   f"model: half chooses the checkpoint, half decides publication [{d('val_fraction')}]")
    f.add_argument("--z", type=T.positive_float, default=d("z"),
                   help=f"publish only when the held-out gain exceeds this many standard errors [{d('z'):g}]")
    f.add_argument("--interpolate", type=T.auto_or(T.fraction_or_one), default=d("interpolate"),
                   help="publish the starting weights moved this fraction of the way to the fine-tuned ones "
                   "(judged as such); auto: 0.5, or 0.75 where the held-out check at full resolution rates it "
                   "clearly higher [the mode's: auto; paired 1; n2n, adjacent, structn2v 0.5]")
    f.add_argument("--val-every", type=T.count(1, "a number of steps"), default=d("val_every"))
    f.add_argument("--patience", type=T.count(1, "a number of validations"), default=d("patience"),
                   help="stop early after this many validations without improvement [none: use the whole budget]")
    f.add_argument("--weights", choices=("average", "best"), default=d("weights"),
                   help="what the fine-tuned weights are: the average of the run's second half, or the checkpoint "
                   "the held-out crops chose [the mode's: average; paired and n2n/adjacent best]")
    f.add_argument("--mask-fraction", type=T.fraction, default=d("mask_fraction"),
                   help="n2v/n2v2: share of pixels masked per patch [n2v 0.015, n2v2 0.005]")
    f.add_argument("--bn", choices=("frozen", "train"), default=d("bn"),
                   help=f"frozen: BatchNorm keeps the pretrained statistics; train: batch statistics [{d('bn')}]")
    f.add_argument("--no-noise-check", dest="noise_check", action="store_false",
                   help="train a sub-sampling or blind-spot mode (nbr2nbr, n2v, n2v2) even when the noise is "
                   "correlated between neighbouring pixels (by default refused: it makes the model worse)")
    f.add_argument("--publish", choices=("improved", "always"), default=d("publish"),
                   help="improved: save the model only if it beats the starting model clearly on held-out data "
                   f"[{d('publish')}]")
    f.add_argument("--axes", help="axis letters of the data, e.g. ZYX")
    f.add_argument("--device", default=d("device"))
    f.add_argument("--amp", choices=AMP, default=d("amp"),
                   help=f"mixed precision: auto = on for CUDA and bf16 on CPUs with native bf16 (AVX512-BF16/AMX), "
                   f"else fp32; on = bf16 on any CPU; off = fp32 [{d('amp')}]")
    f.add_argument("--seed", type=int, default=d("seed"))
    f.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune of the same name")
    f.add_argument("--overwrite", action="store_true", help="replace an existing user model of the same name")
    f.set_defaults(func=cmd_finetune)


def _register_eval(sub) -> None:
    e = sub.add_parser("eval", help="validation figures of a model (published conventions)",
                       description="PSNR on Set12 (denoise), Set14 (sr, jpeg) or W2S 031-040 (microscopy).")
    e.add_argument("model", help="model name, task, .safetensors path, or 'baseline'")
    e.add_argument("--task", choices=("denoise", "sr", "jpeg", "microscopy"))
    e.add_argument("--data-root", required=True, help="folder holding Set12, Set14, W2S_train_8bit")
    e.add_argument("--quick", action="store_true", help="a subset (as used during training)")
    e.add_argument("--ensemble", action="store_true", help="with the x8 self-ensemble (as restore --ensemble)")
    e.add_argument("--backend", choices=[b for b in BACKENDS if b != "auto"], default=None,
                   help="run the model's inference form on this restore backend on the CPU, e.g. onnxruntime-int8 "
                   "(default: the trained PyTorch module itself)")
    e.set_defaults(func=cmd_eval)

