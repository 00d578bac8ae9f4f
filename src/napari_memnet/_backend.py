"""memnet's engine loads off the GUI thread: it imports ONNX Runtime, and torch where a GPU may be there (1-5 s),
which on the GUI thread would freeze napari as a dock opens. On a machine without a usable GPU, the CPU path runs
on ONNX Runtime and never imports torch (~3 s and ~220 MB saved). Until the engine is loaded, the widgets touch only
the parts of memnet that need neither (reading layers, task names); `when_loaded` tells them on the GUI thread when
the rest is there."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from functools import partial

import memnet

_lock = threading.Lock()
_loaded = threading.Event()
_devices: list[str] = ["auto", "cpu"]


def load() -> None:
    """Import memnet's engine, read the model list and the devices there are (torch only where a GPU may be),
    once per process (a second caller waits for the first). Blocking: call it from a background thread."""
    if _loaded.is_set():
        return
    with _lock:
        if not _loaded.is_set():
            engine = memnet.engine  # the restore engine and ONNX Runtime's path: no torch
            memnet.list_models()
            _devices[:] = engine.available_devices()  # imports torch where a GPU may be there
            _loaded.set()


def devices() -> list[str]:
    """The devices a restore can run on ("auto", "cpu", "cuda:0", ...), once the engine is loaded."""
    return list(_devices)


def loaded() -> bool:
    """Whether the engine is loaded. When torch is already imported (a script, a test, another plugin), or the
    engine is and torch is not needed (no GPU possible), and no thread is loading, loading costs next to nothing:
    it is done here and then."""
    if _loaded.is_set():
        return True
    cheap = "torch" in sys.modules or ("memnet.engine" in sys.modules and not memnet.engine.gpu_possible())
    if cheap and _lock.acquire(blocking=False):  # a load in progress holds the lock
        _lock.release()
        load()
    return _loaded.is_set()


_waiting: list[tuple[Callable[[], None], Callable[[BaseException], None] | None]] = []  # for when_loaded


def when_loaded(callback: Callable[[], None], on_error: Callable[[BaseException], None] | None = None) -> None:
    """``callback()`` on the GUI thread once the engine is loaded: at once if it is, else after `load` ran in a
    background worker. The worker starts once the GUI thread is idle again (the dock that asked is built and
    drawn: a load running meanwhile would slow that down, sharing the GIL). ``on_error`` gets what stopped the
    load (a broken torch install)."""
    if loaded():
        callback()
        return
    _waiting.append((callback, on_error))
    if len(_waiting) == 1:
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, _start_loading)


def _start_loading() -> None:
    from napari.qt.threading import create_worker

    def done(_=None):
        waiting, _waiting[:] = list(_waiting), []
        for callback, _on_error in waiting:
            _call(callback)

    def failed(err: BaseException):
        waiting, _waiting[:] = list(_waiting), []
        for _callback, on_error in waiting:
            if on_error is not None:
                _call(partial(on_error, err))

    worker = create_worker(load, _start_thread=False, _connect={"errored": failed})  # connected before it starts
    worker.returned.connect(done)
    worker.start()


def _call(callback: Callable[[], None]) -> None:
    try:
        callback()
    except RuntimeError as e:  # the widget was closed while the engine loaded: nothing to update
        if "deleted" not in str(e):
            raise
