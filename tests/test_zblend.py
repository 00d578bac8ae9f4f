"""A context model's second stage, the Z-blend (`memnet.zblend`): the numpy blend computes the torch one it was
trained as; tiled, lazy, ramp-blended, resumed and distributed restores equal whole-stack inference (stage 1 on
whole planes, then the blend of its mirrored neighbours); stage 1 runs once per plane and tile in an ordered pass;
the weights travel in the model file, checked; fine-tuning keeps the blend."""

import copy

import numpy as np
import pytest
import tifffile
import torch
import zarr
from conftest import MICRO_METADATA
from test_context import _CountingArray

import memnet
from memnet.stacktrain import BlendNet, blend_windows, train_blend
from memnet.tiling import mirror_index
from memnet.zoo import ModelFileError, load_weights


def _random_blend(hidden=8, seed=0):
    torch.manual_seed(seed)
    b = BlendNet(2, (2, 5), hidden=hidden)
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.5)
    return b


@pytest.fixture
def zb_model(ctx_model):
    m = copy.deepcopy(ctx_model)
    m.zblend = _random_blend().to_zblend()
    return m


@pytest.fixture
def zb_user(zb_model, _isolated_user_models):
    _isolated_user_models.mkdir(parents=True, exist_ok=True)
    memnet.save_model(zb_model, _isolated_user_models / "tiny-zb.safetensors", name="tiny-zb", task="microscopy",
                      metadata={**MICRO_METADATA, "rank": 100})
    return "tiny-zb"


def _whole_stack(model, stack):
    """Untiled reference: stage 1 on whole planes (each with its mirrored neighbours), then the blend of stage 1's
    mirrored planes z-2..z+2 and the noisy plane z."""
    k, n = model.config.context, len(stack)
    with torch.no_grad():
        s1 = np.stack([model(torch.from_numpy(stack[[mirror_index(z + d, n) for d in range(-k, k + 1)]][None]))[0, 0]
                       .numpy() for z in range(n)])
    zb = model.zblend
    return np.stack([zb(s1[[mirror_index(z + d, n) for d in range(-zb.context, zb.context + 1)]], stack[z])
                     for z in range(n)])


def test_the_numpy_blend_computes_the_torch_blend_it_was_trained_as():
    net = _random_blend(hidden=32)
    x = torch.rand(2, 6, 37, 41)
    zb = net.to_zblend()
    with torch.no_grad():
        want = net(x)[:, 0].numpy()
    for i in range(2):
        np.testing.assert_allclose(zb(x[i, :5].numpy(), x[i, 5].numpy()), want[i], atol=2e-6)
    # untrained, it is stage 1: the centre's weight is e^4 / (e^4 + 4)
    plain = BlendNet(2).to_zblend()
    s = np.random.default_rng(0).random((5, 20, 20)).astype(np.float32)
    w = np.exp(4) / (np.exp(4) + 4)
    np.testing.assert_allclose(plain(s, s[2]), w * s[2] + (1 - w) / 4 * (s.sum(0) - s[2]), atol=1e-6)


def test_a_short_blend_training_learns_to_average_planes_that_agree():
    rng = np.random.default_rng(0)
    clean = np.repeat(rng.random((1, 48, 48)).astype(np.float32), 8, 0)  # the same structure on every plane
    s1 = clean + rng.normal(0, 0.05, clean.shape).astype(np.float32)  # stage 1's residual noise, independent
    noisy = clean + rng.normal(0, 0.2, clean.shape).astype(np.float32)
    x = blend_windows(s1, noisy, 2)
    assert x.shape == (8, 6, 48, 48) and np.array_equal(x[0, 0], s1[2])  # plane -2 is plane 2
    net = train_blend([x], [clean], [True], steps=150, patch=32, batch=4, log=lambda s: None)
    out = net.to_zblend()(x[4, :5], x[4, 5])
    assert np.mean((out - clean[4]) ** 2) < 0.5 * np.mean((s1[4] - clean[4]) ** 2)


@pytest.mark.parametrize("tile", [24, 48])
def test_tiled_restore_with_a_zblend_equals_whole_stack_inference(zb_model, rng, tile):
    stack = rng.random((7, 61, 75)).astype(np.float32)
    want = _whole_stack(zb_model, stack)
    out = memnet.restore(stack, zb_model, axes="ZYX", tile=tile, device="cpu", batch_size=3)
    np.testing.assert_allclose(out, want, atol=2e-5)
    lazy = memnet.restore(stack, zb_model, axes="ZYX", tile=tile, device="cpu", lazy=True)
    np.testing.assert_allclose(np.asarray(lazy), want, atol=2e-5)
    ramps = memnet.restore(stack, zb_model, axes="ZYX", tile=tile, device="cpu", halo=8)
    assert ramps.shape == want.shape and np.abs(ramps - want).mean() < 0.01 * np.abs(want).mean()  # approximate


def test_stage_one_runs_once_per_plane_and_tile_in_an_ordered_pass(zb_model, rng, monkeypatch):
    from memnet.runner import Runner

    seen = []
    call = Runner.__call__
    monkeypatch.setattr(Runner, "__call__", lambda self, batch: seen.append(len(batch)) or call(self, batch))
    stack = rng.random((6, 256, 256)).astype(np.float32)
    arr = _CountingArray(stack, (1, 256, 256))  # one 256 KB chunk per plane
    out = memnet.restore(arr, zb_model, axes="ZYX", tile=128, device="cpu", batch_size=2, backend="eager")
    assert sum(seen) == 6 * 4  # six planes of four tiles: each plane's stage 1 once, not once per neighbour
    assert len(arr.reads) == 6  # and each plane read once, though stage 1 of plane z+2 reads up to z+4
    np.testing.assert_allclose(out, _whole_stack(zb_model, stack), atol=2e-5)


def test_the_blend_travels_in_the_model_file_and_runs_without_torch(zb_user, zb_model, rng):
    weights, info = load_weights(zb_user)
    assert weights.zblend is not None and info.metadata["zblend"] == {"context": 2, "radii": [2, 5], "hidden": 8}
    assert info.receptive_field == memnet.receptive_field(zb_model) + 5
    assert memnet.zoo.describe(info)["arch"].endswith("5 planes + Z-blend")
    assert not any(k.startswith("zblend.") for k in weights.tensors)  # stage 1's graph never sees them
    model, _ = memnet.load_model(zb_user)
    assert model.zblend.digest() == zb_model.zblend.digest()
    stack = (rng.random((5, 48, 48)) * 3000 + 100).astype(np.uint16)
    assert memnet.describe_model(stack, "microscopy", axes="ZYX") == "tiny-zb (5 planes along Z + Z-blend)"
    ort = memnet.restore(stack, "microscopy", axes="ZYX", tile=32, device="cpu")  # numpy weights, ONNX Runtime
    tch = memnet.restore(stack, "microscopy", axes="ZYX", tile=32, device="cpu", backend="eager")
    np.testing.assert_allclose(ort.astype(float), tch.astype(float), atol=1)


def test_a_file_whose_blend_does_not_match_its_metadata_is_refused(zb_user, zb_model, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = memnet.zoo.user_model_dir() / "tiny-zb.safetensors"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        import json
        meta = json.loads(f.read(n))["__metadata__"]
    tensors = load_file(path)
    bad = tmp_path / "bad.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "zblend.m.4.bias"}, bad, metadata=meta)
    with pytest.raises(ModelFileError, match="missing tensors .*zblend.m.4.bias"):
        load_weights(bad)
    doc = json.loads(meta["napari_memnet"] if "napari_memnet" in meta else next(iter(meta.values())))
    doc["zblend"] = {"context": 2, "radii": [0], "hidden": 8}
    key = "napari_memnet" if "napari_memnet" in meta else next(iter(meta))
    save_file(tensors, bad, metadata={key: json.dumps(doc)})
    with pytest.raises(ModelFileError, match="not a Z-blend spec"):
        memnet.zoo.read_info(bad)


def test_an_interrupted_zblend_restore_resumes_to_the_same_result(zb_user, tmp_path, rng):
    stack = (rng.random((5, 64, 64)) * 3000).astype(np.uint16)
    full = memnet.restore(stack, zb_user, axes="ZYX", tile=32, device="cpu")
    out, calls = tmp_path / "o.zarr", []

    def cancel():
        calls.append(1)
        return len(calls) > 9

    with pytest.raises(memnet.Cancelled):
        memnet.restore(stack, zb_user, axes="ZYX", output=out, tile=32, device="cpu", batch_size=1, cancel=cancel)
    memnet.restore(stack, zb_user, axes="ZYX", output=out, tile=32, device="cpu", batch_size=1, resume=True)
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"), mode="r")[:], full)


@pytest.mark.slow
def test_a_distributed_zblend_restore_equals_the_local_one(zb_user, tmp_path, rng):
    from distributed import Client, LocalCluster

    stack = (rng.random((5, 64, 64)) * 3000).astype(np.uint16)
    tif = tmp_path / "z.tif"
    tifffile.imwrite(tif, stack, imagej=True, metadata={"axes": "ZYX"})
    local = memnet.restore(tif, zb_user, tile=32, device="cpu")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        out = memnet.restore(tif, zb_user, output=tmp_path / "d.zarr", tile=32, device="cpu", client=client)
        np.testing.assert_array_equal(out[:], local)
        [report] = [r for reports in client.run(memnet.distributed.worker_report).values() for r in reports]
        assert report["groups"] == 5 and report["zblend_stage1_windows"] == 5 * 4  # once per plane and tile


def test_fine_tuning_a_zblend_model_keeps_its_blend(zb_model, tmp_path):
    from memnet.finetune import FinetuneConfig, finetune

    rng = np.random.default_rng(3)
    noisy = rng.poisson(rng.random((6, 64, 64)) * 50 + 10).astype(np.float32)
    start = tmp_path / "start.safetensors"
    memnet.save_model(zb_model, start, name="start-zb", task="microscopy",
                      metadata={"normalization": {"mode": "percentile", "low": 1, "high": 99.8}})
    finetune(FinetuneConfig(model=str(start), name="zb-ft", steps=4, minutes=None, val_every=2, patch=24,
                            axes="ZYX", mode="nbr2nbr", noise_check=False, publish="always"), noisy,
             log=lambda s: None)
    model, info = memnet.load_model("zb-ft")
    assert info.metadata["zblend"] == zb_model.zblend.spec and model.zblend.digest() == zb_model.zblend.digest()


def test_export_refuses_a_context_model_saying_why(zb_user, ctx_user, tmp_path):
    from memnet.export import export_model

    for name in (zb_user, ctx_user):
        with pytest.raises(ValueError, match="is a context model: .*cannot express. Export a 2-D model"):
            export_model(name, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="Z-blend"):
        export_model(zb_user, tmp_path / "m.zip", fmt="bioimageio")
    assert not list(tmp_path.glob("m.*"))


def test_the_shipped_context_model_carries_a_blend_and_memnet_models_says_when_it_runs(capsys):
    info = memnet.zoo.find_context_model("microscopy")
    assert info is not None and info.source == "shipped" and info.metadata["zblend"]["context"] == 2
    assert memnet.cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "5 planes + Z-blend" in out
    assert "on a stack with enough planes along Z or T (--context auto): microscopy -> microscopy-context" in out


def test_training_stage_one_further_drops_the_blend_it_no_longer_fits(zb_model, tmp_path):
    from memnet.stacktrain import train_context

    start = tmp_path / "zb.safetensors"
    memnet.save_model(zb_model, start, name="start-zb", task="microscopy", metadata=MICRO_METADATA)
    logs = []
    train_context(tmp_path / "run", init=str(start), steps=1, batch=2, patch=32, n_sim=2, n_val=2, n_val_sim=1,
                  val_every=1, log=logs.append)
    model, info = memnet.load_model(tmp_path / "run" / "last.safetensors")
    assert model.zblend is None and "zblend" not in info.metadata
    assert any("Z-blend is dropped" in line for line in logs)
