"""Long work off the GUI thread: a napari thread worker that runs a blocking call in a thread and
yields the progress objects it reports, so the widgets can update between batches."""

from __future__ import annotations

import queue
import threading

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
