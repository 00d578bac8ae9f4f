"""Output paths and locks (memnet.outputs): an output that overlaps its input is refused with the input
untouched; one run at a time writes an output; of many runs taking over the same stale lock at once, exactly
one wins, in every trial (issue #32, item 5)."""

import json
import multiprocessing as mp
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import memnet
from memnet.outputs import OutputLock, OutputLocked, sidecar


def dead_pid() -> int:
    """The pid of a process that has exited (this host)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def plant_stale_lock(out: Path, pid: int) -> None:
    sidecar(out).mkdir(parents=True)
    (sidecar(out) / "lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))


def _taker(outs, start, tried, results):
    """One run: for each output, start with all the others (barrier), try to take its lock, report, and
    hold it until every taker has tried (second barrier), so a late taker cannot find it released."""
    for out in outs:
        start.wait()
        lock = OutputLock(out)
        try:
            lock.acquire()
            results.put((str(out), "won"))
        except OutputLocked as e:
            results.put((str(out), "refused" if "being written by another run" in str(e) else str(e)))
        tried.wait()
        lock.release()


def race(outs: list[Path], takers: int) -> dict[str, list[str]]:
    """``takers`` processes race for the stale lock of each of ``outs`` in turn; the outcomes per output."""
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    start, tried, results = ctx.Barrier(takers), ctx.Barrier(takers), ctx.Queue()
    procs = [ctx.Process(target=_taker, args=(outs, start, tried, results)) for _ in range(takers)]
    for p in procs:
        p.start()
    got: dict[str, list[str]] = {str(o): [] for o in outs}
    for _ in range(len(outs) * takers):
        o, what = results.get(timeout=120)  # a safety net against a hang, not an ordering
        got[o].append(what)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return got


def test_many_concurrent_takers_of_a_stale_lock_one_wins(tmp_path):
    pid = dead_pid()
    outs = [tmp_path / f"o{i}.zarr" for i in range(100)]
    for o in outs:
        plant_stale_lock(o, pid)
    got = race(outs, takers=8)
    bad = {o: r for o, r in got.items() if sorted(r) != ["refused"] * 7 + ["won"]}
    assert not bad, f"{len(bad)} of 100 trials did not have exactly one winner: {bad}"
    for o in outs:  # every lock released, the stale one gone, nothing left beside the output
        assert not sidecar(o).exists(), list(sidecar(o).iterdir())


def test_a_live_lock_is_never_taken_over(tmp_path):
    out = tmp_path / "o.zarr"
    with OutputLock(out):
        got = race([out], takers=4)
        assert got[str(out)] == ["refused"] * 4
        assert (sidecar(out) / "lock").exists()
    assert not sidecar(out).exists()


def test_a_claim_left_by_a_taker_that_died_does_not_block(tmp_path):
    """A taker killed between claiming a stale lock and removing it leaves a claim file: it is stale in
    turn, and the next run takes over both."""
    out = tmp_path / "o.zarr"
    pid = dead_pid()
    plant_stale_lock(out, pid)
    raw = (sidecar(out) / "lock").read_bytes()
    claim = sidecar(out) / f"lock.claim.{__import__('hashlib').sha256(raw).hexdigest()[:16]}"
    claim.write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with OutputLock(out) as lock:
        assert lock.held and json.loads((sidecar(out) / "lock").read_text())["token"] == lock.token
    assert not sidecar(out).exists()


@pytest.mark.parametrize("holder", [{"pid": 1, "host": "another-machine", "started": "then"}, {}])
def test_a_lock_of_another_host_or_unreadable_is_refused_naming_the_file(holder, tmp_path):
    out = tmp_path / "o.zarr"
    sidecar(out).mkdir()
    (sidecar(out) / "lock").write_text(json.dumps(holder) if holder else "")
    with pytest.raises(OutputLocked, match=f"remove {sidecar(out) / 'lock'}"):
        OutputLock(out).acquire()


@pytest.fixture
def ome_input(tmp_path, rng):
    x = (rng.random((2, 40, 50)) * 3000).astype(np.uint16)
    p = tmp_path / "x.ome.zarr"
    memnet.save_image(x, p, axes="ZYX")
    return p


@pytest.mark.parametrize("case", ["level inside the input", "zarr inside the input", "symlink to the input"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_overlapping_the_input_is_refused_and_the_input_untouched(case, overwrite, ome_input, micro_file,
                                                                           tmp_path, restore_cli, _digest):
    out = {"level inside the input": ome_input / "0", "zarr inside the input": ome_input / "out.zarr",
           "symlink to the input": tmp_path / "link.zarr"}[case]
    if case == "symlink to the input":
        out.symlink_to(ome_input, target_is_directory=True)
    before = _digest(ome_input)
    rc, err = restore_cli([ome_input, "-o", out, "--model", micro_file, *(["--overwrite"] if overwrite else [])])
    assert rc == 2 and ("lies inside the input" in err or "is the input" in err), err
    assert _digest(ome_input) == before


def test_an_output_containing_the_input_is_refused(micro_file, tmp_path, rng, restore_cli, _digest):
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
