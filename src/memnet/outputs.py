"""Output safety, in one place for every writer (restore's sinks, the widget, distributed runs,
save_image, finetune's model file): an output never overlaps an input, one run at a time owns an
output (a lock that names its holder), and the bookkeeping of a run (lock, resume markers, the staging
copy of an overwrite) lives beside the output in ``NAME.memnet/``, where readers do not trip on it."""

from __future__ import annotations

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


class OutputLock:
    """An exclusive claim on an output, from start to finish: ``NAME.memnet/lock``, created atomically
    (O_EXCL), holding the owner's pid, host and start time. A lock whose process is gone (same host) is
    stale and taken over; a live one, or one from another host, refuses the run with its holder named."""

    def __init__(self, out):
        self.out = Path(out)
        self.path = sidecar(out) / "lock"
        self.held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S%z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = self._holder()
                if h.get("host") == me["host"] and isinstance(h.get("pid"), int) and not _alive(h["pid"]):
                    # Stale (its process died): move it aside atomically, so of two runs taking it over
                    # only one succeeds, then try again.
                    try:
                        os.replace(self.path, self.path.with_name(f"lock.stale.{h['pid']}"))
                    except FileNotFoundError:
                        pass
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
            self.held = True
            for stale in self.path.parent.glob("lock.stale.*"):
                stale.unlink(missing_ok=True)
            return self
        raise OutputLocked(f"could not take the lock {self.path}: it keeps changing hands")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._holder().get("pid") == os.getpid():
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
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
