"""Training end to end on small synthetic data: a tiny model, a few steps."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

import memnet
from memnet import fitloop
from memnet.fitloop import MixedPrecision, multi_supervised_loss
from memnet.train import TrainConfig, train
from memnet.trainset import PatchSampler


def _smooth_images(folder, n=6, size=64, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = 0.5 + 0.25 * np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(1, 3) * yy + rng.uniform()))
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_loss_is_mean_of_branches_and_final():
    t = torch.zeros(1, 1, 4, 4)
    b = [torch.ones(1, 1, 4, 4), 2 * torch.ones(1, 1, 4, 4)]
    f = 3 * torch.ones(1, 1, 4, 4)
    assert multi_supervised_loss(f, b, t).item() == pytest.approx((1 + 4 + 9) / 3)


def test_psnr_loss_weighs_each_patch_by_its_own_error():
    t = torch.zeros(2, 1, 4, 4)
    out = torch.cat([torch.full((1, 1, 4, 4), 0.01), torch.full((1, 1, 4, 4), 0.1)]).requires_grad_()
    loss = multi_supervised_loss(out, [out], t, "psnr")
    expect = 5e-4 * (np.log(1e-4 + 1e-4) + np.log(1e-2 + 1e-4)) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    (g,) = torch.autograd.grad(loss, out)
    # MSE pulls 10x harder on the patch with 10x the error; the log loss pulls harder on the small one
    g_mse = torch.autograd.grad(multi_supervised_loss(out, [out], t), out)[0]
    assert g_mse[1].abs().mean() / g_mse[0].abs().mean() == pytest.approx(10, rel=1e-4)
    assert g[0].abs().mean() > 4 * g[1].abs().mean()
    with pytest.raises(ValueError, match="mse or psnr"):
        multi_supervised_loss(out, [out], t, "l1")


@pytest.mark.parametrize("task", ["denoise", "sr", "jpeg", "microscopy"])
def test_sampler_degrades_and_keeps_shapes(task):
    rng = np.random.default_rng(0)
    clean = [rng.random((60, 60), dtype=np.float32)]
    s = PatchSampler(task, clean, [], patch=24)
    x, y = s.batch(4)
    assert x.shape == y.shape == (4, 1, 24, 24)
    assert not torch.equal(x, y)


@pytest.mark.slow
def test_train_reduces_loss_saves_and_resumes(tmp_path):
    data = _smooth_images(tmp_path / "clean")
    logs = []
    cfg = TrainConfig(task="denoise", out=str(tmp_path / "run"), data=[str(data)], arch="M2R2C8", patch=24,
                      batch_size=8, steps=60, val_every=30, log_every=5, lr=3e-3, name="tiny-denoise")
    best = train(cfg, log=logs.append)
    losses = [float(m[1]) for line in logs if (m := re.search(r"loss ([0-9.]+)", line))]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert any("validation at step 60" in line for line in logs)

    model, info = memnet.load_model(best)
    assert info.name == "tiny-denoise" and info.task == "denoise"
    assert info.metadata["training"]["steps"] in (30, 60)
    # amp "auto": bf16 where this CPU computes it natively, else fp32; the record says which ran
    assert info.metadata["training"]["precision"] == ("bfloat16" if fitloop.cpu_has_native_bf16() else "float32")
    assert "holdout" in info.metrics and info.normalization == {"mode": "natural"}
    assert info.metadata["degradation"]["gaussian_sigma_255"] == [0, 75]

    cfg = cfg.replace(steps=70)
    logs2 = []
    train(cfg, resume=True, log=logs2.append)
    assert logs2[0].startswith("resumed from step 60")
    _, info2 = memnet.load_model(tmp_path / "run" / "last.safetensors")
    assert info2.metadata["training"]["steps"] == 70


@pytest.mark.slow
def test_bf16_training_on_cpu_learns_like_fp32_and_saves_fp32_weights(tmp_path):
    data = _smooth_images(tmp_path / "clean")
    curves = {}
    for amp in ("off", "on"):
        logs = []
        cfg = TrainConfig(task="denoise", out=str(tmp_path / amp), data=[str(data)], arch="M2R2C8", patch=24,
                          batch_size=8, steps=60, val_every=60, log_every=5, lr=3e-3, amp=amp)
        best = train(cfg, log=logs.append)
        curves[amp] = [float(m[1]) for line in logs if (m := re.search(r"loss ([0-9.]+)", line))]
    end = {amp: np.mean(c[-3:]) for amp, c in curves.items()}
    assert end["on"] < 0.5 * np.mean(curves["on"][:3])
    assert end["on"] < 1.3 * end["off"]  # same seed, same batches: bf16 must not learn visibly worse
    model, info = memnet.load_model(best)
    assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())
    assert info.metadata["training"]["config"]["amp"] == "on" and info.metadata["training"]["precision"] == "bfloat16"
    with pytest.raises(ValueError, match="amp must be 'auto', 'on' or 'off'"):
        train(TrainConfig(task="denoise", out=str(tmp_path / "r2"), data=[str(data)], amp="yes"))


def test_train_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="training data folder not found"):
        train(TrainConfig(task="denoise", out=str(tmp_path / "r"), data=[str(tmp_path / "nope")]))
    with pytest.raises(ValueError, match="unknown architecture 'Big'"):
        train(TrainConfig(task="denoise", out=str(tmp_path / "r"), data=[str(_smooth_images(tmp_path / "d"))],
                          arch="Big"))


def test_continued_training_keeps_cumulative_steps_and_hours(tmp_path):
    data = _smooth_images(tmp_path / "clean")
    first = train(TrainConfig(task="denoise", out=str(tmp_path / "a"), data=[str(data)], arch="M2R2C8", patch=24,
                              batch_size=4, steps=6, val_every=6, name="stage-a"), log=lambda s: None)
    _, a = memnet.load_model(first)
    second = train(TrainConfig(task="denoise", out=str(tmp_path / "b"), data=[str(data)], patch=24, batch_size=4,
                               steps=4, val_every=4, init=str(first), name="stage-b"), log=lambda s: None)
    _, b = memnet.load_model(second)
    t = b.metadata["training"]
    assert t["steps"] == 4 and t["total_steps"] == 10
    assert t["continued_from"]["name"] == "stage-a" and t["continued_from"]["steps"] == 6
    assert t["total_hours"] >= a.metadata["training"]["hours"]
    # A third stage adds to the running totals, not to the second stage's own steps.
    third = train(TrainConfig(task="denoise", out=str(tmp_path / "c"), data=[str(data)], patch=24, batch_size=4,
                              steps=3, val_every=3, init=str(second)), log=lambda s: None)
    assert memnet.load_model(third)[1].metadata["training"]["total_steps"] == 13


def test_paired_targets_are_mapped_onto_the_noisy_images_intensity_frame(tmp_path):
    # A clean image stored at another gain and offset than its noisy capture (as W2S's 8-bit copies):
    # after normalisation the target must sit in the noisy image's frame, not at its own percentiles.
    import tifffile

    from memnet.trainset import load_data

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    signal = 0.2 + 0.6 * (np.sin(6 * xx) * np.cos(4 * yy)) ** 2
    noisy = np.clip(signal + rng.normal(0, 0.15, signal.shape), 0, 1.2)
    (tmp_path / "n").mkdir()
    (tmp_path / "c").mkdir()
    tifffile.imwrite(tmp_path / "n" / "a.tif", (noisy * 180).astype(np.uint8))
    tifffile.imwrite(tmp_path / "c" / "a.tif", (signal * 250 + 3).astype(np.uint8))
    cfg = TrainConfig(task="microscopy", out=str(tmp_path / "r"), pairs=[str(tmp_path / "n"), str(tmp_path / "c")])
    (x, y), = load_data(cfg)[1]
    # Regressing the noisy input on the target gives gain 1, offset 0 (noise aside).
    a, b = np.polyfit(y.ravel(), x.ravel(), 1)
    assert abs(a - 1) < 0.02 and abs(b) < 0.01
    # Each normalised by its own percentiles, the gain would be far from 1 (the noise widens the
    # noisy image's percentile range).
    from memnet.evaluate import percentile_normalize

    a_own, _ = np.polyfit(percentile_normalize((signal * 250 + 3).astype(np.uint8)).ravel(), x.ravel(), 1)
    assert abs(a_own - 1) > 0.1


def test_stacks_are_training_data_read_lazily_one_patch_at_a_time(tmp_path):
    """A folder may hold stacks (TIFF, Zarr) beside 2-D images; every plane is a training image, read
    only where a patch is cropped and mapped by one normaliser per stack (the model's policy)."""
    import tifffile
    import zarr

    from memnet.normalize import Normalizer
    from memnet.trainset import LazyPlane, training_images

    rng = np.random.default_rng(1)
    folder = _smooth_images(tmp_path / "mixed", n=1)
    tif = (rng.random((3, 64, 80)) * 4000 + 100).astype(np.uint16)
    tifffile.imwrite(folder / "stack.tif", tif, imagej=True, metadata={"axes": "ZYX"})
    z = zarr.open(str(folder / "stack.zarr"), mode="w", shape=(2, 64, 64), chunks=(1, 32, 32), dtype="uint16")
    z[:] = (rng.random((2, 64, 64)) * 1000).astype(np.uint16)

    planes = training_images(folder, None, "microscopy")
    lazy = [p for p in planes if isinstance(p, LazyPlane)]
    assert len(planes) == 6 and len(lazy) == 5
    assert sorted(p.shape for p in lazy) == [(64, 64)] * 2 + [(64, 80)] * 3
    # A crop is the stack's normalised plane at that place (percentiles over the stack, not the patch).
    norm = Normalizer.for_data(tif, {"mode": "percentile", "low": 1.0, "high": 99.8})
    stack_planes = [p for p in lazy if p.shape == (64, 80)]
    crop = stack_planes[1][10:34, 20:44]
    assert crop.dtype == np.float32 and crop.shape == (24, 24)
    np.testing.assert_allclose(crop, norm.forward(tif[1, 10:34, 20:44]), atol=0.02)

    best = train(TrainConfig(task="microscopy", out=str(tmp_path / "run"), data=[str(folder)], arch="M2R2C8",
                             patch=24, batch_size=4, steps=4, val_every=4), log=lambda s: None)
    assert memnet.load_model(best)[1].task == "microscopy"


def test_paired_stacks_pair_plane_for_plane(tmp_path):
    import tifffile

    from memnet.trainset import load_data

    rng = np.random.default_rng(2)
    clean = (rng.random((3, 48, 48)) * 200 + 20).astype(np.uint8)
    noisy = np.clip(clean + rng.normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
    for d, a in (("n", noisy), ("c", clean)):
        (tmp_path / d).mkdir()
        tifffile.imwrite(tmp_path / d / "s.tif", a, imagej=True, metadata={"axes": "ZYX"})
    cfg = TrainConfig(task="microscopy", out=str(tmp_path / "r"), pairs=[str(tmp_path / "n"), str(tmp_path / "c")])
    _, pairs = load_data(cfg)
    assert len(pairs) == 3 and all(x.shape == y.shape == (48, 48) for x, y in pairs)
    # Each pair is the same plane: the target correlates with its own noisy plane, not a neighbour's.
    assert np.corrcoef(pairs[1][0].ravel(), pairs[1][1].ravel())[0, 1] > 0.8
    assert abs(np.corrcoef(pairs[1][0].ravel(), pairs[2][1].ravel())[0, 1]) < 0.2

    tifffile.imwrite(tmp_path / "c" / "s.tif", clean[:2], imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(ValueError, match="do not match plane for plane"):
        load_data(cfg)


def test_sgd_is_the_papers_recipe(tmp_path):
    """--optimizer sgd without --lr starts at the paper's 0.1 and clips at 0.01 / (current lr)."""
    data = _smooth_images(tmp_path / "clean")
    logs = []
    best = train(TrainConfig(task="denoise", out=str(tmp_path / "r"), data=[str(data)], arch="M2R2C8", patch=24,
                             batch_size=4, steps=8, val_every=8, log_every=2, optimizer="sgd"), log=logs.append)
    info = memnet.load_model(best)[1]
    assert info.metadata["training"]["config"]["lr"] == 0.1
    lrs = [float(m[1]) for line in logs if (m := re.search(r"lr ([0-9.e+-]+)", line))]
    # Divided by 10 every quarter of the run (the lr logged after step 2 is the one for steps 3-4).
    assert lrs == pytest.approx([1e-2, 1e-3, 1e-4, 1e-5])
    losses = [float(m[1]) for line in logs if (m := re.search(r"loss ([0-9.]+)", line))]
    assert all(np.isfinite(losses))


def test_recalibrated_bn_statistics_are_the_exact_average_of_the_data(tiny_model):
    """After recalibration the eval-mode model computes what training mode computes on that data
    (BN statistics = the data's, not a running average of other batches); weights are untouched."""
    from memnet.train import recalibrate_bn

    torch.manual_seed(0)
    x = torch.rand(16, 1, 32, 32)

    class Fixed:  # a sampler that always returns the same batch
        def batch(self, n):
            return x, x

    model = tiny_model
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    with torch.no_grad():
        train_out = model.train()(x)
        stale = model.eval()(x)
    assert (stale - train_out).abs().max() > 1e-3  # the fixture's statistics are not this data's
    recalibrate_bn(model, Fixed(), batches=3, batch=16)
    assert not model.training
    with torch.no_grad():
        recal = model(x)
    # Equal up to the unbiased (running) vs biased (batch) variance, n = 16*32*32.
    assert (recal - train_out).abs().max() < 1e-3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("task", ["sr", "jpeg"])
def test_cli_train_each_natural_task_end_to_end(tmp_path, task, capsys):
    from memnet.cli import main

    data = _smooth_images(tmp_path / "clean")
    out = tmp_path / "run"
    assert main(["train", "--task", task, "--data", str(data), "--arch", "M2R2C8", "--patch", "24", "--batch", "4",
                 "--steps", "6", "--val-every", "3", "--bn-batches", "2", "--out", str(out),
                 "--name", f"t-{task}"]) == 0
    text = capsys.readouterr().out
    assert "validation at step 6: holdout" in text and f"best model: {out / 'best.safetensors'}" in text
    model, info = memnet.load_model(out / "best.safetensors")
    assert info.task == task and info.name == f"t-{task}" and info.metadata["training"]["config"]["bn_batches"] == 2
    assert info.metadata["degradation"] == memnet.trainset.DEGRADATIONS[task]


def test_cli_loss_choices_match_the_losses_training_accepts():
    import argparse

    from memnet.cli import build_parser
    from memnet.train_options import LOSSES

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    loss = next(a for a in sub.choices["train"]._actions if "--loss" in a.option_strings)
    assert tuple(loss.choices) == LOSSES


def test_a_trained_model_grows_wider_and_keeps_training(tmp_path):
    data = _smooth_images(tmp_path / "clean")
    first = train(TrainConfig(task="denoise", out=str(tmp_path / "a"), data=[str(data)], arch="M2R2C8", patch=24,
                              batch_size=4, steps=6, val_every=6), log=lambda s: None)
    logs = []
    grown = train(TrainConfig(task="denoise", out=str(tmp_path / "b"), data=[str(data)], arch="M2R2C12", patch=24,
                              batch_size=4, steps=4, val_every=4, init=str(first)), log=logs.append)
    model, info = memnet.load_model(grown)
    assert model.config.channels == 12 and info.name == "denoise-M2R2C12"
    assert info.metadata["training"]["total_steps"] == 10
    assert any("widening denoise-M2R2C8 from 8 to 12 channels" in line for line in logs)
    with pytest.raises(ValueError, match="--arch M1R2C8 does not fit --init denoise-M2R2C8.*can only grow"):
        train(TrainConfig(task="denoise", out=str(tmp_path / "c"), data=[str(data)], arch="M1R2C8", patch=24,
                          batch_size=4, steps=2, init=str(first)), log=lambda s: None)
    logs = []
    deep = train(TrainConfig(task="denoise", out=str(tmp_path / "d"), data=[str(data)], arch="M3R3C12", patch=24,
                             batch_size=4, steps=2, val_every=2, init=str(first)), log=logs.append)
    model, _ = memnet.load_model(deep)
    assert (model.config.blocks, model.config.recursions, model.config.channels) == (3, 3, 12)
    assert any("deepening denoise-M2R2C8 from M2R2 to M3R3" in line for line in logs)


def test_warmup_ramps_the_lr_linearly_into_the_cosine(tmp_path):
    data = _smooth_images(tmp_path / "clean")
    logs = []
    train(TrainConfig(task="denoise", out=str(tmp_path / "r"), data=[str(data)], arch="M2R2C8", patch=24, batch_size=4,
                      steps=8, val_every=8, log_every=1, lr=1e-3, warmup=3), log=logs.append)
    lrs = [float(m[1]) for line in logs if (m := re.search(r"lr ([0-9.e+-]+)", line))]
    cosine = [1e-3 * (0.5 * (1 + np.cos(np.pi * s / 8)) * 0.99 + 0.01) for s in range(1, 9)]
    # The lr logged after step s is the one for step s+1: (s+1)/4 of the cosine until step 3, then the cosine.
    expected = [min(1, (s + 1) / 4) * c for s, c in zip(range(1, 9), cosine)]
    assert lrs == pytest.approx(expected, rel=2e-3)  # logged to 3 digits
    with pytest.raises(ValueError, match="warmup must be between 0 and steps-1"):
        train(TrainConfig(task="denoise", out=str(tmp_path / "r2"), data=[str(data)], steps=5, warmup=5))
    with pytest.raises(ValueError, match="warmup applies to the adam cosine schedule"):
        train(TrainConfig(task="denoise", out=str(tmp_path / "r3"), data=[str(data)], optimizer="sgd", warmup=2))


def test_stop_checkpoints_and_resume_finishes(tmp_path):
    data = _smooth_images(tmp_path / "clean")
    cfg = TrainConfig(task="denoise", out=str(tmp_path / "run"), data=[str(data)], arch="M2R2C8", patch=24,
                      batch_size=4, steps=20, val_every=50, bn_batches=2, lr=3e-3)
    import threading

    ev, logs = threading.Event(), []

    def log(line):  # "stop" arrives while step 7 is being logged
        logs.append(line)
        if line.startswith("step 7/"):
            ev.set()

    cfg = cfg.replace(log_every=1)
    from memnet.engine import Cancelled

    with pytest.raises(Cancelled, match="stopped at step 7: checkpoint saved"):
        train(cfg, log=log, cancel=ev)
    assert any("validation at step 7" in line for line in logs)  # the checkpoint is validated
    _, info = memnet.load_model(tmp_path / "run" / "last.safetensors")
    assert info.metadata["training"]["steps"] == 7
    logs2 = []
    train(cfg, resume=True, log=logs2.append, cancel=lambda: False)
    assert logs2[0].startswith("resumed from step 7") and any("validation at step 20" in line for line in logs2)
    cfg = cfg.replace(steps=30)  # resume with more steps, but stopped before the first: nothing new to save
    with pytest.raises(Cancelled, match="stopped before step 21"):
        train(cfg, resume=True, log=lambda s: None, cancel=ev)


def test_cli_train_sigterm_stops_gracefully(tmp_path, capfd, monkeypatch):
    import os
    import signal

    from memnet.cli import main

    data = _smooth_images(tmp_path / "clean")
    real_batch, n = PatchSampler.batch, []

    def batch_then_sigterm(self, k):  # a scheduler's SIGTERM during the 4th training batch
        n.append(1)
        if len(n) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch(self, k)

    monkeypatch.setattr(PatchSampler, "batch", batch_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    rc = main(["train", "--task", "denoise", "--data", str(data), "--arch", "M2R2C8", "--patch", "24", "--batch", "4",
               "--steps", "50", "--val-every", "50", "--bn-batches", "2", "--out", str(tmp_path / "run")])
    out = capfd.readouterr().out
    assert rc == 130 and "stopping after this step" in out and "stopped at step" in out
    assert memnet.load_model(tmp_path / "run" / "last.safetensors")[1].metadata["training"]["steps"] < 50
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_cli_train_stop_asked_on_the_last_step_is_a_finished_run(tmp_path, capfd, monkeypatch):
    import os
    import signal

    from memnet.cli import main

    data = _smooth_images(tmp_path / "clean")
    real_recal = memnet.train.recalibrate_bn

    def recal_then_sigint(*a, **k):  # Ctrl-C while the final checkpoint is being prepared
        os.kill(os.getpid(), signal.SIGINT)
        return real_recal(*a, **k)

    monkeypatch.setattr(memnet.train, "recalibrate_bn", recal_then_sigint)
    rc = main(["train", "--task", "denoise", "--data", str(data), "--arch", "M2R2C8", "--patch", "24", "--batch", "4",
               "--steps", "5", "--val-every", "50", "--bn-batches", "2", "--out", str(tmp_path / "run")])
    assert rc == 0 and "validation at step 5" in capfd.readouterr().out


def test_resume_refuses_weights_and_state_from_different_steps(tmp_path):
    import shutil

    data = _smooth_images(tmp_path / "clean")
    cfg = TrainConfig(task="denoise", out=str(tmp_path / "run"), data=[str(data)], arch="M2R2C8", patch=24,
                      batch_size=4, steps=6, val_every=3, bn_batches=0)
    train(cfg, log=lambda s: None)
    run = tmp_path / "run"
    keep = tmp_path / "state6.pt"
    shutil.copy(run / "state.pt", keep)
    cfg = cfg.replace(steps=9)
    train(cfg, resume=True, log=lambda s: None)  # weights and state now at step 9
    shutil.copy(keep, run / "state.pt")  # as if the save was interrupted between the two files
    with pytest.raises(ValueError, match="last.safetensors is from step 9 but state.pt from step 6"):
        train(cfg, resume=True, log=lambda s: None)


def _dihedral(a):
    return [np.rot90(b, k) for b in (a, a[:, ::-1]) for k in range(4)]


@pytest.mark.slow
def test_device_sampler_cuts_real_crops_in_all_8_orientations_with_blind_noise():
    from memnet.trainset import DevicePatchSampler

    rng = np.random.default_rng(3)
    ims = [rng.random((40, 30), dtype=np.float32), rng.random((25, 52), dtype=np.float32),
           rng.random((6, 6), dtype=np.float32)]  # the last is smaller than a patch: never used
    s = DevicePatchSampler(ims, 8, "cpu", seed=1)
    noisy, clean = s.batch(400)
    assert noisy.shape == clean.shape == (400, 1, 8, 8) and noisy.dtype == torch.float32
    seen = set()
    for p in clean[:, 0].numpy()[:80]:
        found = [(i, y, x, k) for i, im in enumerate(ims[:2]) for y in range(im.shape[0] - 7)
                 for x in range(im.shape[1] - 7) for k, d in enumerate(_dihedral(im[y:y + 8, x:x + 8]))
                 if np.array_equal(d, p)]
        assert found, "every clean patch is a crop of an image, flipped/rotated"
        seen.add(found[0][3])
    assert seen == set(range(8))
    sig = (noisy - clean).std(dim=(1, 2, 3)).numpy() * 255
    assert sig.min() < 10 and 65 < sig.max() < 90 and 30 < np.median(sig) < 45  # sigma uniform in [0, 75]
    again = DevicePatchSampler(ims, 8, "cpu", seed=1).batch(400)
    assert torch.equal(again[0], noisy)  # seeded: a resumed run draws reproducible batches
    with pytest.raises(TypeError, match="in-memory 2-D arrays"):
        DevicePatchSampler([ims[0], [[0.0] * 30] * 40], 8, "cpu")  # not silently dropped


def test_training_with_the_device_sampler_learns_and_refuses_what_it_cannot_make(tmp_path):
    data = _smooth_images(tmp_path / "d")
    cfg = TrainConfig(task="denoise", out=str(tmp_path / "r"), data=[str(data)], arch="M2R2C8", patch=24,
                      batch_size=8, steps=40, lr=3e-3, val_every=20, bn_batches=2, sampler="device")
    train(cfg, log=lambda s: None)
    hist = memnet.load_model(tmp_path / "r" / "last.safetensors")[1].metadata["training"]["history"]
    assert hist[-1]["holdout"] > hist[0]["holdout"] - 0.5 and hist[-1]["holdout"] > 20
    with pytest.raises(ValueError, match="sampler 'device'.*denoise"):
        train(TrainConfig(task="jpeg", out=str(tmp_path / "j"), data=[str(data)], sampler="device"))
    with pytest.raises(ValueError, match="unknown sampler 'gpu': expected one of auto, numpy, device"):
        TrainConfig(task="denoise", out=str(tmp_path / "k"), data=[str(data)], sampler="gpu")  # refused on construction


@pytest.mark.parametrize("where", ["numpy", "device"])
def test_sigma_ranges_mix_noise_levels_as_asked(where):
    from memnet.trainset import DevicePatchSampler, PatchSampler

    flat = [np.full((40, 40), 0.5, np.float32)]
    ranges = [(0, 75), (10, 20)]
    if where == "numpy":
        s = PatchSampler("denoise", flat, [], 16, seed=2, sigma=ranges)
        noisy = np.stack([s.sample()[0] for _ in range(1500)])
    else:
        noisy = DevicePatchSampler(flat, 16, "cpu", seed=2, sigma=ranges).batch(1500)[0][:, 0].numpy()
    sig = (noisy - 0.5).std(axis=(1, 2)) * 255
    # half the patches from 10-20 plus 10/75 of the other half: ~57% expected near 10-20
    near = np.mean((sig > 8) & (sig < 22))
    assert 0.5 < near < 0.68, near
    assert sig.max() > 60  # still blind over 0-75
    with pytest.raises(ValueError, match="0 <= LO < HI <= 255"):
        PatchSampler("denoise", flat, [], 16, sigma=[(30, 20)])


def test_train_records_its_sigma_mixture_and_refuses_it_for_other_tasks(tmp_path):
    data = _smooth_images(tmp_path / "d")
    cfg = TrainConfig(task="denoise", out=str(tmp_path / "r"), data=[str(data)], arch="M2R2C8", patch=24,
                      batch_size=4, steps=2, val_every=2, bn_batches=1, sigma=[(0, 75), (5, 30)])
    meta = memnet.load_model(train(cfg, log=lambda s: None))[1].metadata
    assert meta["degradation"]["sigma_mixture_255"] == [[0, 75], [5, 30]]
    assert meta["degradation"]["gaussian_sigma_255"] == [0, 75]
    assert meta["training"]["config"]["sigma"] == [[0, 75], [5, 30]]
    with pytest.raises(ValueError, match="apply to task denoise"):
        train(TrainConfig(task="jpeg", out=str(tmp_path / "j"), data=[str(data)], sigma=[(0, 10)]))


def test_cli_sigma_flag_parses_and_rejects_bad_ranges(tmp_path, capsys):
    from memnet.cli import main

    data = _smooth_images(tmp_path / "d")
    base = ["train", "--task", "denoise", "--data", str(data), "--arch", "M2R2C8", "--patch", "24", "--batch", "4",
            "--steps", "2", "--val-every", "2", "--bn-batches", "1"]
    assert main(base + ["--out", str(tmp_path / "r"), "--sigma", "0:50", "--sigma", "15:25"]) == 0
    meta = memnet.load_model(tmp_path / "r" / "best.safetensors")[1].metadata
    assert meta["degradation"]["sigma_mixture_255"] == [[0.0, 50.0], [15.0, 25.0]]
    assert main(base + ["--out", str(tmp_path / "s"), "--sigma", "25"]) != 0
    assert "LO:HI" in capsys.readouterr().err


def test_camera_noise_is_normalised_like_restore_and_targets_its_expectation():
    from memnet.degrade import camera_noise

    yy, xx = np.mgrid[0:96, 0:96] / 96
    clean = 0.2 + 0.6 * (np.sin(8 * xx) * np.cos(5 * yy) > 0)
    fixed = {"gamma": [1.0, 1.0], "blur_sigma_px": [0.0, 0.0], "clip_8bit": 0.0, "pixel_gain_cv": [0, 0],
             "pixel_offset_adu": [0, 0], "read_noise_e": [1.0, 1.0], "adu_per_e": [1.0, 1.0]}
    errors = {}
    for photons in (3.0, 1000.0):
        noisy, target = camera_noise(clean, np.random.default_rng(1), {**fixed, "photons_at_1": [photons, photons]})
        lo, hi = np.percentile(noisy, [1.0, 99.8])  # the frame restore puts a microscopy input in
        assert abs(lo) < 1e-6 and abs(hi - 1) < 1e-6
        assert abs(float(np.mean(noisy - target))) < 0.02  # the target is the noise-free expectation
        errors[photons] = float(np.std(noisy - target))
    assert errors[3.0] > 5 * errors[1000.0]  # more photons, less noise
    # Drawn at random: 8-bit renderings and sCMOS pixel variation included, always finite.
    rng = np.random.default_rng(2)
    for _ in range(30):
        noisy, target = camera_noise(clean, rng)
        assert np.isfinite(noisy).all() and np.isfinite(target).all() and noisy.shape == clean.shape


def test_camera_noise_renders_some_exports_with_heavy_saturation():
    """Some 8-bit exports set the display range for dim structures: up to 40 % of the pixels at 0 and at 255. The
    camera mix draws such renderings (the 3D-RCAN crops are like this), the usual ones clip only a few pixels."""
    from memnet.degrade import camera_noise

    yy, xx = np.mgrid[0:96, 0:96] / 96
    clean = 0.1 + 0.8 * xx * (0.5 + 0.5 * np.cos(6 * yy))

    def clipped(ranges, seed):
        noisy, target = camera_noise(clean, np.random.default_rng(seed), {"clip_8bit": 1.0, "gamma": [1.0, 1.0],
                                                                         "photons_at_1": [50.0, 50.0], **ranges})
        assert np.isfinite(target).all() and abs(float(np.mean(noisy - target))) < 0.05
        return float(np.mean(noisy <= noisy.min())), float(np.mean(noisy >= noisy.max()))

    heavy = np.array([clipped({"clip_heavy": 1.0}, s) for s in range(20)])
    light = np.array([clipped({"clip_heavy": 0.0}, s) for s in range(20)])
    assert light.max() < 0.08  # ties at the clip level (quantised counts) add a little to the 2 %
    assert heavy.mean(axis=0).min() > 0.08 and heavy.max() < 0.45
    assert (heavy[:, 0] > 0.15).any() and (heavy[:, 1] > 0.15).any()


def test_camera_noise_stays_bounded_on_dark_content():
    """Dark content at a few photons and a coarse camera gain gives a crop of (nearly) one count level: its
    percentiles coincide. Once such a crop came out with pixels at 1e6 and blew up a training run; now the
    acquisition is drawn again, and blank stays blank."""
    from memnet.degrade import camera_noise

    clean = np.zeros((96, 96))
    clean[40, 40] = 1.0
    dark = {"photons_at_1": [1.0, 3.0], "background": [0.0, 0.01], "read_noise_e": [0.3, 0.3], "adu_per_e": [0.3, 0.3]}
    worst = 0.0
    for seed in range(60):
        for clip in ({"clip_8bit": 1.0, "clip_heavy": 1.0}, {"clip_8bit": 0.0}):
            noisy, target = camera_noise(clean, np.random.default_rng(seed), {**dark, **clip})
            worst = max(worst, float(np.abs(noisy).max()), float(np.abs(target).max()))
    assert worst <= 2.0
    # One bright pixel on a black, noise-free background: percentiles 0 and 0 whatever is drawn, so the crop is
    # scaled by its full range (it came out at ~1e9 before).
    bright = {"photons_at_1": [1000.0, 1000.0], "background": [0.0, 0.0], "read_noise_e": [0.01, 0.01],
              "pixel_offset_adu": [0.0, 0.0], "pixel_gain_cv": [0.0, 0.0], "clip_8bit": 0.0, "gamma": [1.0, 1.0],
              "blur_sigma_px": [0.0, 0.0]}
    noisy, target = camera_noise(clean, np.random.default_rng(1), bright)
    assert noisy.max() == pytest.approx(1.0) and noisy.min() == 0 and 0.5 < target.max() <= 1.5
    no_light = {**dark, "background": [0.0, 0.0], "read_noise_e": [0.01, 0.01], "pixel_offset_adu": [0.0, 0.0]}
    noisy, target = camera_noise(np.zeros((32, 32)), np.random.default_rng(0), no_light)
    assert not noisy.any() and not target.any()


def test_camera_correlated_noise_correlates_neighbours_and_keeps_the_target():
    """``--noise camera-correlated``: the noise (not the content) of some acquisitions is correlated between
    neighbouring pixels, isotropically or along X only; the plain camera mix stays pixel-independent."""
    from memnet.degrade import camera_noise, camera_ranges

    clean = np.full((96, 96), 0.5)
    fixed = {"gamma": [1.0, 1.0], "blur_sigma_px": [0.0, 0.0], "clip_8bit": 0.0, "pixel_gain_cv": [0, 0],
             "pixel_offset_adu": [0, 0], "photons_at_1": [100.0, 100.0], "background": [0.1, 0.1]}

    def lag1(r, axis):
        a, b = np.moveaxis(r, axis, 0)[1:].ravel(), np.moveaxis(r, axis, 0)[:-1].ravel()
        return float(np.corrcoef(a, b)[0, 1])

    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(12):
        noisy, target = camera_noise(clean, rng, {**camera_ranges("camera-correlated"), **fixed, "correlated": 1.0,
                                                  "correlated_sigma_px": [0.8, 0.8], "scan_tau_px": [1.0, 1.0]})
        r = noisy - target
        cy, cx = lag1(r, 0), lag1(r, 1)
        assert cx > 0.2 and abs(float(r.mean())) < 0.05  # correlated along X always; the target is the expectation
        assert cy > 0.2 or abs(cy) < 0.08
        seen.add("isotropic" if cy > 0.2 else "along X")
    assert seen == {"isotropic", "along X"}
    noisy, target = camera_noise(clean, rng, {**camera_ranges("camera"), **fixed})
    assert abs(lag1(noisy - target, 1)) < 0.08 and camera_ranges("camera")["correlated"] == 0
    assert camera_ranges("camera-correlated")["correlated"] == 0.3


def test_microscopy_training_with_camera_noise(tmp_path):
    data = _smooth_images(tmp_path / "clean")
    sampler = PatchSampler("microscopy", [np.asarray(Image.open(p), np.float32) / 255 for p in sorted(data.iterdir())],
                           [], 24, seed=0, noise="camera")
    x, y = sampler.batch(6)
    assert x.shape == y.shape == (6, 1, 24, 24) and not torch.equal(x, y)
    best = train(TrainConfig(task="microscopy", out=str(tmp_path / "r"), data=[str(data)], arch="M2R2C8", patch=24,
                             batch_size=4, steps=4, val_every=4, noise="camera"), log=lambda s: None)
    _, info = memnet.load_model(best)
    assert info.metadata["degradation"]["camera"]["photons_at_1"] == [1.0, 1000.0]
    with pytest.raises(ValueError, match="--noise camera applies to task microscopy, not 'denoise'"):
        train(TrainConfig(task="denoise", out=str(tmp_path / "d"), data=[str(data)], noise="camera"))
    with pytest.raises(ValueError, match="unknown noise model 'pink'.*camera"):
        train(TrainConfig(task="microscopy", out=str(tmp_path / "m"), data=[str(data)], noise="pink"))


def test_ood_evaluation_scores_each_microscope_with_the_affine_fit(tmp_path):
    import tifffile

    from memnet.evaluate import eval_ood, identity

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        clean = (rng.random((40, 40)) * 200).astype(np.uint8)
        for folder, img in (("clean", clean), ("noisy", (clean * 0.5 + 20).astype(np.uint8))):
            (tmp_path / folder).mkdir(exist_ok=True)
            tifffile.imwrite(tmp_path / folder / f"{name}.tif", img)
    out = eval_ood(identity, tmp_path, per_image=True)
    assert set(out) == {"OOD", "a", "b"}
    assert out["a"] > 40 and out["OOD"] == pytest.approx((out["a"] + out["b"]) / 2)  # scale/offset fitted away
    with pytest.raises(FileNotFoundError, match="no microscopy_ood pairs"):
        eval_ood(identity, tmp_path / "nothing")


def test_a_checkpoint_written_before_the_shared_fit_loop_still_resumes():
    """state.pt files in training/ were written with step/best/hours/history at the top level."""
    import json as _json

    from memnet.train import fit_state_of

    old = {"step": 4000, "best": 29.68, "hours": 3.1, "history": _json.dumps([{"step": 4000, "sigma25": 29.68}])}
    st = fit_state_of(old)
    assert (st.step, st.best, st.hours_before) == (4000, 29.68, 3.1) and st.history[0]["sigma25"] == 29.68


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_trains_in_bf16_only_on_cpus_with_native_bf16(monkeypatch, native):
    # Emulated bf16 is slower than fp32: "auto" must pick it only where the CPU computes it natively.
    monkeypatch.setattr(fitloop.torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(fitloop.torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert MixedPrecision("auto", cpu, cpu_auto=True).dtype == (torch.bfloat16 if native else None)
    assert MixedPrecision("auto", cpu).dtype is None  # fine-tuning: fp32 on any CPU unless asked
    assert MixedPrecision("on", cpu).dtype == torch.bfloat16
    assert MixedPrecision("off", cpu, cpu_auto=True).dtype is None
    model = memnet.MemNet(blocks=1, recursions=1, channels=8)
    final, branches = MixedPrecision("auto", cpu, cpu_auto=True).forward(model, torch.rand(2, 1, 16, 16))
    assert final.dtype == torch.float32 and all(b.dtype == torch.float32 for b in branches)  # the loss sees fp32


def test_cpu_has_native_bf16_is_false_without_the_probes(monkeypatch):
    monkeypatch.delattr(fitloop.torch.cpu, "_is_avx512_bf16_supported")
    assert fitloop.cpu_has_native_bf16() is False
