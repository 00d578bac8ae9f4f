"""Source: the one place that knows a file's axis order; planes come out (Y, X) whatever it is."""

import numpy as np

import memnet


def test_read_plane_gives_yx_windows_for_any_axis_order(rng):
    data = rng.random((3, 2, 40, 30)).astype(np.float32)  # T C Y X
    src = memnet.open_input(data, axes="TCYX")
    assert src.lead_axes == "TC" and src.lead_shape == (3, 2) and src.plane_shape == (40, 30)
    np.testing.assert_array_equal(src.read_plane((2, 1)), data[2, 1])
    np.testing.assert_array_equal(src.read_plane((1, 0), slice(5, 9), slice(10, 30, 2)), data[1, 0, 5:9, 10:30:2])
    swapped = memnet.open_input(np.ascontiguousarray(data.transpose(3, 0, 2, 1)), axes="XTYC")  # X first, C last
    assert swapped.lead_axes == "TC" and swapped.plane_shape == (40, 30)
    np.testing.assert_array_equal(swapped.read_plane((2, 1)), data[2, 1])
    np.testing.assert_array_equal(swapped.read_plane((0, 1), slice(0, 7), slice(3, 4)), data[0, 1, 0:7, 3:4])


def test_leads_neighbours_channels_and_storage_order(rng):
    data = rng.random((2, 3, 2, 20, 10)).astype(np.float32)  # T Z C Y X
    src = memnet.open_input(np.ascontiguousarray(data.transpose(0, 4, 1, 3, 2)), axes="TXZYC")
    assert src.leads() == [(t, z, c) for t in range(2) for z in range(3) for c in range(2)]
    assert src.context_axis == "Z" and src.channel((1, 2, 1)) == (1,)
    assert src.neighbour((1, 1, 0), 1) == (1, 2, 0) and src.neighbour((1, 1, 0), -1) == (1, 0, 0)
    assert src.neighbour((1, 2, 0), 1) is None and src.neighbour((1, 0, 0), -1) is None
    assert src.neighbour((0, 1, 1), 1, axis="T") == (1, 1, 1)
    window = src.read_plane((1, 2, 1), slice(3, 9), slice(2, 7))
    np.testing.assert_array_equal(window, data[1, 2, 1, 3:9, 2:7])
    stored = src.to_storage(window)  # back to storage order, where Source.index puts it
    np.testing.assert_array_equal(stored, src.array[src.index((1, 2, 1), slice(3, 9), slice(2, 7))])
    assert memnet.open_input(data[0, 0, 0], axes="YX").context_axis is None


def test_a_sample_is_the_same_pixels_whatever_the_axis_order(rng):
    data = rng.integers(0, 60000, (5, 64, 48), dtype=np.uint16)  # Z Y X
    a = memnet.open_input(data, axes="ZYX").sample(max_samples=500)
    b = memnet.open_input(np.ascontiguousarray(data.transpose(1, 0, 2)), axes="YZX").sample(max_samples=500)
    c = memnet.open_input(np.ascontiguousarray(data.transpose(2, 1, 0)), axes="XYZ").sample(max_samples=500)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a, c):
        np.testing.assert_array_equal(x, y)


def test_a_read_failure_names_the_plane_and_window():
    class Broken:
        shape, dtype, ndim = (2, 8, 8), np.dtype(np.uint16), 3

        def __getitem__(self, idx):
            raise RuntimeError("decompression failed")

    src = memnet.open_input(Broken(), axes="ZYX")
    try:
        src.read_plane((1,), slice(0, 4), slice(2, 8))
    except OSError as e:
        assert "plane (1,), rows 0:4, columns 2:8" in str(e) and "decompression failed" in str(e)
    else:
        raise AssertionError("a failing read must raise")
