"""The plugin in a real napari viewer (under Xvfb: pytest-xvfb starts it)."""

import numpy as np


def test_sample_opens_in_a_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-memnet", "noisy_fluorescence")
    (layer,) = viewer.layers
    assert layer.data.shape == (4, 384, 384) and layer.data.dtype == np.uint16
    np.testing.assert_allclose(layer.scale, (0.5, 0.1, 0.1))
    assert tuple(layer.axis_labels) == ("z", "y", "x")
