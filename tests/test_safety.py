"""Nothing lost, nothing silently wrong (issue #26, docs/reliability.md): outputs that overlap inputs,
concurrent runs, non-finite results, hostile weights, devices, messages. The input is checked by hash."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

import memnet
from memnet.cli import main


@pytest.fixture
def micro_file(tiny_model, tmp_path):
    p = tmp_path / "micro.safetensors"
    memnet.save_model(tiny_model, p, name="micro", task="microscopy",
                      metadata={"normalization": {"mode": "percentile", "low": 1, "high": 99.8}})
    return p


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _restore(args, capsys):
    rc = main(["restore", *map(str, args), "--device", "cpu", "-q"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--halo", "abc", "argument --halo: expected 'exact' or a whole number of pixels >= 0, got 'abc'"),
    ("--halo", "1.5", "argument --halo: expected 'exact' or a whole number of pixels >= 0, got '1.5'"),
    ("--batch-size", "abc", "argument --batch-size: expected 'auto' or a whole number of tiles >= 1, got 'abc'"),
    ("--tile", "8", "argument --tile: expected a tile size in pixels >= 16, got '8'"),
    ("--scale", "5", "argument --scale: expected a super-resolution factor of 2, 3 or 4, got '5'"),
    ("--workers", "0", "argument --workers: expected a number of workers >= 1, got '0'"),
])
def test_restore_options_name_themselves_and_what_they_accept(option, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["restore", "in.tif", "-o", "out.zarr", option, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_finetune_refuses_a_negative_step_count(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--model", "microscopy", "--mode", "n2v", "--data", "x.tif", "-o", "m", "--steps", "-3"])
    assert e.value.code == 2 and "argument --steps: expected a number of steps >= 1, got '-3'" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["mps", "xpu", "cuda:7"])
def test_an_unavailable_device_is_a_clean_error_listing_what_is_available(device, micro_file, tmp_path, capsys):
    if device.split(":")[0] in memnet.engine.available_devices():
        pytest.skip(f"{device} exists on this machine")
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.zeros((20, 20), np.uint16))
    rc = main(["restore", str(src), "-o", str(tmp_path / "o.tif"), "--model", str(micro_file), "--device", device])
    err = capsys.readouterr().err
    assert rc == 2 and f"device '{device}' requested but" in err and "available: auto, cpu" in err
    assert "Traceback" not in err


def test_python_dash_m_memnet_is_the_command_line():
    r = subprocess.run([sys.executable, "-m", "memnet", "restore", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--resume" in r.stdout


def test_a_nan_in_the_weights_fails_the_run_and_marks_nothing_complete(tiny_model, tmp_path, capsys):
    broken = memnet.MemNet(2, 2, 8)
    broken.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        broken.recon_conv.weight.view(-1)[0] = float("nan")
    x = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in plane \(\), rows 0:32, columns 0:32.*weights"):
        memnet.restore(x, broken.eval(), tile=32, device="cpu")
    out = tmp_path / "o.zarr"
    with pytest.raises(FloatingPointError):
        memnet.restore(x, broken.eval(), output=out, tile=32, device="cpu")
    assert zarr.open_group(str(out), mode="r").attrs["memnet"]["complete"] is False


def test_an_overflowing_input_is_an_error_not_an_all_nan_result(tiny_model):
    with pytest.raises(FloatingPointError, match="overflows the model"):
        memnet.restore(np.full((30, 30), 1e38, np.float32), tiny_model, device="cpu")


@pytest.mark.parametrize("value", [1e30, -3e25, 7.0, 0.0])
def test_constant_float_images_of_any_magnitude_stay_finite(micro_file, value):
    out = memnet.restore(np.full((30, 30), value, np.float32), micro_file, device="cpu")
    assert np.isfinite(out).all() and out.dtype == np.float32
    # At its level: the span is the magnitude, so the (random) tiny model's response to a flat 0 input,
    # about 1 % of the span, is all that moves it.
    np.testing.assert_allclose(out, value, rtol=0.05, atol=0.05)
