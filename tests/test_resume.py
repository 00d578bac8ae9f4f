"""Resume checks what it resumes: the input's content (issue #32, item 1) and a read-only output (item 8)."""

import hashlib

import numpy as np
import pytest
import tifffile
import zarr

import memnet
from memnet.fingerprint import content_fingerprint


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def natural_file(tiny_model, tmp_path):
    """The tiny model as a natural-image (denoise-like) model: no percentiles to notice a new input."""
    p = tmp_path / "tiny-natural.safetensors"
    memnet.save_model(tiny_model, p, name="tiny-natural", task="denoise")
    return p


def _interrupt(src, model, out, after=2):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > after

    with pytest.raises(memnet.engine.Cancelled):
        memnet.restore(src, model, output=out, tile=32, device="cpu", batch_size=1, cancel=cancel)
    assert zarr.open_group(str(out), mode="r").attrs["memnet"]["complete"] is False


def test_resume_refuses_an_input_replaced_by_another_of_the_same_shape(natural_file, tmp_path, rng, restore_cli):
    src, out = tmp_path / "in.tif", tmp_path / "o.zarr"
    old = (rng.random((2, 96, 96)) * 200).astype(np.uint8)
    tifffile.imwrite(src, old, imagej=True, metadata={"axes": "ZYX"})
    _interrupt(src, natural_file, out)
    new = (rng.random((2, 96, 96)) * 200).astype(np.uint8)  # same path, shape and dtype
    tifffile.imwrite(src, new, imagej=True, metadata={"axes": "ZYX"})
    before = _sha(src)
    with pytest.raises(ValueError, match="the input changed since the run started .*restore again with --overwrite"):
        memnet.restore(src, natural_file, output=out, tile=32, device="cpu", batch_size=1, resume=True)
    rc, err = restore_cli([src, "-o", out, "--model", natural_file, "--tile", 32, "--batch-size", 1, "--resume"])
    assert rc == 2 and "the input changed since the run started" in err and len(err.strip().splitlines()) == 1
    assert _sha(src) == before  # the input untouched
    assert zarr.open_group(str(out), mode="r").attrs["memnet"]["complete"] is False
    # Putting the old image back makes it resumable, and the result equals an uninterrupted run.
    tifffile.imwrite(src, old, imagej=True, metadata={"axes": "ZYX"})
    memnet.restore(src, natural_file, output=out, tile=32, device="cpu", batch_size=1, resume=True)
    ref = memnet.restore(old, natural_file, axes="ZYX", tile=32, device="cpu", batch_size=1)
    got = zarr.open_group(str(out), mode="r")
    assert got.attrs["memnet"]["complete"] is True
    assert got["0"][:].tobytes() == ref.tobytes()


def test_an_older_record_without_a_fingerprint_resumes_with_a_warning(natural_file, tmp_path, rng):
    x = (rng.random((2, 96, 96)) * 200).astype(np.uint8)
    out = tmp_path / "o.zarr"
    _interrupt(x, natural_file, out)
    root = zarr.open_group(str(out), mode="r+")
    meta = root.attrs["memnet"]
    assert "input_sha256" in meta["job"]
    meta["job"].pop("input_sha256")
    root.attrs["memnet"] = meta
    with pytest.warns(UserWarning, match="did not record the input's content"):
        memnet.restore(x, natural_file, output=out, tile=32, device="cpu", batch_size=1, resume=True)
    ref = memnet.restore(x, natural_file, tile=32, device="cpu", batch_size=1)
    assert zarr.open_group(str(out), mode="r")["0"][:].tobytes() == ref.tobytes()


def test_the_fingerprint_is_a_fixed_sample_that_sees_a_replaced_image(rng):
    a = (rng.random((5, 300, 200)) * 1000).astype(np.uint16)
    fp = content_fingerprint(memnet.open_input(a, axes="ZYX"))
    assert fp == content_fingerprint(memnet.open_input(a.copy(), axes="ZYX"))  # deterministic
    other = (rng.random((5, 300, 200)) * 1000).astype(np.uint16)
    assert fp != content_fingerprint(memnet.open_input(other, axes="ZYX"))
    assert fp != content_fingerprint(memnet.open_input(a.astype(np.int32), axes="ZYX"))  # dtype is part of it
    b = a.copy()
    b[4, 150:250, 100:] = 0  # the bottom of the last plane changed
    assert fp != content_fingerprint(memnet.open_input(b, axes="ZYX"))
    tiny = np.arange(6, dtype=np.uint8).reshape(2, 3)  # smaller than a window
    flipped = tiny[::-1].copy()
    assert content_fingerprint(memnet.open_input(tiny, axes="YX")) != \
        content_fingerprint(memnet.open_input(flipped, axes="YX"))


def test_resume_on_a_read_only_mount(natural_file, tmp_path, rng, monkeypatch, restore_cli):
    x = (rng.random((2, 96, 96)) * 200).astype(np.uint8)
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, x, imagej=True, metadata={"axes": "ZYX"})
    done, part = tmp_path / "done.zarr", tmp_path / "part.zarr"
    memnet.restore(src, natural_file, output=done, tile=32, device="cpu", batch_size=1)
    _interrupt(src, natural_file, part)

    def digest(p):
        return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file())).hexdigest()

    before = digest(done)
    import errno

    from memnet.outputs import OutputLock

    def refuse(self):  # what mkdir/open raise on a read-only mount
        raise OSError(errno.EROFS, "Read-only file system", str(self.path.parent))

    monkeypatch.setattr(OutputLock, "acquire", refuse)
    # A complete output needs nothing: resumed without writing, exit 0, its result returned.
    got = memnet.restore(src, natural_file, output=done, tile=32, device="cpu", resume=True)
    assert got[:].tobytes() == memnet.restore(x, natural_file, axes="ZYX", tile=32, device="cpu").tobytes()
    rc, err = restore_cli([src, "-o", done, "--model", natural_file, "--tile", 32, "--resume"])
    assert rc == 0, err
    assert digest(done) == before
    # An unfinished one (read-only too): one line that says why and what to do, no errno dump.
    rc, err = restore_cli([src, "-o", part, "--model", natural_file, "--tile", 32, "--batch-size", 1, "--resume"])
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"cannot resume {part}: its folder is read-only (Read-only file system)" in err
    assert "copy it to a writable place and resume there" in err and "Errno" not in err
