"""The Export widget in a real napari viewer (Xvfb): only formats that can run, one-line mistakes."""

import pytest

import napari_memnet._export_widget as ew


def _formats(w) -> list:
    return [c[1] if isinstance(c, tuple) else c for c in w._format.choices]


def test_every_installed_format_is_offered_and_bioimageio_first(dock, monkeypatch):
    monkeypatch.setattr(ew, "format_available", lambda fmt: True)
    _, w = dock("Export model")
    assert _formats(w) == ["bioimageio", "onnx", "torchscript"] and w._format.value == "bioimageio"
    assert w._hint.native.isHidden()


def test_a_format_without_its_libraries_is_not_offered_and_the_widget_says_how_to_get_it(dock, monkeypatch):
    monkeypatch.setattr(ew, "format_available", lambda fmt: fmt != "bioimageio")
    _, w = dock("Export model")
    assert _formats(w) == ["onnx", "torchscript"] and w._format.value == "onnx"
    assert not w._hint.native.isHidden()
    assert w._hint.value == 'bioimage.io export: pip install "napari-memnet[export]", then restart napari'


def test_the_availability_check_looks_for_the_libraries(monkeypatch):
    import importlib.util

    found = {"onnx"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in found else None)
    assert ew.format_available("onnx") and ew.format_available("torchscript")
    assert not ew.format_available("bioimageio")
    found |= {"bioimageio.spec", "bioimageio.core"}
    assert ew.format_available("bioimageio")


def test_a_name_without_an_ending_gets_the_formats_and_a_wrong_one_is_one_line(dock, wait_worker, user_model,
                                                                               tmp_path, qtbot):
    _, w = dock("Export model")
    w._model.value = user_model
    w._format.value = "torchscript"
    w._path.value = tmp_path / "pkg.onnx"  # the format's ending follows a later format change only
    w._path.value = tmp_path / "pkg.zip"
    assert w.start() is None and w._status.value == "a TorchScript export is a .pt file: save as pkg.pt"
    w._path.value = tmp_path / "noext"
    with qtbot.capture_exceptions() as raised:
        wait_worker(w.start())
    assert raised == [] and (tmp_path / "noext.pt").exists() and w._status.value.startswith("wrote ")


def test_an_existing_file_is_one_line_with_a_free_name(dock, wait_worker, user_model, tmp_path, qtbot):
    _, w = dock("Export model")
    w._model.value = user_model
    w._format.value = "torchscript"
    (tmp_path / "m.pt").write_bytes(b"old")
    w._path.value = tmp_path / "m.pt"
    assert w.start() is None
    assert w._status.value == "m.pt exists: tick 'Replace existing' to replace it, or save as m-2.pt"
    # the same words when memnet refuses (the file appeared after the check), with nothing raised
    from memnet.export import export_model

    with qtbot.capture_exceptions() as raised:
        wait_worker(w._job.start(lambda p, c: export_model(user_model, tmp_path / "m.pt", "torchscript"),
                                 w._on_done))
    assert raised == [] and w._status.value.startswith("m.pt exists: tick 'Replace existing'")
    assert (tmp_path / "m.pt").read_bytes() == b"old"


@pytest.mark.skipif(not ew.format_available("bioimageio"), reason="bioimageio.spec/core not installed")
def test_the_default_format_runs_when_offered(dock, wait_worker, user_model, tmp_path, qtbot):
    _, w = dock("Export model")
    assert w._format.value == "bioimageio"
    w._model.value = user_model
    w._path.value = tmp_path / "pkg"
    with qtbot.capture_exceptions() as raised:
        wait_worker(w.start(), timeout=180_000)
    assert raised == [], w._status.value
    assert w._status.value.startswith("wrote ") and (tmp_path / "pkg.zip").exists()
    assert (tmp_path / "pkg.zip").stat().st_size > 1000
