"""The int8 CPU backend (onnxruntime-int8): it runs, the tiled engine equals whole-image inference on it, and it
stays close to the fp32 backend; its calibration data is made locally and deterministically."""

import numpy as np
import pytest
import torch

import memnet
from memnet.inference import calibration_inputs, choose_backend, make_backend, onnxruntime_available

pytestmark = pytest.mark.skipif(not onnxruntime_available(), reason="needs onnx and onnxruntime")
CPU = torch.device("cpu")


def _rel(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(y - ref).max() / (ref.max() - ref.min()))


def test_calibration_inputs_are_deterministic_normalised_and_shaped_for_the_model():
    cfg = memnet.CONFIGS["M4R4C32"]
    a, b = calibration_inputs(cfg, count=5, size=64), calibration_inputs(cfg, count=5, size=64)
    assert len(a) == 5 and all(x.shape == (1, 64, 64) and x.dtype == np.float32 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # every user gets the same model
    lo, hi = np.percentile(np.stack(a), [1, 99.8])
    assert -0.5 < lo < 0.2 and 0.8 < hi < 1.5  # the percentile frame restore puts microscopy inputs in
    ctx = memnet.MemNetConfig(blocks=1, recursions=1, channels=4, context=1)
    assert calibration_inputs(ctx, count=3, size=32)[0].shape == (3, 32, 32)  # 2k+1 planes for a context model


def test_int8_is_a_cpu_backend_that_auto_never_picks():
    assert choose_backend("onnxruntime-int8", CPU) == "onnxruntime-int8"
    assert choose_backend("auto", CPU) == "onnxruntime"
    with pytest.raises(ValueError, match="runs on the CPU"):
        choose_backend("onnxruntime-int8", torch.device("cuda"))
    assert memnet.RestoreOptions(backend="onnxruntime-int8").backend == "onnxruntime-int8"


def test_int8_tiled_equals_whole_image_and_stays_near_fp32(tiny_model, rng):
    data = rng.random((2, 150, 130), dtype=np.float32)
    fn, name = make_backend(tiny_model, CPU, "onnxruntime-int8")
    assert name == "onnxruntime-int8"
    assert make_backend(tiny_model, CPU, "onnxruntime-int8")[0] is fn  # built (and calibrated) once
    with torch.no_grad():
        whole = np.stack([fn(torch.from_numpy(p)[None, None])[0, 0].numpy() for p in data])
        fp32 = np.stack([make_backend(tiny_model, CPU, "onnxruntime")[0](torch.from_numpy(p)[None, None])[0, 0]
                         .numpy() for p in data])
    # each backend is a fixed function of its window: exact tiling holds for int8 as for fp32
    tiled = memnet.restore(data, tiny_model, tile=48, device="cpu", backend="onnxruntime-int8")
    assert _rel(tiled, whole) < 1e-5
    assert 0 < _rel(whole, fp32) < 0.05  # really quantized, and within 5% of the range of fp32 everywhere


@pytest.mark.slow
def test_the_microscopy_model_in_int8_stays_near_fp32_on_a_noisy_fluorescence_image():
    from memnet.degrade import camera_noise
    from memnet.synthstack import simulate_stack

    model, _ = memnet.load_model("microscopy")
    rng = np.random.default_rng(123)  # not the calibration seed
    x, _ = camera_noise(simulate_stack(rng, planes=1, size=160).clean[0], rng)
    t = torch.from_numpy(x.astype(np.float32))[None, None]
    with torch.no_grad():
        ref = make_backend(model, CPU, "onnxruntime")[0](t)[0, 0].numpy()
        got = make_backend(model, CPU, "onnxruntime-int8")[0](t)[0, 0].numpy()
    rms = float(np.sqrt(np.mean((got - ref) ** 2)) / (ref.max() - ref.min()))
    # measured: rms 1.0 % and max 5.3 % of the output range (it costs W2S 0.6 dB: docs/performance.md)
    assert 0 < rms < 0.02 and _rel(got, ref) < 0.1


def test_validation_can_run_a_model_on_a_backend(tiny_model, rng):
    from memnet.evaluate import predictor

    x = rng.random((40, 52), dtype=np.float32)
    ref = predictor(tiny_model)(x)
    assert _rel(predictor(tiny_model, backend="onnxruntime")(x), ref) < 1e-5
    assert 0 < _rel(predictor(tiny_model, backend="onnxruntime-int8")(x), ref) < 0.05  # what `memnet eval
    # --backend onnxruntime-int8` scores: the quantized model, not the float one


def test_a_resume_never_mixes_int8_and_float_tiles(tiny_model, rng, tmp_path):
    data = rng.random((2, 90, 70), dtype=np.float32)
    out = tmp_path / "o.zarr"
    memnet.restore(data, tiny_model, output=out, tile=48, device="cpu", backend="onnxruntime")
    memnet.restore(data, tiny_model, output=out, tile=48, device="cpu", backend="eager", resume=True)  # same function
    with pytest.raises(ValueError, match="arithmetic: 'float' then, 'int8' now"):
        memnet.restore(data, tiny_model, output=out, tile=48, device="cpu", backend="onnxruntime-int8", resume=True)
