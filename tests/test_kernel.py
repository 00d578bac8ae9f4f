"""The restore job (memnet.kernel): a non-finite model result fails the run, naming where, before anything
is marked complete."""

import numpy as np
import pytest
import torch
import zarr

import memnet


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
