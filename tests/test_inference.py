"""The inference form (BN folding) and its backends equal the trained model; the automatic tile."""

import numpy as np
import pytest
import torch

import memnet
from memnet.inference import choose_backend, fold, make_backend, onnxruntime_available
from memnet.memory import default_tile
from memnet.zoo import list_models, load_model

CPU = torch.device("cpu")


def _rel(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(y - ref).max() / (ref.max() - ref.min()))


@pytest.mark.parametrize("arch,seed", [((1, 1, 4), 0), ((2, 3, 8), 1), ((3, 2, 6), 2)])
def test_folding_is_exact_in_float64(random_model, arch, seed):
    m = random_model(*arch, seed)
    x = torch.rand(2, 1, 37, 29, dtype=torch.float64)
    with torch.no_grad():
        ref, got = m(x), fold(m)(x)
    assert _rel(got, ref) < 1e-12
    # folding leaves the trained model as it was, and the folded form really has fewer BNs
    n_bn = sum(isinstance(t, torch.nn.BatchNorm2d) for t in m.modules())
    n_folded = sum(isinstance(t, torch.nn.BatchNorm2d) for t in fold(m).modules())
    # the gate's BN is split per memory (m + R of them in block m): the R BNs after conv_a are gone
    m_, r_ = arch[0], arch[1]
    assert n_folded == n_bn - m_ * r_ - m_ + sum(m + r_ for m in range(1, m_ + 1))
    assert max(t.num_features for t in fold(m).modules() if isinstance(t, torch.nn.BatchNorm2d)) == arch[2]
    assert m.training is False and isinstance(m.blocks[0].conv_a, torch.nn.Conv2d)


def _backends():
    names = ["eager"] + (["onnxruntime"] if onnxruntime_available() else [])
    return names + [pytest.param("compile", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", _backends())
def test_each_backend_equals_the_float64_model_to_1e_5_of_the_range(random_model, backend):
    m = random_model(2, 2, 8, seed=3)
    x = torch.rand(3, 1, 40, 52, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x).numpy()
        fn, name = make_backend(m.float(), CPU, backend)
        assert name == backend
        got = fn(x.float().contiguous(memory_format=torch.channels_last)).numpy()
    assert got.shape == ref.shape
    assert _rel(got, ref) < 1e-5


@pytest.mark.parametrize("info", list_models(), ids=lambda i: i.name)
def test_every_shipped_model_runs_the_same_on_every_backend(info, rng):
    model, _ = load_model(info.path)  # a context model's stage 1: its planes in (its blend is numpy, tested apart)
    x = torch.from_numpy(rng.random((1, model.config.planes, 96, 80), dtype=np.float32))
    with torch.no_grad():
        ref = model.double()(x.double()).numpy()
        model.float()
        for backend in ["eager"] + (["onnxruntime"] if onnxruntime_available() else []):
            fn, _ = make_backend(model, CPU, backend)
            assert _rel(fn(x.contiguous(memory_format=torch.channels_last)).numpy(), ref) < 1e-5, backend


def test_the_tiled_engine_on_each_backend_equals_whole_image_inference(tiny_model, rng):
    data = rng.random((2, 150, 130), dtype=np.float32)
    with torch.no_grad():
        whole = np.stack([tiny_model.double()(torch.from_numpy(p).double()[None, None])[0, 0].numpy() for p in data])
    tiny_model.float()
    for backend in ["eager"] + (["onnxruntime"] if onnxruntime_available() else []):
        out = memnet.restore(data, tiny_model, tile=48, device="cpu", backend=backend)
        assert _rel(out, whole) < 1e-5, backend


def test_a_backend_is_built_once_per_weights_and_rebuilt_when_they_change(tiny_model):
    a, _ = make_backend(tiny_model, CPU, "eager")
    assert make_backend(tiny_model, CPU, "eager")[0] is a
    with torch.no_grad():
        tiny_model.recon_conv.bias.add_(1.0)
    b, _ = make_backend(tiny_model, CPU, "eager")
    assert b is not a
    x = torch.rand(1, 1, 20, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(b(x), tiny_model(x), atol=1e-5)


def test_backend_choice_and_clear_refusals(monkeypatch):
    assert choose_backend("eager", CPU) == "eager"
    assert choose_backend("auto", torch.device("cuda")) == "eager"
    if onnxruntime_available():
        assert choose_backend("auto", CPU) == "onnxruntime"
    with pytest.raises(ValueError, match="runs on the CPU"):
        choose_backend("onnxruntime", torch.device("cuda"))
    with pytest.raises(ValueError, match="backend must be one of"):
        memnet.RestoreOptions(backend="tensorrt")
    monkeypatch.setattr("memnet.inference.onnxruntime_available", lambda: False)
    assert choose_backend("auto", CPU) == "eager"  # without onnxruntime installed: eager, no error
    with pytest.raises(ValueError, match="pip install onnx onnxruntime"):
        choose_backend("onnxruntime", CPU)


def test_the_automatic_tile_follows_the_receptive_field():
    cfg = memnet.CONFIGS
    # CPU: windows of about 640 px (the measured sweet spot), never below 256.
    assert default_tile(cfg["M4R4C32"], CPU) == 576  # radius 34 -> window 644
    assert default_tile(cfg["M6R6C64"], CPU) == 512  # radius 74 -> window 660
    assert default_tile(cfg["M10R10C64"], CPU) == 256
    # with the plane: the tile whose windows cover the least area (2 x 2 tiles of 512 on 1024²)
    assert default_tile(cfg["M4R4C32"], CPU, plane=(1024, 1024)) == 512
    assert default_tile(cfg["M4R4C32"], CPU, plane=(300, 200)) == 576  # one window either way: the largest
    assert default_tile(cfg["M6R6C64"], CPU, plane=(1024, 1024)) == 512
    # GPU: the halo costs at most 1.3x the core's work.
    for name in ("M4R4C32", "M6R6C64"):
        c = cfg[name]
        r = 2 + 2 * c.blocks * c.recursions
        t = default_tile(c, torch.device("meta"))
        assert t % 64 == 0 and ((t + 2 * r) / t) ** 2 <= 1.3 and ((t - 64 + 2 * r) / (t - 64)) ** 2 > 1.3


def test_tile_auto_is_resolved_recorded_and_resumable(tiny_model, rng, tmp_path):
    data = rng.random((2, 700, 90), dtype=np.float32)
    out = tmp_path / "o.zarr"
    job = memnet.engine.prepare(data, tiny_model, device="cpu")
    assert job.options.tile == default_tile(tiny_model.config, CPU, plane=(700, 90)) == 384
    memnet.restore(data, tiny_model, output=out, device="cpu")
    arr = memnet.open_input(out).array
    assert arr.chunks[-2:] == (job.options.tile, 90)
    # resuming a finished run with the default (auto) tile is accepted and changes nothing
    before = np.asarray(arr[...])
    memnet.restore(data, tiny_model, output=out, device="cpu", resume=True)
    np.testing.assert_array_equal(np.asarray(memnet.open_input(out).array[...]), before)


def test_a_resume_with_tile_auto_keeps_the_tiling_the_run_started_with(tiny_model, rng, tmp_path):
    data = rng.random((2, 700, 90), dtype=np.float32)
    out = tmp_path / "o.zarr"
    first = memnet.restore(data, tiny_model, output=out, device="cpu", tile=256)  # auto would be 384 here
    before = np.asarray(first[...])
    memnet.restore(data, tiny_model, output=out, device="cpu", resume=True)  # tile auto: the recorded 256
    arr = memnet.open_input(out).array
    assert arr.chunks[-2:] == (256, 90)
    np.testing.assert_array_equal(np.asarray(arr[...]), before)
    with pytest.raises(ValueError, match="tile: 256 then, 384 now"):  # an explicit other tile is still refused
        memnet.restore(data, tiny_model, output=out, device="cpu", resume=True, tile=384)


def test_two_threads_can_export_at_once(tiny_model):
    """A napari warm-up and a restore of another model may build their ONNX backends at the same time."""
    import threading

    from memnet.inference import onnx_bytes

    other = memnet.MemNet(blocks=1, recursions=1, channels=4).eval()
    errors, start = [], threading.Barrier(2)

    def export(m):
        start.wait()
        try:
            for _ in range(3):
                onnx_bytes(m)
        except Exception as e:  # the exporter's global state, shared between threads
            errors.append(e)

    threads = [threading.Thread(target=export, args=(m,)) for m in (tiny_model, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.skipif(not onnxruntime_available(), reason="needs onnx and onnxruntime")
def test_an_exported_graph_is_reused_from_the_user_cache(random_model, tiny_model, tmp_path, monkeypatch):
    """A new process (an emptied in-memory cache) builds its ONNX Runtime session from the graph exported
    before, in MEMNET_CACHE_DIR: no second export; other weights get their own graph; a damaged file is
    exported again and replaced."""
    from memnet import inference, ortgraph

    exports = []
    real = ortgraph.graph_bytes
    monkeypatch.setattr(ortgraph, "graph_bytes", lambda *a: exports.append(1) or real(*a))
    x = torch.rand(1, 1, 30, 26)
    with torch.no_grad():
        ref = tiny_model(x).numpy()

    def build(model):
        inference._BUILT.clear()  # what a new process starts with
        ortgraph._BUILT.clear()
        fn, name = make_backend(model, CPU, "onnxruntime")
        assert name == "onnxruntime"
        with torch.no_grad():
            return fn(x).numpy()

    assert _rel(build(tiny_model), ref) < 1e-5 and len(exports) == 1
    graphs = list((tmp_path / "cache" / "onnx").glob("*.onnx"))  # the conftest's MEMNET_CACHE_DIR
    assert len(graphs) == 1
    assert _rel(build(tiny_model), ref) < 1e-5 and len(exports) == 1  # read back, not exported again
    other = random_model(2, 2, 8, seed=5, dtype=torch.float32)
    with torch.no_grad():
        other_ref = other(x).numpy()
    assert _rel(build(other), other_ref) < 1e-5 and len(exports) == 2
    assert len(list(graphs[0].parent.glob("*.onnx"))) == 2
    graphs[0].write_bytes(b"not a graph")  # damaged (a disk error, a killed writer on an old version)
    assert _rel(build(tiny_model), ref) < 1e-5 and len(exports) == 3
    assert graphs[0].read_bytes() != b"not a graph"


@pytest.mark.skipif(not onnxruntime_available(), reason="needs onnx and onnxruntime")
def test_onnx_graph_has_no_concatenation_and_its_session_no_memory_pattern(random_model):
    """The gate runs as a running sum over the memories (no (m+R)·C-channel concatenation alive), and the
    ONNX Runtime session keeps the arena but not the memory pattern (which doubled the peak)."""
    import onnx

    from memnet.inference import folded_onnx_bytes, onnx_bytes

    m = random_model(2, 3, 8, seed=4, dtype=torch.float32)
    for graph in (onnx_bytes(fold(m)), folded_onnx_bytes(fold(m))):  # traced (int8's source) and written
        ops = {n.op_type for n in onnx.load_from_string(graph).graph.node}
        assert "Concat" not in ops and "Conv" in ops
    fn, _ = make_backend(m, CPU, "onnxruntime")
    so = fn.session.get_session_options()
    assert so.enable_mem_pattern is False and so.enable_cpu_mem_arena is True


@pytest.mark.skipif(not onnxruntime_available(), reason="needs onnx and onnxruntime")
@pytest.mark.parametrize("arch,context,in_ch", [((2, 3, 8), 0, 1), ((1, 2, 6), 1, 2)])
def test_the_written_onnx_graph_equals_the_folded_model(random_model, arch, context, in_ch):
    """The graph the onnxruntime backend runs, written node by node (not traced), computes the folded model:
    a 2-D model and a context model with two input channels (the centre plane's slice)."""
    import onnxruntime as ort

    from memnet.inference import folded_onnx_bytes

    m = random_model(*arch, seed=5, dtype=torch.float32, in_channels=in_ch, out_channels=in_ch, context=context)
    f = fold(m)
    x = torch.rand(2, in_ch * f.config.planes, 33, 27)
    sess = ort.InferenceSession(folded_onnx_bytes(f), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = f(x).numpy()
    assert got.shape == ref.shape and _rel(got, ref) < 1e-5
