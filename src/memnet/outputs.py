"""Output safety, in one place for every writer (restore's sinks, the widget, distributed runs,
save_image, finetune's model file): an output never overlaps an input, one run at a time owns an
output (a lock that names its holder), and the bookkeeping of a run (lock, resume markers, the staging
copy of an overwrite) lives beside the output in ``NAME.memnet/``, where readers do not trip on it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

__all__ = ["check_output_path", "OutputLock", "OutputLocked", "sidecar", "write_marker", "read_markers"]


class OutputLocked(OSError):
    """Another run holds the output."""


def _real(p: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(p))))  # symlinks followed, also for missing paths


def check_output_path(out, inputs=()) -> None:
    """Refuse an output that is, contains, or lies inside an input (symlinks followed), whatever the
    flags: writing it, or removing it to overwrite it, would destroy the input."""
    o = _real(Path(out))
    for inp in inputs:
        if inp is None:
            continue
        i = _real(Path(inp))
        if o == i:
            raise ValueError(f"the output {out} is the input: choose another output path (inputs are never "
                             "overwritten)")
        if i in o.parents:
            raise ValueError(f"the output {out} lies inside the input {inp}: writing there would change the input; "
                             "choose an output outside it")
        if o in i.parents:
            raise ValueError(f"the output {out} contains the input {inp}: replacing it would delete the input; "
                             "choose another output path")


def sidecar(out) -> Path:
    """``NAME.memnet/`` beside the output: lock, resume markers, staging copy."""
    out = Path(out)
    return out.with_name(out.name + ".memnet")


def write_marker(directory: Path, key: str) -> None:
    """A done-marker, atomically (several workers may write markers into the same folder)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{key}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    tmp.write_text("done\n")
    os.replace(tmp, directory / key)


def read_markers(*directories: Path) -> set[str]:
    """The done-markers' names found in ``directories`` (those that exist), in-flight temporary files left out."""
    keys: set[str] = set()
    for d in directories:
        if d.is_dir():
            keys |= {p.name for p in d.iterdir() if not p.name.endswith(".tmp")}
    return keys


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return True
    return True


def _read(p: Path) -> bytes | None:
    try:
        return p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return b""


def _parse(raw: bytes | None) -> dict:
    try:
        h = json.loads(raw or b"")
    except ValueError:
        return {}
    return h if isinstance(h, dict) else {}


def _stale(h: dict) -> bool:
    """A lock (or claim) of a process on this host that is gone."""
    return h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int) and not _alive(h["pid"])


def _take_over(path: Path, raw: bytes, depth: int = 0) -> None:
    """Remove the stale lock ``path`` if it still holds ``raw``, so that of many runs taking over the same
    stale lock exactly one removes it (and then only one can create the next, by O_EXCL). The remover is
    whoever creates the claim file named after this very lock's content (O_EXCL): while it holds the
    claim no one else can remove or replace that lock, so its re-check cannot be overtaken. A claim left
    by a taker that died is stale in turn, and taken over the same way."""
    claim = path.with_name(f"{path.name}.claim.{hashlib.sha256(raw).hexdigest()[:16]}")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "token": os.urandom(8).hex()}
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:  # another run is removing this stale lock
        craw = _read(claim)
        if craw is not None and _stale(_parse(craw)) and depth < 3:
            _take_over(claim, craw, depth + 1)
        else:
            time.sleep(0.01)
        return
    except FileNotFoundError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        if _read(path) == raw:  # still the stale lock we saw, not a newer one
            path.unlink(missing_ok=True)
    finally:
        claim.unlink(missing_ok=True)


class OutputLock:
    """An exclusive claim on an output, from start to finish: ``NAME.memnet/lock``, created atomically
    (O_EXCL), holding the owner's pid, host and start time. A lock whose process is gone (same host) is
    stale and taken over; a live one, or one from another host, refuses the run with its holder named."""

    read_only = False  # it writes (a complete output on a read-only mount is resumed without one)

    def __init__(self, out):
        self.out = Path(out)
        self.path = sidecar(out) / "lock"
        self.held, self.token = False, None

    def _holder(self) -> dict:
        return _parse(_read(self.path))

    def acquire(self) -> OutputLock:
        """Take the lock, taking over one left by a dead process on this host; OutputLocked (naming the holder and the
        way out) when another run holds it."""
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S%z"), "token": os.urandom(8).hex()}
        for _ in range(200):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileNotFoundError:  # the folder was removed by a run releasing it: make it again
                continue
            except FileExistsError:
                raw = _read(self.path)
                if raw is None:  # released meanwhile
                    continue
                h = _parse(raw)
                if _stale(h):
                    _take_over(self.path, raw)
                    continue
                if not h:  # being written by its creator right now, or unreadable
                    time.sleep(0.2)
                    h = self._holder()
                who = (f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}" if h
                       else "an unknown process")
                raise OutputLocked(
                    f"the output {self.out} is being written by another run ({who}): wait for it to finish, "
                    f"or choose another output. If that run is gone (e.g. another machine crashed), remove "
                    f"{self.path}") from None
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except BaseException:  # e.g. a full disk: an empty lock would refuse every later run
                self.path.unlink(missing_ok=True)
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass
                raise
            self.held, self.token = True, me["token"]
            for stale in self.path.parent.glob("lock.stale.*"):  # left by versions before the claim files
                stale.unlink(missing_ok=True)
            return self
        raise OutputLocked(f"could not take the lock {self.path}: it keeps changing hands")

    def release(self) -> None:
        """Give the lock up if this object holds it (a lock taken over by another run meanwhile is left alone)."""
        if not self.held:
            return
        self.held = False
        if self._holder().get("token") == self.token:
            self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()  # only when nothing else (resume markers) is kept there
        except OSError:
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def remove_tree(p: Path) -> None:
    """Remove a folder tree, a file or a link (not what it points to); nothing when ``p`` does not exist."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
