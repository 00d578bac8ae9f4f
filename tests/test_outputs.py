"""The output lock (issue #32, item 5): of many runs taking over the same stale lock at once, exactly
one wins, in every trial."""

import json
import multiprocessing as mp
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
