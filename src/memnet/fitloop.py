"""The one fit loop behind ``memnet train`` and ``memnet finetune``.

It owns what both share: the step count and the wall-clock budget, stop/cancel, the validation cadence,
best-score tracking with early stopping, the run's history and its hours across resumes. What a step does,
how a model is validated and what a checkpoint holds stay with the caller, as three callables.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .runtime import stop_requested
from .train_options import LOSSES

__all__ = ["FitState", "MixedPrecision", "atomic_save", "cpu_has_native_bf16", "fit", "hardware_name",
           "multi_supervised_loss"]


@dataclass
class FitState:
    """Where a run stands; saved with each checkpoint so a resume continues it exactly."""

    step: int = 0
    best: float = -math.inf
    bad: int = 0  # validations since the last improvement
    history: list = field(default_factory=list)  # one dict per validation: step, loss, score, ...
    hours_before: float = 0.0  # spent in earlier sessions of this run
    started: float = field(default_factory=time.time)
    ended: str = ""  # "completed", "time budget", "early stop" or "stopped"

    @property
    def hours(self) -> float:
        """Hours spent on this run, earlier sessions included."""
        return self.hours_before + (time.time() - self.started) / 3600

    def as_dict(self) -> dict:
        """The state as plain values for the checkpoint (``hours`` sums this session with the earlier ones)."""
        return {"step": self.step, "best": self.best, "bad": self.bad, "history": self.history,
                "hours": self.hours}

    @classmethod
    def from_dict(cls, d: dict) -> FitState:
        """The state saved by ``as_dict``; the clock of the new session starts now."""
        return cls(step=int(d["step"]), best=float(d["best"]), bad=int(d.get("bad", 0)),
                   history=list(d.get("history", [])), hours_before=float(d.get("hours", 0.0)))


def atomic_save(obj, path: Path) -> None:
    """torch.save through a temporary file: a kill mid-save never leaves a truncated checkpoint."""
    tmp = Path(path).with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fit(state: FitState, *, steps: int | None, val_every: int, train_step: Callable[[int], float],
        validate: Callable[[], dict], checkpoint: Callable[[FitState, bool], None], seconds: float | None = None,
        patience: int | None = None, stop=None, log: Callable[[str], None] = lambda s: None,
        min_delta: float = 0.0, validate_on_stop: bool = True,
        on_step: Callable[[FitState, float, float | None], None] | None = None,
        val_seconds: float | None = None) -> FitState:
    """Run ``train_step(step)`` until ``steps`` (None: no step limit), the ``seconds`` budget of this
    session (after at least one step), ``patience`` validations without improvement, or ``stop``; whichever
    comes first.

    ``validate()`` returns a dict with a ``score`` (higher is better) and any other figures; it runs
    every ``val_every`` steps, and also once ``val_seconds`` have passed since the last one (so slow steps
    still give a curve), and once more at the end of the run, whatever ended it (a stop only with
    ``validate_on_stop``). ``checkpoint(state, improved)`` is called after each validation. A stop sets
    ``state.ended = "stopped"`` and returns (the caller decides whether that is an error).
    ``on_step(state, loss, score)``, if given, follows every step (``score`` None between validations)."""
    if steps is None and seconds is None:
        raise ValueError("a run needs a step count or a time budget")
    t0 = last_val = time.time()
    first = state.step
    loss_sum, n_loss, since_val = 0.0, 0, 0
    while True:
        out_of_steps = steps is not None and state.step >= steps
        # at least one step per session, however little time is left (the caller's set-up may have used it)
        out_of_time = seconds is not None and state.step > first and time.time() - t0 >= seconds
        stopped = stop_requested(stop)
        if out_of_steps or out_of_time or stopped:
            state.ended = "completed" if out_of_steps else ("stopped" if stopped else "time budget")
            if since_val and (validate_on_stop or not stopped):  # the end of a run is validated and checkpointed
                _validate(state, validate, checkpoint, loss_sum / max(n_loss, 1), min_delta)
            return state
        loss = train_step(state.step)
        state.step += 1
        since_val += 1
        loss_sum += float(loss) if not torch.is_tensor(loss) else loss.detach()
        n_loss += 1
        validated = state.step % val_every == 0 or (val_seconds is not None and time.time() - last_val >= val_seconds)
        if validated:
            _validate(state, validate, checkpoint, loss_sum / n_loss, min_delta)
            loss_sum, n_loss, since_val = 0.0, 0, 0
            last_val = time.time()
        if on_step is not None:
            on_step(state, loss, state.history[-1]["score"] if validated else None)
        if validated and patience is not None and state.bad >= patience:
            log(f"early stop: no improvement in {patience} validations")
            state.ended = "early stop"
            return state


def _validate(state: FitState, validate, checkpoint, loss, min_delta: float) -> None:
    figures = validate()
    score = float(figures["score"])
    improved = score > state.best + min_delta
    if improved:
        state.best, state.bad = score, 0
    else:
        state.bad += 1
    state.history.append({"step": state.step, "loss": float(loss), **{k: float(v) for k, v in figures.items()}})
    checkpoint(state, improved)  # the caller logs: it knows what its figures mean


def multi_supervised_loss(final: torch.Tensor, branches: list[torch.Tensor], target: torch.Tensor,
                          kind: str = "mse") -> torch.Tensor:
    """The paper's loss over every branch output and the final output, weights 1/(M+1) each.

    ``kind="mse"`` is the paper's. ``kind="psnr"`` is the mean over patches of log(MSE + 1e-4) per
    patch, i.e. each patch weighted by its own error: with plain MSE a blind denoiser's gradient is
    dominated by its sigma 50-75 patches (~6x the error of sigma 15) and it spends its capacity there.
    The 1e-4 floor (40 dB) keeps near-clean patches from taking over; the 5e-4 scale keeps gradients
    on the MSE scale, so a run can switch loss when resumed without upsetting Adam's statistics."""
    outs = branches + [final]
    if kind == "mse":
        return sum(torch.mean((o - target) ** 2) for o in outs) / len(outs)
    if kind == "psnr":
        return 5e-4 * sum(torch.log(((o - target) ** 2).mean(dim=(1, 2, 3)) + 1e-4).mean() for o in outs) / len(outs)
    raise ValueError(f"unknown loss {kind!r}: {' or '.join(LOSSES)}")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 training runs about
    twice as fast as fp32; elsewhere bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


class MixedPrecision:
    """The forwards/backward of one training step under ``amp`` ("auto": on for CUDA, and with ``cpu_auto``
    on CPUs with native bf16; "on": bf16 on any CPU too; "off"), shared by training and fine-tuning."""

    def __init__(self, amp: str, dev: torch.device, cpu_auto: bool = False):
        if amp not in ("auto", "on", "off"):
            raise ValueError(f"amp must be 'auto', 'on' or 'off', got {amp!r}")
        self.dev, self.dtype = dev, None
        if amp == "on" or (amp == "auto" and (dev.type == "cuda" or (cpu_auto and cpu_has_native_bf16()))):
            # CPU: bf16 via oneDNN, 2.1x the patches/s of fp32 on a CPU with AMX (bench/train_throughput.py).
            cuda_fp16 = dev.type == "cuda" and not torch.cuda.is_bf16_supported()
            self.dtype = torch.float16 if cuda_fp16 else torch.bfloat16
        # fp16 needs loss scaling against underflowing gradients; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.dtype == torch.float16)

    @property
    def precision(self) -> str:
        """What the step's forwards compute in, for a model's card: "bfloat16", "float16" or "float32"."""
        return str(self.dtype or torch.float32).removeprefix("torch.")

    def forward(self, model, x):
        """``model(x, branches=True)`` with outputs in fp32: the residuals the loss compares are small
        next to the image."""
        with self.autocast():
            final, branches = model(x, branches=True)
        return final.float(), [b.float() for b in branches]

    def autocast(self):
        """The autocast context of this step's forwards (a no-op in fp32)."""
        return torch.autocast(self.dev.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def step(self, loss, opt, clip: float | None = None):
        """Backward (loss-scaled for fp16), optional gradient-norm clipping at ``clip``, then the optimiser step."""
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if clip is not None:
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        self.scaler.step(opt)
        self.scaler.update()


def hardware_name(dev: torch.device) -> str:
    """The device in words (GPU name, or CPU with its thread count), recorded in a model's training metadata."""
    import os
    import platform

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads of {os.cpu_count()})"
