"""memnet export: ONNX (run in onnxruntime) and TorchScript match the PyTorch model on any tile size."""

import json

import numpy as np
import pytest
import torch

import memnet
from memnet.cli import main
from memnet.export import export_model


@pytest.fixture
def tiny_file(tiny_model, tmp_path):
    p = tmp_path / "tiny.safetensors"
    memnet.save_model(tiny_model, p, name="tiny-micro", task="microscopy",
                      metadata={"normalization": {"mode": "percentile", "low": 1, "high": 99.8}})
    return p


def _reference(model, x):
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_onnx_export_matches_pytorch_in_onnxruntime(tiny_model, tiny_file, tmp_path, rng, capsys):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "tiny.onnx"
    assert main(["export", str(tiny_file), "-o", str(out)]) == 0 and "wrote" in capsys.readouterr().out
    x = rng.random((2, 1, 45, 70)).astype(np.float32)  # not the size it was traced with
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, _reference(tiny_model.eval(), x), atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["memnet_task"] == "microscopy" and json.loads(meta["memnet_normalization"])["mode"] == "percentile"
    assert int(meta["memnet_receptive_field_px"]) == memnet.receptive_field(tiny_model)


def test_torchscript_export_matches_pytorch(tiny_model, tiny_file, tmp_path, rng):
    out = export_model(tiny_file, tmp_path / "tiny.pt", "torchscript")
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


def test_export_errors_name_the_problem(tiny_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", str(tiny_file), "-o", str(tmp_path / "x.onnx"), "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert main(["export", str(tiny_file), "-o", str(tmp_path / "x.onnx"), "--scale", "2"]) == 2
    assert "--scale applies to super-resolution models; tiny-micro is a 'microscopy' model" in capsys.readouterr().err


def test_export_never_overwrites_unless_asked(tiny_file, tmp_path, capsys):
    out = tmp_path / "x.pt"
    out.write_bytes(b"keep")
    assert main(["export", str(tiny_file), "-o", str(out), "--format", "torchscript"]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main(["export", str(tiny_file), "-o", str(out), "--format", "torchscript", "--overwrite"]) == 0

