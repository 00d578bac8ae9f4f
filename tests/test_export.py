"""memnet export: ONNX (run in onnxruntime) and TorchScript match the PyTorch model on any tile size; bioimage.io
packages pass bioimageio.core's own model test."""

import json
import sys

import numpy as np
import pytest
import torch

import memnet
from memnet.cli import main
from memnet.export import export_model
from memnet.normalize import Normalizer


def _reference(model, x):
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_onnx_export_matches_pytorch_in_onnxruntime(tiny_model, micro_file, tmp_path, rng, capsys):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "tiny.onnx"
    assert main(["export", str(micro_file), "-o", str(out)]) == 0 and "wrote" in capsys.readouterr().out
    x = rng.random((2, 1, 45, 70)).astype(np.float32)  # not the size it was traced with
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, _reference(tiny_model.eval(), x), atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["memnet_task"] == "microscopy" and json.loads(meta["memnet_normalization"])["mode"] == "percentile"
    assert int(meta["memnet_receptive_field_px"]) == memnet.receptive_field(tiny_model)


def test_torchscript_export_matches_pytorch(tiny_model, micro_file, tmp_path, rng):
    out = export_model(micro_file, tmp_path / "tiny.pt", "torchscript")
    files = {"memnet.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=files)
    x = rng.random((1, 1, 33, 52)).astype(np.float32)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(torch.from_numpy(x)).numpy(), _reference(tiny_model.eval(), x), atol=1e-5)
    assert json.loads(files["memnet.json"])["memnet_name"] == "tiny-micro"


def test_an_exported_sr_model_upscales_as_the_engine_does(tiny_model, tmp_path, rng):
    p = tmp_path / "sr.safetensors"
    memnet.save_model(tiny_model, p, name="tiny-sr", task="sr")
    out = export_model(p, tmp_path / "sr.pt", "torchscript", scale=3)
    x = rng.random((20, 30)).astype(np.float32)
    with torch.inference_mode():
        y = torch.jit.load(str(out))(torch.from_numpy(x)[None, None]).numpy()
    assert y.shape == (1, 1, 60, 90)
    # Pillow's bicubic in the graph, borders included: the engine's result to float precision
    np.testing.assert_allclose(y[0, 0], memnet.restore(x, p, scale=3), atol=1e-5)
    with pytest.raises(ValueError, match="give the factor to build in"):
        export_model(p, tmp_path / "sr2.pt", "torchscript")


def test_export_errors_name_the_problem(micro_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", str(micro_file), "-o", str(tmp_path / "x.onnx"), "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert main(["export", str(micro_file), "-o", str(tmp_path / "x.onnx"), "--scale", "2"]) == 2
    assert "--scale applies to super-resolution models; tiny-micro is a 'microscopy' model" in capsys.readouterr().err


def test_export_never_overwrites_unless_asked(micro_file, tmp_path, capsys):
    out = tmp_path / "x.pt"
    out.write_bytes(b"keep")
    assert main(["export", str(micro_file), "-o", str(out), "--format", "torchscript"]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main(["export", str(micro_file), "-o", str(out), "--format", "torchscript", "--overwrite"]) == 0



# --- bioimage.io packages: built with bioimageio.spec, tested by bioimageio.core's own model test ---

def _passed(package) -> set[str]:
    """bioimageio.core's test of a package: asserts it passed; returns the weight formats it ran."""
    from bioimageio.core import test_model

    summary = test_model(package)
    failed = [f"{d.name}: {[e.msg for e in d.errors]}" for d in summary.details if d.status != "passed"]
    assert summary.status == "passed", failed
    return {d.loc[1] for d in summary.details if d.name.startswith("Reproduce test outputs")}


@pytest.mark.slow
def test_bioimageio_package_passes_bioimageio_core(tiny_model, micro_file, tmp_path, capsys):
    import tifffile
    from bioimageio.core import predict
    from bioimageio.spec import load_description

    sample = tmp_path / "stack.tif"  # the user's sample: a stack, its middle plane is used
    tifffile.imwrite(sample, np.random.default_rng(1).poisson(40, (3, 100, 120)).astype(np.uint16) + 100)
    out = tmp_path / "tiny.zip"
    assert main(["export", str(micro_file), "--format", "bioimageio", "-o", str(out), "--sample", str(sample)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert _passed(out) == {"onnx", "torchscript"}  # test tensors (ours) rerun through both weight formats
    descr = load_description(out)
    (inp,), (outp,) = descr.inputs, descr.outputs
    assert [a.type for a in inp.axes] == ["batch", "channel", "space", "space"]
    pre = inp.preprocessing[1]
    assert pre.id == "scale_range" and (pre.kwargs.min_percentile, pre.kwargs.max_percentile) == (1.0, 99.8)
    radius = memnet.receptive_field(tiny_model)
    assert [a.halo for a in outp.axes[2:]] == [radius, radius]
    assert np.load(inp.test_tensor.get_reader()).shape == (1, 1, 80, 80)
    readme = descr.documentation.get_reader().read().decode()
    assert "10.1109/ICCV.2017.486" in readme and "normalised" in readme
    # The halo is enough: bioimageio.core's tiles stitch to memnet restore's result, away from the image
    # border (there core pads the image, memnet restore does not).
    big = np.random.default_rng(2).poisson(40, (1, 1, 208, 176)).astype(np.float32) + 100
    got = predict(model=str(out), inputs=big, blocksize_parameter=1).members["output"].data.to_numpy()[0, 0]
    raw = big[0, 0].astype(np.float64)
    norm = Normalizer.for_data(raw, {"mode": "percentile", "low": 1, "high": 99.8})
    want = norm.forward(memnet.restore(raw, micro_file))
    np.testing.assert_allclose(got[radius:-radius, radius:-radius], want[radius:-radius, radius:-radius], atol=1e-5)


@pytest.mark.slow
def test_bioimageio_sr_package_outputs_the_upscaled_size(tiny_model, tmp_path):
    from bioimageio.spec import load_description

    p = tmp_path / "sr.safetensors"
    memnet.save_model(tiny_model, p, name="tiny-sr", task="sr")
    out = export_model(p, tmp_path / "sr.zip", "bioimageio", scale=2)
    assert _passed(out) == {"onnx", "torchscript"}
    descr = load_description(out)
    x, y = (np.load(t.test_tensor.get_reader()) for t in (descr.inputs[0], descr.outputs[0]))
    assert x.dtype == np.uint8 and y.shape[2:] == (2 * x.shape[2], 2 * x.shape[3])  # output = input x scale
    assert [a.scale for a in descr.outputs[0].axes[2:]] == [0.5, 0.5]


@pytest.mark.slow
def test_shipped_microscopy_model_as_bioimageio_package(tmp_path, capsys):
    out = tmp_path / "microscopy.zip"
    assert main(["export", "microscopy", "--format", "bioimageio", "-o", str(out)]) == 0
    assert _passed(out) == {"onnx", "torchscript"}


def test_bioimageio_export_without_the_spec_says_what_to_install(micro_file, tmp_path, monkeypatch, capsys):
    for name in ("bioimageio", "bioimageio.spec"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["export", str(micro_file), "--format", "bioimageio", "-o", str(tmp_path / "t.zip")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'napari-memnet[export]'" in err and "bioimageio.spec" in err
    assert main(["export", str(micro_file), "--format", "bioimageio", "-o", str(tmp_path / "t.onnx")]) == 2
    assert "a bioimage.io package is a .zip file" in capsys.readouterr().err
    assert not list(tmp_path.glob("*t*partial*"))


@pytest.mark.parametrize("fmt, name, message", [
    ("torchscript", "x.onnx", "--format torchscript writes torchscript, but x.onnx is named like onnx: name it e.g. "
                              "x.pt, or pass --format onnx"),
    ("onnx", "x.pt", "--format onnx writes onnx, but x.pt is named like torchscript: name it e.g. x.onnx, or pass "
                     "--format torchscript"),
    ("onnx", "x.bin", "--format onnx writes onnx, but x.bin has no onnx suffix: name it e.g. x.onnx"),
    ("bioimageio", "x.onnx", "a bioimage.io package is a .zip file: name the output e.g. x.zip"),
])
def test_export_format_and_suffix_must_agree(fmt, name, message, micro_file, tmp_path, capsys):
    """Issue #32, item 11: a file never holds another format than its name says."""
    out = tmp_path / name
    assert main(["export", str(micro_file), "-o", str(out), "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [micro_file]


def test_export_format_follows_the_suffix_when_not_given(micro_file, tmp_path, capsys):
    out = tmp_path / "x.pt"
    assert main(["export", str(micro_file), "-o", str(out)]) == 0
    assert torch.jit.load(str(out)) is not None  # TorchScript, as the name says
    assert main(["export", str(micro_file), "-o", str(tmp_path / "x.bin")]) == 2
    assert "cannot tell the export format from 'x.bin'" in capsys.readouterr().err
