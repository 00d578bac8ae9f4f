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


@pytest.mark.parametrize("option, value, cli", [("pyramid", 256, ["--pyramid", "256"]),
                                                ("ome_zarr_version", "0.4", ["--ome-zarr-version", "0.4"])])
def test_zarr_only_options_with_a_tiff_output_are_refused(option, value, cli, tiny_model, micro_file, tmp_path,
                                                         restore_cli):
    """Issue #32, item 9: never silently ignored."""
    import tifffile

    x = np.zeros((20, 20), np.float32)
    with pytest.raises(ValueError, match=rf"^{option} \(--{option.replace('_', '-')}\) applies to a .zarr output "
                                         r"only, not to .*o.tif: drop it or write a .zarr output$"):
        memnet.restore(x, tiny_model, output=tmp_path / "o.tif", device="cpu", **{option: value})
    with pytest.raises(ValueError, match="applies to a .zarr output only, not to an in-memory result"):
        memnet.restore(x, tiny_model, device="cpu", options=memnet.RestoreOptions(**{option: value}))
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.zeros((20, 20), np.uint16))
    rc, err = restore_cli([src, "-o", tmp_path / "o.tif", "--model", micro_file, *cli])
    assert rc == 2 and f"--{option.replace('_', '-')}) applies to a .zarr output only" in err
    assert not (tmp_path / "o.tif").exists()
    rc, err = restore_cli([src, "-o", tmp_path / "o.zarr", "--model", micro_file, *cli])  # what they are for
    assert rc == 0, err


def test_save_image_checks_overwrite_strictly(tmp_path):
    out = tmp_path / "o.tif"
    memnet.save_image(np.zeros((20, 20), np.uint8), out)
    before = out.read_bytes()
    with pytest.raises(TypeError, match="^overwrite must be True or False, got 'no'$"):
        memnet.save_image(np.ones((20, 20), np.uint8), out, overwrite="no")
    assert out.read_bytes() == before


def test_write_threads_change_the_speed_only(tmp_path, micro_file, rng, restore_cli):
    """docs/developing.md's restore-option recipe, followed: a speed-only option (issue #34: a GPU outruns
    one core's compression), checked on construction, in the CLI, ignored by resume."""
    x = rng.integers(0, 3000, (3, 96, 80), dtype=np.uint16)
    ref = memnet.restore(x, str(micro_file), device="cpu", tile=32, write_threads=1)
    out = memnet.restore(x, str(micro_file), output=str(tmp_path / "a.zarr"), device="cpu", tile=32, write_threads=3)
    np.testing.assert_array_equal(np.asarray(out), ref)
    again = memnet.restore(x, str(micro_file), output=str(tmp_path / "a.zarr"), device="cpu", tile=32, resume=True,
                           write_threads=2)  # resumable with another value: it changes nothing in the result
    np.testing.assert_array_equal(np.asarray(again), ref)
    with pytest.raises(ValueError, match="write_threads must be ≥ 1 or 'auto', got 0"):
        memnet.RestoreOptions(write_threads=0)
    assert memnet.RestoreOptions().write_threads == "auto" and "write_threads" in memnet.RestoreOptions.speed_only()
    import tifffile

    tifffile.imwrite(tmp_path / "x.tif", x, metadata={"axes": "ZYX"})
    rc, err = restore_cli([tmp_path / "x.tif", "-o", tmp_path / "c.zarr", "--model", micro_file, "--tile", "32",
                           "--write-threads", "2"])
    assert rc == 0, err
    np.testing.assert_array_equal(memnet.open_input(tmp_path / "c.zarr").array[:], ref)
    with pytest.raises(SystemExit) as e:  # argparse's refusal: exit 2, naming the option
        restore_cli([tmp_path / "x.tif", "-o", tmp_path / "d.zarr", "--write-threads", "0"])
    assert e.value.code == 2
