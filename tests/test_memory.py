"""Memory up front (issue #32, item 6): one estimate of a batch's peak memory; an explicit tile or batch
that cannot fit is refused in one line naming what fits; an automatic tile is made to fit. The memory
there is comes from MEMNET_MEMORY_LIMIT here (a fake small limit), never from really running out."""

import subprocess
import sys

import numpy as np
import pytest
import tifffile

import memnet
from memnet.memory import available_bytes, batch_peak_bytes, fit_tile
from memnet.model import MemNetConfig


def test_the_estimate_grows_with_window_batch_and_model():
    small, big = MemNetConfig(4, 4, 32), MemNetConfig(6, 6, 64)
    a = batch_peak_bytes(small, (256, 256))
    assert batch_peak_bytes(small, (512, 512)) > 3.9 * a and batch_peak_bytes(small, (256, 256), 4) > 3.9 * a
    assert batch_peak_bytes(big, (256, 256)) > 2 * a
    # The issue's case: --tile 2048 on M6R6C64 (radius 74: a 2196² window) needs far more than 8 GB.
    assert batch_peak_bytes(big, (2196, 2196), 1, "onnxruntime") > 16 * 2**30


def test_an_explicit_tile_that_cannot_fit_is_refused_naming_the_largest_that_fits(tiny_model, monkeypatch, rng,
                                                                                   tmp_path, restore_cli):
    monkeypatch.setenv("MEMNET_MEMORY_LIMIT", "12M")
    cfg, r = tiny_model.config, memnet.receptive_field(tiny_model)
    x = rng.random((160, 160), dtype=np.float32)
    fits = fit_tile(cfg, x.shape, 240, r, auto=True)
    assert 16 <= fits < 240 and fits % 16 == 0
    with pytest.raises(ValueError, match=rf"^not enough memory: tile 240 needs about .* of M2R2C8 \(eager, CPU\), "
                                         rf"and about 12 MB is available: use tile {fits} or less \(--tile {fits}\)"):
        memnet.restore(x, tiny_model, tile=240, device="cpu", backend="eager")
    with pytest.raises(ValueError, match="not enough memory"):
        memnet.restore(x, tiny_model, tile=fits + 16, device="cpu", backend="eager")  # the largest, exactly
    got = memnet.restore(x, tiny_model, tile=fits, device="cpu", backend="eager")
    # tile auto: made to fit, the same exact result
    np.testing.assert_array_equal(memnet.restore(x, tiny_model, device="cpu", backend="eager"), got)
    # The CLI: one line, exit 2, nothing written.
    src, out = tmp_path / "in.tif", tmp_path / "o.tif"
    tifffile.imwrite(src, x)
    model = tmp_path / "m.safetensors"
    memnet.save_model(tiny_model, model, name="m", task="denoise")
    rc, err = restore_cli([src, "-o", out, "--model", model, "--tile", 240, "--backend", "eager"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"--tile {fits})" in err
    assert not out.exists() and not (tmp_path / "o.tif.partial").exists()


def test_an_explicit_batch_that_cannot_fit_names_the_batch_that_does(tiny_model, monkeypatch, rng):
    monkeypatch.setenv("MEMNET_MEMORY_LIMIT", "12M")
    x = rng.random((96, 96), dtype=np.float32)
    with pytest.raises(ValueError, match=r"for 32 windows of .*: use batch_size (\d+) or less \(--batch-size \1\)"):
        memnet.restore(x, tiny_model, tile=48, batch_size=32, device="cpu", backend="eager")
    with pytest.raises(ValueError) as e:
        memnet.restore(x, tiny_model, tile=48, batch_size=32, device="cpu", backend="eager")
    most = int(str(e.value).split("use batch_size ")[1].split()[0])
    memnet.restore(x, tiny_model, tile=48, batch_size=most, device="cpu", backend="eager")  # runs


def test_the_m6r6c64_case_of_the_issue_is_one_line(monkeypatch):
    monkeypatch.setenv("MEMNET_MEMORY_LIMIT", "8G")
    with pytest.raises(ValueError, match=r"tile 2048 needs about \d+\.\d GB for one window of 2196×2196 px of M6R6C64 "
                                         r"\(eager, CPU\), and about 8.0 GB is available: use tile \d+ or less"):
        memnet.restore(np.zeros((2200, 2200), np.float32), memnet.MemNet(6, 6, 64), tile=2048, device="cpu",
                       backend="eager")


def test_available_memory_reads_the_address_space_limit():
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, resource.RLIM_INFINITY)); "
            "from memnet.memory import available_bytes; print(available_bytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert 0 <= int(out.stdout) < 6 * 2**30  # what the limit leaves, less what the process already maps
    if sys.platform.startswith("linux"):
        assert available_bytes() > 0  # MemAvailable


def test_auto_batches_fit_the_memory_there_is(tiny_model, monkeypatch):
    import torch

    from memnet.runner import auto_batch

    cpu = torch.device("cpu")
    one = batch_peak_bytes(tiny_model.config, (64, 64))
    assert auto_batch(tiny_model, (64, 64), cpu, None) == 32  # plenty
    monkeypatch.setenv("MEMNET_MEMORY_LIMIT", str(int(5.5 * one / 0.9)))
    assert auto_batch(tiny_model, (64, 64), cpu, None) == 5
