"""Intensity mapping (memnet.normalize): back to integer dtypes, the top of int64/uint64 stays at the top
(issue #32, item 2); a flat float image of any magnitude stays finite."""

import numpy as np
import pytest
import torch
import zarr

import memnet
from memnet.ngff import mean2x2
from memnet.normalize import Normalizer


def _shifting_model(shift: float) -> memnet.MemNet:
    """A MemNet that returns its input plus ``shift``: every conv weight zero, the reconstruction bias
    ``shift`` and the branch weights summing to one (y = x + shift in every branch)."""
    m = memnet.MemNet(blocks=2, recursions=2, channels=8)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.recon_conv.bias.fill_(shift)
        m.branch_weights.fill_(0.5)
    return m.eval()


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.int32, np.uint32])
def test_inverse_keeps_the_top_of_the_range(dtype):
    info = np.iinfo(dtype)
    x = np.array([[info.min, info.max]], dtype=dtype)
    norm = Normalizer.for_data(x, {"mode": "natural"})
    out = norm.inverse(np.array([[-0.5, 1.0], [1.5, 0.0]], np.float32))
    assert out.dtype == dtype
    assert out[0, 1] == info.max and out[1, 0] == info.max  # exactly at the top, and above it
    assert out[0, 0] == info.min and out[1, 1] == info.min


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_mean2x2_of_saturated_pixels_stays_saturated(dtype):
    info = np.iinfo(dtype)
    block = np.full((4, 5), info.max, dtype=dtype)
    out = mean2x2(block)
    assert out.dtype == dtype and (out == info.max).all()


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_saturated_64_bit_pixels_stay_saturated_in_the_output_and_its_pyramid(dtype, rng, tmp_path):
    info = np.iinfo(dtype)
    x = np.full((64, 64), info.max, dtype=dtype)
    x[:, :32] = info.max // 4 * 2  # a dimmer half: mapped back near the middle, not wrapped
    model = _shifting_model(0.01)  # pushes the bright half above the top of the range
    out = tmp_path / "o.zarr"
    memnet.restore(x, model, output=out, tile=32, device="cpu", pyramid=16)
    root = zarr.open_group(str(out), mode="r")
    lv0 = root["0"][:]
    assert lv0.dtype == dtype
    assert (lv0[:, 32:] == info.max).all()  # saturated, never wrapped to the minimum
    assert (lv0[:, :32] > info.max // 4).all()
    for k in ("1", "2"):
        lv = root[k][:]
        assert (lv[:, lv.shape[1] // 2:] == info.max).all(), f"level {k} wrapped"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16])
def test_the_lookup_table_gives_the_float64_mapping_bit_for_bit(dtype):
    """8- and 16-bit inputs are mapped through a table (one lookup per pixel): the same float32 values as
    the float64 computation, so outputs and resumed runs do not change."""
    info = np.iinfo(dtype)
    raw = np.random.default_rng(0).integers(int(info.min), int(info.max) + 1, (64, 48)).astype(dtype)
    n = Normalizer(scale=1234.5, offset=-17.25, out_dtype=np.dtype(dtype), clip=(float(info.min), float(info.max)))
    np.testing.assert_array_equal(n.forward(raw), ((raw.astype(np.float64) + 17.25) / 1234.5).astype(np.float32))
    np.testing.assert_array_equal(n.forward(raw[::2, 1::3]), n.forward(raw)[::2, 1::3])  # views too


@pytest.mark.parametrize("value", [1e30, -3e25, 7.0, 0.0])
def test_constant_float_images_of_any_magnitude_stay_finite(micro_file, value):
    out = memnet.restore(np.full((30, 30), value, np.float32), micro_file, device="cpu")
    assert np.isfinite(out).all() and out.dtype == np.float32
    # At its level: the span is the magnitude, so the (random) tiny model's response to a flat 0 input,
    # about 1 % of the span, is all that moves it.
    np.testing.assert_allclose(out, value, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32])
def test_mean2x2_of_integers_is_the_rounded_float64_mean(dtype, rng):
    """Small integers take an integer path (the pyramid's hot path): the same values as the float64 means
    rounded half to even, at odd edges, at the dtype's extremes and on exact halves and quarters."""
    info = np.iinfo(dtype)
    for shape in [(2, 2), (3, 5), (64, 63), (65, 65), (1, 7), (6, 1)]:
        for lo, hi in [(info.min, info.max), (0, 3), (info.max - 3, info.max), (info.min, info.min + 3)]:
            block = rng.integers(lo, hi, shape, dtype=dtype, endpoint=True)
            h, w = shape
            padded = np.full((h + h % 2, w + w % 2), np.nan)
            padded[:h, :w] = block
            ref = np.rint(np.nanmean(padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2), axis=(1, 3)))
            out = mean2x2(block)
            assert out.dtype == dtype and np.array_equal(out, ref.astype(dtype)), (shape, lo)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.dtype(">i2"), np.dtype(">u2")])
def test_the_forward_table_of_8_and_16_bit_data_is_the_float64_mapping(dtype):
    """Every value of an 8/16-bit dtype (signed ones indexed by their bits with the sign flipped) maps as
    the float64 computation does."""
    norm = Normalizer.build(dtype, {"mode": "percentile"}, lambda lo, hi: (3.0, 200.0))
    info = np.iinfo(dtype)
    values = np.arange(int(info.min), int(info.max) + 1).astype(dtype).reshape(-1, 64)
    ref = ((values.astype(np.float64) - norm.offset) / norm.scale).astype(np.float32)
    out = norm.forward(values)
    assert out.dtype == np.float32 and np.array_equal(out, ref)
