"""The shared fit loop (memnet.fitloop): budgets, stop, validation cadence, early stop, resume state."""

import json
import threading

import pytest

from memnet.fitloop import FitState, fit


def _run(state=None, scores=None, **kw):
    state = state or FitState()
    scores = iter(scores or [1.0] * 100)
    seen = {"steps": [], "checkpoints": []}
    kw.setdefault("val_every", 3)
    fit(state, train_step=lambda step: seen["steps"].append(step) or 0.5,
        validate=lambda: {"score": next(scores)},
        checkpoint=lambda st, improved: seen["checkpoints"].append((st.step, improved)), **kw)
    return state, seen


def test_steps_validate_on_the_cadence_and_once_more_at_the_end():
    state, seen = _run(steps=7)
    assert seen["steps"] == list(range(7)) and state.ended == "completed"
    assert [c[0] for c in seen["checkpoints"]] == [3, 6, 7]  # the last, partial round is validated too
    assert [h["step"] for h in state.history] == [3, 6, 7] and state.history[0]["loss"] == 0.5


def test_early_stop_after_patience_rounds_without_improvement():
    state, seen = _run(steps=100, scores=[1.0, 2.0, 2.0, 1.5, 2.0005], patience=3, min_delta=1e-3)
    assert state.ended == "early stop" and state.step == 15 and state.best == 2.0
    assert [c[1] for c in seen["checkpoints"]] == [True, True, False, False, False]


def test_a_time_budget_ends_the_run_and_it_is_validated():
    state, seen = _run(steps=None, seconds=0.05, val_every=10**9)
    assert state.ended == "time budget" and state.step >= 1
    assert seen["checkpoints"] == [(state.step, True)]


def test_stop_validates_unless_told_not_to():
    stop = threading.Event()
    state = FitState()
    fit(state, steps=50, val_every=10, train_step=lambda s: (stop.set() if s == 4 else None) or 0.0,
        validate=lambda: {"score": 1.0}, checkpoint=lambda st, imp: None, stop=stop)
    assert state.ended == "stopped" and state.step == 5 and [h["step"] for h in state.history] == [5]
    state2 = FitState()
    stop.clear()
    fit(state2, steps=50, val_every=10, train_step=lambda s: (stop.set() if s == 4 else None) or 0.0,
        validate=lambda: {"score": 1.0}, checkpoint=lambda st, imp: None, stop=stop, validate_on_stop=False)
    assert state2.ended == "stopped" and state2.step == 5 and state2.history == []


def test_state_round_trips_and_a_resumed_run_continues_its_count_and_hours():
    state, _ = _run(steps=6)
    saved = json.loads(json.dumps(state.as_dict()))
    resumed = FitState.from_dict(saved)
    assert (resumed.step, resumed.best, resumed.history) == (6, state.best, state.history)
    assert resumed.hours >= saved["hours"]
    resumed, seen = _run(resumed, steps=9)
    assert seen["steps"] == [6, 7, 8] and [h["step"] for h in resumed.history][-1] == 9


def test_a_run_needs_a_bound():
    with pytest.raises(ValueError, match="needs a step count or a time budget"):
        _run(steps=None, seconds=None)


def test_slow_steps_are_validated_on_a_time_schedule(monkeypatch):
    """A budget that holds few steps still gives a curve: a validation once ``val_seconds`` have passed,
    whatever the step cadence (a fake clock: each step takes 4 s)."""
    import memnet.fitloop as fl

    now = [1000.0]
    monkeypatch.setattr(fl.time, "time", lambda: now[0])
    state = FitState()
    steps = []

    def step(i):
        steps.append(i)
        now[0] += 4.0
        return 0.5

    fit(state, steps=None, seconds=60, val_every=25, val_seconds=10, train_step=step,
        validate=lambda: {"score": 1.0}, checkpoint=lambda st, improved: None)
    assert len(steps) == 15 and state.ended == "time budget"
    assert [h["step"] for h in state.history] == [3, 6, 9, 12, 15]  # every 12 s (>= 10 s), never at step 25


def test_a_spent_budget_still_runs_one_step_and_validates_it():
    state, seen = _run(steps=None, seconds=0.0, val_every=10**9)
    assert seen["steps"] == [0] and state.ended == "time budget" and seen["checkpoints"] == [(1, True)]
