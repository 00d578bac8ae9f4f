"""Training end to end on small synthetic data: a tiny model, a few steps."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

import memnet
from memnet.train import PatchSampler, TrainConfig, multi_supervised_loss, train


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


@pytest.mark.parametrize("task", ["denoise", "sr", "jpeg", "microscopy"])
def test_sampler_degrades_and_keeps_shapes(task):
    rng = np.random.default_rng(0)
    clean = [rng.random((60, 60), dtype=np.float32)]
    s = PatchSampler(task, clean, [], patch=24)
    x, y = s.batch(4)
    assert x.shape == y.shape == (4, 1, 24, 24)
    assert not torch.equal(x, y)


def test_train_reduces_loss_saves_and_resumes(tmp_path):
    data = _smooth_images(tmp_path / "clean")
    logs = []
    cfg = TrainConfig(task="denoise", out=str(tmp_path / "run"), data=[str(data)], arch="M2R2C8", patch=24,
                      batch=8, steps=60, val_every=30, log_every=5, lr=3e-3, name="tiny-denoise")
    best = train(cfg, log=logs.append)
    losses = [float(m[1]) for line in logs if (m := re.search(r"loss ([0-9.]+)", line))]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert any("validation at step 60" in line for line in logs)

    model, info = memnet.load_model(best)
    assert info.name == "tiny-denoise" and info.task == "denoise"
    assert info.metadata["training"]["steps"] in (30, 60)
    assert "holdout" in info.metrics and info.normalization == {"mode": "natural"}
    assert info.metadata["degradation"]["gaussian_sigma_255"] == [0, 75]

    cfg.steps = 70
    logs2 = []
    train(cfg, resume=True, log=logs2.append)
    assert logs2[0].startswith("resumed from step 60")
    _, info2 = memnet.load_model(tmp_path / "run" / "last.safetensors")
    assert info2.metadata["training"]["steps"] == 70


def test_bf16_training_on_cpu_learns_like_fp32_and_saves_fp32_weights(tmp_path):
    data = _smooth_images(tmp_path / "clean")
    curves = {}
    for amp in ("off", "on"):
        logs = []
        cfg = TrainConfig(task="denoise", out=str(tmp_path / amp), data=[str(data)], arch="M2R2C8", patch=24,
                          batch=8, steps=60, val_every=60, log_every=5, lr=3e-3, amp=amp)
        best = train(cfg, log=logs.append)
        curves[amp] = [float(m[1]) for line in logs if (m := re.search(r"loss ([0-9.]+)", line))]
    end = {amp: np.mean(c[-3:]) for amp, c in curves.items()}
    assert end["on"] < 0.5 * np.mean(curves["on"][:3])
    assert end["on"] < 1.3 * end["off"]  # same seed, same batches: bf16 must not learn visibly worse
    model, info = memnet.load_model(best)
    assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())
    assert info.metadata["training"]["config"]["amp"] == "on"
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
                              batch=4, steps=6, val_every=6, name="stage-a"), log=lambda s: None)
    _, a = memnet.load_model(first)
    second = train(TrainConfig(task="denoise", out=str(tmp_path / "b"), data=[str(data)], patch=24, batch=4,
                               steps=4, val_every=4, init=str(first), name="stage-b"), log=lambda s: None)
    _, b = memnet.load_model(second)
    t = b.metadata["training"]
    assert t["steps"] == 4 and t["total_steps"] == 10
    assert t["continued_from"]["name"] == "stage-a" and t["continued_from"]["steps"] == 6
    assert t["total_hours"] >= a.metadata["training"]["hours"]
    # A third stage adds to the running totals, not to the second stage's own steps.
    third = train(TrainConfig(task="denoise", out=str(tmp_path / "c"), data=[str(data)], patch=24, batch=4,
                              steps=3, val_every=3, init=str(second)), log=lambda s: None)
    assert memnet.load_model(third)[1].metadata["training"]["total_steps"] == 13


def test_paired_targets_are_mapped_onto_the_noisy_images_intensity_frame(tmp_path):
    # A clean image stored at another gain and offset than its noisy capture (as W2S's 8-bit copies):
    # after normalisation the target must sit in the noisy image's frame, not at its own percentiles.
    import tifffile

    from memnet.train import _load_data

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    signal = 0.2 + 0.6 * (np.sin(6 * xx) * np.cos(4 * yy)) ** 2
    noisy = np.clip(signal + rng.normal(0, 0.15, signal.shape), 0, 1.2)
    (tmp_path / "n").mkdir()
    (tmp_path / "c").mkdir()
    tifffile.imwrite(tmp_path / "n" / "a.tif", (noisy * 180).astype(np.uint8))
    tifffile.imwrite(tmp_path / "c" / "a.tif", (signal * 250 + 3).astype(np.uint8))
    cfg = TrainConfig(task="microscopy", out=str(tmp_path / "r"), pairs=[str(tmp_path / "n"), str(tmp_path / "c")])
    (x, y), = _load_data(cfg)[1]
    # Regressing the noisy input on the target gives gain 1, offset 0 (noise aside).
    a, b = np.polyfit(y.ravel(), x.ravel(), 1)
    assert abs(a - 1) < 0.02 and abs(b) < 0.01
    # Each normalised by its own percentiles, the gain would be far from 1 (the noise widens the
    # noisy image's percentile range).
    from memnet.evaluate import percentile_normalize

    a_own, _ = np.polyfit(percentile_normalize((signal * 250 + 3).astype(np.uint8)).ravel(), x.ravel(), 1)
    assert abs(a_own - 1) > 0.1
