"""The Restore widget in a real napari viewer (Xvfb): calibrated results, one-line errors, layout."""

import threading
import warnings

import numpy as np
import pytest

import memnet
from napari_memnet._io import layer_kwargs

UM = ("micrometer",) * 3


def _stack(viewer, rng, **kw):
    data = (rng.random((3, 48, 40)) * 3000).astype(np.uint16)
    return viewer.add_image(data, name="stack", scale=(0.5, 0.1, 0.1), translate=(2.0, 1.0, 3.0),
                            axis_labels=("z", "y", "x"), units=("um",) * 3, **kw)


def _geometry(layer) -> tuple:
    return (tuple(np.round(layer.scale, 9)), tuple(np.round(layer.translate, 9)), tuple(map(str, layer.units)),
            tuple(layer.axis_labels))


@pytest.mark.parametrize("dest", ["memory", "zarr on disk"])
def test_results_keep_the_layers_calibration_and_reopen_with_it(dock, wait_worker, user_model, rng, tmp_path, dest):
    viewer, w = dock("Restore")
    src = _stack(viewer, rng)
    w._model.value = user_model
    w._dest.value = dest
    w._path.value = tmp_path / "r.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # napari's "Inconsistent units across layers" among them
        wait_worker(w.start())
        out = viewer.layers["stack [tiny-micro]"]
        assert _geometry(out) == _geometry(src) == ((0.5, 0.1, 0.1), (2.0, 1.0, 3.0), UM, ("z", "y", "x"))
        assert viewer.layers.extent.units is not None  # one set of units across the layers
        if dest == "zarr on disk":
            on_disk = memnet.open_input(tmp_path / "r.zarr")
            assert on_disk.axes == "ZYX" and on_disk.scale == {"Z": 0.5, "Y": 0.1, "X": 0.1}
            assert on_disk.translate == {"Z": 2.0, "Y": 1.0, "X": 3.0}
            assert set(map(memnet.io.ngff_unit, on_disk.units.values())) == {"micrometer"}
            (again,) = viewer.open(str(tmp_path / "r.zarr"), plugin="napari-memnet")
            assert _geometry(again) == _geometry(src)
            assert viewer.layers.extent.units is not None
            # the writer keeps it too
            viewer.layers.selection = {out}
            viewer.layers.save(str(tmp_path / "w.zarr"), selected=True, plugin="napari-memnet")
            written = memnet.open_input(tmp_path / "w.zarr")
            assert _geometry(viewer.add_image(written.array, **layer_kwargs(written, "w"))) == _geometry(src)


def test_preview_layer_keeps_the_planes_calibration(dock, wait_worker, user_model, rng):
    viewer, w = dock("Restore")
    src = _stack(viewer, rng)
    w._model.value = user_model
    viewer.dims.set_point(0, 2.0 + 0.5 * 2)  # plane 2
    wait_worker(w.start(preview=True))
    prev = viewer.layers["stack [tiny-micro] preview"]
    assert _geometry(prev) == ((0.1, 0.1), (1.0, 3.0), UM[:2], ("y", "x"))
    assert "z=2" in w._status.value
    np.testing.assert_array_equal(src.data[2].shape, prev.data.shape)


def test_the_preview_of_a_channel_is_that_plane_of_the_full_restore(dock, wait_worker, user_model, rng):
    """Each channel is mapped by its own percentiles over the whole stack, in the preview as in the full run."""
    viewer, w = dock("Restore")
    data = np.stack([rng.poisson(2000, (3, 40, 40)), rng.poisson(40, (3, 40, 40))], axis=1).astype(np.uint16)
    data[2] *= 2  # the planes differ: a plane's own percentiles would give another preview
    viewer.add_image(data, name="two", axis_labels=("z", "c", "y", "x"))
    w._model.value = user_model
    viewer.dims.set_current_step(0, 2)
    viewer.dims.set_current_step(1, 1)
    wait_worker(w.start(preview=True))
    full = memnet.restore(data, user_model, axes="ZCYX", **w._options())
    np.testing.assert_array_equal(viewer.layers["two [tiny-micro] preview"].data, full[2, 1])
    assert "z=2, c=1" in w._status.value


def test_preview_names_the_plane_of_a_layer_without_axis_names(dock, wait_worker, user_model, rng):
    viewer, w = dock("Restore")
    viewer.add_image(rng.random((4, 32, 32), dtype=np.float32), name="plain")
    w._model.value = user_model
    viewer.dims.set_current_step(0, 3)
    wait_worker(w.start(preview=True))
    assert "plane 3 of axis 0" in w._status.value and "q=" not in w._status.value


def test_restore_passes_the_calibration_to_memnet(dock, user_model, rng, monkeypatch):
    """What the widget hands to memnet.restore: the layer's calibration, under memnet's names."""
    viewer, w = dock("Restore")
    _stack(viewer, rng)
    w._model.value = user_model
    seen = {}
    monkeypatch.setattr(memnet, "restore", lambda data, model, **kw: seen.update(kw) or np.zeros(data.shape))
    w._job.start = lambda call, on_done, **kw: call(lambda p: None, None)
    w.start()
    assert seen["pixel_size"] == {"Z": 0.5, "Y": 0.1, "X": 0.1} and seen["axes"] == "ZYX"
    assert seen["translate"] == {"Z": 2.0, "Y": 1.0, "X": 3.0}
    assert seen["units"] == {"Z": "micrometer", "Y": "micrometer", "X": "micrometer"}


def test_the_widget_says_which_model_a_stack_gets_and_passes_the_choice(dock, ctx_user, rng, monkeypatch):
    viewer, w = dock("Restore")
    viewer.add_image((rng.random((5, 40, 40)) * 3000).astype(np.uint16), name="z5", axis_labels=("z", "y", "x"))
    w._model.value = "microscopy"
    assert w._uses.value == "uses tiny-ctx (5 planes along Z)"
    seen = {}
    monkeypatch.setattr(memnet, "restore", lambda data, model, **kw: seen.update(kw) or np.zeros(data.shape))
    w._job.start = lambda call, on_done, **kw: call(lambda p: None, None)
    w.start()
    assert seen["context"] == "auto"
    w._context.value = False
    assert w._uses.value.endswith("(2-D, plane by plane)")
    w.start()
    assert seen["context"] == "off"
    w._context.value = True
    w._layer.value = viewer.add_image(rng.random((40, 40)).astype(np.float32), name="flat")
    assert w._uses.value.endswith("(2-D)")
    w._model.value = ctx_user  # a context model named for a single image: said in one line, before any run
    assert "needs at least 3 planes along Z or T" in w._uses.value and "\n" not in w._uses.value


def test_an_existing_zarr_is_one_line_with_a_replace_box_and_a_free_name(dock, wait_worker, user_model, rng,
                                                                         tmp_path, qtbot):
    viewer, w = dock("Restore")
    _stack(viewer, rng)
    w._model.value = user_model
    w._dest.value = "zarr on disk"
    assert not w._replace.native.isHidden()
    target = tmp_path / "r.zarr"
    w._path.value = target
    wait_worker(w.start())
    first = memnet.open_input(target).array[:]
    viewer.layers.remove("stack [tiny-micro]")
    assert w.start() is None  # refused before any work
    assert w._status.value == "r.zarr exists: tick 'Replace existing' to replace it, or save as r-2.zarr"
    # memnet's own refusal (the file appeared after the check) reads the same, without a traceback
    with qtbot.capture_exceptions() as raised:
        w._replace.value = False
        job = w._job.start(lambda p, c: memnet.restore(np.zeros((40, 40), np.float32), user_model, output=target),
                           lambda res: None)
        wait_worker(job)
    assert raised == [] and w._status.value.startswith("r.zarr exists: tick 'Replace existing'")
    assert "\n" not in w._status.value and "--overwrite" not in w._status.value
    w._replace.value = True
    wait_worker(w.start())
    assert "done" in w._status.value
    np.testing.assert_array_equal(memnet.open_input(target).array[:], first)


def test_expected_errors_are_one_line_and_nothing_escapes(dock, wait_worker, user_model, qtbot, monkeypatch):
    from napari.utils.notifications import notification_manager

    viewer, w = dock("Restore")
    shown = []
    monkeypatch.setattr(notification_manager, "receive_error", lambda *exc: shown.append(exc))
    x = np.ones((40, 40), np.float32)
    x[3, 4] = np.nan
    viewer.add_image(x, name="nan")
    w._model.value = user_model
    with qtbot.capture_exceptions() as raised:
        wait_worker(w.start())
    assert raised == [] and shown == []
    assert "NaN or Inf" in w._status.value and "\n" not in w._status.value
    assert not w._status.value.startswith("error")
    assert w._run_btn.enabled and w._preview_btn.enabled and not w._cancel_btn.enabled
    assert [layer.name for layer in viewer.layers] == ["nan"]


def test_a_bug_still_shows_its_traceback(dock, wait_worker, qtbot, monkeypatch):
    from napari.utils.notifications import notification_manager

    viewer, w = dock("Restore")
    shown = []
    monkeypatch.setattr(notification_manager, "receive_error", lambda *exc: shown.append(exc))

    def bug(progress, cancel):
        raise KeyError("internal")

    with qtbot.capture_exceptions() as raised:
        wait_worker(w._job.start(bug, lambda res: None))
    assert raised == []  # not re-raised on the GUI thread (that can abort a script's viewer)
    assert [e[0] for e in shown] == [KeyError] and shown[0][2] is not None  # napari's traceback notification
    assert w._status.value.startswith("error: KeyError") and "a bug" in w._status.value


def test_the_tile_box_offers_auto(dock):
    _, w = dock("Restore")
    assert w._tile.value == "auto" and w._tile.native.currentText() == "auto" and w._options()["tile"] == "auto"
    w._tile.value = 64
    assert w._options()["tile"] == 64


def test_cancel_resets_the_progress_bar(dock, wait_worker, user_model, rng, cancel_waits):
    viewer, w = dock("Restore")
    cancel_waits(after=2)  # the run waits for the cancel below: it cannot end first
    viewer.add_image(rng.random((20, 64, 64), dtype=np.float32), name="big")
    w._model.value = user_model
    w._tile.value = 32

    def cancel_after_some(p):
        if p.done >= 2:
            w.cancel()

    worker = w.start()
    worker.yielded.connect(cancel_after_some)
    wait_worker(worker)
    assert "cancelled" in w._status.value and w._progress.value == 0


def _settle(qtbot, window, *widgets):
    """Let Qt finish laying ``window`` out: wait until it is on screen (the X server answers when it
    does), then process events until the sizes of ``window`` and ``widgets`` have not changed for 5 rounds
    in a row (a layout pass may post the next one). Rounds are counted, not timed: the same on a loaded
    machine."""
    from qtpy.QtWidgets import QApplication

    qtbot.waitUntil(lambda: window.windowHandle() is not None and window.windowHandle().isExposed(),
                    timeout=60_000)  # a hang guard only

    def sizes():
        return [(w.width(), w.height()) for w in (window, *widgets)]

    last, same = sizes(), 0
    for _ in range(1000):
        QApplication.sendPostedEvents()
        QApplication.processEvents()
        now = sizes()
        same = same + 1 if now == last else 0
        if same == 5:
            return
        last = now
    raise AssertionError(f"the layout never settled: {last}")


def _dock_of(widget):
    d = widget.native.parentWidget()
    while d is not None and type(d).__name__ != "QtViewerDockWidget":
        d = d.parentWidget()
    return d


@pytest.mark.parametrize("name", ["Restore", "Fine-tune", "Export model"])
def test_a_long_error_does_not_widen_the_dock(dock, qtbot, name):
    viewer, w = dock(name)
    win = viewer.window._qt_window
    win.resize(1200, 900)
    win.show()
    dock_widget = _dock_of(w)
    _settle(qtbot, win, dock_widget)
    before, window = dock_widget.width(), win.width()
    w._job._on_failed(type("F", (), {"error": ValueError("x"), "message": "/a/long/path/" * 25})())
    _settle(qtbot, win, dock_widget)
    assert dock_widget.width() <= before and win.width() == window
    assert w._status.value == "/a/long/path/" * 25  # the text is all there, wrapped over several lines:
    assert w._status.native.height() >= 3 * w._status.native.fontMetrics().height()


def test_the_three_docks_fit_a_1000_px_screen(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    docks = [viewer.window.add_plugin_dock_widget("napari-memnet", n)[1] for n in ("Restore", "Fine-tune",
                                                                                   "Export model")]
    win = viewer.window._qt_window
    win.show()
    _settle(qtbot, win, *map(_dock_of, docks))
    assert win.minimumSizeHint().height() <= 900  # room left for the desktop's own bars
    win.resize(1500, 900)
    _settle(qtbot, win, *map(_dock_of, docks))
    assert win.height() <= 1000 and all(_dock_of(w).height() >= 150 for w in docks)  # none squeezed to its title


def test_the_widget_warms_the_model_up_and_a_preview_waits_for_it(make_napari_viewer, wait_worker, user_model,
                                                                    rng, monkeypatch, qtbot):
    """Opening the widget (or picking a model) prepares the model in the background, one warm-up after the
    other; a preview started meanwhile waits for them instead of preparing the model a second time."""
    from napari_memnet._restore_widget import WARM_PX, RestoreWidget

    calls, gate = [], threading.Event()

    def fake_restore(data, model, **kw):
        calls.append((data.shape, model, kw.get("device")))
        if data.shape == (WARM_PX, WARM_PX):
            assert gate.wait(120)  # a hang guard only: the test sets it
        return np.zeros(data.shape, np.float32)

    def fake_restore_plane(data, model, lead, **kw):
        return fake_restore(data, model, **kw)

    monkeypatch.setattr(memnet, "restore", fake_restore)
    monkeypatch.setattr(memnet, "restore_plane", fake_restore_plane)
    viewer = make_napari_viewer()
    viewer.add_image(rng.random((40, 50), dtype=np.float32), name="img")
    w = RestoreWidget(viewer)
    qtbot.waitUntil(lambda: len(calls) == 1, timeout=60_000)  # a hang guard only
    assert calls == [((WARM_PX, WARM_PX), "microscopy", "auto")]
    w._model.value = user_model  # a new model: warmed up too, once the first warm-up has ended
    worker = w.start(preview=True)
    assert w._warming.is_alive() and len(calls) == 1  # the preview waits for both warm-ups
    gate.set()
    wait_worker(worker)
    assert calls[1] == ((WARM_PX, WARM_PX), user_model, "auto")
    assert calls[-1] == ((40, 50), user_model, "auto") and "preview" in w._status.value


@pytest.fixture
def builds(monkeypatch):
    """The inference backends built from now on (a fresh in-memory cache): ``builds.calls`` the configs of the
    models built, ``builds.gate``: the first build of a test's tiny model (8 channels) waits for it."""
    from collections import OrderedDict

    from memnet import inference, ortgraph

    rec = type("Builds", (), {"calls": [], "gate": threading.Event()})()

    def recorded(real, ort: bool):
        def build(model, *a, **kw):  # a torch MemNet or numpy Weights: both have the config
            if ort or not a[1].startswith("onnxruntime"):  # ONNX Runtime sessions: counted once, in ortgraph
                rec.calls.append(model.config)
                if [c.channels for c in rec.calls].count(8) == 1 and model.config.channels == 8:
                    assert rec.gate.wait(120), "the test never let the first build go on"
            return real(model, *a, **kw)
        return build

    for module in (inference, ortgraph):
        monkeypatch.setattr(module, "_BUILT", OrderedDict())
        monkeypatch.setattr(module, "_build", recorded(module._build, module is ortgraph))
    return rec


def test_a_preview_clicked_while_the_warm_up_builds_the_model_reuses_its_backend(make_napari_viewer, dock,
                                                                                 wait_worker, user_model, builds,
                                                                                 rng, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(rng.random((40, 50), dtype=np.float32), name="img")
    _, w = dock("Restore", viewer)
    w._model.value = user_model
    qtbot.waitUntil(lambda: any(c.channels == 8 for c in builds.calls), timeout=60_000)  # the tiny model's
    worker = w.start(preview=True)  # while the warm-up builds the model
    builds.gate.set()
    wait_worker(worker, timeout=120_000)
    wait_worker(w.start(preview=True), timeout=120_000)
    assert "preview" in w._status.value
    assert [c.channels for c in builds.calls].count(8) == 1  # built once, by the warm-up


def test_a_stack_warms_up_the_context_model_it_will_use(make_napari_viewer, dock, wait_worker, ctx_user, builds,
                                                        rng, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image((rng.random((5, 40, 40)) * 3000).astype(np.uint16), name="z5", axis_labels=("z", "y", "x"))
    builds.gate.set()
    _, w = dock("Restore", viewer)
    assert w._uses.value == "uses tiny-ctx (5 planes along Z)"
    qtbot.waitUntil(lambda: any(c.context for c in builds.calls), timeout=60_000)
    w._warming.join(120)
    before = list(builds.calls)
    wait_worker(w.start(preview=True), timeout=120_000)
    assert "preview" in w._status.value and builds.calls == before  # nothing built for the preview


def test_until_memnet_is_loaded_the_dock_offers_the_task_and_then_the_full_list(dock, user_model, monkeypatch,
                                                                                 qtbot):
    """While the engine loads in the background (here: held by the test), the dock is usable: the first task
    preselected, and the model list and the model the layer gets appear once it is loaded."""
    from napari_memnet import _backend

    monkeypatch.setattr(_backend, "_loaded", threading.Event())  # not loaded yet in this process
    assert _backend._lock.acquire(timeout=60)  # a load in progress
    try:
        viewer, w = dock("Restore")
        viewer.add_image(np.zeros((40, 50), np.float32), name="img")
        assert w._model.value == "microscopy" and len(w._model.choices) == 1
        assert w._uses.value == "loading memnet…"
    finally:
        _backend._lock.release()
    qtbot.waitUntil(lambda: w._uses.value.startswith("uses "), timeout=60_000)
    assert user_model in w._model.choices and w._model.value == "microscopy"


_DOCK_WITHOUT_TORCH = """
import sys, threading, time
imports = []

class Seen:  # records which thread imports torch; finds nothing itself
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            imports.append(threading.current_thread() is threading.main_thread())
        return None

sys.meta_path.insert(0, Seen())
import napari
import numpy as np
from qtpy.QtWidgets import QApplication

viewer = napari.Viewer(show=False)
viewer.add_image(np.zeros((3, 40, 40), np.uint16), name="stack", axis_labels=("z", "y", "x"))
docks = [viewer.window.add_plugin_dock_widget("napari-memnet", n)[1] for n in ("Restore", "Fine-tune", "Export model")]
w = docks[0]
print("torch after the docks opened:", "torch" in sys.modules, imports, flush=True)
end = time.monotonic() + 300  # a hang guard only
while not w._uses.value.startswith("uses ") and time.monotonic() < end:
    QApplication.processEvents()
    time.sleep(0.01)
w._warming.join()
print("torch loaded:", "torch" in sys.modules, flush=True)
print("imports on the main thread:", imports, "uses:", w._uses.value, "models:", len(docks[2]._model.choices),
      flush=True)
viewer.close()
"""


@pytest.mark.slow
def test_opening_the_docks_imports_torch_in_the_background_only(tmp_path):
    """torch (1-5 s to import) never loads on napari's GUI thread when the docks open: they answer at once,
    and the model line and the full model lists appear once the background load is done."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NAPARI_CONFIG": str(tmp_path / "settings.yaml")}
    r = subprocess.run([sys.executable, "-c", _DOCK_WITHOUT_TORCH], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    # torch is never looked for on the GUI thread; on a machine without a GPU it is not loaded at all
    assert last.startswith("imports on the main thread: [") and "True" not in last.split(" uses:")[0], r.stdout
    assert "uses microscopy" in last, r.stdout
    assert "torch loaded: False" in r.stdout or memnet.engine.gpu_possible(), r.stdout
    assert int(last.rsplit("models: ", 1)[1]) > 1, r.stdout  # the Export dock's list, filled in
