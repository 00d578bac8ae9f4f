"""The plugin in a real napari viewer (under Xvfb: pytest-xvfb starts it)."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

import memnet


def test_sample_opens_in_a_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-memnet", "noisy_fluorescence")
    (layer,) = viewer.layers
    assert layer.data.shape == (4, 384, 384) and layer.data.dtype == np.uint16
    np.testing.assert_allclose(layer.scale, (0.5, 0.1, 0.1))
    assert tuple(layer.axis_labels) == ("z", "y", "x")


def _values(combo) -> list:
    return [c[1] if isinstance(c, tuple) else c for c in combo.choices]


def _widget(viewer):
    """The Restore widget as napari finds it: from the plugin's manifest."""
    _, w = viewer.window.add_plugin_dock_widget("napari-memnet", "Restore")
    return w


def _wait(qtbot, worker, timeout=60_000):
    qtbot.waitUntil(lambda: worker.ended, timeout=timeout)  # BackgroundJob sets it when finished


def test_restore_widget_adds_a_layer_with_the_inputs_metadata(make_napari_viewer, qtbot, user_model, rng):
    viewer = make_napari_viewer()
    data = (rng.random((3, 70, 90)) * 3000).astype(np.uint16)
    src = viewer.add_image(data, name="stack", scale=(2.0, 0.3, 0.3), translate=(1.0, 5.0, 7.0),
                           axis_labels=("z", "y", "x"), units=("um", "um", "um"), metadata={"lab": "x"})
    w = _widget(viewer)
    assert w._layer.value is src
    w._model.value = user_model
    w._tile.value = 32
    _wait(qtbot, w.start())
    out = viewer.layers["stack [tiny-micro]"]
    assert out.data.shape == data.shape and out.data.dtype == np.uint16
    np.testing.assert_allclose(out.scale, src.scale)
    np.testing.assert_allclose(out.translate, src.translate)
    assert tuple(out.axis_labels) == ("z", "y", "x") and out.metadata["lab"] == "x"
    assert str(out.units[0]) in ("micrometer", "µm")
    np.testing.assert_array_equal(src.data, data)  # input untouched
    expected = memnet.restore(data, user_model, tile=32, device="cpu")
    assert np.abs(np.asarray(out.data).astype(int) - expected).max() <= 1
    assert "done" in w._status.value and w._run_btn.enabled


def test_preview_restores_only_the_displayed_slice(make_napari_viewer, qtbot, user_model, rng):
    viewer = make_napari_viewer()
    data = (rng.random((5, 60, 60)) * 3000).astype(np.uint16)
    viewer.add_image(data, name="stack")
    viewer.dims.set_current_step(0, 3)
    w = _widget(viewer)
    w._model.value = user_model
    _wait(qtbot, w.start(preview=True))
    prev = viewer.layers["stack [tiny-micro] preview"]
    assert prev.data.shape == (60, 60)
    expected = memnet.restore(data, user_model, device="cpu")[3]  # that plane of the full restore
    assert np.abs(prev.data.astype(int) - expected).max() <= 1
    assert "plane 3 of axis 0" in w._status.value


def test_self_ensemble_checkbox(make_napari_viewer, qtbot, user_model, rng):
    viewer = make_napari_viewer()
    data = (rng.random((50, 64)) * 3000).astype(np.uint16)
    viewer.add_image(data, name="img")
    w = _widget(viewer)
    w._model.value = user_model
    w._tile.value = 32
    w._ensemble.value = True
    _wait(qtbot, w.start())
    out = viewer.layers["img [tiny-micro]"]
    assert out.metadata["memnet_options"]["ensemble"] is True
    expected = memnet.restore(data, user_model, tile=32, device="cpu", ensemble=True)
    assert np.abs(np.asarray(out.data).astype(int) - expected).max() <= 1


def test_cancel_leaves_no_half_layer(make_napari_viewer, qtbot, user_model, rng, cancel_waits):
    viewer = make_napari_viewer()
    cancel_waits(after=1)  # the run waits for the cancel below: it cannot end first
    viewer.add_image(rng.random((40, 64, 64), dtype=np.float32), name="big")
    w = _widget(viewer)
    w._model.value = user_model
    w._tile.value = 32
    seen = []

    def cancel_early(p):
        seen.append(p)
        w.cancel()

    worker = w.start()
    worker.yielded.connect(cancel_early)
    _wait(qtbot, worker)
    assert [layer.name for layer in viewer.layers] == ["big"]
    assert "cancelled" in w._status.value
    assert seen and seen[-1].done < seen[-1].total


def _restore_to_disk(viewer, qtbot, model, data, name, path):
    """``data`` restored by the Restore widget into the Zarr ``path``: the layer it adds."""
    viewer.add_image(data, name=name)
    w = _widget(viewer)
    w._model.value = model
    w._dest.value = "zarr on disk"
    w._path.value = path
    _wait(qtbot, w.start())
    return viewer.layers[f"{name} [tiny-micro]"]


def test_restore_to_disk_adds_a_lazy_layer(make_napari_viewer, qtbot, user_model, tmp_path, rng):
    import dask.array as da

    viewer = make_napari_viewer()
    out = _restore_to_disk(viewer, qtbot, user_model, (rng.random((2, 50, 50)) * 255).astype(np.uint8), "s",
                           tmp_path / "r.zarr")
    assert isinstance(out.data, da.Array)
    assert zarr.open_group(str(tmp_path / "r.zarr"), mode="r").attrs["memnet"]["complete"] is True


def test_an_on_disk_result_with_a_pyramid_is_a_multiscale_layer(make_napari_viewer, qtbot, user_model, tmp_path,
                                                                 rng):
    viewer = make_napari_viewer()
    out = _restore_to_disk(viewer, qtbot, user_model, (rng.random((1100, 300)) * 255).astype(np.uint8), "tall",
                           tmp_path / "t.zarr")
    assert out.multiscale and [tuple(d.shape) for d in out.data] == [(1100, 300), (550, 150)]
    np.testing.assert_array_equal(np.asarray(out.data[0]), np.asarray(memnet.open_input(tmp_path / "t.zarr").array))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_widgets_open_on_the_microscopy_model(make_napari_viewer, rng, dtype):
    from napari_memnet._finetune_widget import FinetuneWidget

    viewer = make_napari_viewer()
    w = _widget(viewer)
    assert w._model.value == "microscopy"  # before any layer
    viewer.add_image((rng.random((2, 40, 40)) * 200).astype(dtype), name="new")
    assert w._layer.value is viewer.layers["new"]
    assert w._model.value == "microscopy" and w._scale.native.isHidden()
    assert "scale" not in w._options()
    w._model.value = "sr"
    assert not w._scale.native.isHidden() and w._options()["scale"] == 2
    assert FinetuneWidget(viewer)._model.value == "microscopy"


def test_model_list_refreshes_after_a_new_user_model(make_napari_viewer, tiny_model, user_model,
                                                     _isolated_user_models):
    viewer = make_napari_viewer()
    w = _widget(viewer)
    values = _values(w._model)
    assert "microscopy" in values and user_model in values and "fresh" not in values
    memnet.save_model(tiny_model, _isolated_user_models / "fresh.safetensors", name="fresh", task="denoise")
    w.refresh_models()
    assert "fresh" in list(w._model.choices)


def test_a_published_model_reaches_every_open_widget(make_napari_viewer, tiny_model, user_model,
                                                      _isolated_user_models, rng):
    """Fine-tune announces a published model (models.changed): every Restore widget and every
    Fine-tune "Start from" list re-reads the models; a widget whose Qt side is gone stops listening."""
    from qtpy import sip

    from napari_memnet._models import models
    from napari_memnet._restore_widget import RestoreWidget

    viewer = make_napari_viewer()
    layer = viewer.add_image(rng.random((3, 32, 32), dtype=np.float32), name="img")
    docked = _widget(viewer)
    _, ft = viewer.window.add_plugin_dock_widget("napari-memnet", "Fine-tune")
    loose, gone = RestoreWidget(viewer), RestoreWidget(viewer)  # not docked: they listen all the same
    models.changed.emit()  # lets go of the widgets of earlier tests (their viewers are closed)
    listeners = len(models.changed)
    sip.delete(gone.native)
    memnet.save_model(tiny_model, _isolated_user_models / "new.safetensors", name="new", task="microscopy")
    assert not any("new" in _values(w._model) for w in (docked, loose, ft))
    ft._name.value = "new"
    ft._on_done(_isolated_user_models / "new.safetensors", layer, user_model, "new")  # a published run's end
    assert all("new" in _values(w._model) for w in (docked, loose, ft))
    assert ft._compare_btn.enabled and ft._status.value.startswith("saved as 'new'")
    assert len(models.changed) <= listeners - 1  # at least the deleted widget's listener let go


def test_layer_pickers_follow_the_viewers_image_layers(make_napari_viewer, rng):
    """magicgui's napari.layers.Image pickers: image layers only, kept in step with the viewer."""
    viewer = make_napari_viewer()
    restore = _widget(viewer)
    _, ft = viewer.window.add_plugin_dock_widget("napari-memnet", "Fine-tune")
    pickers = (restore._layer, ft._noisy, ft._second)
    assert all(list(p.choices) == [] and p.value is None for p in pickers)
    a = viewer.add_image(rng.random((16, 16)), name="a")
    viewer.add_labels(np.zeros((16, 16), np.uint8), name="mask")
    b = viewer.add_image(rng.random((16, 16)), name="b")
    assert all(list(p.choices) == [a, b] and p.value is a for p in pickers)
    a.name = "renamed"
    combo = restore._layer.native
    assert sorted(combo.itemText(i) for i in range(combo.count())) == ["b", "renamed"]
    viewer.layers.remove(a)
    assert all(list(p.choices) == [b] and p.value is b for p in pickers)


def test_reader_opens_tiff_and_zarr_lazily(make_napari_viewer, tmp_path, rng):
    import dask.array as da

    x = (rng.random((3, 40, 50)) * 1000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", x, imagej=True, resolution=(4, 4), metadata={"axes": "ZYX", "spacing": 2.0,
                                                                                        "unit": "um"})
    memnet.save_image(x, tmp_path / "a.zarr", axes="ZYX", scale={"Z": 2.0, "Y": 0.25, "X": 0.25},
                      units={"Z": "µm", "Y": "µm", "X": "µm"})
    viewer = make_napari_viewer()
    for name in ("a.tif", "a.zarr"):
        (layer,) = viewer.open(str(tmp_path / name), plugin="napari-memnet")
        assert isinstance(layer.data, da.Array)
        np.testing.assert_array_equal(np.asarray(layer.data), x)
        np.testing.assert_allclose(layer.scale, (2.0, 0.25, 0.25))
        assert tuple(layer.axis_labels) == ("z", "y", "x")


def test_reader_opens_a_restored_pyramid_as_a_multiscale_layer(make_napari_viewer, user_model, tmp_path, rng):
    import dask.array as da

    x = (rng.random((2, 150, 200)) * 3000).astype(np.uint16)
    out = tmp_path / "r.zarr"
    memnet.restore(x, user_model, output=out, axes="ZYX", tile=32, pyramid=40, device="cpu")
    levels = [zarr.open_group(str(out), mode="r")[str(k)][:] for k in range(4)]
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(out), plugin="napari-memnet")
    assert layer.multiscale and len(layer.data) == 4
    assert [tuple(d.shape) for d in layer.data] == [(2, 150, 200), (2, 75, 100), (2, 38, 50), (2, 19, 25)]
    assert all(isinstance(d, da.Array) for d in layer.data)  # lazy, every level
    for d, want in zip(layer.data, levels):
        np.testing.assert_array_equal(np.asarray(d), want)
    assert tuple(layer.axis_labels) == ("z", "y", "x")
    # Saving the layer writes its full resolution (and a new pyramid).
    viewer.layers.save(str(tmp_path / "s.zarr"), selected=False, plugin="napari-memnet")
    np.testing.assert_array_equal(memnet.open_input(tmp_path / "s.zarr").array[:], levels[0])


def test_writer_round_trips(make_napari_viewer, tmp_path, rng):
    x = (rng.random((2, 30, 40)) * 1000).astype(np.uint16)
    viewer = make_napari_viewer()
    layer = viewer.add_image(x, name="w", scale=(3.0, 0.5, 0.5), axis_labels=("z", "y", "x"))
    for name in ("w.zarr", "w.tif"):
        viewer.layers.save(str(tmp_path / name), selected=False, plugin="napari-memnet")
        src = memnet.open_input(tmp_path / name)
        np.testing.assert_array_equal(np.asarray(src.array[:]), x)
        assert src.axes == "ZYX" and src.scale["Z"] == pytest.approx(3.0) and src.scale["X"] == pytest.approx(0.5)
    assert layer.data is x


def test_finetune_widget_trains_and_the_model_appears_in_restore(make_napari_viewer, qtbot, user_model, rng):
    from napari_memnet._finetune_widget import FinetuneWidget

    viewer = make_napari_viewer()
    yy, xx = np.mgrid[0:64, 0:64] / 64
    clean = np.stack([0.5 + 0.3 * np.sin(5 * xx + 3 * yy + k) for k in range(4)]).astype(np.float32)
    noisy = (clean + rng.normal(0, 0.1, clean.shape)).astype(np.float32)
    viewer.add_image(noisy, name="noisy")
    viewer.add_image(clean, name="clean")
    restore = _widget(viewer)
    _, ft = viewer.window.add_plugin_dock_widget("napari-memnet", "Fine-tune")
    assert isinstance(ft, FinetuneWidget)
    ft._noisy.value = viewer.layers["noisy"]
    ft._mode.value = "paired"
    assert not ft._second.native.isHidden()
    ft._second.value = viewer.layers["clean"]
    ft._model.value = user_model
    ft._name.value = "from-widget"
    ft._steps.value = 40
    ft._patch.value = 24
    worker = ft.start()
    _wait(qtbot, worker, timeout=120_000)
    assert "saved as 'from-widget'" in ft._status.value and "held-out score" in ft._status.value
    assert len(ft.plot.history) >= 2
    assert "from-widget" in [c for c in restore._model.choices]
    restore._model.value = "from-widget"
    # Before/after on the slice on screen: the starting model and the new one, each as a 2-D layer.
    viewer.dims.set_point(0, 2)
    assert ft._compare_btn.enabled
    _wait(qtbot, ft.compare())
    before, after = viewer.layers[f"noisy [{user_model}] before"], viewer.layers["noisy [from-widget] after"]
    assert before.data.shape == after.data.shape == (64, 64)
    np.testing.assert_allclose(before.data, memnet.restore(noisy[2], user_model), atol=1e-6)
    np.testing.assert_allclose(after.data, memnet.restore(noisy[2], "from-widget"), atol=1e-6)
    assert not np.allclose(before.data, after.data)


def test_finetune_widget_offers_self_supervised_modes_with_a_minutes_budget(make_napari_viewer, user_model, rng):
    from memnet.finetune_modes import MODES
    from napari_memnet._finetune_widget import FinetuneWidget

    viewer = make_napari_viewer()
    viewer.add_image(rng.random((3, 64, 64), dtype=np.float32), name="stack")
    ft = FinetuneWidget(viewer)
    assert ft._mode.value == "auto" and set(ft._mode.choices) == {"auto", *MODES}
    assert list(ft._mode.choices)[:3] == ["auto", "nbr2nbr", "n2v2"]  # one noisy layer is enough for the first ones
    assert ft._minutes.value == 5.0 and ft._steps.value == 0  # a time budget; steps only if asked
    for mode in ("nbr2nbr", "n2v2", "n2v", "adjacent", "synthetic"):
        ft._mode.value = mode
        assert ft._second.native.isHidden()
    ft._mode.value = "n2n"
    assert not ft._second.native.isHidden() and ft._second.label == "Second noisy layer"


def test_finetune_widget_reports_when_the_starting_model_stays_better(make_napari_viewer, qtbot, user_model, rng):
    viewer = make_napari_viewer()
    viewer.add_image(rng.random((3, 64, 64), dtype=np.float32), name="noise")
    _, ft = viewer.window.add_plugin_dock_widget("napari-memnet", "Fine-tune")
    ft._model.value = user_model
    ft._name.value = "no-gain"
    ft._steps.value = 10
    ft._patch.value = 16
    import napari_memnet._finetune_widget as fw

    real = fw.FinetuneConfig
    # cannot improve: nothing may be published (and the tiny random model is no denoiser, so its residual
    # says nothing about the noise: no noise check)
    fw.FinetuneConfig = lambda **k: real(**{**k, "lr": 1e-12, "noise_check": False})
    try:
        worker = ft.start()  # the config is made here, before the worker starts
    finally:
        fw.FinetuneConfig = real
    _wait(qtbot, worker, timeout=120_000)
    assert ft._status.value.startswith("not published") and "no-gain" not in [m.name for m in memnet.list_models()]
    assert not ft._compare_btn.enabled


def test_finetune_widget_needs_a_second_layer_for_paired(make_napari_viewer, user_model, rng):
    from napari_memnet._finetune_widget import FinetuneWidget

    viewer = make_napari_viewer()
    viewer.add_image(rng.random((64, 64), dtype=np.float32), name="only")
    ft = FinetuneWidget(viewer)
    ft._mode.value = "paired"
    ft._second.value = viewer.layers["only"]
    assert ft.start() is None and "needs a clean layer" in ft._status.value


def test_super_resolution_layer_geometry(make_napari_viewer, qtbot, tiny_model, _isolated_user_models, rng):
    memnet.save_model(tiny_model, _isolated_user_models / "sr.safetensors", name="tiny-sr", task="sr")
    viewer = make_napari_viewer()
    data = rng.random((2, 20, 30), dtype=np.float32)
    viewer.add_image(data, name="lr", scale=(3.0, 0.4, 0.4), translate=(0.0, 10.0, 20.0))
    w = _widget(viewer)
    w._model.value = "tiny-sr"
    w._scale.value = 2
    _wait(qtbot, w.start())
    out = viewer.layers["lr [tiny-sr]"]
    assert out.data.shape == (2, 40, 60)
    np.testing.assert_allclose(out.scale, (3.0, 0.2, 0.2))
    # The upscaled grid's first pixel centre sits a quarter input pixel before the input's.
    np.testing.assert_allclose(out.translate, (0.0, 10.0 - 0.1, 20.0 - 0.1))
    np.testing.assert_allclose(out.data, memnet.restore(data, "tiny-sr", scale=2, device="cpu"), atol=1e-5)
    assert out.metadata["memnet_options"]["scale"] == 2 and "done" in w._status.value


def test_export_widget_writes_onnx_and_follows_the_format(make_napari_viewer, qtbot, user_model, tmp_path, rng):
    import onnxruntime as ort

    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-memnet", "Export model")
    w._model.value = user_model
    w._path.value = tmp_path / "tiny.zip"
    w._format.value = "onnx"
    assert Path(str(w._path.value)).name == "tiny.onnx"  # the file name follows the format
    _wait(qtbot, w.start())
    assert w._status.value.startswith("wrote ") and w._export_btn.enabled
    x = rng.random((1, 1, 40, 48), dtype=np.float32)
    model, _ = memnet.load_model(user_model)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(tmp_path / "tiny.onnx")).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.ptp(ref)
    before = (tmp_path / "tiny.onnx").stat().st_mtime_ns
    assert w.start() is None and "exists" in w._status.value  # nothing is replaced unless asked
    w._overwrite.value = True
    _wait(qtbot, w.start())
    assert w._status.value.startswith("wrote ") and (tmp_path / "tiny.onnx").stat().st_mtime_ns != before
