"""The output sinks (memnet.sinks): TIFF output of any image shape, an overwrite that fails keeps the old
output, a disk full from the start leaves nothing behind."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import memnet


def test_a_failed_overwrite_keeps_the_old_output(micro_file, tmp_path, rng, _digest):
    x = (rng.random((3, 64, 64)) * 3000).astype(np.uint16)
    out = tmp_path / "o.zarr"
    memnet.restore(x, micro_file, output=out, tile=32, device="cpu")
    before = _digest(out)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(memnet.engine.Cancelled):
        memnet.restore(x + 7, micro_file, output=out, tile=32, device="cpu", batch_size=1, overwrite=True,
                       cancel=cancel)
    assert _digest(out) == before  # untouched until the new one is complete
    assert zarr.open_group(str(out), mode="r").attrs["memnet"]["complete"] is True
    memnet.restore(x + 7, micro_file, output=out, tile=32, device="cpu", overwrite=True)
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][:],
                                  memnet.restore(x + 7, micro_file, tile=32, device="cpu"))


@pytest.mark.parametrize("shape", [(100, 1000), (520, 50), (1, 20000)])
def test_narrow_images_write_as_tiff(shape, micro_file, tmp_path, rng):
    x = (rng.random(shape) * 3000).astype(np.uint16)
    out = tmp_path / "o.tif"
    memnet.restore(x, micro_file, output=out, device="cpu")
    np.testing.assert_array_equal(tifffile.imread(out), memnet.restore(x, micro_file, device="cpu"))


def test_a_tiff_tile_that_cannot_be_is_named_with_valid_ones(micro_file, tmp_path):
    with pytest.raises(ValueError, match="multiple of 16, got --tile 100: use 96 or 112, or write a .zarr"):
        memnet.restore(np.zeros((300, 300), np.uint16), micro_file, output=tmp_path / "o.tif", tile=100,
                       device="cpu")


# A full disk, simulated through zarr's public store API: the array's metadata is the first write that
# fails; the other writes of zarr's concurrent batch fail a moment later, while the error is on its way.
_FULL_DISK_ZARR = r"""
import asyncio, errno, sys
from zarr.storage import LocalStore

full, in_flight = [], set()

def failing(real):
    async def method(self, key, value):
        if key.endswith((".zarray", "/zarr.json")):  # an array's metadata, Zarr v2 or v3
            full.append(key)
        if not full:
            return await real(self, key, value)
        if key.endswith((".zarray", "/zarr.json")):
            raise OSError(errno.ENOSPC, "No space left on device")
        in_flight.add(key)
        try:
            await asyncio.sleep(0.5)
            raise OSError(errno.ENOSPC, "No space left on device")
        finally:
            in_flight.discard(key)
    return method

LocalStore.set = failing(LocalStore.set)
LocalStore.set_if_not_exists = failing(LocalStore.set_if_not_exists)
from memnet.cli import main
rc = main(sys.argv[1:])
print("zarr writes in flight after the run:", sorted(in_flight))
sys.exit(rc)
"""


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_a_disk_full_at_start_is_one_clear_line(suffix, micro_file, tmp_path, rng, _digest):
    from memnet.outputs import sidecar

    src = tmp_path / "in.tif"
    tifffile.imwrite(src, (rng.random((64, 64)) * 3000).astype(np.uint16))
    before = _digest(src)
    out = tmp_path / f"o{suffix}"
    args = ["restore", str(src), "-o", str(out), "--model", str(micro_file), "--tile", "64", "--device", "cpu", "-q"]
    if suffix == ".zarr":
        cmd = [sys.executable, "-c", _FULL_DISK_ZARR, *args]
    else:  # a real ENOSPC, no root needed: the partial file leads to /dev/full
        if not Path("/dev/full").exists():
            pytest.skip("no /dev/full here")
        (tmp_path / "o.tif.partial").symlink_to("/dev/full")
        cmd = [sys.executable, "-m", "memnet", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [  # no asyncio "exception was never retrieved" traceback after it
        f"memnet restore: error: no space left on device writing {out}: free space or choose another output"]
    if suffix == ".zarr":
        assert "in flight after the run: []" in proc.stdout  # settled before reporting, nothing races the cleanup
    assert not out.exists() and not (tmp_path / "o.tif.partial").exists()  # nothing half-made, nothing complete
    assert not sidecar(out).exists()  # no lock left to refuse the next run
    assert _digest(src) == before


@pytest.mark.parametrize("axes", ["ZYX", "XZY"])
def test_a_tile_row_is_joined_into_one_write_and_an_incomplete_one_left_as_it_came(axes):
    """The local executor's write-behind joins the blocks of a tile row (any order, ragged last column, X
    before Y) into one block for a sink that takes row writes; blocks of a row never completed are
    handed back one by one."""
    from types import SimpleNamespace

    from memnet.local import RowJoin

    src = SimpleNamespace(axes=axes)
    yi, xi = axes.index("Y"), axes.index("X")
    shape = [3, 3, 3]
    shape[yi], shape[xi] = 20, 50
    join = RowJoin(SimpleNamespace(source=src, out_shape=tuple(shape)))
    full = np.arange(20 * 50, dtype=np.uint16).reshape(20, 50)

    def block(z, ys, xs):
        idx = [z, z, z]
        idx[yi], idx[xi] = ys, xs
        b = full[ys, xs]
        return tuple(idx), (b.T if xi < yi else b)

    rows = [join.add(*block(1, slice(0, 16), xs)) for xs in (slice(32, 48), slice(0, 16), slice(48, 50))]
    assert rows == [None, None, None]
    index, row = join.add(*block(1, slice(0, 16), slice(16, 32)))
    want_index, want = block(1, slice(0, 16), slice(0, 50))
    assert index == want_index and np.array_equal(row, want)
    parts = [block(2, slice(16, 20), xs) for xs in (slice(16, 32), slice(48, 50))]
    for p in parts:
        assert join.add(*p) is None
    left = join.flush()
    assert [i for i, _ in left] == [i for i, _ in parts]
    assert all(np.array_equal(b, p[1]) for (_, b), p in zip(left, parts)) and join.flush() == []


def test_a_marker_waits_for_its_blocks_while_the_writers_go_on(micro_file, tmp_path, rng, monkeypatch):
    """The write-behind never waits for a done-marker: with the first group's block held in its writer, the
    next groups' blocks are still written, and no marker (nor pyramid row) is written before the held block
    is; once it is, the run completes with the same result. Ordered by events, not by time."""
    import threading

    from memnet.sinks import ZarrSink

    x = rng.integers(0, 4000, (2, 96, 64)).astype(np.uint16)
    ref = memnet.restore(x, str(micro_file), device="cpu", tile=32, axes="ZYX")
    release, later = threading.Event(), threading.Event()
    writes, marks = [], []
    write, mark_done = ZarrSink.write, ZarrSink.mark_done

    def held_write(self, index, block):
        with lock:
            writes.append(index)
            first = len(writes) == 1
        if first:
            assert release.wait(600), "never released"  # a hang guard only
        else:
            later.set()
        write(self, index, block)

    def logged_mark(self, key):
        marks.append((key, release.is_set()))
        mark_done(self, key)

    lock = threading.Lock()
    monkeypatch.setattr(ZarrSink, "write", held_write)
    monkeypatch.setattr(ZarrSink, "mark_done", logged_mark)
    out = tmp_path / "o.zarr"
    result = {}
    run = threading.Thread(target=lambda: result.update(a=memnet.restore(
        x, str(micro_file), output=str(out), device="cpu", tile=32, axes="ZYX", batch_size=1, write_threads=3,
        pyramid=32)))
    run.start()
    assert later.wait(600), "no other block was written while the first was held"
    assert marks == []  # nothing vouches for a group before its blocks are written
    release.set()
    run.join(600)
    assert not run.is_alive()
    assert len(marks) == 2 * 3 and all(after for _, after in marks)  # one group per tile row: 2 planes × 3 rows
    assert np.array_equal(np.asarray(result["a"]), np.asarray(ref))
    z = zarr.open_group(str(out), mode="r")
    assert z.attrs["memnet"]["complete"] and z["1"].shape[-2:] == (48, 32)
