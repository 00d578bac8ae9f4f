"""Restore options are checked strictly: a truthy string is never taken as yes (issue #32, item 3)."""

import numpy as np
import pytest

import memnet


@pytest.mark.parametrize("name, value", [("overwrite", "no"), ("resume", "no"), ("lazy", "no"), ("overwrite", 1),
                                         ("resume", None), ("ensemble", "yes")])
def test_bool_options_are_checked_strictly(name, value, tiny_model, tmp_path):
    out = tmp_path / "o.tif"
    memnet.restore(np.zeros((20, 20), np.float32), tiny_model, output=out, device="cpu")
    before = out.read_bytes()
    with pytest.raises(TypeError, match=f"^{name} must be True or False, got {value!r}$"):
        memnet.restore(np.ones((20, 20), np.float32), tiny_model, output=out, device="cpu", **{name: value})
    assert out.read_bytes() == before  # not replaced


def test_numpy_bools_are_bools(tiny_model, tmp_path):
    out = tmp_path / "o.tif"
    memnet.restore(np.zeros((20, 20), np.float32), tiny_model, output=out, device="cpu")
    memnet.restore(np.ones((20, 20), np.float32), tiny_model, output=out, device="cpu", overwrite=np.bool_(True),
                   ensemble=np.True_)
    import tifffile

    expected = memnet.restore(np.ones((20, 20), np.float32), tiny_model, device="cpu", ensemble=True)
    np.testing.assert_array_equal(tifffile.imread(out), expected)  # replaced, with the ensemble
