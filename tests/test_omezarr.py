"""OME-Zarr output (issue #22): 0.5 by default and 0.4 on request, metadata the spec's library accepts;
a resolution pyramid written while restoring, equal to block means of the final level 0, that resumes
after an interruption like level 0; and choosing a level of a multiscale input."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr

import memnet
from memnet.cli import main


@pytest.fixture
def model_file(tiny_model, tmp_path):
    p = tmp_path / "m.safetensors"
    memnet.save_model(tiny_model, p, name="m", task="microscopy",
                      metadata={"normalization": {"mode": "percentile", "low": 1, "high": 99.8}})
    return p


@pytest.fixture
def stack(tmp_path, rng):
    x = (rng.random((2, 150, 230)) * 4000).astype(np.uint16)  # odd level sizes on the way down
    p = tmp_path / "in.tif"
    tifffile.imwrite(p, x, imagej=True, metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"}, resolution=(2.0, 2.0))
    return p


def _block_means(a: np.ndarray) -> np.ndarray:
    """The reference: Y and X halved, each pixel the mean of its 2x2 block (of the pixels there are at an
    odd edge: NaN padding), rounded half to even."""
    h, w = a.shape[-2:]
    p = np.full(a.shape[:-2] + (h + h % 2, w + w % 2), np.nan)
    p[..., :h, :w] = a
    m = np.nanmean(p.reshape(a.shape[:-2] + (p.shape[-2] // 2, 2, p.shape[-1] // 2, 2)), axis=(-3, -1))
    return np.rint(m).astype(a.dtype) if a.dtype.kind in "iu" else m.astype(a.dtype)


def _levels(path) -> list[np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    attrs = dict(root.attrs)
    return [root[d["path"]][:] for d in attrs.get("ome", attrs)["multiscales"][0]["datasets"]]


def _check_pyramid(levels, fit):
    for k in range(1, len(levels)):
        np.testing.assert_array_equal(levels[k], _block_means(levels[k - 1]), err_msg=f"level {k}")
    assert max(levels[-1].shape[-2:]) <= fit < max(levels[-2].shape[-2:])


@pytest.mark.parametrize("halo", ["exact", 8])
def test_pyramid_is_the_block_means_of_level_0_which_stays_exact(stack, model_file, tmp_path, halo):
    out = tmp_path / "o.zarr"
    memnet.restore(stack, model_file, output=out, tile=32, halo=halo, pyramid=40, device="cpu", batch_size=3)
    levels = _levels(out)
    assert [lv.shape for lv in levels] == [(2, 150, 230), (2, 75, 115), (2, 38, 58), (2, 19, 29)]
    np.testing.assert_array_equal(levels[0], memnet.restore(stack, model_file, tile=32, halo=halo, device="cpu"))
    _check_pyramid(levels, 40)
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["memnet"]["complete"] is True and root.attrs["memnet"]["job"]["pyramid"] == 40
    assert not (tmp_path / "o.zarr.memnet").exists()
    # Each level's pixel size doubles in Y and X, its first pixel centred on the block it averages.
    ds = root.attrs["ome"]["multiscales"][0]["datasets"]
    assert ds[2]["coordinateTransformations"] == [{"type": "scale", "scale": [2.0, 2.0, 2.0]},
                                                  {"type": "translation", "translation": [0.0, 0.75, 0.75]}]


@pytest.mark.parametrize("axes", ["ZYX", "ZXY"])
def test_the_pyramid_built_from_memory_is_the_one_read_back(model_file, tmp_path, rng, monkeypatch, axes):
    """A run builds each pyramid row from the rows it just wrote, kept in memory (not read back from level
    0): the same chunks, byte for byte, as building every row from what is on disk; odd sizes, and X stored
    before Y."""
    from memnet.sinks import ZarrSink

    x = (rng.random((2, 150, 230)) * 4000).astype(np.uint16)
    kw = dict(axes=axes, tile=32, pyramid=16, device="cpu", batch_size=3)
    read_back = []
    original = ZarrSink._build_read_back
    monkeypatch.setattr(ZarrSink, "_build_read_back", lambda self, unit: read_back.append(unit) or original(self, unit))
    memnet.restore(x, model_file, output=tmp_path / "mem.zarr", **kw)
    assert read_back == []  # every row came from memory
    monkeypatch.setattr(ZarrSink, "_keep", lambda self, *a: None)  # nothing kept: every row read back
    memnet.restore(x, model_file, output=tmp_path / "disk.zarr", **kw)
    assert read_back
    files = sorted(str(p.relative_to(tmp_path / "mem.zarr")) for p in (tmp_path / "mem.zarr").rglob("*")
                   if p.is_file() and p.name != "zarr.json")
    assert len(files) > 40
    for f in files:
        assert (tmp_path / "mem.zarr" / f).read_bytes() == (tmp_path / "disk.zarr" / f).read_bytes(), f
    _check_pyramid([np.moveaxis(lv, -1, -2) if axes == "ZXY" else lv for lv in _levels(tmp_path / "mem.zarr")], 16)


def test_chunks_written_without_zarrs_empty_check_are_the_same_files(tmp_path, rng, monkeypatch):
    """Blocks whose chunks all hold a non-zero pixel skip zarr's compare with the fill value; a block with an
    all-zero chunk goes through zarr, which leaves that chunk out: the same files as zarr alone writes."""
    from memnet.sinks import ZarrSink

    x = (rng.random((2, 150, 230)) * 4000).astype(np.uint16)
    x[0, :64, :96] = 0  # whole chunks of zeros (and of their pyramid rows), beside non-zero ones
    x[1, 70:80, 40:50] = 0  # zeros inside chunks that are not all zero
    dense = []
    original = ZarrSink._write
    monkeypatch.setattr(ZarrSink, "_write", lambda self, k, index, block: dense.append(
        all(block[r: r + 32, c: c + 32].any() for r in range(0, block.shape[0], 32)
            for c in range(0, block.shape[1], 32))) or original(self, k, index, block))
    memnet.save_image(x, tmp_path / "a.zarr", axes="ZYX", tile=32, pyramid=16)
    assert any(dense) and not all(dense)  # both paths taken
    monkeypatch.setattr(ZarrSink, "_write", lambda self, k, index, block: self.levels[k].__setitem__(
        tuple(index[d] for d in self.perm), block))  # zarr alone, with its check
    memnet.save_image(x, tmp_path / "b.zarr", axes="ZYX", tile=32, pyramid=16)
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name != "zarr.json")
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name != "zarr.json")
    assert "0/c/0/0/0" not in files and "0/c/0/0/3" in files  # the all-zero chunk left out, its neighbour kept
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_a_small_image_has_level_0_only_and_pyramid_0_turns_it_off(model_file, tmp_path, rng):
    x = (rng.random((100, 120)) * 4000).astype(np.uint16)
    memnet.restore(x, model_file, output=tmp_path / "a.zarr", device="cpu")  # default: down to 1024 px
    assert len(_levels(tmp_path / "a.zarr")) == 1
    memnet.save_image(np.zeros((1100, 40), np.uint8), tmp_path / "b.zarr", pyramid=0)
    assert len(_levels(tmp_path / "b.zarr")) == 1
    memnet.save_image(np.zeros((1100, 40), np.uint8), tmp_path / "c.zarr")
    assert [lv.shape for lv in _levels(tmp_path / "c.zarr")] == [(1100, 40), (550, 20)]


@pytest.mark.parametrize("version, zarr_format", [("0.5", 3), ("0.4", 2)])
def test_metadata_validates_with_ome_zarr_models(version, zarr_format, stack, model_file, tmp_path, capsys):
    import ome_zarr_models
    from ome_zarr_models import v04, v05

    out = tmp_path / "o.zarr"
    assert main(["restore", str(stack), "-o", str(out), "--model", str(model_file), "--tile", "32", "--pyramid", "40",
                 "--ome-zarr-version", version, "--device", "cpu", "-q"]) == 0, capsys.readouterr().err
    root = zarr.open_group(str(out), mode="r")
    assert root.metadata.zarr_format == zarr_format
    try:
        image = ome_zarr_models.open_ome_zarr(root)  # the library finds the version itself and validates
        assert isinstance(image, {"0.5": v05.Image, "0.4": v04.Image}[version])
    except Exception as e:  # ome-zarr-models 1.6's v0.4 Image model does not build under pydantic >= 2.13
        if version != "0.4" or "not fully defined" not in str(e):
            raise
    memnet.ngff.validate(root, version)  # what the writer ran: the library's model of it, or of its metadata
    attrs = dict(root.attrs)
    meta = {"0.5": v05.image.ImageAttrs, "0.4": v04.image.ImageAttrs}[version].model_validate(attrs.get("ome", attrs))
    ms = meta.multiscales[0]
    assert [a.name for a in ms.axes] == ["z", "y", "x"] and [d.path for d in ms.datasets] == ["0", "1", "2", "3"]
    assert [a.unit for a in ms.axes] == ["micrometer"] * 3
    assert ms.datasets[1].coordinateTransformations[0].scale == [2.0, 1.0, 1.0]
    # Our reader reads both versions alike.
    back = memnet.open_input(out)
    assert back.axes == "ZYX" and back.scale == {"Z": 2.0, "Y": 0.5, "X": 0.5} and back.n_levels == 4
    _check_pyramid(_levels(out), 40)


def test_axes_ome_zarr_cannot_describe_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="OME-Zarr cannot describe axes 'QSYX'.*write a .tif output"):
        memnet.save_image(np.zeros((2, 3, 20, 20), np.uint8), tmp_path / "a.zarr", axes="QSYX")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="ome_zarr_version must be '0.5' or '0.4', got '0.3'"):
        memnet.restore(np.zeros((20, 20), np.float32), memnet.MemNet(2, 2, 8), ome_zarr_version="0.3")


def _cancel_after(n):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > n

    return cancel


def test_an_interrupted_pyramid_resumes_to_the_same_bytes(model_file, tmp_path, rng):
    """Cancelled at several points (before, between and after the groups a pyramid row needs), with
    some finished rows' pyramid markers lost as if killed before they were built: resume gives the
    pyramid of an uninterrupted run, byte for byte."""
    stack = (rng.random((2, 96, 128)) * 4000).astype(np.uint16)
    kw = dict(axes="ZYX", tile=16, pyramid=16, device="cpu", batch_size=2)
    memnet.restore(stack, model_file, output=tmp_path / "ref.zarr", **kw)
    ref = _levels(tmp_path / "ref.zarr")
    assert len(ref) == 4
    out = tmp_path / "o.zarr"
    done = tmp_path / "o.zarr.memnet" / "done"
    # 2 planes x 6 groups (one tile row each, 4 batches): each run cancelled a few groups further.
    for n in (11, 9, 13):
        with pytest.raises(memnet.Cancelled):
            memnet.restore(stack, model_file, output=out, resume=True, cancel=_cancel_after(n), **kw)
        root = zarr.open_group(str(out), mode="r+")
        assert root.attrs["memnet"]["complete"] is False
        built = sorted(p for p in done.iterdir() if p.name.startswith("L"))
        assert built, "no pyramid row was built before the interruption"
        # As if killed after its group's marker and before its pyramid row: marker gone, chunks unwritten.
        k, p, row = map(int, built[-1].name[1:].split("-"))
        built[-1].unlink()
        ch = root[str(k)].chunks[1]
        root[str(k)][p, row * ch:(row + 1) * ch] = 0
    memnet.restore(stack, model_file, output=out, resume=True, **kw)
    got = _levels(out)
    assert [g.tobytes() for g in got] == [r.tobytes() for r in ref]
    assert zarr.open_group(str(out), mode="r").attrs["memnet"]["complete"] is True


@pytest.mark.slow
def test_kill_9_and_resume_leaves_an_identical_pyramid(tmp_path, rng, model_file, held_restore):
    """Killed -9 five times, each at a point the test chose (after some groups' markers, before or after
    the pyramid rows they complete, or part-way into the next group), and resumed: the pyramid is the
    uninterrupted run's, byte for byte. The runs are held there until killed, so no kill depends on speed."""
    x = (rng.random((4, 64, 96)) * 4000).astype(np.uint16)
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, x, imagej=True, metadata={"axes": "ZYX"})
    groups, blocks = 4 * 4, 6  # batch 1: a group is one row of 6 tiles, 4 rows per plane

    def args(out):
        return [src, "-o", out, "--model", model_file, "--tile", "16", "--pyramid", "16", "--device", "cpu",
                "--batch-size", "1", "--resume", "-q"]

    def cli(out):
        return [sys.executable, "-m", "memnet.cli", "restore", *map(str, args(out))]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(cli(tmp_path / "ref.zarr"), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    out, markers = tmp_path / "out.zarr", tmp_path / "out.zarr.memnet" / "done"

    def n_done():  # groups (pyramid rows have L... markers)
        return len([p for p in markers.glob("*") if not p.name.startswith("L")]) if markers.is_dir() else 0

    pick, built = np.random.default_rng(2), []
    for _ in range(5):
        new, more = int(pick.integers(0, 4)), int(pick.integers(0, blocks + 1))
        new, before = (new or int(more == 0)), n_done()  # at least one marker or block
        assert before + new < groups  # the run is held before its end
        proc = held_restore(args(out), new, more)
        built.append(sum(p.name.startswith("L") for p in markers.iterdir()))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert n_done() == before + new
        assert zarr.open_group(str(out), mode="r").attrs["memnet"]["complete"] is False
    assert any(built), "no kill landed after a pyramid row"
    res = subprocess.run(cli(out), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert zarr.open_group(str(out), mode="r").attrs["memnet"]["complete"] is True
    got, want = _levels(out), _levels(tmp_path / "ref.zarr")
    assert len(got) == 4 and [g.tobytes() for g in got] == [w.tobytes() for w in want]


@pytest.mark.slow
def test_distributed_pyramid_equals_the_local_one_and_resumes(stack, model_file, tmp_path):
    from distributed import Client, LocalCluster

    kw = dict(tile=32, pyramid=40, device="cpu", batch_size=2)
    memnet.restore(stack, model_file, output=tmp_path / "ref.zarr", **kw)
    ref = _levels(tmp_path / "ref.zarr")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        memnet.restore(stack, model_file, output=tmp_path / "d.zarr", client=client, **kw)
        out = tmp_path / "r.zarr"
        seen = []

        def cancel():
            seen.append(1)
            return len(seen) > 9

        with pytest.raises(memnet.Cancelled):
            memnet.restore(stack, model_file, output=out, client=client, cancel=cancel, **kw)
        memnet.restore(stack, model_file, output=out, client=client, resume=True, **kw)
    # Level 0 may differ by a rounding (one torch thread on the workers); the pyramid is its block means.
    for path in (tmp_path / "d.zarr", out):
        got = _levels(path)
        assert np.abs(got[0].astype(int) - ref[0]).max() <= 1
        _check_pyramid(got, 40)
        assert zarr.open_group(str(path), mode="r").attrs["memnet"]["complete"] is True


def test_level_picks_a_resolution_of_a_multiscale_input(model_file, tmp_path, rng, capsys):
    x = (rng.random((2, 90, 100)) * 4000).astype(np.uint16)
    ms = tmp_path / "in.ome.zarr"
    memnet.save_image(x, ms, axes="ZYX", scale={"Z": 3.0, "Y": 0.2, "X": 0.2}, tile=32, pyramid=30)
    levels = _levels(ms)
    assert len(levels) == 3
    src = memnet.open_input(ms, level=1)
    assert src.shape == (2, 45, 50) and src.scale == {"Z": 3.0, "Y": 0.4, "X": 0.4} and src.n_levels == 3
    out = tmp_path / "o.zarr"
    assert main(["restore", str(ms), "-o", str(out), "--model", str(model_file), "--level", "1", "--tile", "32",
                 "--device", "cpu", "-q"]) == 0
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][:],
                                  memnet.restore(levels[1], model_file, tile=32, device="cpu"))
    back = memnet.open_input(out)
    assert back.scale == {"Z": 3.0, "Y": 0.4, "X": 0.4} and back.translate == {"Z": 0.0, "Y": 0.1, "X": 0.1}
    assert zarr.open_group(str(out), mode="r").attrs["memnet"]["job"]["level"] == 1
    rc = main(["restore", str(ms), "-o", str(tmp_path / "p.zarr"), "--model", str(model_file), "--level", "5", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "the input has levels 0..2; got --level 5" in err, err
    with pytest.raises(ValueError, match="only a multiscale OME-Zarr input has resolution levels"):
        memnet.restore(x, model_file, level=1, device="cpu")


def test_an_output_from_before_the_pyramid_resumes_only_as_it_was_made(stack, model_file, tmp_path):
    """Outputs written before this change were OME-Zarr 0.4 with one level, and their job record does not
    say so: a resume with today's defaults is refused naming both, one with those settings continues."""
    out = tmp_path / "o.zarr"
    kw = dict(tile=32, device="cpu", batch_size=3)
    ref = memnet.restore(stack, model_file, output=out, ome_zarr_version="0.4", pyramid=0, **kw)[:]
    root = zarr.open_group(str(out), mode="r+")
    job = {k: v for k, v in root.attrs["memnet"]["job"].items() if k not in ("ome_zarr_version", "pyramid")}
    root.attrs["memnet"] = {"complete": False, "job": job}
    with pytest.raises(ValueError, match="ome_zarr_version: '0.4' then, '0.5' now; pyramid: 0 then, 1024 now"):
        memnet.restore(stack, model_file, output=out, resume=True, **kw)
    got = memnet.restore(stack, model_file, output=out, resume=True, ome_zarr_version="0.4", pyramid=0, **kw)
    np.testing.assert_array_equal(got[:], ref)


def test_zarr_output_puts_imagej_tzcyx_axes_in_ngff_order(micro_file, tmp_path, rng):
    x = (rng.random((2, 3, 2, 40, 40)) * 3000).astype(np.uint16)  # T Z C Y X
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, x, imagej=True, metadata={"axes": "TZCYX"})
    out = tmp_path / "o.zarr"
    memnet.restore(src, micro_file, output=out, tile=32, device="cpu")
    root = zarr.open_group(str(out), mode="r")
    assert [a["name"] for a in root.attrs["ome"]["multiscales"][0]["axes"]] == ["t", "c", "z", "y", "x"]  # 0.5
    expected = memnet.restore(x, micro_file, axes="TZCYX", tile=32, device="cpu")
    np.testing.assert_array_equal(root["0"][:], expected.transpose(0, 2, 1, 3, 4))
    back = memnet.open_input(out)
    assert back.axes == "TCZYX"
