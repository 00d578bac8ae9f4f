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

__all__ = ["FitState", "fit", "atomic_save", "stop_requested"]


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
        return self.hours_before + (time.time() - self.started) / 3600

    def as_dict(self) -> dict:
        return {"step": self.step, "best": self.best, "bad": self.bad, "history": self.history,
                "hours": self.hours}

    @classmethod
    def from_dict(cls, d: dict) -> FitState:
        return cls(step=int(d["step"]), best=float(d["best"]), bad=int(d.get("bad", 0)),
                   history=list(d.get("history", [])), hours_before=float(d.get("hours", 0.0)))


def stop_requested(stop) -> bool:
    """``stop``: None, a ``threading.Event`` or a callable returning True."""
    return stop is not None and bool(stop.is_set() if hasattr(stop, "is_set") else stop())


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
