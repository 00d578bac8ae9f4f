"""The plugin's reader (the napari.yaml reader contribution)."""

import numpy as np


def test_the_plugin_reader_opens_each_series_as_its_own_layer(two_series):
    from napari_memnet._io import read_layers

    p, a, b = two_series
    layers = read_layers(str(p))
    assert [kw["name"] for _, kw, _ in layers] == ["two [series 0]", "two [series 1]"]
    np.testing.assert_array_equal(np.asarray(layers[1][0]), b)
