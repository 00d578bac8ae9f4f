"""The napari experience in numbers: how long the Restore dock takes to open, the first preview against
later ones, and the worst gap in the GUI thread's event loop while a stack is restored (a 50 ms timer:
each interval beyond 50 ms is time the window could not answer).

Needs a real X server (vispy crashes under Qt's offscreen platform), e.g.:

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python bench/napari_ui.py --model microscopy

(docs/napari.md's figures ran under ``taskset -c 1``: one core, shared with other work on that machine).

``--delay`` is the time between the dock opening and the first preview click (a user picking a layer and a
slice); 0 clicks at once. Figures are printed, never asserted. napari runs with a throwaway settings file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="microscopy", help="task name, model name or .safetensors path")
    ap.add_argument("--size", type=int, default=512, help="image height and width (default 512)")
    ap.add_argument("--planes", type=int, default=8, help="planes of the restored stack (default 8)")
    ap.add_argument("--previews", type=int, default=3, help="previews after the first (default 3)")
    ap.add_argument("--delay", type=float, default=5.0, help="seconds from the dock opening to the first preview")
    ap.add_argument("--timer-ms", type=int, default=50, help="the GUI timer's period (default 50 ms)")
    ap.add_argument("--finetune-minutes", type=float, default=0,
                    help="then fine-tune (nbr2nbr) with this budget through the Fine-tune widget (0: skip)")
    return ap.parse_args()


def main() -> int:
    args = _parse()
    if not os.environ.get("DISPLAY"):
        print("needs an X server: run under xvfb-run (see the docstring)", file=sys.stderr)
        return 2
    os.environ["NAPARI_CONFIG"] = os.path.join(tempfile.mkdtemp(prefix="memnet-bench-"), "settings.yaml")
    t0 = time.perf_counter()
    import napari
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    import_s = time.perf_counter() - t0
    viewer = napari.Viewer(show=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:args.size, 0:args.size] / args.size
    clean = 400 + 300 * np.sin(9 * xx + 5 * yy) ** 2
    stack = np.stack([rng.poisson(clean * (1 + 0.1 * k)) for k in range(args.planes)]).astype(np.uint16)
    viewer.add_image(stack, name="stack", scale=(0.5, 0.1, 0.1), axis_labels=("z", "y", "x"), units=("um",) * 3)
    app = QApplication.instance()
    app.processEvents()

    t = time.perf_counter()
    _, w = viewer.window.add_plugin_dock_widget("napari-memnet", "Restore")
    app.processEvents()
    dock_s = time.perf_counter() - t
    w._model.value = args.model

    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(args.timer_ms)

    def wait(seconds=None, worker=None):
        """Run the event loop for ``seconds``, or until ``worker`` has finished."""
        loop = QEventLoop()
        poll = QTimer()
        end = time.perf_counter() + (seconds or 0)
        poll.timeout.connect(lambda: (worker.ended if worker is not None else time.perf_counter() >= end)
                             and loop.quit())
        poll.start(5)
        loop.exec()
        poll.stop()

    def preview() -> float:
        t = time.perf_counter()
        wait(worker=w.start(preview=True))
        return time.perf_counter() - t

    wait(seconds=args.delay)
    first = preview()
    later = [preview() for _ in range(args.previews)]

    ticks.clear()
    adding: list[float] = []  # when the result layer is added (napari's layer and GL texture creation)
    on_done = w._on_done

    def timed_done(*a, **k):
        adding.append(time.perf_counter())
        on_done(*a, **k)
        adding.append(time.perf_counter())

    w._on_done = timed_done
    t = time.perf_counter()
    wait(worker=w.start())
    wait(seconds=1.0)  # the ticks after the layer went in
    restore_s = adding[0] - t
    timer.stop()
    ticks_a = np.array(ticks)
    spans_add = (ticks_a[1:] >= adding[0]) & (ticks_a[:-1] <= adding[1])
    gaps = np.diff(ticks_a)[~spans_add] * 1000
    add_gap = float(np.diff(ticks_a)[spans_add].max() * 1000) if spans_add.any() else 0.0
    tuned = None
    if args.finetune_minutes:
        os.environ["MEMNET_MODEL_DIR"] = tempfile.mkdtemp(prefix="memnet-bench-models-")  # a throwaway model
        _, ft = viewer.window.add_plugin_dock_widget("napari-memnet", "Fine-tune")
        ft._model.value = args.model
        ft._minutes.value = args.finetune_minutes
        t = time.perf_counter()
        first_step = []
        worker = ft.start()
        stages = []  # (seconds since Start, what the fine-tune reported) until its first step

        def seen(p):
            if not first_step:
                (stages.append((time.perf_counter() - t, p)) if isinstance(p, str) else
                 first_step.append(time.perf_counter()))

        worker.yielded.connect(seen)
        wait(worker=worker)
        tuned = (time.perf_counter() - t, len(ft.plot.history), ft._status.value, first_step[0] - t)
    print(f"napari_ui: model {args.model}, {args.planes}x{args.size}x{args.size} uint16, "
          f"first preview {args.delay:g} s after the dock opened")
    print(f"  import napari {import_s:.2f} s; Restore dock opens in {dock_s:.2f} s")
    print(f"  first preview {first:.2f} s; later previews {', '.join(f'{v:.2f}' for v in later)} s "
          f"(first / median later = {first / float(np.median(later)):.2f}x)")
    print(f"  restore {restore_s:.1f} s: worst GUI gap {gaps.max():.0f} ms with a {args.timer_ms} ms timer, "
          f"{int((gaps > 200).sum())} gaps over 200 ms, median {np.median(gaps):.0f} ms; adding the result layer "
          f"(napari) {add_gap:.0f} ms; status: {w._status.value}")
    if tuned is not None:
        print(f"  fine-tune, {args.finetune_minutes:g} min budget: {tuned[0]:.0f} s (first step after "
              f"{tuned[3]:.0f} s), {tuned[1]} points on the plot; status: {tuned[2]}")
        print("  set-up: " + "; ".join(f"{t:.1f} s {msg[:40]}" for t, msg in stages))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
