"""The Fine-tune widget in a real napari viewer (Xvfb): names that never collide, one-line mistakes,
what runs before the first step, and the scores at the end. The fine-tune itself is replaced by a stand-in
whose pace the test sets (events), so nothing here depends on the machine's speed."""

import threading

import numpy as np
import pytest

import memnet
import memnet.finetune as mf
from memnet.finetune import FinetuneProgress


@pytest.fixture
def ft(dock, rng, user_model):
    viewer, w = dock("Fine-tune")
    viewer.add_image(rng.random((3, 64, 64), dtype=np.float32), name="noisy")
    w._model.value = user_model
    return w


def _publish(tiny_model, name):
    memnet.save_model(tiny_model, memnet.user_model_dir() / f"{name}.safetensors", name=name, task="microscopy")


def test_the_default_name_is_free_and_the_next_run_gets_a_new_one(ft, tiny_model, dock):
    assert ft._name.value == "my-finetuned"
    _publish(tiny_model, "my-finetuned")
    ft._on_done(memnet.user_model_dir() / "my-finetuned.safetensors", ft.viewer.layers["noisy"], "tiny-micro",
                "my-finetuned")
    assert ft._name.value == "my-finetuned-2"  # a second Start does not collide
    _, again = dock("Fine-tune")
    assert again._name.value == "my-finetuned-2"


def test_an_existing_name_is_one_line_with_a_replace_box(ft, tiny_model, monkeypatch, wait_worker):
    _publish(tiny_model, "mine")
    ft._name.value = "mine"
    assert ft.start() is None
    assert ft._status.value == "a model named 'mine' exists: tick 'Replace existing model' to replace it, " \
                               "or save as 'mine-2'"
    seen = {}
    monkeypatch.setattr(mf, "finetune", lambda cfg, *a, **k: seen.setdefault("cfg", cfg) and None)
    ft._replace.value = True
    wait_worker(ft.start())
    assert seen["cfg"].overwrite is True and seen["cfg"].name == "mine"


def test_memnets_refusal_of_an_existing_name_reads_the_same(ft, tiny_model, monkeypatch, wait_worker, qtbot):
    def exists(cfg, *a, **k):
        _publish(tiny_model, cfg.name)  # another run published it meanwhile
        raise FileExistsError(f"a user model named {cfg.name!r} already exists (...): choose another name, "
                              "or overwrite it explicitly")

    monkeypatch.setattr(mf, "finetune", exists)
    ft._name.value = "late"
    with qtbot.capture_exceptions() as raised:
        wait_worker(ft.start())
    assert raised == []
    assert ft._status.value.startswith("a model named 'late' exists: tick 'Replace existing model'")


@pytest.mark.parametrize("name, words", [("", "name the new model (Save as)"),
                                         ("tiny-micro", "save the new model under another name than 'tiny-micro'"),
                                         ("a/b", "invalid model name 'a/b': use letters, digits, '-' or '_'")])
def test_bad_names_are_one_line(ft, name, words, wait_worker, qtbot):
    ft._name.value = name
    with qtbot.capture_exceptions() as raised:
        worker = ft.start()
        if worker is not None:
            wait_worker(worker)
    assert raised == [] and ft._status.value.startswith(words) and "\n" not in ft._status.value


def _stand_in(stages, gate, history, baseline, result):
    """A fine-tune that logs its set-up stages, waits for ``gate``, reports steps, then returns/raises."""

    def run(cfg, noisy, *, progress, log, **kw):
        for s in stages:
            log(s)
        assert gate.wait(120)  # a hang guard only: the test sets it
        for k in range(1, len(history) + 1):
            progress(FinetuneProgress(k * 5, None, 0.01, history[k - 1][2], 10.0 * k, history[:k], 60.0, baseline))
        if isinstance(result, BaseException):
            raise result
        return result

    return run


def test_setup_stages_show_before_the_first_step_and_the_end_gives_the_scores(ft, monkeypatch, wait_worker, qtbot,
                                                                              tiny_model):
    gate = threading.Event()
    _publish(tiny_model, "done-model")  # what the real run would have saved
    history = [(5, 0.02, 20.5), (10, 0.015, 21.25), (15, 0.014, 21.0)]
    monkeypatch.setattr(mf, "finetune", _stand_in(["reading the data…", "checking the noise…"], gate, history, 20.0,
                                                  memnet.user_model_dir() / "done-model.safetensors"))
    ft._name.value = "done-model"
    ft._replace.value = True
    ft._minutes.value = 1.0
    worker = ft.start()
    qtbot.waitUntil(lambda: ft._status.value == "checking the noise…", timeout=120_000)  # a hang guard
    gate.set()
    wait_worker(worker)
    assert len(ft.plot.history) == 3
    assert ft._status.value.startswith("held-out score 20.00 → 21.25 dB, saved as 'done-model' in ")
    assert ft._progress.value == 100 and ft._name.value == "done-model-2"


def test_not_published_says_the_scores(ft, monkeypatch, wait_worker):
    gate = threading.Event()
    gate.set()
    decision = mf.publish_decision([1.0] * 8, [0.999, 1.001] * 4)
    refused = mf.NotImproved("not published: …", decision)
    monkeypatch.setattr(mf, "finetune", _stand_in([], gate, [(5, 0.02, 19.5)], 20.0, refused))
    assert ft._mode.value == "auto"  # the CLI's default mode is the widget's first
    wait_worker(ft.start())
    assert ft._status.value == ("not published: held-out score 20.00 → 19.50 dB did not clearly beat tiny-micro "
                                f"({decision.summary()}); try another mode, more data or more time")
    assert decision.summary().startswith("kept the starting model: gain +0.000 ± ")


def test_correlated_noise_is_explained_in_the_widgets_words(ft, monkeypatch, wait_worker):
    gate = threading.Event()
    gate.set()
    monkeypatch.setattr(mf, "finetune", _stand_in([], gate, [], None, mf.NoiseCorrelated("not fine-tuned: … --mode")))
    wait_worker(ft.start())
    assert ft._status.value.startswith("not fine-tuned: the noise in this layer is correlated")
    assert "--" not in ft._status.value
