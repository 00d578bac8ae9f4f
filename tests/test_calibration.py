"""memnet's calibration keywords: pixel_size / units / translate reach the outputs, override a file's."""

import re

import numpy as np
import pytest
import tifffile

import memnet

CAL = {"pixel_size": {"Z": 0.5, "Y": 0.1, "X": 0.1}, "units": {"z": "µm", "y": "µm", "x": "µm"},
       "translate": {"Z": 2.0, "Y": 1.0, "X": 3.0}}


def test_an_arrays_calibration_reaches_a_zarr_output(micro_file, rng, tmp_path):
    x = (rng.random((2, 40, 40)) * 1000).astype(np.uint16)
    memnet.restore(x, micro_file, output=tmp_path / "r.zarr", device="cpu", **CAL)
    out = memnet.open_input(tmp_path / "r.zarr")
    assert out.scale == CAL["pixel_size"] and out.translate == CAL["translate"]
    assert {memnet.io.ngff_unit(u) for u in out.units.values()} == {"micrometer"} and set(out.units) == set("ZYX")
    lazy = memnet.restore_lazy(x, micro_file, device="cpu", **CAL)  # accepted by every entry point
    assert lazy.shape == x.shape


def test_the_keywords_override_a_files_calibration(tmp_path, rng):
    x = (rng.random((3, 20, 20)) * 1000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", x, imagej=True, resolution=(4, 4), metadata={"axes": "ZYX", "spacing": 2.0,
                                                                                        "unit": "um"})
    src = memnet.open_input(tmp_path / "a.tif", pixel_size={"x": 0.3}, units={"Z": "nm"})
    assert src.scale == {"Z": 2.0, "Y": 0.25, "X": 0.3} and src.units["Z"] == "nm" and src.units["X"] == "µm"


@pytest.mark.parametrize("kw, words", [
    ({"pixel_size": {"T": 1.0}}, "pixel_size names axis 'T', which the input does not have (axes ZYX)"),
    ({"pixel_size": {"X": 0}}, "pixel_size['X'] must be a finite positive number"),
    ({"translate": {"X": "left"}}, "translate['X'] must be a number"),
])
def test_bad_calibration_is_named(kw, words, rng):
    with pytest.raises(ValueError, match=re.escape(words)):
        memnet.open_input(rng.random((2, 8, 8)), **kw)
