"""Long work off the GUI thread, the one way both dock widgets do it: a napari thread worker runs a
blocking call in a thread and yields the progress objects it reports, so the widgets update between
batches; ``BackgroundJob`` adds what every widget needs around it (cancel, errors, busy buttons)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import memnet

CANCELLED = object()  # returned (not raised) when the call was cancelled: a normal outcome


def progress_worker(call):
    """``call(progress)`` runs in a background thread; ``progress`` puts objects that the worker
    yields. Returns the (not yet started) worker; its ``returned`` value is the call's result, or
    ``CANCELLED``."""
    from napari.qt.threading import thread_worker

    @thread_worker
    def work():
        q: queue.Queue = queue.Queue()
        result = {}

        def run():
            try:
                result["value"] = call(q.put)
            except BaseException as e:
                result["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        while t.is_alive() or not q.empty():
            try:
                yield q.get(timeout=0.05)
            except queue.Empty:
                pass
        if isinstance(result.get("error"), memnet.Cancelled):
            return CANCELLED
        if "error" in result:
            raise result["error"]
        return result["value"]

    return work()


class BackgroundJob:
    """A widget's background work. ``start(call, on_done)`` runs ``call(progress, cancel)`` in a thread
    worker (``cancel`` is a ``threading.Event`` for memnet's ``cancel=``); on the GUI thread progress
    objects go to ``on_progress``, the result (or ``CANCELLED``) to ``on_done``, and an error to the
    widget's status line. ``busy(True)`` is called at the start and ``busy(False)`` once the worker has
    finished, however it ended, so the widget can toggle its buttons."""

    def __init__(self, status, busy: Callable[[bool], None]):
        self._status = status  # a magicgui Label
        self._busy = busy
        self._cancel: threading.Event | None = None
        self._t0 = 0.0
        self.worker = None

    def start(self, call: Callable[[Callable, threading.Event], Any], on_done: Callable[[Any], None], *,
              on_progress: Callable[[Any], None] | None = None, message: str = "", busy: bool = True):
        """Start ``call`` and return its (started) worker. ``busy=False`` for short follow-up work that
        leaves the buttons as they are."""
        self._cancel = cancel = threading.Event()
        self.worker = worker = progress_worker(lambda progress: call(progress, cancel))
        if on_progress is not None:
            worker.yielded.connect(on_progress)
        worker.returned.connect(on_done)
        worker.errored.connect(self._on_error)
        if busy:
            self._busy(True)
            worker.finished.connect(lambda: self._busy(False))
        if message:
            self._status.value = message
        self._t0 = time.monotonic()
        worker.start()
        return worker

    def cancel(self, message: str = "cancelling…") -> None:
        """Ask the running call to stop at its next check (it then returns ``CANCELLED``)."""
        if self._cancel is not None:
            self._cancel.set()
            self._status.value = message

    @property
    def elapsed(self) -> float:
        """Seconds since the last start."""
        return time.monotonic() - self._t0

    def _on_error(self, err) -> None:
        self._status.value = f"error: {err}"
