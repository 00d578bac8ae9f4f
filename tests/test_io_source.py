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
