"""The bad-input / fault matrix (docs/reliability.md): each row a clear error naming the problem,
a non-zero CLI exit, the input untouched and no output marked complete."""

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import example, given, settings
from hypothesis import strategies as st

import memnet
from memnet.tiling import TilePlan


@pytest.fixture
def model_file(tiny_model, tmp_path):
    p = tmp_path / "m.safetensors"
    memnet.save_model(tiny_model, p, name="m", task="denoise")
    return p


def _assert_no_complete_output(out):
    if out.suffix == ".zarr" and out.exists():
        assert zarr.open_group(str(out), mode="r").attrs["memnet"]["complete"] is False
    elif out.suffix == ".tif":
        assert not out.exists()


def test_corrupt_tiff(model_file, tmp_path, restore_cli):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + os.urandom(200))
    before = bad.read_bytes()
    rc, err = restore_cli([bad, "-o", tmp_path / "o.zarr", "--model", model_file])
    assert rc == 2 and "bad.tif" in err and "not a readable TIFF" in err
    assert bad.read_bytes() == before and not (tmp_path / "o.zarr").exists()


def test_truncated_tiff_fails_mid_run_without_complete_output(model_file, tmp_path, restore_cli, rng):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, (rng.random((6, 64, 64)) * 255).astype(np.uint8))
    data = good.read_bytes()
    trunc = tmp_path / "trunc.tif"
    trunc.write_bytes(data[: int(len(data) * 0.6)])
    before = trunc.read_bytes()
    for out in (tmp_path / "o.zarr", tmp_path / "o.tif"):
        rc, err = restore_cli([trunc, "-o", out, "--model", model_file, "--tile", "32"])
        assert rc == 2 and "trunc.tif" in err and ("truncated" in err or "not a readable TIFF" in err), err
        _assert_no_complete_output(out)
    assert trunc.read_bytes() == before


@pytest.mark.parametrize("shape,msg", [((0, 5), "the input is empty"), ((3, 0, 4), "the input is empty"),
                                       ((0, 10, 10), "the input is empty"), ((0,), "need at least a 2-D image"),
                                       ((10,), "need at least a 2-D image")])
def test_empty_arrays(tiny_model, shape, msg):
    with pytest.raises(ValueError, match=msg):
        memnet.restore(np.zeros(shape, np.float32), tiny_model, device="cpu")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_in_float_data(model_file, tmp_path, bad, rng, restore_cli):
    x = rng.random((40, 50), dtype=np.float32)
    x[17, 23] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf.*y=17, x=23"):
        memnet.restore(x, model_file, device="cpu")
    p = tmp_path / "nan.tif"
    tifffile.imwrite(p, x)
    rc, err = restore_cli([p, "-o", tmp_path / "o.zarr", "--model", model_file])
    assert rc == 2 and "NaN or Inf" in err
    _assert_no_complete_output(tmp_path / "o.zarr")


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                                   "float16", "float32", "float64"])
def test_every_numeric_dtype_keeps_its_dtype(tiny_model, dtype, rng):
    dt = np.dtype(dtype)
    if dt.kind == "f":
        x = rng.random((20, 24)).astype(dt)
    else:
        info = np.iinfo(dt)
        x = rng.integers(max(info.min, -1000), min(info.max, 1000), (20, 24), endpoint=True).astype(dt)
    out = memnet.restore(x, tiny_model, device="cpu")
    assert out.dtype == dt and out.shape == x.shape


@pytest.mark.parametrize("dtype,msg", [("bool", "boolean"), ("complex64", "complex")])
def test_unsupported_dtypes(tiny_model, dtype, msg):
    with pytest.raises(TypeError, match=msg):
        memnet.restore(np.zeros((20, 20), dtype), tiny_model, device="cpu")


def test_more_than_six_dimensions(tiny_model):
    with pytest.raises(ValueError, match="7-D arrays are not supported"):
        memnet.restore(np.zeros((1,) * 5 + (8, 8), np.float32), tiny_model, device="cpu")


def test_axes_that_do_not_match(model_file, tmp_path, restore_cli, rng):
    p = tmp_path / "in.tif"
    tifffile.imwrite(p, rng.random((2, 30, 30), dtype=np.float32))
    rc, err = restore_cli([p, "-o", tmp_path / "o.zarr", "--model", model_file, "--axes", "TZYX"])
    assert rc == 2 and "expected axes like ZYX for a 3-D array, got 'TZYX'" in err


def test_rgb_vs_channel_first_ambiguity(tiny_model, rng):
    rgb = rng.random((40, 50, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"ambiguous shape \(40, 50, 3\).*axes='YXC'"):
        memnet.restore(rgb, tiny_model, device="cpu")
    out = memnet.restore(rgb, tiny_model, axes="YXC", device="cpu")
    per_channel = memnet.restore(np.ascontiguousarray(rgb[..., 1]), tiny_model, device="cpu")
    np.testing.assert_allclose(out[..., 1], per_channel, atol=1e-5)
    # An RGB TIFF is labelled by its metadata (YXS): no ambiguity.
    assert memnet.open_input(rgb, axes="YXS").axes == "YXS"


def test_model_for_the_wrong_task_or_channels(tiny_model, tmp_path):
    sr = tmp_path / "sr.safetensors"
    memnet.save_model(tiny_model, sr, name="sr", task="sr")
    with pytest.raises(ValueError, match="super-resolution model: pass scale"):
        memnet.restore(np.zeros((20, 20), np.float32), sr, device="cpu")
    rgb_model = memnet.MemNet(1, 1, 4, in_channels=3, out_channels=3)
    with pytest.raises(ValueError, match="single-channel models.*3 channels"):
        memnet.restore(np.zeros((20, 20), np.float32), rgb_model, device="cpu")


def test_pickled_weights_are_refused_on_the_cli(tmp_path, restore_cli, rng):
    import pickle

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"a": 1}))
    p = tmp_path / "in.tif"
    tifffile.imwrite(p, rng.random((20, 20), dtype=np.float32))
    rc, err = restore_cli([p, "-o", tmp_path / "o.zarr", "--model", evil])
    assert rc == 2 and "evil.safetensors" in err and "refused" in err


def test_output_equal_to_input_on_the_cli(model_file, tmp_path, restore_cli, rng):
    p = tmp_path / "in.tif"
    tifffile.imwrite(p, rng.random((20, 20), dtype=np.float32))
    before = p.read_bytes()
    rc, err = restore_cli([p, "-o", p, "--model", model_file, "--overwrite"])
    assert rc == 2 and "is the input" in err and p.read_bytes() == before


def test_existing_output_without_overwrite(model_file, tmp_path, restore_cli, rng):
    p = tmp_path / "in.tif"
    tifffile.imwrite(p, rng.random((20, 20), dtype=np.float32))
    out = tmp_path / "o.tif"
    out.write_bytes(b"precious")
    rc, err = restore_cli([p, "-o", out, "--model", model_file])
    assert rc == 2 and "already exists" in err and "--overwrite" in err and out.read_bytes() == b"precious"
    rc, err = restore_cli([p, "-o", out, "--model", model_file, "--overwrite"])
    assert rc == 0 and tifffile.imread(out).shape == (20, 20)


def _read_only_dirs(tmp_path):
    """Folders this process really cannot write to: a chmod 555 folder (not for root, who ignores
    permission bits) and a read-only mount such as /proc/sys in containers."""
    out = []
    if os.geteuid() != 0:
        ro = tmp_path / "readonly"
        ro.mkdir()
        os.chmod(ro, 0o555)
        out.append(ro)
    if os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
        out.append(Path("/proc/sys"))
    return out


def test_read_only_directory(model_file, tmp_path, restore_cli, rng):
    p = tmp_path / "in.tif"
    tifffile.imwrite(p, rng.random((20, 20), dtype=np.float32))
    dirs = _read_only_dirs(tmp_path)
    assert dirs, "no read-only folder available to test against on this machine"
    for ro in dirs:
        rc, err = restore_cli([p, "-o", ro / "memnet-out.zarr", "--model", model_file])
        assert rc == 2 and "read-only" in err and str(ro) in err
        assert not (ro / "memnet-out.zarr").exists()


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_full_disk_is_reported_and_nothing_is_marked_complete(model_file, tmp_path, monkeypatch, suffix, rng):
    """A full disk, simulated: the store's writes fail with ENOSPC part-way through."""
    from memnet import io as mio

    calls = {"n": 0}
    if suffix == ".zarr":
        real = mio.ZarrSink.write

        def write(self, index, block):
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, index, block)

        monkeypatch.setattr(mio.ZarrSink, "write", write)
    else:
        import tifffile as tf

        real_imwrite = tf.imwrite

        def imwrite(path, *a, **kw):
            data = kw.pop("data", None)

            def failing():
                for i, tile in enumerate(data):
                    if i > 3:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    yield tile

            return real_imwrite(path, *a, data=failing(), **kw)

        monkeypatch.setattr(tf, "imwrite", imwrite)
    out = tmp_path / f"o{suffix}"
    x = rng.random((3, 64, 64), dtype=np.float32)
    with pytest.raises(OSError, match="No space left on device"):
        memnet.restore(x, model_file, output=out, tile=32, device="cpu", batch_size=1)
    _assert_no_complete_output(out)
    assert not (tmp_path / f"o{suffix}.partial").exists()


# Property-based tests -------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), tile=st.integers(1, 128), halo=st.integers(0, 80))
def test_tiling_plan_cores_partition_the_image(h, w, tile, halo):
    plan = TilePlan(h, w, tile=tile, halo=halo)
    cover = np.zeros((h, w), np.int32)
    shapes = set()
    for t in plan:
        cover[t.core] += 1
        wy, wx = t.window
        shapes.add((wy.stop - wy.start, wx.stop - wx.start))
        assert 0 <= wy.start and wy.stop <= h and 0 <= wx.start and wx.stop <= w
        # The kept core lies at least `halo` from every window edge that is not an image edge.
        for core, win, n in ((t.core[0], wy, h), (t.core[1], wx, w)):
            assert win.start <= core.start and core.stop <= win.stop
            assert win.start == 0 or core.start - win.start >= halo
            assert win.stop == n or win.stop - core.stop >= halo
        cy, cx = t.crop
        assert (cy.stop - cy.start, cx.stop - cx.start) == (t.core[0].stop - t.core[0].start,
                                                              t.core[1].stop - t.core[1].start)
    assert (cover == 1).all()
    assert len(shapes) == 1  # one window shape for the whole run


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 400), tile=st.integers(8, 128), halo=st.integers(1, 60),
       kind=st.sampled_from(["cosine", "linear"]))
def test_blend_weights_sum_to_one_with_no_taper_at_borders(n, tile, halo, kind):
    halo = min(halo, tile // 2)
    plan = TilePlan(n, 1, tile=tile, halo=halo, blend=kind)
    total = np.zeros(n)
    for t in plan:
        sy, _ = plan.support(t)
        total[sy] += plan.weights(t)[:, 0]
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=2, max_size=4),
       dtype=st.sampled_from(["uint8", "uint16", "int16", "float32"]), fmt=st.sampled_from(["tif", "zarr"]))
@example(shape=[1, 2, 1, 1], dtype="uint8", fmt="tif")  # 1-pixel planes: tifffile's store fails on them
def test_readers_round_trip_random_valid_files(tmp_path_factory, shape, dtype, fmt):
    rng = np.random.default_rng(len(shape))
    x = (rng.random(shape) * 100).astype(dtype)
    d = tmp_path_factory.mktemp("rt")
    axes = "TZYX"[-len(shape):] if len(shape) != 3 else "ZYX"
    if fmt == "tif":
        p = d / "x.tif"
        tifffile.imwrite(p, x, metadata={"axes": axes})
    else:
        p = d / "x.zarr"
        memnet.save_image(x, p, axes=axes)
    src = memnet.open_input(p, axes=axes)
    assert src.shape == x.shape and src.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(src.array[...]), x)
    src.close()


@pytest.mark.parametrize("dtype", ["int32", "uint8", "float32", "bfloat16", "float16"])
def test_a_torch_tensor_is_restored_like_its_numpy_array(dtype, tiny_model, rng, tmp_path):
    """Issue #32, item 7: a tensor (any device) is taken as the numpy array it holds, on the CPU."""
    import torch

    x = (rng.random((2, 40, 40)) * 100).astype(np.float32)
    t = torch.from_numpy(x).to(getattr(torch, dtype))
    expected = memnet.restore(t.float().numpy() if dtype == "bfloat16" else t.numpy(), tiny_model, axes="ZYX",
                              tile=32, device="cpu")
    got = memnet.restore(t, tiny_model, axes="ZYX", tile=32, device="cpu")
    assert isinstance(got, np.ndarray) and got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    out = tmp_path / "o.zarr"
    memnet.restore(t.requires_grad_(True) if t.is_floating_point() else t, tiny_model, axes="ZYX", tile=32,
                   device="cpu", output=out)
    np.testing.assert_array_equal(memnet.open_input(out).array[:], expected)
    with pytest.raises(TypeError, match="boolean"):
        memnet.restore(torch.zeros(20, 20, dtype=torch.bool), tiny_model, device="cpu")
