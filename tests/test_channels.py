"""Channels are restored as separate images (issue #31): the intensity mapping is taken per channel
(C axis and RGB samples S), never across channels, and the same way for any axis order."""

import numpy as np
import pytest
import tifffile

import memnet
from memnet.normalize import Intensity


def _two_channels(h=96, w=80, seed=1):
    """A bright DAPI-like channel and a dim one, as the issue's repro: (2, h, w) uint16."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    c0 = 2000 + 30000 * (np.sin(yy / 11) * np.cos(xx / 13) > 0.3)
    c1 = 20 + 200 * (0.5 + 0.5 * np.sin(xx / 6 + yy / 17))
    return np.stack([rng.poisson(c0), rng.poisson(c1)]).astype(np.uint16)


def test_a_two_channel_imagej_stack_gives_each_channel_as_restored_alone(tmp_path, micro_file, restore_cli):
    st = _two_channels()
    path = tmp_path / "ch2.tif"
    tifffile.imwrite(path, np.stack([st, st[:, ::-1]])[None], imagej=True, metadata={"axes": "TZCYX"})
    rc, err = restore_cli([path, "-o", tmp_path / "both.tif", "--model", micro_file, "--tile", "64"])
    assert rc == 0, err
    both = tifffile.imread(tmp_path / "both.tif").reshape(2, 2, *st.shape[1:])  # Z C Y X
    for c in range(2):
        alone = tmp_path / f"c{c}.tif"
        tifffile.imwrite(alone, np.stack([st[c], st[c, ::-1]]), metadata={"axes": "ZYX"})
        rc, err = restore_cli([alone, "-o", tmp_path / f"c{c}-out.tif", "--model", micro_file, "--tile", "64"])
        assert rc == 0, err
        np.testing.assert_array_equal(both[:, c], tifffile.imread(tmp_path / f"c{c}-out.tif"))


def test_rgb_samples_are_mapped_each_on_their_own(tmp_path, micro_file):
    st = _two_channels(64, 64)
    rgb = np.stack([st[0] // 130, st[1], (st[1] // 2 + 5)], axis=-1).astype(np.uint8)  # Y X S
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    assert memnet.open_input(path).axes == "YXS"
    out = memnet.restore(str(path), str(micro_file), device="cpu", tile=32)
    for s in range(3):
        alone = memnet.restore(np.ascontiguousarray(rgb[..., s]), str(micro_file), device="cpu", tile=32)
        np.testing.assert_array_equal(out[..., s], alone)


def test_the_axis_order_of_a_zarr_does_not_change_the_result(tmp_path, micro_file, rng):
    import zarr

    zyx = rng.poisson(np.linspace(5, 900, 3 * 48 * 40).reshape(3, 48, 40)).astype(np.uint16)
    ref = memnet.restore(zyx, str(micro_file), axes="ZYX", device="cpu", tile=32)
    for axes, order in (("YZX", (1, 0, 2)), ("XZY", (2, 0, 1))):
        z = zarr.open_array(str(tmp_path / f"{axes}.zarr"), mode="w", shape=zyx.transpose(order).shape,
                            chunks=(16, 3, 16), dtype=zyx.dtype)
        z[:] = zyx.transpose(order)
        out = memnet.restore(z, str(micro_file), axes=axes, device="cpu", tile=32)
        np.testing.assert_array_equal(out, ref.transpose(order))


def test_lazy_runs_map_channels_separately(micro_file):
    st = _two_channels(64, 48)
    lazy = memnet.restore(st, str(micro_file), axes="CYX", device="cpu", tile=32, lazy=True).compute()
    for c in range(2):
        np.testing.assert_array_equal(lazy[c], memnet.restore(st[c], str(micro_file), device="cpu", tile=32))


@pytest.mark.slow
def test_distributed_runs_map_channels_separately(tmp_path, micro_file):
    from distributed import Client, LocalCluster

    st = _two_channels(64, 48)
    path = tmp_path / "cyx.tif"
    tifffile.imwrite(path, st, metadata={"axes": "CYX"})
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        memnet.restore(str(path), str(micro_file), output=str(tmp_path / "d.zarr"), device="cpu", tile=32,
                       client=client)
    out = np.asarray(memnet.open_input(tmp_path / "d.zarr").array)
    for c in range(2):
        np.testing.assert_array_equal(out[c], memnet.restore(st[c], str(micro_file), device="cpu", tile=32))


def test_one_channel_keeps_the_job_record_it_had(rng):
    """Outputs written before per-channel mapping resume: a single channel's record is unchanged."""
    src = memnet.open_input(rng.integers(0, 4000, (2, 30, 30), dtype=np.uint16), axes="ZYX")
    one = Intensity.for_source(src, {"mode": "percentile", "low": 1, "high": 99.8})
    assert set(one.as_dict()) == {"scale", "offset", "dtype"} and one.at((1,)) is one.at((0,))
    two = Intensity.for_source(memnet.open_input(src.array, axes="CYX"), {"mode": "percentile", "low": 1,
                                                                           "high": 99.8})
    assert len(two.as_dict()["channels"]) == 2 and two.at((0,)) is not two.at((1,))
    assert Intensity.from_spec(two.to_spec()) == two


def test_a_plane_restored_alone_for_a_preview_equals_that_plane_of_the_full_result(micro_file):
    st = np.stack([_two_channels(64, 48, seed=s) for s in (1, 2, 3)])  # Z C Y X: 3 planes of 2 channels
    st[2] *= 3  # the last plane is brighter: a plane's own percentiles would map it differently
    full = memnet.restore(st, str(micro_file), axes="ZCYX", device="cpu", tile=32)
    for lead in [(0, 1), (2, 0), (1, 1)]:
        plane = memnet.restore_plane(st, str(micro_file), lead, axes="ZCYX", device="cpu", tile=32)
        np.testing.assert_array_equal(plane, full[lead])
    xy = np.ascontiguousarray(st.transpose(0, 1, 3, 2))  # X before Y in storage
    plane = memnet.restore_plane(xy, str(micro_file), (1, 0), axes="ZCXY", device="cpu", tile=32)
    np.testing.assert_array_equal(plane, full[1, 0])
    alone = memnet.restore(st[2, 0], str(micro_file), device="cpu", tile=32)
    assert not np.array_equal(alone, full[2, 0])  # what a preview of the plane on its own would have shown
    with pytest.raises(ValueError, match=r"plane \(3, 0\) is not in the input: its planes are indexed over ZC"):
        memnet.restore_plane(st, str(micro_file), (3, 0), axes="ZCYX", device="cpu", tile=32)
