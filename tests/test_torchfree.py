"""The CPU path on ONNX Runtime without torch (issues #33, #34): weights read as numpy, folded and written as an
ONNX graph in numpy, run on numpy batches; equal to the torch model and to the torch ONNX Runtime path; a restore
on it never imports torch; "auto" still goes to torch where a GPU may be there."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import memnet
from memnet import kernel, ortgraph, runtime
from memnet.arch import Weights, state_shapes
from memnet.inference import fold, onnx_bytes
from memnet.runner import OrtRunner, Runner
from memnet.zoo import load_model, load_weights

pytestmark = pytest.mark.skipif(not ortgraph.onnxruntime_available(), reason="needs onnx and onnxruntime")

CONTEXT_FILE = Path(__file__).parents[1] / "training" / "microscopy-context-M4R4C32.safetensors"


def _weights(model) -> Weights:
    return Weights(model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()})


def _rel(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(y - ref).max() / (ref.max() - ref.min()))


def _session(graph: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(graph, providers=["CPUExecutionProvider"])


MODELS = {"2-D": ((2, 3, 8), {}), "context, 2 channels": ((1, 2, 6), {"context": 1, "in_channels": 2,
                                                                          "out_channels": 2})}


@pytest.mark.parametrize("config", [memnet.MemNetConfig(2, 3, 8), memnet.MemNetConfig(1, 2, 6, 2, 2, 1),
                                    memnet.CONFIGS["M4R4C32"]])
def test_the_state_shapes_are_the_modules(config):
    want = {k: tuple(v.shape) for k, v in memnet.MemNet(**config.as_dict()).state_dict().items()}
    assert state_shapes(config) == want


@pytest.mark.parametrize("name", MODELS)
def test_numpy_folding_equals_torch_folding(random_model, name):
    arch, kw = MODELS[name]
    m = random_model(*arch, seed=3, **kw, dtype=torch.float32)
    ref = {k: v.numpy() for k, v in fold(m).state_dict().items() if not k.endswith("num_batches_tracked")}
    got = ortgraph.fold_state(m.config, _weights(m).tensors)
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == np.float32 and got[k].shape == ref[k].shape, k
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("name", MODELS)
def test_the_numpy_graph_equals_the_eager_model_and_torchs_export(random_model, name):
    """The graph written from numpy weights, against the eager (unfolded) model and against the folded model
    exported by torch's own exporter (the reference), on random inputs."""
    arch, kw = MODELS[name]
    m = random_model(*arch, seed=5, **kw, dtype=torch.float32)
    x = np.random.default_rng(0).random((2, m.config.in_channels * m.config.planes, 33, 27), dtype=np.float32)
    got = _session(ortgraph.graph_bytes(m.config, ortgraph.fold_state(m.config, _weights(m).tensors))).run(
        None, {"input": x})[0]
    with torch.no_grad():
        eager = m(torch.from_numpy(x)).numpy()
    exported = _session(onnx_bytes(fold(m))).run(None, {"input": x})[0]
    assert got.shape == eager.shape
    assert _rel(got, eager) < 1e-5 and _rel(got, exported) < 1e-5


@pytest.mark.skipif(not CONTEXT_FILE.exists(), reason="the trained context model is not in this checkout")
def test_the_trained_context_model_on_numpy_equals_its_torch_model():
    weights, _ = load_weights(CONTEXT_FILE)
    model, _ = load_model(CONTEXT_FILE)
    x = np.random.default_rng(1).random((1, weights.config.planes, 48, 40), dtype=np.float32)
    got = OrtRunner(weights)(x)
    with torch.no_grad():
        eager = model(torch.from_numpy(x)).numpy()[:, 0]
    assert _rel(got, eager) < 1e-5


@pytest.mark.parametrize("ensemble", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_the_numpy_runner_is_bit_identical_to_the_torch_runner(random_model, name, ensemble):
    """Same batches through `OrtRunner` (numpy weights) and `Runner` (the torch module, backend onnxruntime):
    the same floats, the x8 self-ensemble included."""
    arch, kw = MODELS[name]
    m = random_model(*arch, seed=7, **kw, dtype=torch.float32)
    if m.config.in_channels != 1:  # the runners take single-channel windows (the engine runs channels apart)
        m = random_model(1, 2, 6, seed=7, context=1, dtype=torch.float32)
    planes = m.config.planes
    batch = np.random.default_rng(2).random((3, planes, 40, 36) if planes > 1 else (3, 40, 36), dtype=np.float32)
    torch_runner = Runner(m, torch.device("cpu"), ensemble=ensemble, backend="onnxruntime")
    ort_runner = OrtRunner(_weights(m), ensemble=ensemble)
    assert ort_runner.backend == torch_runner.backend == "onnxruntime"
    a, b = torch_runner(batch), ort_runner(batch)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (3, 40, 36)
    assert np.array_equal(a, b)


def test_a_restore_on_the_numpy_path_equals_the_torch_path(user_model, monkeypatch, rng):
    """The same restore, once on `runtime.CPU` (numpy weights, OrtRunner) and once forced onto torch (a torch
    device, the torch Runner): the same output, bit for bit, and the same batch and tile."""
    data = (rng.random((2, 70, 90)) * 4000).astype(np.uint16)
    light = kernel.prepare(data, user_model, device="cpu")
    assert isinstance(light.runner, OrtRunner) and light.runner.device is runtime.CPU
    got = memnet.restore(data, user_model, device="cpu", tile=32)
    monkeypatch.setattr(kernel, "cpu_without_torch", lambda device: False)
    heavy = kernel.prepare(data, user_model, device="cpu")
    assert isinstance(heavy.runner, Runner) and heavy.runner.backend == "onnxruntime"
    assert kernel.resolve_batch(light) == kernel.resolve_batch(heavy) and light.options == heavy.options
    assert np.array_equal(got, memnet.restore(data, user_model, device="cpu", tile=32))


_NO_TORCH = r"""
import sys, numpy as np, memnet, memnet.cli
from memnet.runtime import gpu_possible
data = (np.random.default_rng(0).random((3, 50, 60)) * 4000).astype(np.uint16)
out = sys.argv[1]
memnet.restore(data, "microscopy", output=out + "/a.zarr", device="auto")
plane = memnet.restore_plane(data, "microscopy", (1,), device="cpu")
lazy = memnet.restore(data, "microscopy", lazy=True, device="cpu").compute(scheduler="synchronous")
assert np.array_equal(lazy[1], plane)
memnet.save_image(data, out + "/in.tif", axes="ZYX")
assert memnet.cli.main(["restore", out + "/in.tif", "-o", out + "/b.tif", "--model", "microscopy", "-q"]) == 0
print(gpu_possible(), "torch" in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:3])
"""


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_a_restore_on_the_cpu_imports_no_torch(tmp_path, cache):
    """API (to a Zarr), a preview plane, a lazy dask array and `memnet restore` (CLI) on ONNX Runtime: torch is
    never imported, with an empty graph cache (the graph written from numpy) and with the graph cached."""
    src = str(Path(memnet.__file__).parents[1])
    env = {**os.environ, "MEMNET_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": src}
    runs = 2 if cache == "warm" else 1
    for i in range(runs):
        out = tmp_path / f"run{i}"
        out.mkdir()
        r = subprocess.run([sys.executable, "-c", _NO_TORCH, str(out)], capture_output=True, text=True, env=env,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.split() == ["False", "False", "[]"], r.stdout
        graphs = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
        assert len(graphs) == 1  # written by the first run, read by the second


@pytest.mark.parametrize("platform,build,nodes,gpu", [
    ("linux", {"cuda": False, "hip": False}, ["/dev/nvidia0"], False),  # a CPU-only torch cannot use a GPU
    ("linux", {"cuda": True, "hip": False}, [], False),                 # CUDA torch, no NVIDIA device
    ("linux", {"cuda": True, "hip": False}, ["/dev/nvidia0"], True),
    ("linux", {"cuda": True, "hip": False}, ["/dev/dxg"], True),        # WSL 2
    ("linux", {"cuda": False, "hip": True}, ["/dev/kfd"], True),        # ROCm
    ("linux", {"cuda": False, "hip": True}, ["/dev/nvidia0"], False),
    ("win32", {"cuda": True, "hip": False}, [], True),                  # no cheap test: torch decides
    ("darwin", {"cuda": False, "hip": False}, [], True),                # MPS: torch decides
    ("linux", None, [], False),                                         # no torch installed
])
def test_auto_goes_to_torch_wherever_a_gpu_may_be(monkeypatch, platform, build, nodes, gpu):
    monkeypatch.setattr(runtime.sys, "platform", platform)
    monkeypatch.setattr(runtime, "_torch_build", lambda: build)
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: None)  # build None: not installed
    monkeypatch.setattr(runtime.Path, "exists", lambda p: str(p) in nodes)
    assert runtime.gpu_possible() is gpu
    assert runtime.cpu_without_torch("auto") is (not gpu)
    assert runtime.cpu_without_torch("cpu") and not runtime.cpu_without_torch("cuda")


def test_a_gpu_machine_asks_torch_and_an_explicit_backend_keeps_torch(random_model, monkeypatch, user_model):
    """Where a GPU may be, "auto" is torch's choice (never the CPU without asking); eager, compile and a given
    module always run on torch."""
    asked = []
    monkeypatch.setattr(kernel, "cpu_without_torch", lambda device: device == "cpu")
    monkeypatch.setattr(kernel, "resolve_device", lambda device: asked.append(device) or torch.device("cpu"))
    opts = memnet.RestoreOptions
    assert kernel.pick_device(user_model, opts(device="auto")) == torch.device("cpu") and asked == ["auto"]
    assert kernel.pick_device(user_model, opts(device="cpu")) is runtime.CPU
    assert kernel.pick_device(user_model, opts(device="cpu", backend="eager")) == torch.device("cpu")
    assert kernel.pick_device(random_model(1, 1, 4, 0, dtype=torch.float32), opts(device="cpu")) == torch.device("cpu")


def test_the_runtime_reads_torchs_build_from_its_version_file():
    build = runtime._torch_build()
    assert build == {"cuda": torch.version.cuda is not None, "hip": torch.version.hip is not None,
                     "xpu": getattr(torch.version, "xpu", None) is not None}


def test_int8_on_numpy_weights_equals_the_torch_runners_int8(random_model, tmp_path, monkeypatch):
    """onnxruntime-int8 on numpy weights: its graph is traced and quantized with torch the first time (then cached);
    the torch Runner, in a fresh session cache, reads the same graph back and gives the same floats."""
    m = random_model(1, 2, 6, seed=9, dtype=torch.float32)
    batch = np.random.default_rng(3).random((2, 40, 36), dtype=np.float32)
    monkeypatch.setattr(ortgraph, "_BUILT", type(ortgraph._BUILT)())
    got = OrtRunner(_weights(m), backend="onnxruntime-int8")(batch)
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1  # the conftest's MEMNET_CACHE_DIR
    ortgraph._BUILT.clear()
    ref = Runner(m, torch.device("cpu"), backend="onnxruntime-int8")(batch)
    assert np.array_equal(got, ref)
    fp32 = OrtRunner(_weights(m))(batch)
    assert 0 < _rel(got, fp32) < 0.1  # int8 arithmetic: close to fp32, not equal
