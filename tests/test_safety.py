"""Nothing lost, nothing silently wrong (issue #26, docs/reliability.md): outputs that overlap inputs,
concurrent runs, non-finite results, hostile weights, devices, messages. The input is checked by hash."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

import memnet
from memnet.cli import main


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("option, value, message", [
    ("--halo", "abc", "argument --halo: expected 'exact' or a whole number of pixels >= 0, got 'abc'"),
    ("--halo", "1.5", "argument --halo: expected 'exact' or a whole number of pixels >= 0, got '1.5'"),
    ("--batch-size", "abc", "argument --batch-size: expected 'auto' or a whole number of tiles >= 1, got 'abc'"),
    ("--tile", "8", "argument --tile: expected a tile size in pixels >= 16, got '8'"),
    ("--scale", "5", "argument --scale: expected a super-resolution factor of 2, 3 or 4, got '5'"),
    ("--workers", "0", "argument --workers: expected a number of workers >= 1, got '0'"),
])
def test_restore_options_name_themselves_and_what_they_accept(option, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["restore", "in.tif", "-o", "out.zarr", option, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_finetune_refuses_a_negative_step_count(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--model", "microscopy", "--mode", "n2v", "--data", "x.tif", "-o", "m", "--steps", "-3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --steps: expected a number of steps >= 1, got '-3'" in err


@pytest.mark.parametrize("device", ["mps", "xpu", "cuda:7"])
def test_an_unavailable_device_is_a_clean_error_listing_what_is_available(device, micro_file, tmp_path, capsys):
    if device in memnet.engine.available_devices():
        pytest.skip(f"{device} exists on this machine: nothing unavailable to ask for")
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.zeros((20, 20), np.uint16))
    rc = main(["restore", str(src), "-o", str(tmp_path / "o.tif"), "--model", str(micro_file), "--device", device])
    err = capsys.readouterr().err
    if device.split(":")[0] in memnet.engine.available_devices():  # e.g. cuda:7 on a machine with fewer GPUs
        assert rc == 2 and f"device '{device}' does not exist" in err and "available here: auto, cpu" in err
    else:
        assert rc == 2 and f"device '{device}' requested but" in err and "available: auto, cpu" in err
    assert "Traceback" not in err


def test_python_dash_m_memnet_is_the_command_line():
    r = subprocess.run([sys.executable, "-m", "memnet", "restore", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--resume" in r.stdout


def test_a_nan_in_the_weights_fails_the_run_and_marks_nothing_complete(tiny_model, tmp_path, capsys):
    broken = memnet.MemNet(2, 2, 8)
    broken.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        broken.recon_conv.weight.view(-1)[0] = float("nan")
    x = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in plane \(\), rows 0:32, columns 0:32.*weights"):
        memnet.restore(x, broken.eval(), tile=32, device="cpu")
    out = tmp_path / "o.zarr"
    with pytest.raises(FloatingPointError):
        memnet.restore(x, broken.eval(), output=out, tile=32, device="cpu")
    assert zarr.open_group(str(out), mode="r").attrs["memnet"]["complete"] is False


def test_an_overflowing_input_is_an_error_not_an_all_nan_result(tiny_model):
    with pytest.raises(FloatingPointError, match="overflows the model"):
        memnet.restore(np.full((30, 30), 1e38, np.float32), tiny_model, device="cpu")


@pytest.mark.parametrize("value", [1e30, -3e25, 7.0, 0.0])
def test_constant_float_images_of_any_magnitude_stay_finite(micro_file, value):
    out = memnet.restore(np.full((30, 30), value, np.float32), micro_file, device="cpu")
    assert np.isfinite(out).all() and out.dtype == np.float32
    # At its level: the span is the magnitude, so the (random) tiny model's response to a flat 0 input,
    # about 1 % of the span, is all that moves it.
    np.testing.assert_allclose(out, value, rtol=0.05, atol=0.05)


@pytest.fixture
def ome_input(tmp_path, rng):
    x = (rng.random((2, 40, 50)) * 3000).astype(np.uint16)
    p = tmp_path / "x.ome.zarr"
    memnet.save_image(x, p, axes="ZYX")
    return p


@pytest.mark.parametrize("case", ["level inside the input", "zarr inside the input", "symlink to the input"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_overlapping_the_input_is_refused_and_the_input_untouched(case, overwrite, ome_input, micro_file,
                                                                           tmp_path, restore_cli):
    out = {"level inside the input": ome_input / "0", "zarr inside the input": ome_input / "out.zarr",
           "symlink to the input": tmp_path / "link.zarr"}[case]
    if case == "symlink to the input":
        out.symlink_to(ome_input, target_is_directory=True)
    before = _digest(ome_input)
    rc, err = restore_cli([ome_input, "-o", out, "--model", micro_file, *(["--overwrite"] if overwrite else [])])
    assert rc == 2 and ("lies inside the input" in err or "is the input" in err), err
    assert _digest(ome_input) == before


def test_an_output_containing_the_input_is_refused(micro_file, tmp_path, rng, restore_cli):
    exp = tmp_path / "exp.zarr"
    exp.mkdir()
    img = exp / "img.tif"
    tifffile.imwrite(img, (rng.random((30, 30)) * 255).astype(np.uint8))
    before = _digest(img)
    rc, err = restore_cli([img, "-o", exp, "--model", micro_file, "--overwrite"])
    assert rc == 2 and "contains the input" in err and _digest(img) == before


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_a_held_output_is_refused_naming_its_holder_and_a_stale_lock_is_taken_over(suffix, micro_file, tmp_path,
                                                                                   rng, restore_cli):
    import json
    import os
    import socket

    from memnet.outputs import OutputLock, sidecar

    src = tmp_path / "in.tif"
    tifffile.imwrite(src, (rng.random((40, 40)) * 3000).astype(np.uint16))
    out = tmp_path / f"o{suffix}"
    with OutputLock(out):  # another run, alive, writing this output
        rc, err = restore_cli([src, "-o", out, "--model", micro_file, "--overwrite"])
        assert rc == 2 and f"being written by another run (pid {os.getpid()} on {socket.gethostname()}" in err
        assert not out.exists()
    # A lock left by a process that died: taken over, the run completes, nothing is left beside it.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    sidecar(out).mkdir()
    (sidecar(out) / "lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                   "started": "then"}))
    rc, err = restore_cli([src, "-o", out, "--model", micro_file])
    assert rc == 0, err
    assert not sidecar(out).exists()


def _slow_run(src, out, model, *extra):
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "memnet", "restore", str(src), "-o", str(out), "--model",
                             str(model), "--tile", "32", "--batch-size", "1", "--device", "cpu", "-q", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("suffix, extra", [(".tif", []), (".zarr", ["--overwrite"])])
def test_two_concurrent_runs_one_output(suffix, extra, micro_file, tmp_path, rng):
    """The first run is held mid-run by the test (its progress callback waits on an event) while the
    second is started and refused: the order of events does not depend on how fast either runs."""
    import threading

    x = (rng.random((3, 64, 64)) * 3000).astype(np.uint16)
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, x, imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / f"o{suffix}"
    holding, release, failed = threading.Event(), threading.Event(), []

    def hold(p):  # after the first batch: the output is open and locked
        holding.set()
        assert release.wait(300), "the test never released the first run"

    def first_run():
        try:
            memnet.restore(src, micro_file, output=out, tile=32, batch_size=1, device="cpu", progress=hold)
        except BaseException as e:
            failed.append(e)
            holding.set()

    first = threading.Thread(target=first_run)
    first.start()
    try:
        assert holding.wait(300) and not failed, failed
        second = _slow_run(src, out, micro_file, *extra)
        rc = second.wait(300)
        assert rc == 2 and "being written by another run" in second.stderr.read()
    finally:
        release.set()
        first.join(300)
    assert not failed, failed
    expected = memnet.restore(x, micro_file, tile=32, device="cpu")
    got = tifffile.imread(out) if suffix == ".tif" else zarr.open_group(str(out), mode="r")["0"][:]
    # Readable and complete, not a mix of two runs (1 count: float rounding of other batch shapes/threads).
    assert got.shape == expected.shape and np.abs(got.astype(int) - expected).max() <= 1


def test_a_failed_overwrite_keeps_the_old_output(micro_file, tmp_path, rng):
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


# A `memnet restore` that stops after its first batch (output open and locked) until it gets a signal,
# after creating the file argv[1]: the test knows it is mid-run without guessing how long a run takes.
_HELD_RUN = """
import sys, time
from pathlib import Path
import memnet.kernel
from memnet.cli import main
add = memnet.kernel.ProgressTally.add
def held(self, tiles):
    add(self, tiles)
    Path(sys.argv[1]).touch()
    time.sleep(600)
memnet.kernel.ProgressTally.add = held
sys.exit(main(["restore", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_sigterm_mid_run_cleans_up_like_ctrl_c(suffix, micro_file, tmp_path, rng):
    import os
    import signal
    import time

    from memnet.outputs import sidecar

    src = tmp_path / "in.tif"
    tifffile.imwrite(src, (rng.random((3, 64, 64)) * 3000).astype(np.uint16), imagej=True, metadata={"axes": "ZYX"})
    out, held = tmp_path / f"o{suffix}", tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", _HELD_RUN, str(held), str(src), "-o", str(out), "--model",
                             str(micro_file), "--tile", "32", "--batch-size", "1", "--device", "cpu", "-q"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not held.exists() and proc.poll() is None and time.monotonic() - t0 < 300:  # a hang guard only
        time.sleep(0.01)
    assert held.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    err = proc.stderr.read()
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    if suffix == ".tif":
        assert not out.exists() and not (tmp_path / "o.tif.partial").exists() and "removed" in err
    else:
        assert zarr.open_group(str(out), mode="r").attrs["memnet"]["complete"] is False and "--resume" in err
    assert not (sidecar(out) / "lock").exists()  # released: --resume can take it


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


@pytest.fixture
def two_series(tmp_path, rng):
    a = (rng.random((2, 30, 40)) * 3000).astype(np.uint16)
    b = (rng.random((50, 20)) * 3000).astype(np.uint16)
    p = tmp_path / "two.ome.tif"
    with tifffile.TiffWriter(p, ome=True) as tw:
        tw.write(a, metadata={"axes": "ZYX"})
        tw.write(b, metadata={"axes": "YX"})
    return p, a, b


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


def test_the_plugin_reader_opens_each_series_as_its_own_layer(two_series):
    from napari_memnet._io import read_layers

    p, a, b = two_series
    layers = read_layers(str(p))
    assert [kw["name"] for _, kw, _ in layers] == ["two [series 0]", "two [series 1]"]
    np.testing.assert_array_equal(np.asarray(layers[1][0]), b)


def test_finetune_never_writes_its_model_over_its_data(tmp_path, monkeypatch, micro_file, rng):
    from memnet.finetune import FinetuneConfig, finetune

    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("MEMNET_MODEL_DIR", str(models))
    data = models / "lab.safetensors"  # a user who keeps an image where the model would go
    tifffile.imwrite(data, (rng.random((40, 40)) * 3000).astype(np.uint16))
    before = _digest(data)
    with pytest.raises(ValueError, match="is the input"):
        finetune(FinetuneConfig(model=str(micro_file), mode="n2v", name="lab", overwrite=True, steps=2), str(data))
    assert _digest(data) == before


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
def test_a_disk_full_at_start_is_one_clear_line(suffix, micro_file, tmp_path, rng):
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


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    import errno
    import os

    from memnet.outputs import OutputLock, sidecar

    def onto_a_full_disk(fd, *a, **kw):  # the lock file is created, writing its holder fails
        os.close(fd)
        return open("/dev/full", *a, **kw)

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    out = tmp_path / "o.tif"
    monkeypatch.setattr(os, "fdopen", onto_a_full_disk)
    with pytest.raises(OSError) as e:
        OutputLock(out).acquire()
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and not sidecar(out).exists()
    with OutputLock(out):  # the next run is not refused by an empty lock of nobody's
        pass


def test_a_message_after_an_unfinished_progress_bar_gets_a_line_of_its_own():
    import io
    from types import SimpleNamespace

    from memnet._cli_restore import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar(SimpleNamespace(done=3, total=48, fraction=3 / 48, mpx_per_s=0.5, elapsed=2.0, eta=30.0))
    bar.end_line()
    bar.end_line()
    assert stream.getvalue().startswith("\r[#") and stream.getvalue().endswith("ETA 00:30\n")
    stream.seek(0), stream.truncate()
    bar(SimpleNamespace(done=48, total=48, fraction=1.0, mpx_per_s=0.5, elapsed=32.0, eta=0.0))
    bar.end_line()  # a finished bar has ended its line already
    assert stream.getvalue().endswith("ETA 00:00\n") and not stream.getvalue().endswith("\n\n")
