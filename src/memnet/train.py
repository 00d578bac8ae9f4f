"""Training from scratch (``memnet train``): random patches, on-the-fly degradations, the paper's
multi-supervised loss, validation with the published conventions, checkpoints and resume."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .degrade import camera_ranges
from .evaluate import evaluate_task, predictor
from .fitloop import FitState, MixedPrecision, atomic_save, fit, hardware_name, multi_supervised_loss
from .metrics import psnr
from .model import MemNet, deepen, parse_arch, widen
from .runtime import Cancelled, resolve_device, stop_requested
from .train_options import DEFAULT_ARCH, TrainConfig
from .trainset import (
    DEGRADATIONS,
    NORMALIZATION,
    DevicePatchSampler,
    PatchSampler,
    load_data,
    use_device_sampler,
)
from .zoo import load_model, save_model

__all__ = ["TrainConfig", "fit_state_of", "recalibrate_bn", "train"]

def _degradation_record(cfg: TrainConfig) -> dict:
    if cfg.task == "microscopy" and cfg.noise.startswith("camera"):
        return {"pairs": DEGRADATIONS["microscopy"]["pairs"], "camera": camera_ranges(cfg.noise)}
    return DEGRADATIONS[cfg.task]


def _build_model(cfg: TrainConfig, log=print) -> tuple[MemNet, dict]:
    """The model to train and, when continuing from weights, their training record. With ``init`` and a
    wider ``arch`` (same blocks and recursions), the trained model is widened function-preservingly."""
    if cfg.init:
        model, info = load_model(cfg.init)
        if cfg.arch:
            want, have = parse_arch(cfg.arch), model.config
            if want.blocks < have.blocks or want.recursions < have.recursions or want.channels < have.channels:
                raise ValueError(
                    f"--arch {cfg.arch} does not fit --init {info.name} (M{have.blocks}R{have.recursions}"
                    f"C{have.channels}): trained weights can only grow (more blocks, recursions or channels); "
                    f"drop --arch to continue with the same architecture")
            if want.channels > have.channels:
                log(f"widening {info.name} from {have.channels} to {want.channels} channels (same outputs)")
                model = widen(model, want.channels, seed=cfg.seed)
            if (want.blocks, want.recursions) != (have.blocks, have.recursions):
                log(f"deepening {info.name} from M{have.blocks}R{have.recursions} to M{want.blocks}R{want.recursions}"
                    f" (same outputs)")
                model = deepen(model, want.blocks, want.recursions, seed=cfg.seed)
        return model, {**(info.metadata.get("training") or {}), "name": info.name}
    return MemNet(**parse_arch(cfg.arch or DEFAULT_ARCH).as_dict()), {}


def recalibrate_bn(model: MemNet, sampler: PatchSampler, batches: int = 50, batch: int = 32,
                   device: str | torch.device = "cpu") -> MemNet:
    """Re-estimate every BatchNorm's running mean/variance as an exact average over ``batches`` fresh
    training batches (the weights are untouched), in place; returns the model in eval mode.

    The running statistics that training leaves behind are an exponential average of the last ~10
    batches: mid-run, while the weights move fast, they lag behind them (and each batch mixes
    degradations differently), so a checkpoint would be judged with stale statistics. On the denoiser
    3,600 steps in (Set12 σ 25) recalibrating moved 28.26 to 28.79 dB; at the end of a cosine decay the
    running averages are accurate (shipped sr/jpeg: -0.01/+0.003 dB). Outputs of a model in training
    mode do not depend on these statistics, so this can be done at any time, also after training."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or batches < 1:
        return model.eval()
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    dev = torch.device(device)
    with torch.no_grad():
        for _ in range(batches):
            x, _ = sampler.batch(batch)
            model(x.to(dev).contiguous(memory_format=torch.channels_last))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)
    return model.eval() if not was_training else model


def _validate(model, cfg: TrainConfig, sampler_val) -> dict[str, float]:
    if cfg.val_root:
        return evaluate_task(cfg.task, predictor(model, cfg.device), cfg.val_root, quick=True)
    # Fixed held-out batch: PSNR in model range (peak 1).
    x, y = sampler_val
    pred = predictor(model, cfg.device)
    vals = [psnr(pred(x[i, 0].numpy()), y[i, 0].numpy(), peak=1.0) for i in range(len(x))]
    return {"holdout": float(np.mean(vals))}


def _optimizer(cfg: TrainConfig, model):
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / (cfg.warmup + 1))
            * (0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)) * 0.99 + 0.01))
    else:  # the paper: divide by 10 every 1/4 of the run (their 20 epochs of 80)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.steps // 4), gamma=0.1)
    return opt, sched


def fit_state_of(st: dict) -> FitState:
    """The run's state from a checkpoint (also those written before the shared fit loop)."""
    if "fit" in st:
        return FitState.from_dict(json.loads(st["fit"]))
    return FitState(step=int(st["step"]), best=float(st["best"]), history=json.loads(st.get("history", "[]")),
                    hours_before=float(st.get("hours", 0.0)))


def _resume(out: Path, model, opt, sched, mp, log) -> FitState:
    state_path, last_path = out / "state.pt", out / "last.safetensors"
    model_l, info_l = load_model(last_path)
    model.load_state_dict(model_l.state_dict())
    st = torch.load(state_path, weights_only=True)
    state = fit_state_of(st)
    w_step = (info_l.metadata.get("training") or {}).get("steps")
    if w_step is not None and int(w_step) != state.step:
        raise ValueError(f"cannot resume {out}: last.safetensors is from step {w_step} but state.pt from step "
                         f"{state.step} (a checkpoint save was interrupted). Start a new run from those weights "
                         f"with --init {last_path} (new --out), or restore both files from a backup")
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    if st.get("scaler"):
        mp.scaler.load_state_dict(st["scaler"])
    log(f"resumed from step {state.step} (best validation {state.best:.2f} dB)")
    return state


def _record(cfg: TrainConfig, arch: str) -> dict:
    return {
        "description": f"MemNet {arch} for {cfg.task}",
        "normalization": NORMALIZATION[cfg.task],
        "degradation": _degradation_record(cfg) if not cfg.sigma else {
            **DEGRADATIONS[cfg.task], "sigma_mixture_255": cfg.sigma,
            "gaussian_sigma_255": [min(r[0] for r in cfg.sigma), max(r[1] for r in cfg.sigma)]},
        "training": {"config": cfg.to_dict()},
    }


def _training_record(meta_base: dict, state: FitState, previous: dict | None, dev, mp: MixedPrecision) -> dict:
    hours = round(state.hours, 3)
    t = {**meta_base["training"], "steps": state.step, "hours": hours, "hardware": hardware_name(dev),
         "precision": mp.precision, "history": state.history[-50:]}
    if previous:
        # Continued from trained weights: the record keeps the cumulative recipe across runs/sessions.
        t["continued_from"] = {k: previous.get(k) for k in ("name", "steps", "hours", "total_steps",
                                                            "total_hours", "hardware") if k in previous}
        t["total_steps"] = int(previous.get("total_steps", previous.get("steps", 0))) + state.step
        t["total_hours"] = round(float(previous.get("total_hours", previous.get("hours", 0))) + hours, 3)
    return t


def train(cfg: TrainConfig, resume: bool = False, log=print, cancel=None) -> Path:
    """Train; returns the path of the best model (``OUT/best.safetensors``). ``cancel``: a
    ``threading.Event`` or a callable returning True, as for ``restore`` and ``finetune``; when it fires
    before the last step the run validates, saves a checkpoint (as ``--hours`` does) and raises
    ``Cancelled``; ``resume=True`` continues it."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dev = resolve_device(cfg.device)
    cfg = cfg.replace(device=str(dev))  # validation and the saved record use the device actually used
    state_path, last_path, best_path = out / "state.pt", out / "last.safetensors", out / "best.safetensors"
    # before loading data: a bad value fails at once. auto: bf16 on a CPU with native bf16 too (2.1x the
    # patches/s of fp32 with AMX); fine-tuning keeps fp32 there (its publish decision was measured in fp32)
    mp = MixedPrecision(cfg.amp, dev, cpu_auto=True)
    sampler, make_sampler, val_batch = _samplers(cfg, dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: let cuDNN pick its fastest kernels
    model, previous = _build_model(cfg, log)
    c = model.config
    arch = f"M{c.blocks}R{c.recursions}C{c.channels}"
    model = model.to(dev).to(memory_format=torch.channels_last)
    opt, sched = _optimizer(cfg, model)
    state = FitState()
    if resume and state_path.exists() and last_path.exists():
        state = _resume(out, model, opt, sched, mp, log)
        sampler = make_sampler(cfg.seed + state.step)
    elif resume:
        log(f"nothing to resume in {out}: starting from " + (f"--init {cfg.init}" if cfg.init else "scratch"))
    meta_base = _record(cfg, arch)
    if state.step < cfg.steps and stop_requested(cancel):
        raise Cancelled(f"training stopped before step {state.step + 1}: nothing new to save")
    rate = _RateLog(cfg, log, sched)

    def train_step(step: int):
        x, y = sampler.batch(cfg.batch_size)
        x = x.to(dev).contiguous(memory_format=torch.channels_last)
        y = y.to(dev).contiguous(memory_format=torch.channels_last)
        final, branches = mp.forward(model, x)
        loss = multi_supervised_loss(final, branches, y, cfg.loss)
        # The paper's adjustable clipping: gradients bounded by theta / (current lr), theta = 0.01.
        mp.step(loss, opt, 0.01 / sched.get_last_lr()[0] if cfg.optimizer == "sgd" else None)
        sched.step()
        rate.add(step + 1, loss)
        return loss.detach()  # no .item() per step: a host sync each step would idle a GPU

    def validate():
        if cfg.bn_batches:  # exact BN statistics for the checkpoint (own RNG: the training stream is unchanged)
            recalibrate_bn(model, make_sampler(cfg.seed + 10**6 + state.step), cfg.bn_batches, cfg.batch_size, dev)
        metrics = _validate(model, cfg, val_batch)
        model.train()
        return {"score": float(np.mean(list(metrics.values()))), **metrics}

    def checkpoint(st: FitState, improved: bool):
        metrics = {k: v for k, v in st.history[-1].items() if k not in ("step", "loss", "score")}
        save_model(model, last_path, name=cfg.name or f"{cfg.task}-{arch}", task=cfg.task,
                   metadata={**meta_base, "training": _training_record(meta_base, st, previous, dev, mp),
                             "metrics": metrics})
        atomic_save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": mp.scaler.state_dict(),
                     "fit": json.dumps(st.as_dict())}, state_path)
        if improved:
            last_path.with_suffix(".tmp").write_bytes(last_path.read_bytes())
            last_path.with_suffix(".tmp").replace(best_path)
        log(f"validation at step {st.step}: " + ", ".join(f"{k} {v:.2f} dB" for k, v in metrics.items())
            + ("  (best)" if improved else ""))

    model.train()
    fit(state, steps=cfg.steps, val_every=cfg.val_every, seconds=None if cfg.hours is None else cfg.hours * 3600,
        train_step=train_step, validate=validate, checkpoint=checkpoint, stop=cancel, log=log)
    if state.ended == "time budget":
        log(f"time budget of {cfg.hours} h reached at step {state.step}: checkpoint saved, resume with --resume")
    elif state.ended == "stopped":
        raise Cancelled(f"training stopped at step {state.step}: checkpoint saved, resume with --resume")
    return best_path


class _RateLog:
    """The training log line every ``log_every`` steps: loss, patches/s, lr, elapsed, ETA."""

    def __init__(self, cfg: TrainConfig, log, sched):
        self.cfg, self.log, self.sched = cfg, log, sched
        self.t0 = self.t_log = time.time()
        self.n, self.acc = 0, 0.0

    def add(self, step: int, loss) -> None:
        cfg = self.cfg
        self.acc += loss.detach()
        self.n += 1
        if step % cfg.log_every and step != cfg.steps:
            return
        rate = self.n * cfg.batch_size / max(time.time() - self.t_log, 1e-9)
        eta = (cfg.steps - step) * cfg.batch_size / rate if rate > 0 else 0
        self.log(f"step {step}/{cfg.steps}  loss {float(self.acc) / self.n:.5f}  {rate:.1f} patches/s  "
                 f"lr {self.sched.get_last_lr()[0]:.2e}  elapsed {(time.time() - self.t0) / 60:.1f} min  "
                 f"ETA {eta / 60:.1f} min")
        self.t_log, self.n, self.acc = time.time(), 0, 0.0


def _samplers(cfg: TrainConfig, dev):
    """The training sampler, a factory for re-seeded ones, and the held-out batch (None with a validation
    set: ~5% of the images are held out when none is given)."""
    clean, pairs = load_data(cfg)
    val_batch = None
    if not cfg.val_root:
        vs = PatchSampler(cfg.task, clean[: max(1, len(clean) // 20)], pairs[: max(1, len(pairs) // 20)] if pairs
                          else [], cfg.patch, seed=12345)
        val_batch = vs.batch(64)
        clean = clean[max(1, len(clean) // 20):] or clean
        pairs = pairs[max(1, len(pairs) // 20):] or pairs
    on_device = use_device_sampler(cfg, dev, clean, pairs)

    def make_sampler(seed: int):
        if on_device:
            return DevicePatchSampler(clean, cfg.patch, dev, seed=seed, sigma=cfg.sigma)
        return PatchSampler(cfg.task, clean, pairs, cfg.patch, seed=seed, sigma=cfg.sigma, noise=cfg.noise)

    return make_sampler(cfg.seed), make_sampler, val_batch


