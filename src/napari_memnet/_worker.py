"""Long work off the GUI thread, the one way both dock widgets do it: a napari thread worker runs a
blocking call in a thread and yields the progress objects it reports, so the widgets update between
batches; ``BackgroundJob`` adds what every widget needs around it (cancel, errors, busy buttons)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from magicgui.widgets import Label

import memnet

CANCELLED = object()  # returned (not raised) when the call was cancelled: a normal outcome

# What a user's input, files or machine can cause (memnet's own errors derive from these: ModelFileError,
# OutputLocked, FileExistsError...) or a missing optional library: shown as one line in the widget. Anything else
# is a bug: a traceback.
EXPECTED = (ValueError, OSError, MemoryError, ImportError)


class Failed:
    """The call stopped on an expected error (returned, not raised: napari shows a raised one as a
    traceback pop-up). ``error``: the exception."""

    def __init__(self, error: BaseException):
        self.error = error

    @property
    def message(self) -> str:
        return one_line(str(self.error) or type(self.error).__name__)


def one_line(text: str) -> str:
    """The first line of a message (an error's detail lines stay in the terminal log)."""
    return text.strip().splitlines()[0] if text.strip() else ""


def free_path(path: Path) -> Path:
    """``path`` with the first free numbered name ("r.zarr" -> "r-2.zarr"), to suggest instead of it."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".ome.zarr") else path.suffix
    stem = path.name[: len(path.name) - len(suffix)]
    k = 2
    while (path.with_name(f"{stem}-{k}{suffix}")).exists():
        k += 1
    return path.with_name(f"{stem}-{k}{suffix}")


def progress_worker(call, on_error: Callable[[BaseException], None] | None = None):
    """``call(progress)`` runs in a background thread; ``progress`` puts objects that the worker
    yields. Returns the (not yet started) worker; its ``returned`` value is the call's result,
    ``CANCELLED`` or a ``Failed``. ``on_error`` receives a bug's exception; connecting it when the worker
    is made keeps superqt from re-raising it on the GUI thread (which can abort a script's viewer)."""
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
        err = result.get("error")
        if isinstance(err, memnet.Cancelled):
            return CANCELLED
        if isinstance(err, EXPECTED):
            return Failed(err)
        if err is not None:
            raise err
        return result["value"]

    return work(_connect={"errored": on_error or (lambda e: None)}, _start_thread=False)


class BackgroundJob:
    """A widget's background work. ``start(call, on_done)`` runs ``call(progress, cancel)`` in a thread
    worker (``cancel`` is a ``threading.Event`` for memnet's ``cancel=``); on the GUI thread progress
    objects go to ``on_progress`` and the result (or ``CANCELLED``) to ``on_done``. An expected error
    (``EXPECTED``) becomes one line in the widget's status, in the widget's words when ``explain(error)``
    returns some (else the error's first line); a bug shows "error: ..." there and napari's traceback.
    ``busy(True)`` is called at the start and ``busy(False)`` once the worker has finished, however it
    ended, so the widget can toggle its buttons."""

    def __init__(self, status, busy: Callable[[bool], None],
                 explain: Callable[[BaseException], str | None] | None = None):
        self._status = status  # a magicgui Label
        self._busy = busy
        self._explain = explain or (lambda e: None)
        self._cancel: threading.Event | None = None
        self._t0 = 0.0
        self.worker = None

    def start(self, call: Callable[[Callable, threading.Event], Any], on_done: Callable[[Any], None], *,
              on_progress: Callable[[Any], None] | None = None, message: str = "", busy: bool = True):
        """Start ``call`` and return its (started) worker. ``busy=False`` for short follow-up work that
        leaves the buttons as they are."""
        self._cancel = cancel = threading.Event()
        self.worker = worker = progress_worker(lambda progress: call(progress, cancel), self._on_error)
        if on_progress is not None:
            worker.yielded.connect(on_progress)
        worker.returned.connect(lambda res: self._on_failed(res) if isinstance(res, Failed) else on_done(res))
        worker.ended = False  # True once finished, on the GUI thread (a finished signal may come before a wait)
        worker.finished.connect(lambda: setattr(worker, "ended", True))
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

    def _on_failed(self, failed: Failed) -> None:
        self._status.value = self._explain(failed.error) or failed.message

    def _on_error(self, err) -> None:
        from napari.utils.notifications import notification_manager

        self._status.value = f"error: {type(err).__name__}: {one_line(str(err))} (a bug: see the traceback)"
        notification_manager.receive_error(type(err), err, err.__traceback__)  # napari's pop-up, with the traceback


def _breakable(text: str, run: int = 24) -> str:
    """``text`` with invisible break opportunities after path separators and inside long unbroken runs,
    so a label can wrap a long path or name instead of widening its dock."""
    out, since = [], 0
    for ch in text:
        out.append(ch)
        since = 0 if ch.isspace() else since + 1
        if ch in "/\\_.,;:" or since >= run:
            out.append("\u200b")
            since = 0
    return "".join(out)


def status_label() -> Label:
    """A status line that wraps (at spaces, path separators, and inside long runs) and takes its width from
    the dock, never the other way round: a long message makes it taller, not the dock wider. Its ``value``
    stays the plain text; the full text is also its tooltip."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QSizePolicy

    label = _Status(value="")
    q = label.native
    q.setWordWrap(True)
    q.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    q.setMinimumWidth(40)
    q.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


class _Status(Label):
    _plain = ""

    @property
    def value(self) -> str:
        return self._plain

    @value.setter
    def value(self, text) -> None:
        self._plain = str(text)
        Label.value.fset(self, _breakable(self._plain))
        self.tooltip = self._plain


class ScrollingDock:
    """Mixed into a scrollable magicgui Container that napari docks: napari docks ``.native``, which for
    a scrollable container is its contents without the scroll area; answering the scroll area lets a
    dock be shorter than its contents (three docks fit a 1000 px screen; the contents scroll)."""

    @property
    def native(self):
        return self.root_native_widget

    @property
    def contents(self):
        """The widget holding the rows (inside the scroll area)."""
        return self.root_native_widget.widget()

    def fit_dock(self, at_least: int = 240) -> None:
        """Keep the dock at least ``at_least`` px tall (or its whole contents, when shorter): three docks
        then fit a 1000 px screen, and none is squeezed to its title. As wide as the rows need (they are
        never cut off at the right), and the rows keep their height when the dock is taller."""
        from qtpy.QtCore import QEvent, QObject

        root, contents = self.root_native_widget, self.contents
        contents.layout().addStretch()  # napari adds this to a dock's layout; the scroll area hides it from napari

        class FollowContents(QObject):
            """The scroll area's minimum width follows its rows' (they widen once napari's style applies)."""

            def eventFilter(self, obj, event):  # noqa: N802 (Qt API)
                if event.type() in (QEvent.Type.LayoutRequest, QEvent.Type.Show, QEvent.Type.StyleChange):
                    root.setMinimumWidth(contents.minimumSizeHint().width() + root.verticalScrollBar().sizeHint()
                                         .width())
                return False

        self._follow = FollowContents(root)
        contents.installEventFilter(self._follow)
        root.setMinimumWidth(contents.minimumSizeHint().width() + root.verticalScrollBar().sizeHint().width())
        root.setMinimumHeight(min(at_least, contents.sizeHint().height()))
