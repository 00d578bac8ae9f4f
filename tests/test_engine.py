"""The tiled engine: exactness, blending, streaming I/O, metadata, dtype policy, cancel, errors."""

import threading

import numpy as np
import pytest
import tifffile
import torch
import zarr

import memnet
from memnet.engine import Cancelled
from memnet.io import open_input


def _whole(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, np.float32)).reshape(-1, 1, *x.shape[-2:])).numpy()


@pytest.mark.parametrize("shape,tile", [((1, 700, 913), 128), ((3, 257, 1031), 200), ((2, 61, 45), 16)])
def test_exact_tiling_equals_whole_image_inference(tiny_model, rng, shape, tile):
    x = rng.random(shape, dtype=np.float32)
    ref = _whole(tiny_model, x).reshape(shape)
    out = memnet.restore(x, tiny_model, tile=tile, device="cpu")
    assert out.shape == shape and out.dtype == np.float32
    assert np.abs(out - ref).max() <= 1e-5 * (ref.max() - ref.min())


def test_halo_at_least_radius_is_exact_too(tiny_model, rng):
    x = rng.random((1, 150, 170), dtype=np.float32)
    ref = _whole(tiny_model, x).reshape(x.shape)
    r = memnet.receptive_field(tiny_model)
    out = memnet.restore(x, tiny_model, tile=64, halo=r + 3, device="cpu")
    assert np.abs(out - ref).max() <= 1e-5 * (ref.max() - ref.min())


def test_a_halo_below_the_radius_is_not_exact_but_improves_with_halo(tiny_model, rng):
    x = rng.random((1, 200, 200), dtype=np.float32)
    ref = _whole(tiny_model, x).reshape(x.shape)
    errs = [np.abs(memnet.restore(x, tiny_model, tile=64, halo=h, device="cpu") - ref).max() for h in (2, 5, 8)]
    assert errs[0] > 1e-4 and errs[0] > errs[1] > errs[2]


def test_blending_a_constant_model_output_reproduces_it(rng):
    """Weights sum to one: an identity-like model (global residual only) passes data through."""
    m = memnet.MemNet(1, 1, 4).eval()
    with torch.no_grad():
        m.recon_conv.weight.zero_()
        m.recon_conv.bias.zero_()
        m.branch_weights.fill_(1.0)
    x = rng.random((1, 130, 190), dtype=np.float32)
    for blend in ("cosine", "linear"):
        out = memnet.restore(x, m, tile=32, halo=3, blend=blend, device="cpu")
        np.testing.assert_allclose(out, x, atol=1e-6)


def test_tiff_in_zarr_and_tiff_out_keep_metadata(micro_file, tmp_path, rng):
    x = (rng.random((2, 3, 150, 210)) * 4000).astype(np.uint16)
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, x, imagej=True, resolution=(5, 5), metadata={"axes": "TZYX", "spacing": 0.7, "unit": "um"})
    before = src.read_bytes()
    model_path = micro_file
    mem = memnet.restore(src, model_path, tile=64, device="cpu")
    z = memnet.restore(src, model_path, output=tmp_path / "out.zarr", tile=64, device="cpu")
    t = memnet.restore(src, model_path, output=tmp_path / "out.tif", tile=64, device="cpu")
    assert src.read_bytes() == before  # input untouched
    assert mem.dtype == np.uint16 and mem.shape == x.shape
    np.testing.assert_array_equal(z[:], mem)
    np.testing.assert_array_equal(tifffile.imread(t), mem)
    root = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert root.attrs["memnet"]["complete"] is True
    assert z.chunks == (1, 1, 64, 64)
    for p in (tmp_path / "out.zarr", tmp_path / "out.tif"):
        s = open_input(p)
        assert s.axes == "TZYX"
        assert s.scale["X"] == pytest.approx(0.2) and s.scale["Z"] == pytest.approx(0.7)
        assert s.units["X"] in ("µm", "micrometer")


def test_zarr_input_streams(tiny_model, tmp_path, rng):
    x = rng.random((2, 100, 120), dtype=np.float32)
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=x.shape, dtype=x.dtype, chunks=(1, 50, 60))
    z[:] = x
    out = memnet.restore(tmp_path / "in.zarr", tiny_model, tile=48, device="cpu")
    np.testing.assert_allclose(out, _whole(tiny_model, x).reshape(x.shape), atol=1e-5)


def test_uint8_in_uint8_out_by_255(tiny_model, rng):
    x = (rng.random((1, 60, 70)) * 255).astype(np.uint8)
    out = memnet.restore(x, tiny_model, tile=32, device="cpu")
    ref = _whole(tiny_model, x.astype(np.float32) / 255).reshape(x.shape)
    assert out.dtype == np.uint8
    expected = np.clip(np.rint(ref * 255), 0, 255).astype(np.uint8)
    # Float rounding can flip a value sitting on a .5 boundary: at most 1 level, rarely.
    diff = np.abs(out.astype(int) - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_dask_input_can_come_back_lazy(tiny_model, rng):
    import dask.array as da

    x = rng.random((3, 90, 100), dtype=np.float32)
    lazy = memnet.restore(da.from_array(x, chunks=(1, 45, 50)), tiny_model, tile=32, device="cpu", lazy=True)
    assert isinstance(lazy, da.Array) and lazy.chunksize == (1, 32, 32)
    np.testing.assert_allclose(lazy[1].compute(), _whole(tiny_model, x[1:2])[0, 0], atol=1e-5)
    np.testing.assert_allclose(lazy.compute(), memnet.restore(x, tiny_model, tile=32, device="cpu"), atol=1e-5)


def test_progress_reports_every_tile(tiny_model, rng):
    seen = []
    memnet.restore(rng.random((2, 70, 70), dtype=np.float32), tiny_model, tile=32, device="cpu",
                   batch_size=2, progress=seen.append)
    assert seen[-1].done == seen[-1].total == 2 * 9
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[-1].pixels == 2 * 70 * 70


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_cancel_leaves_no_complete_output(tiny_model, tmp_path, rng, suffix):
    x = rng.random((4, 64, 64), dtype=np.float32)
    ev = threading.Event()

    def progress(p):
        if p.done >= 2:
            ev.set()

    out = tmp_path / f"out{suffix}"
    with pytest.raises(Cancelled):
        memnet.restore(x, tiny_model, output=out, tile=32, batch_size=1, device="cpu", progress=progress, cancel=ev)
    if suffix == ".zarr":
        assert zarr.open_group(str(out), mode="r").attrs["memnet"]["complete"] is False
    else:
        assert not out.exists() and not (tmp_path / "out.tif.partial").exists()


# Axes of the wrong length: tests/test_bad_inputs.py::test_axes_that_do_not_match.
@pytest.mark.parametrize(
    "axes,msg",
    [("ZZX", "name an axis twice"), ("TZY", "must contain Y and X"), ("ZWX", "unknown axis letter")],
)
def test_bad_axes_are_named(tiny_model, axes, msg):
    with pytest.raises(ValueError, match=msg):
        memnet.restore(np.zeros((2, 20, 20), np.float32), tiny_model, axes=axes, device="cpu")


def test_axes_with_x_before_y(tiny_model, rng):
    x = rng.random((50, 3, 40), dtype=np.float32)  # X, C, Y
    out = memnet.restore(x, tiny_model, axes="XCY", tile=16, device="cpu")
    ref = _whole(tiny_model, np.transpose(x, (1, 2, 0)))[:, 0]  # C, Y, X
    np.testing.assert_allclose(out, np.transpose(ref, (2, 0, 1)), atol=1e-5)


def test_other_errors_say_what_is_wrong(tiny_model, tmp_path):
    """The rest (empty, 1-D, complex, corrupt TIFF, output = input, existing output) are rows of the
    fault matrix in tests/test_bad_inputs.py."""
    with pytest.raises(FileNotFoundError, match="input not found"):
        memnet.restore(tmp_path / "nope.tif", tiny_model, device="cpu")
    with pytest.raises(ValueError, match="unsupported output"):
        memnet.restore(np.zeros((20, 20), np.float32), tiny_model, output=tmp_path / "x.png", device="cpu")
    with pytest.raises(ValueError, match="tile must be 'auto' or an integer"):
        memnet.restore(np.zeros((20, 20), np.float32), tiny_model, tile=4, device="cpu")


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 5), (17, 9), (9, 40), (2, 3, 2)])
def test_image_smaller_than_tile_and_receptive_field(tiny_model, rng, shape):
    """One window equal to the image: the same as whole-image inference (a fault-matrix row)."""
    x = rng.random(shape, dtype=np.float32)
    out = memnet.restore(x, tiny_model, tile=256, device="cpu")
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, _whole(tiny_model, x).reshape(shape), atol=1e-5)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_super_resolution_tiling_is_exact_and_scales_metadata(tiny_model, tmp_path, rng, scale):
    from PIL import Image

    x = rng.random((2, 29, 41), dtype=np.float32)
    # Reference: Pillow's bicubic upscaling of the whole image (the training convention), then the model.
    up = np.stack([np.asarray(Image.fromarray(p, mode="F").resize((41 * scale, 29 * scale), Image.BICUBIC))
                   for p in x])
    ref = _whole(tiny_model, up).reshape(up.shape)
    out = memnet.restore(x, tiny_model, scale=scale, tile=32, device="cpu")
    assert out.shape == (2, 29 * scale, 41 * scale)
    assert np.abs(out - ref).max() <= 1e-5 * (ref.max() - ref.min())

    src = tmp_path / "lr.tif"
    tifffile.imwrite(src, x, imagej=True, resolution=(5, 5), metadata={"axes": "ZYX", "spacing": 1.0, "unit": "um"})
    z = memnet.restore(src, tiny_model, scale=scale, output=tmp_path / "sr.zarr", tile=32, device="cpu")
    assert z.shape == out.shape
    s = open_input(tmp_path / "sr.zarr")
    assert s.scale["X"] == pytest.approx(0.2 / scale) and s.scale["Z"] == pytest.approx(1.0)


def test_scale_needs_an_sr_model(tiny_model, tmp_path):
    p = tmp_path / "d.safetensors"
    memnet.save_model(tiny_model, p, name="d", task="denoise")
    with pytest.raises(ValueError, match="needs a super-resolution model"):
        memnet.restore(np.zeros((20, 20), np.float32), p, scale=2, device="cpu")
    with pytest.raises(ValueError, match="scale must be 2, 3 or 4"):
        memnet.restore(np.zeros((20, 20), np.float32), tiny_model, scale=5, device="cpu")


@pytest.mark.parametrize("shape,tile", [((2, 150, 211), 64), ((1, 45, 61), 16)])
def test_self_ensemble_tiling_is_exact(tiny_model, rng, shape, tile):
    """Every flip/rotation of a tile is that member of the whole image, cropped: tiled self-ensemble
    equals whole-image self-ensemble, also on rectangular tiles at the borders."""
    x = rng.random(shape, dtype=np.float32)
    with torch.no_grad():
        ref = memnet.self_ensemble(tiny_model, torch.from_numpy(x)[:, None]).numpy()[:, 0]
    out = memnet.restore(x, tiny_model, tile=tile, device="cpu", ensemble=True)
    assert np.abs(out - ref).max() <= 1e-5 * (ref.max() - ref.min())
    lazy = memnet.restore(x, tiny_model, tile=tile, device="cpu", ensemble=True, lazy=True).compute()
    assert np.abs(lazy - ref).max() <= 1e-5 * (ref.max() - ref.min())
    assert np.abs(memnet.restore(x, tiny_model, tile=tile, device="cpu") - ref).max() > 1e-3


def test_self_ensemble_super_resolution_is_exact(tiny_model, rng):
    from PIL import Image

    x = rng.random((40, 52), dtype=np.float32)
    up = np.array(Image.fromarray(x, mode="F").resize((156, 120), Image.BICUBIC))
    with torch.no_grad():
        ref = memnet.self_ensemble(tiny_model, torch.from_numpy(up)[None, None]).numpy()[0, 0]
    out = memnet.restore(x, tiny_model, scale=3, tile=48, device="cpu", ensemble=True)
    assert out.shape == (120, 156)
    assert np.abs(out - ref).max() <= 1e-5 * (ref.max() - ref.min())


def test_ensemble_must_be_a_bool(tiny_model, rng):
    with pytest.raises(TypeError, match="ensemble must be True or False"):
        memnet.restore(rng.random((20, 20), dtype=np.float32), tiny_model, device="cpu", ensemble="yes")
