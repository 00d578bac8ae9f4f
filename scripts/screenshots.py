"""Regenerate the napari screenshots used in docs/napari.md.

Needs a real X server (vispy crashes under Qt's offscreen platform), e.g.:

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py \
        --model microscopy --out docs/images

It opens the plugin's sample in a napari window of a fixed size, docks the Restore widget, restores the
sample, previews one slice, then fine-tunes a throwaway nbr2nbr model with the Fine-tune widget, and writes
restore_widget.png, before_after.png, preview.png and finetune_widget.png. ``--model`` is a task name,
a model name or a .safetensors path. The fine-tuned model goes to a temporary MEMNET_MODEL_DIR (the
user's model directory is never touched) and napari runs with a temporary settings file (default theme,
the user's napari settings untouched). Exits non-zero if any step fails or times out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="microscopy", help="task name, model name or .safetensors path")
    ap.add_argument("--out", default="docs/images", help="output folder for the PNGs")
    ap.add_argument("--size", default="1500x950", help="window size WxH (default 1500x950)")
    ap.add_argument("--steps", type=int, default=50, help="fine-tuning steps (default 50)")
    ap.add_argument("--patch", type=int, default=32, help="fine-tuning patch size (default 32)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per background run")
    return ap.parse_args()


def _prepare_model_dir(spec: str, model_dir: Path) -> str:
    """Copy the model into the throwaway model dir when it is a file or a user model; return the value
    to pick in the widgets' model lists (a task or a model name)."""
    import warnings

    import memnet
    from memnet.zoo import read_info

    p = Path(spec).expanduser()
    model_dir.mkdir(parents=True, exist_ok=True)
    if p.is_file() or spec.endswith(".safetensors"):
        info = read_info(p)
        shutil.copy2(p, model_dir / p.name)
        return info.name
    # A task or model name, resolved against the user's current model dir before it is replaced:
    # a user model is copied so that it stays visible in the temporary dir.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = memnet.load_model(spec)
    if info.source != "shipped":
        shutil.copy2(info.path, model_dir / info.path.name)
    return spec


def main() -> int:
    args = _parse()
    if not os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM", "") == "offscreen":
        print("error: needs an X server; run under xvfb-run -a -s '-screen 0 1600x1000x24'", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.lower().split("x"))
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="memnet-screenshots-"))
    t_start = time.monotonic()
    try:
        # Before napari or the widgets read them: a throwaway model dir and napari settings file.
        try:
            model_value = _prepare_model_dir(args.model, tmp / "models")
        except (LookupError, OSError, ValueError) as e:
            print(f"error: model {args.model!r}: {e}", file=sys.stderr)
            return 1
        os.environ["MEMNET_MODEL_DIR"] = str(tmp / "models")
        out.mkdir(parents=True, exist_ok=True)
        os.environ["NAPARI_CONFIG"] = str(tmp / "napari-settings.yaml")
        return _run(args, model_value, out, width, height, t_start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class StepFailed(RuntimeError):
    pass


def _run(args, model_value: str, out: Path, width: int, height: int, t_start: float) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="System theme detection")
    import napari
    import torch
    from napari.settings import get_settings
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    from napari_memnet._finetune_widget import FinetuneWidget
    from napari_memnet._restore_widget import RestoreWidget

    torch.manual_seed(0)
    written: list[Path] = []
    running: dict = {}  # the background run in progress: its stop callable and its state

    def settle(seconds: float = 0.5) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.02)

    def watch(worker, what: str, status_label, stop) -> dict:
        if worker is None:
            raise StepFailed(f"{what}: the widget did not start ({status_label.value!r})")
        state = {"done": False, "error": None}
        worker.errored.connect(lambda e: state.update(error=e))
        worker.finished.connect(lambda: state.update(done=True))
        running.update(stop=stop, state=state)
        return state

    def wait(worker, what: str, status_label, stop) -> None:
        state = watch(worker, what, status_label, stop)
        deadline = time.monotonic() + args.timeout
        while not (state["done"] or getattr(worker, "ended", False)):  # ended: set by the widget's job
            if time.monotonic() > deadline:
                raise StepFailed(f"{what}: not finished after {args.timeout:.0f} s ({status_label.value!r})")
            app.processEvents()
            time.sleep(0.02)
        settle(0.5)  # let the returned/finished handlers add layers and repaint
        if state["error"] is not None:
            raise StepFailed(f"{what}: {state['error']!r}")
        if str(status_label.value).startswith(("error", "cancel", "stopped")):
            raise StepFailed(f"{what}: {status_label.value}")

    def shot(name: str) -> None:
        settle(0.8)
        path = out / name
        viewer.screenshot(str(path), canvas_only=False, flash=False)
        written.append(path)
        print(f"wrote {path}  ({time.monotonic() - t_start:.0f} s)", flush=True)

    def grid(enabled: bool) -> None:
        g = viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid  # napari >= 0.9 / older
        g.enabled, g.shape, g.stride = enabled, (1, 2), 1

    settings = get_settings()  # the temporary settings file (NAPARI_CONFIG)
    settings.appearance.theme = "dark"
    settings.application.gui_notification_level = "error"  # no warning pop-ups over the canvas
    viewer = napari.Viewer(title="napari-memnet", show=True)
    app = QApplication.instance()
    try:
        qwin = viewer.window._qt_window
        qwin.showNormal()
        qwin.move(0, 0)
        qwin.resize(width, height)
        settle(1.0)

        # 1. The sample and the docked Restore widget.
        noisy = viewer.open_sample("napari-memnet", "noisy_fluorescence")[0]
        scale_bar = viewer.canvas.overlays["scale_bar"] if hasattr(viewer, "canvas") else viewer.scale_bar
        scale_bar.visible = True
        z_mid = noisy.data.shape[0] // 2
        viewer.dims.set_current_step(0, z_mid)
        restore = RestoreWidget(viewer)
        restore_dock = viewer.window.add_dock_widget(restore, name="Restore (MemNet)", area="right")
        restore._layer.value = noisy
        restore._model.value = model_value
        if restore._model.value != model_value:
            raise StepFailed(f"model {model_value!r} is not in the Restore widget's list")
        qwin.resizeDocks([restore_dock], [400], Qt.Horizontal)
        settle(0.5)
        viewer.reset_view()
        shot("restore_widget.png")

        # 2. Restore the whole stack; input and result side by side with the same contrast limits.
        wait(restore.start(), "restore", restore._status, restore.cancel)
        result_name = f"{noisy.name} [{model_value}]"
        if result_name not in viewer.layers:
            raise StepFailed(f"restore: no layer {result_name!r} was added ({restore._status.value!r})")
        result = viewer.layers[result_name]
        result.contrast_limits = noisy.contrast_limits
        print(f"restore: {restore._status.value}", flush=True)
        grid(True)
        viewer.reset_view()
        shot("before_after.png")

        # 3. Preview of the displayed (middle) z slice, over the hidden full result.
        grid(False)
        result.visible = False
        viewer.dims.set_current_step(0, z_mid)
        wait(restore.start(preview=True), "preview", restore._status, restore.cancel)
        preview_name = f"{noisy.name} [{model_value}] preview"
        if preview_name not in viewer.layers:
            raise StepFailed(f"preview: no layer {preview_name!r} was added ({restore._status.value!r})")
        viewer.layers[preview_name].contrast_limits = noisy.contrast_limits
        print(f"preview: {restore._status.value}", flush=True)
        viewer.reset_view()
        shot("preview.png")

        # 4. A short nbr2nbr fine-tune in the Fine-tune widget (the Restore dock is closed for room).
        viewer.window.remove_dock_widget(restore_dock)
        for name in (preview_name, result_name):
            viewer.layers.remove(name)
        ft = FinetuneWidget(viewer)
        ft_dock = viewer.window.add_dock_widget(ft, name="Fine-tune (MemNet)", area="right")
        qwin.resizeDocks([ft_dock], [400], Qt.Horizontal)
        ft._noisy.value = noisy
        ft._mode.value = "nbr2nbr"
        ft._model.value = model_value
        ft._name.value = "screenshot-nbr2nbr"
        ft._steps.value = args.steps
        ft._patch.value = args.patch
        settle(0.3)
        wait(ft.start(), "fine-tune", ft._status, ft.stop)
        if len(ft.plot.history) < 2:
            raise StepFailed(f"fine-tune: the loss plot has {len(ft.plot.history)} point(s)")
        if ft.saved_path is not None:  # published: it beat the starting model on held-out data
            if "screenshot-nbr2nbr" not in restore._model.choices:
                raise StepFailed("fine-tune: the new model is not in the Restore widget's list")
            wait(ft.compare(), "before/after", ft._status, ft.stop)
        elif not ft._status.value.startswith("not published"):
            raise StepFailed(f"fine-tune: neither saved nor reported as not published ({ft._status.value!r})")
        print(f"fine-tune: {ft._status.value}", flush=True)
        viewer.layers.selection.active = noisy
        viewer.status = "Ready"
        viewer.reset_view()
        shot("finetune_widget.png")
    except StepFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        state = running.get("state")
        if state is not None and not state["done"]:  # stop the background run before closing the viewer
            running["stop"]()
            end = time.monotonic() + 120
            while not state["done"] and time.monotonic() < end:
                app.processEvents()
                time.sleep(0.05)
        viewer.close()
    print(f"{len(written)} screenshots in {out} ({time.monotonic() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
