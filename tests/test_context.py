"""Context models: a plane restored from its neighbours along Z (else T) — exact tiling, the boundary rule, one
read per plane, the automatic choice, resume, lazy and distributed runs, and the semi-synthetic training data."""

import numpy as np
import pytest
import tifffile
import torch
import zarr

import memnet
from memnet.model import MemNet, macs_per_pixel, with_context
from memnet.synthstack import context_crop, noisy_stack, simulate_stack
from memnet.tiling import mirror_index


def _whole_stack(model: MemNet, stack: np.ndarray) -> np.ndarray:
    """Untiled reference: every plane with its mirrored neighbours, whole planes through the model."""
    k, n = model.config.context, len(stack)
    with torch.no_grad():
        return np.stack([model(torch.from_numpy(stack[[mirror_index(z + d, n) for d in range(-k, k + 1)]][None]))[0, 0]
                         .numpy() for z in range(n)])


def test_a_context_model_grown_from_a_2d_model_computes_the_2d_function_and_costs_little_more(tiny_model):
    ctx = with_context(tiny_model, 2)
    x = torch.rand(2, 5, 40, 36)
    assert torch.allclose(ctx(x), tiny_model(x[:, 2:3]), atol=1e-5)
    assert ctx.config.planes == 5 and macs_per_pixel(ctx.config) <= 1.3 * macs_per_pixel(tiny_model.config)
    with pytest.raises(ValueError, match="this model sees 5"):
        with_context(ctx, 1)


def test_a_context_model_grows_to_more_planes_and_computes_what_it_did():
    torch.manual_seed(0)
    ctx = MemNet(1, 1, 8, context=2).eval()
    with torch.no_grad():  # non-trivial input statistics, so a plane's BatchNorm landing elsewhere would show
        ctx.fenet.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 5))
        ctx.fenet.bn.running_var.copy_(torch.linspace(0.5, 2.0, 5))
    wide = with_context(ctx, 3).eval()
    x = torch.rand(2, 7, 24, 20)
    assert wide.config.planes == 7
    assert torch.allclose(wide(x), ctx(x[:, 1:6]), atol=1e-5)


def test_the_boundary_rule_mirrors_without_repeating_the_end_planes():
    assert [mirror_index(i, 5) for i in range(-2, 7)] == [2, 1, 0, 1, 2, 3, 4, 3, 2]
    src = memnet.open_input(np.zeros((4, 3, 8, 8), np.float32), axes="TZYX")
    assert src.context_axis == "Z"
    assert src.context_leads((1, 0), 2) == [(1, 2), (1, 1), (1, 0), (1, 1), (1, 2)]
    with pytest.raises(ValueError, match="needs at least 3 planes along Z, got 2"):
        memnet.open_input(np.zeros((2, 8, 8), np.float32), axes="ZYX").context_leads((0,), 2)


@pytest.mark.parametrize("tile", [24, 48])
def test_tiled_restore_equals_whole_stack_inference(ctx_model, rng, tile):
    stack = rng.random((7, 61, 75)).astype(np.float32)
    out = memnet.restore(stack, ctx_model, axes="ZYX", tile=tile, device="cpu", batch_size=3)
    np.testing.assert_allclose(out, _whole_stack(ctx_model, stack), atol=2e-5)


def test_context_runs_along_z_for_each_time_point_and_channel_and_along_t_without_z(ctx_model, rng):
    tzcyx = rng.random((2, 5, 2, 40, 40)).astype(np.float32)
    out = memnet.restore(tzcyx, ctx_model, axes="TZCYX", tile=32, device="cpu")
    for t in range(2):
        for c in range(2):
            np.testing.assert_allclose(out[t, :, c], _whole_stack(ctx_model, tzcyx[t, :, c]), atol=2e-5)
    tyx = rng.random((6, 40, 40)).astype(np.float32)
    np.testing.assert_allclose(memnet.restore(tyx, ctx_model, axes="TYX", tile=32, device="cpu"),
                               _whole_stack(ctx_model, tyx), atol=2e-5)


class _CountingArray:
    """A chunked array that counts the chunks read from it (as a Zarr or TIFF store would decode them)."""

    def __init__(self, a: np.ndarray, chunks: tuple):
        self.a, self.chunks, self.shape, self.dtype, self.ndim = a, chunks, a.shape, a.dtype, a.ndim
        self.reads = []

    def __getitem__(self, idx):
        self.reads.append(idx)
        return self.a[idx]


def test_each_plane_is_read_once_per_pass_not_once_per_neighbour(ctx_model, rng):
    stack = rng.random((6, 256, 256)).astype(np.float32)
    arr = _CountingArray(stack, (1, 256, 256))  # one 256 KB chunk per plane
    out = memnet.restore(arr, ctx_model, axes="ZYX", tile=64, device="cpu", batch_size=2)
    assert len(arr.reads) == 6  # 16 tiles per plane, 5 planes per window: still one read of each plane
    np.testing.assert_allclose(out, _whole_stack(ctx_model, stack), atol=2e-5)


def test_a_task_name_picks_the_context_model_for_a_stack_and_says_so(ctx_user, ctx_model, tmp_path, rng, capsys):
    stack = (rng.random((5, 48, 48)) * 3000 + 100).astype(np.uint16)
    assert memnet.describe_model(stack, "microscopy", axes="ZYX") == "tiny-ctx (5 planes along Z)"
    auto = memnet.restore(stack, "microscopy", axes="ZYX", tile=32, device="cpu")
    np.testing.assert_array_equal(auto, memnet.restore(stack, ctx_user, axes="ZYX", tile=32, device="cpu"))
    off = memnet.restore(stack, "microscopy", axes="ZYX", tile=32, device="cpu", context="off")
    assert not np.array_equal(auto, off)
    assert memnet.describe_model(stack, "microscopy", axes="ZYX", context="off").endswith("(2-D, plane by plane)")
    # too few planes for five, a single image, or a named 2-D model: the 2-D model
    assert "2-D" in memnet.describe_model(stack[:4], "microscopy", axes="ZYX")
    assert "2-D" in memnet.describe_model(stack[0], "microscopy")
    # the CLI says which model it runs, and the job record keeps the choice
    tif, out = tmp_path / "z.tif", tmp_path / "o.zarr"
    tifffile.imwrite(tif, stack, imagej=True, metadata={"axes": "ZYX"})
    assert memnet.cli.main(["restore", str(tif), "-o", str(out), "--model", "microscopy", "--device", "cpu",
                            "--tile", "32"]) == 0
    assert "model: tiny-ctx (5 planes along Z)" in capsys.readouterr().err
    job = zarr.open_group(str(out), mode="r").attrs["memnet"]["job"]
    assert job["context"] == "auto" and job["context_planes"] == 5 and job["context_axis"] == "Z"
    assert job["model"] == "tiny-ctx.safetensors"


def test_a_named_context_model_refuses_what_it_cannot_restore(ctx_user, rng):
    stack = rng.random((5, 40, 40)).astype(np.float32)
    with pytest.raises(ValueError, match="tiny-ctx is a context model .*choose a 2-D model"):
        memnet.restore(stack, ctx_user, axes="ZYX", context="off")
    with pytest.raises(ValueError, match="needs at least 3 planes along Z or T"):
        memnet.restore(stack[0], ctx_user)
    with pytest.raises(ValueError, match="context must be 'auto' or 'off'"):
        memnet.RestoreOptions(context="on")


def test_an_interrupted_context_restore_resumes_to_the_same_result(ctx_user, tmp_path, rng):
    stack = (rng.random((5, 64, 64)) * 3000).astype(np.uint16)
    full = memnet.restore(stack, ctx_user, axes="ZYX", tile=32, device="cpu")
    out, calls = tmp_path / "o.zarr", []

    def cancel():
        calls.append(1)
        return len(calls) > 6

    with pytest.raises(memnet.Cancelled):
        memnet.restore(stack, ctx_user, axes="ZYX", output=out, tile=32, device="cpu", batch_size=1, cancel=cancel)
    memnet.restore(stack, ctx_user, axes="ZYX", output=out, tile=32, device="cpu", batch_size=1, resume=True)
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"), mode="r")[:], full)
    with pytest.raises(ValueError, match="context"):  # a resume with the context switched off is another job
        memnet.restore(stack, "microscopy", axes="ZYX", output=out, tile=32, device="cpu", resume=True, context="off")


def test_a_lazy_context_restore_equals_the_eager_one(ctx_model, rng):
    stack = rng.random((5, 50, 50)).astype(np.float32)
    lazy = memnet.restore(stack, ctx_model, axes="ZYX", tile=32, device="cpu", lazy=True)
    np.testing.assert_allclose(np.asarray(lazy), _whole_stack(ctx_model, stack), atol=2e-5)


@pytest.mark.slow
def test_a_distributed_context_restore_equals_the_local_one(ctx_user, tmp_path, rng):
    from distributed import Client, LocalCluster

    stack = (rng.random((5, 64, 64)) * 3000).astype(np.uint16)
    tif = tmp_path / "z.tif"
    tifffile.imwrite(tif, stack, imagej=True, metadata={"axes": "ZYX"})
    local = memnet.restore(tif, ctx_user, tile=32, device="cpu")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        out = memnet.restore(tif, ctx_user, output=tmp_path / "d.zarr", tile=32, device="cpu", client=client)
        np.testing.assert_array_equal(out[:], local)


def test_semi_synthetic_stacks_and_context_crops():
    rng = np.random.default_rng(0)
    st = simulate_stack(rng, planes=6, size=64, kinds=("nuclei", "filaments"))
    assert st.clean.shape == (6, 64, 64) and st.clean.dtype == np.float32 and np.isfinite(st.clean).all()
    assert 0.25 * 0.99 <= st.step_per_fwhm <= 3 * 1.01
    crop = context_crop(st.clean, rng, 2, 32)
    assert crop.shape == (5, 32, 32)
    noisy, target = noisy_stack(crop, rng)
    assert noisy.shape == target.shape == (5, 32, 32)
    assert np.std(noisy - target) > 0.01  # noise was added, per plane
    # the end planes follow the boundary rule: centre plane 0 sees planes 2, 1, 0, 1, 2
    ramp = np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None], (6, 8, 8))
    seen = {tuple(sorted(context_crop(ramp, np.random.default_rng(s), 2, 8, edge_fraction=1.0)[:, 0, 0]))
            for s in range(20)}
    assert seen == {(0.0, 1.0, 1.0, 2.0, 2.0), (3.0, 3.0, 4.0, 4.0, 5.0)}


@pytest.mark.slow
def test_context_training_starts_from_the_2d_model_checkpoints_and_resumes(micro_file, tmp_path):
    from memnet.stacktrain import train_context

    out = tmp_path / "run"
    logs = []
    train_context(out, init=str(micro_file), steps=2, batch=2, patch=32, n_sim=2, n_val=2, n_val_sim=1, val_every=1,
                  log=logs.append)
    model, info = memnet.load_model(out / "last.safetensors")
    assert model.config.context == 2 and info.task == "microscopy" and info.metadata["training"]["steps"] == 2
    assert "mirror" in info.metadata["context"]["boundary"]
    baseline = json_load(out / "baseline.json")["2d_mean_db"]
    assert any(f"{baseline:.3f} dB" in line for line in logs)  # the 2-D model scored on the same crops first
    train_context(out, init=str(micro_file), steps=3, batch=2, patch=32, n_sim=2, n_val=2, n_val_sim=1, val_every=1,
                  log=logs.append)
    assert any("resumed at step 2" in line for line in logs)
    assert memnet.load_model(out / "last.safetensors")[1].metadata["training"]["steps"] == 3


def json_load(path):
    import json

    return json.loads(path.read_text())


def test_sub_sampling_a_context_window_takes_every_plane_at_the_same_pixels_and_targets_the_centre():
    from memnet.finetune_modes import subsample_pairs

    b, c, h, w = 3, 5, 8, 10
    # Each value encodes its plane and pixel: plane * 1000 + row * 100 + column.
    x = (torch.arange(c)[:, None, None] * 1000 + torch.arange(h)[:, None] * 100 + torch.arange(w)).float()
    x = x.expand(b, c, h, w).clone()
    g1, g2, _ = subsample_pairs(x, np.random.default_rng(0))
    assert g1.shape == (b, c, h // 2, w // 2) and g2.shape == (b, 1, h // 2, w // 2)
    pix1, pix2 = g1 % 1000, g2 % 1000
    assert torch.equal(g1 // 1000, torch.arange(c).float()[None, :, None, None].expand_as(g1))
    assert (pix1 == pix1[:, :1]).all()  # every plane at the centre's pixels
    assert (g2 // 1000 == c // 2).all()  # the target: the centre plane
    assert (pix2 != pix1[:, :1]).all()  # ... at the other pixel of each cell, never one the input holds
    rows1, rows2, cols1, cols2 = pix1[:, :1] // 100, pix2 // 100, pix1[:, :1] % 100, pix2 % 100
    assert ((rows1 // 2 == rows2 // 2) & (cols1 // 2 == cols2 // 2)).all()  # the same 2x2 cell
    one = subsample_pairs(x[:, :1], np.random.default_rng(0))  # a 2-D model's plane: unchanged behaviour
    assert torch.equal(one[0] % 1000, pix1[:, :1]) and torch.equal(one[1] % 1000, pix2)


@pytest.fixture
def noisy_zstack():
    rng = np.random.default_rng(3)
    st = simulate_stack(rng, 8, 96, z_step=0.5 * 2.355 * 4.2, psf_xy=1.2, psf_z=4.2, kinds=("nuclei", "filaments"),
                        widefield=False)
    clean = st.clean * 100 + 10
    return rng.poisson(clean).astype(np.float32), clean


def test_a_context_model_fine_tunes_on_a_stack_and_restores_it_better(ctx_model, noisy_zstack, tmp_path):
    from memnet.finetune import FinetuneConfig, finetune
    from memnet.metrics import affine_fit, psnr

    noisy, clean = noisy_zstack
    start = tmp_path / "start.safetensors"
    memnet.save_model(ctx_model, start, name="start-ctx", task="microscopy",
                      metadata={"normalization": {"mode": "percentile", "low": 1, "high": 99.8}})
    logs = []
    out = finetune(FinetuneConfig(model=str(start), name="ctx-ft", steps=60, minutes=None, val_every=20, patch=24,
                                  lr=1e-3, axes="ZYX", mode="nbr2nbr", noise_check=False),  # a random start model:
                   noisy, log=logs.append)                                  # its residual is no noise estimate
    assert out.decision.published and out.decision.criterion == "subsample"
    model, info = memnet.load_model("ctx-ft")
    assert model.config.context == 2 and info.metadata["finetune"]["mode"] == "nbr2nbr"

    def score(m):
        return psnr(affine_fit(memnet.restore(noisy, m, axes="ZYX").astype(np.float64), clean), clean)

    assert score("ctx-ft") > score(str(start)) + 1.0  # the held-out gain is real: closer to the clean stack


def test_a_context_model_refuses_to_fine_tune_on_what_it_cannot_learn_from(ctx_model, noisy_zstack, tmp_path):
    from memnet.finetune import FinetuneConfig, finetune

    noisy, _ = noisy_zstack
    start = tmp_path / "start.safetensors"
    memnet.save_model(ctx_model, start, name="start-ctx", task="microscopy",
                      metadata={"normalization": {"mode": "percentile", "low": 1, "high": 99.8}})
    cfg = dict(model=str(start), name="ctx-ft", steps=5, minutes=None, patch=24)
    with pytest.raises(ValueError, match="at least 5 planes along Z or T"):
        finetune(FinetuneConfig(**cfg, axes="ZYX"), noisy[:3])
    with pytest.raises(ValueError, match="fine-tunes with mode auto or nbr2nbr"):
        finetune(FinetuneConfig(**cfg, axes="ZYX", mode="n2v"), noisy)
    assert not (memnet.zoo.user_model_dir() / "ctx-ft.safetensors").exists()


def test_batches_made_by_worker_processes_do_not_depend_on_how_many_there_are(micro_file, tmp_path):
    from memnet.stacktrain import BatchPool, ContextSampler, make_bank, train_context

    bank = make_bank(0, 2, planes=6, size=64, workers=2)
    again = make_bank(0, 2, planes=6, size=64, workers=3)
    assert all(np.array_equal(a.clean, b.clean) for a, b in zip(bank, again))
    runs = []
    for workers in (1, 2):
        pool = BatchPool(ContextSampler(bank, 2, 32, seed=0), 3, workers, seed=7)
        try:
            runs.append([pool.batch(3) for _ in range(3)])
        finally:
            pool.close()
    for (x1, y1), (x2, y2) in zip(*runs):
        assert x1.shape == (3, 5, 32, 32) and y1.shape == (3, 1, 32, 32)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(runs[0][0][0], runs[0][1][0])  # each batch from its own seed
    out = tmp_path / "run"
    kw = dict(init=str(micro_file), batch=2, patch=32, n_sim=2, n_val=2, n_val_sim=1, val_every=1, log=lambda s: None)
    train_context(out, steps=2, workers=2, **kw)
    assert memnet.load_model(out / "last.safetensors")[1].metadata["training"]["steps"] == 2
    with pytest.raises(ValueError, match="resume it with the same setting"):
        train_context(out, steps=3, **kw)
