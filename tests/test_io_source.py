"""Source: the one place that knows a file's axis order; planes come out (Y, X) whatever it is."""

import numpy as np
import pytest
import tifffile

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


class _CountingArray:
    """A chunked array (as zarr presents one) that counts the reads reaching it."""

    def __init__(self, data, chunks):
        self.data, self.chunks, self.shape, self.dtype, self.ndim = data, chunks, data.shape, data.dtype, data.ndim
        self.reads = 0

    def __getitem__(self, idx):
        self.reads += 1
        return self.data[idx]


def _read_halo_windows_in_threads(cache, data):
    """Overlapping 104² windows over a (3, 300, 260) array, read from four threads at once: each equals numpy's."""
    from concurrent.futures import ThreadPoolExecutor

    windows = [(z, slice(max(0, y - 20), y + 84), slice(max(0, x - 20), x + 84)) for z in range(3)
               for y in range(0, 300, 64) for x in range(0, 260, 64)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(cache.__getitem__, windows))
    for idx, g in zip(windows, got):
        np.testing.assert_array_equal(g, data[idx])


def test_the_chunk_cache_gives_what_the_array_gives_and_decodes_each_chunk_once(rng):

    from memnet.io import ChunkCache

    data = rng.integers(0, 65535, (3, 300, 260), dtype=np.uint16)
    arr = _CountingArray(data, (2, 128, 512))
    cache = ChunkCache(arr)
    for idx in [(1, slice(0, 300), slice(0, 260)), (2, slice(100, 290, 3), slice(5, 250, 7)), (0, slice(127, 129),
                slice(0, 1)), (2, slice(250, 300), slice(200, 260)), (1, slice(5, 5), slice(0, 4))]:
        np.testing.assert_array_equal(cache[idx], data[idx])
    n = arr.reads
    _read_halo_windows_in_threads(cache, data)
    assert arr.reads - n <= 2 * 3  # chunk rows 0-2 of Z chunks 0-1: 6 chunks, none decoded twice
    small = ChunkCache(_CountingArray(data, (1, 128, 512)), budget=2 * 128 * 260 * 2)  # two chunks fit
    for z in (0, 1, 2, 0):
        small[z, slice(0, 10), slice(0, 10)]
    assert small.array.reads == 4 and len(small.blocks) == 2  # the oldest chunk was evicted and read again


def test_the_chunk_cache_reads_a_row_of_chunks_in_one_call(rng, monkeypatch):
    """A miss reads the chunks beside it along the last axis with it, in one call into the array (a Zarr call
    per chunk costs about as much as decoding it), in runs of at most ROW_MAX bytes; from several threads at
    once, every chunk is still read once and every window is numpy's."""

    from memnet.sources import ChunkCache

    data = rng.integers(0, 65535, (3, 300, 260), dtype=np.uint16)
    arr = _CountingArray(data, (1, 64, 32))  # 5 chunk rows of 9 chunks per plane
    cache = ChunkCache(arr)
    np.testing.assert_array_equal(cache[1, 70:80, 100:110], data[1, 70:80, 100:110])
    assert arr.reads == 1 and len(cache.blocks) == 9  # the whole chunk row
    monkeypatch.setattr(ChunkCache, "ROW_MAX", 4 * 64 * 32 * 2)  # runs of 4 chunks: 3 runs per row
    _read_halo_windows_in_threads(cache, data)
    assert len(cache.blocks) == 3 * 5 * 9 and not cache.inflight  # every chunk once, none left in flight
    assert arr.reads <= 1 + (3 * 5 - 1) * 3 + 2  # about one read per run, far from one per chunk (135)


def test_a_source_reads_big_tiff_pages_once_for_all_its_windows(tmp_path, rng):
    import tifffile

    data = rng.integers(0, 4000, (2, 600, 500), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "z.tif", data, compression="zlib", rowsperstrip=600, metadata={"axes": "ZYX"})
    src = memnet.open_input(tmp_path / "z.tif")
    assert src._reader() is not src.array  # a page is one chunk: cached
    for lead in src.leads():
        for y in range(0, 600, 200):
            np.testing.assert_array_equal(src.read_plane(lead, slice(max(0, y - 30), y + 230), slice(0, 500)),
                                          data[lead[0], max(0, y - 30): y + 230])
    assert memnet.open_input(data)._reader() is data  # numpy: nothing to cache


def test_a_new_input_format_is_its_opener_and_its_table_row(tmp_path, monkeypatch, rng):
    """docs/developing.md's recipe, followed: a .npy reader added to `FORMATS` is read like any input."""
    from memnet.sources import FORMATS, InputFormat, Source

    def open_npy(path, series, level):
        return Source(array=np.load(path, mmap_mode="r"), axes="ZYX")

    monkeypatch.setitem(FORMATS, "npy", InputFormat((".npy",), open_npy))
    data = rng.integers(0, 255, (2, 40, 30), dtype=np.uint8)
    np.save(tmp_path / "stack.npy", data)
    assert memnet.io.input_format(tmp_path / "stack.npy") == "npy"
    src = memnet.open_input(tmp_path / "stack.npy")
    assert src.axes == "ZYX" and src.path == tmp_path / "stack.npy"
    np.testing.assert_array_equal(src.read_plane((1,)), data[1])
    out = memnet.restore(str(tmp_path / "stack.npy"), memnet.MemNet(2, 2, 8), device="cpu", tile=16)
    assert out.shape == data.shape and out.dtype == np.uint8


def test_a_source_that_has_read_through_its_cache_still_pickles(tmp_path, rng):
    import pickle

    import zarr

    z = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=(2, 600, 500), chunks=(1, 600, 500), dtype="u2")
    z[:] = rng.integers(0, 4000, (2, 600, 500), dtype=np.uint16)
    src = memnet.open_input(z, axes="ZYX")
    first = src.read_plane((1,), slice(0, 50), slice(0, 40))  # the cache now holds a chunk and a lock
    again = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(again.read_plane((1,), slice(0, 50), slice(0, 40)), first)


def test_a_second_series_is_never_dropped_silently(two_series, micro_file, tmp_path, restore_cli):
    p, a, b = two_series
    with pytest.warns(UserWarning, match=r"two.ome.tif holds 2 series \(0: \(2, 30, 40\), 1: \(50, 20\)\); using "
                                         r"series 0: pick another with --series N"):
        src = memnet.open_input(p)
    np.testing.assert_array_equal(np.asarray(src.array[:]), a)
    second = memnet.open_input(p, series=1)
    assert second.axes == "YX" and second.n_series == 2
    out = tmp_path / "b.tif"
    rc, err = restore_cli([p, "-o", out, "--model", micro_file, "--series", "1"])
    assert rc == 0, err
    np.testing.assert_array_equal(tifffile.imread(out), memnet.restore(b, micro_file, device="cpu"))
    with pytest.raises(ValueError, match=r"series 5 does not exist: .*two.ome.tif holds 2 series \(0 to 1\)"):
        memnet.open_input(p, series=5)


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_raw_array_reads_what_numpy_indexing_gives(tmp_path, monkeypatch, byteorder):
    """A contiguous uncompressed TIFF read by byte ranges, in bands smaller than the request (forced small
    here): every index form the engine and the percentile sampling use gives numpy's answer."""
    import tifffile

    from memnet.sources import RawArray

    data = np.random.default_rng(0).integers(0, 60000, (3, 70, 90), dtype=np.uint16)
    p = tmp_path / "c.tif"
    tifffile.imwrite(p, data, byteorder=byteorder, metadata={"axes": "ZYX"})
    with tifffile.TiffFile(p) as tif:
        offset, dtype = tif.series[0].dataoffset, np.dtype(tif.series[0].dtype).newbyteorder(tif.byteorder)
    monkeypatch.setattr(RawArray, "_BAND", 5 * 90 * 2)  # 5 rows per read
    raw = RawArray(p, offset, data.shape, dtype)
    for idx in [(1, slice(10, 47), slice(3, 88)), (2, slice(None, None, 7), slice(None, None, 7)), (0,),
                (slice(0, 3), slice(69, 70), 5), (-1, slice(None), slice(None)), (1, 0, slice(None, None, 3)),
                (slice(1, 3), slice(2, 60, 2), slice(80, 90)), (0, slice(65, 3, -4), slice(None)),
                (2, slice(None, None, -1), slice(5, 6)), (Ellipsis,), (1, Ellipsis), (Ellipsis, slice(3, 9)),
                (0, Ellipsis, 4)]:
        got = raw[idx]
        assert got.dtype == np.uint16 and np.array_equal(got, data[idx]), idx
    raw.close()


def test_a_tiff_page_too_large_for_the_cache_is_read_by_byte_ranges(tmp_path, monkeypatch):
    """Above the chunk cache's limit a contiguous TIFF page is read as a RawArray (a window reads its rows,
    not the page); a compressed one stays with tifffile's store. Windows and samples are the same pixels."""
    import tifffile

    from memnet.sources import ChunkCache, RawArray

    data = np.random.default_rng(1).integers(0, 4000, (2, 64, 80), dtype=np.uint16)
    plain, packed = tmp_path / "plain.tif", tmp_path / "packed.tif"
    tifffile.imwrite(plain, data, metadata={"axes": "ZYX"})
    tifffile.imwrite(packed, data, metadata={"axes": "ZYX"}, compression="zlib")
    monkeypatch.setattr(ChunkCache, "MAX_CHUNK", 64 * 80 * 2 - 1)  # one page is "too large"
    src = memnet.open_input(plain)
    assert isinstance(src.array, RawArray)
    assert np.array_equal(src.read_plane((1,), slice(5, 40), slice(7, 70)), data[1, 5:40, 7:70])
    assert np.array_equal(np.stack(src.sample()), data[:, ::_sample_stride(src), ::_sample_stride(src)])
    src.close()
    assert not isinstance(memnet.open_input(packed).array, RawArray)


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("shape,axes", [((1, 2, 1, 1), "TZYX"), ((3, 1, 1, 1), "TZYX"), ((1, 1, 2, 1, 1), "TZCYX")])
def test_a_tiff_of_one_pixel_planes_reads_back(tmp_path, shape, axes, compression):
    """tifffile's store gives such series chunks that do not fit the array and then fails on every read (found
    by the random round trip in test_bad_inputs): they are read by byte ranges, or whole when compressed."""
    import tifffile

    data = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape) * 7
    p = tmp_path / "tiny.tif"
    tifffile.imwrite(p, data, metadata={"axes": axes}, compression=compression)
    src = memnet.open_input(p, axes=axes)
    assert src.shape == shape and src.dtype == np.uint16
    assert np.array_equal(np.asarray(src.array[...]), data)
    last = tuple(n - 1 for n in shape[:-2])
    assert np.array_equal(src.read_plane(last), data[last])
    src.close()
    assert np.array_equal(tifffile.imread(p), data)  # the input is untouched


def _sample_stride(src) -> int:
    from memnet.normalize import sample_plan

    return sample_plan(len(src.leads()), src.plane_shape[0] * src.plane_shape[1])[1]


def test_a_window_inside_one_cached_chunk_is_a_copy_unless_asked_for_a_view(tmp_path):
    """The engine reads windows without a copy (a read-only view of the cached chunk: it only reads them);
    every other reader gets its own writable array, so changing it cannot change what the cache holds."""
    import tifffile

    data = np.arange(3 * 600 * 500, dtype=np.uint16).reshape(3, 600, 500)
    tifffile.imwrite(tmp_path / "s.tif", data, metadata={"axes": "ZYX"})
    src = memnet.open_input(tmp_path / "s.tif")
    view = src.read_plane((1,), slice(10, 90), slice(20, 70), copy=False)
    assert not view.flags.writeable and np.array_equal(view, data[1, 10:90, 20:70])
    own = src.read_plane((1,), slice(10, 90), slice(20, 70))
    own[:] = 0
    assert np.array_equal(src.read_plane((1,), slice(10, 90), slice(20, 70)), data[1, 10:90, 20:70])
    src.close()
