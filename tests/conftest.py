import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import memnet
from memnet.cli import main

MICRO_METADATA = {"normalization": {"mode": "percentile", "low": 1, "high": 99.8}}  # as the shipped model


def _random_model(blocks, recursions, channels, seed, dtype=torch.float64, **config):
    """Every parameter and BN statistic random (negative BN scales included): nothing to hide behind."""
    torch.manual_seed(seed)
    m = memnet.MemNet(blocks, recursions, channels, **config)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.2, 2.0)
                mod.weight.normal_(0, 1.0)
                mod.bias.normal_(0, 0.5)
        m.recon_conv.weight.normal_(0, 0.1)
        m.recon_conv.bias.normal_(0, 0.1)
        m.branch_weights.uniform_(-0.5, 1.0)
    return m.to(dtype).eval()


@pytest.fixture
def random_model():
    """Makes a MemNet with every weight and BN statistic random: ``random_model(blocks, recursions, channels,
    seed, dtype=torch.float64, **config)``."""
    return _random_model


@pytest.fixture(autouse=True)
def _isolated_user_models(tmp_path, monkeypatch):
    """Every test gets an empty user model directory: nothing leaks into the real one."""
    d = tmp_path / "user-models"
    monkeypatch.setenv("MEMNET_MODEL_DIR", str(d))
    monkeypatch.setenv("MEMNET_CACHE_DIR", str(tmp_path / "cache"))  # exported graphs: none from the real cache
    return d


@pytest.fixture
def tiny_model():
    """A tiny MemNet with non-trivial BN statistics (random eval-mode BN is not an identity)."""
    torch.manual_seed(0)
    m = memnet.MemNet(blocks=2, recursions=2, channels=8)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
        m.recon_conv.weight.normal_(0, 0.1)  # not the identity of a freshly initialised model
    return m.eval()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def micro_file(tiny_model, tmp_path):
    """The tiny model saved as a microscopy model file (percentile intensity policy)."""
    p = tmp_path / "tiny-micro.safetensors"
    memnet.save_model(tiny_model, p, name="tiny-micro", task="microscopy", metadata=MICRO_METADATA)
    return p


@pytest.fixture
def restore_cli(capsys):
    """``memnet restore ARGS`` on the CPU, quietly: ``restore_cli(args)`` returns (exit code, stderr)."""

    def run(args):
        rc = main(["restore", *map(str, args), "--device", "cpu", "-q"])
        return rc, capsys.readouterr().err

    return run


@pytest.fixture
def user_model(micro_file, _isolated_user_models):
    """The tiny microscopy model installed in the (isolated) user model directory."""
    _isolated_user_models.mkdir(parents=True, exist_ok=True)
    shutil.copy(micro_file, _isolated_user_models)
    return "tiny-micro"


@pytest.fixture
def ctx_model():
    """A tiny context model (five planes) with non-trivial weights and BN statistics."""
    torch.manual_seed(1)
    m = memnet.MemNet(blocks=1, recursions=2, channels=8, context=2)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.normal_(0, 0.15)
    return m.eval()


@pytest.fixture
def ctx_user(ctx_model, _isolated_user_models):
    """The tiny context model installed as a user microscopy model that outranks any shipped one."""
    _isolated_user_models.mkdir(parents=True, exist_ok=True)
    memnet.save_model(ctx_model, _isolated_user_models / "tiny-ctx.safetensors", name="tiny-ctx", task="microscopy",
                      metadata={**MICRO_METADATA, "rank": 100})
    return "tiny-ctx"


# `memnet restore` that stops at a point the test names and stays there until the test kills it: after
# argv[2] new done-markers of groups, then argv[3] more output blocks (0: right after the marker, before the
# pyramid rows it completes are built; counted in chunks, a tile row written in one call counts as its
# chunks, and the run stops after the write that reaches the count). It creates the file argv[1] when it
# stops. A test that kills it there knows what was on disk, however fast or slow the machine is.
_HELD_RESTORE = """
import sys, threading, time
from pathlib import Path
from memnet import local
from memnet.cli import main
from memnet.sinks import ZarrSink

held, groups, blocks = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
seen, count = {"groups": 0, "blocks": 0}, threading.Lock()  # blocks may be written by several threads

def hold():
    held.touch()
    while True:
        time.sleep(60)

def past():
    with count:
        return seen["groups"] >= groups

mark_done, write, close = ZarrSink.mark_done, ZarrSink.write, local._Writer.close
rows_written, build_ready = ZarrSink.rows_written, ZarrSink.build_ready

# Markers and pyramid rows are written in order on one thread, but blocks run ahead of them (a pool writes
# them): after the chosen marker, later markers and pyramid rows are left out (as if that thread were
# stopped there) while blocks go on being written and counted.
def counted_mark_done(self, key):
    if past():
        return
    mark_done(self, key)
    with count:
        seen["groups"] += 1
        now = seen["groups"] == groups and blocks == 0
    if now:
        hold()

def counted_write(self, index, block):
    write(self, index, block)
    level = self.pyramid.levels[0]
    chunks = -(-block.shape[-2] // level.chunk_h) * -(-block.shape[-1] // level.chunk_w)
    with count:
        was = seen["blocks"]
        if seen["groups"] >= groups:
            seen["blocks"] += chunks
        now = seen["groups"] >= groups and was < blocks <= seen["blocks"]
    if now:
        hold()

def held_rows_written(self, lead, rows):
    if not past():
        rows_written(self, lead, rows)

def held_build_ready(self, units):
    if not past():
        build_ready(self, units)

def held_close(self):
    if past():  # every block was written before as many as asked came after the marker: hold at the end
        hold()
    close(self)

ZarrSink.mark_done, ZarrSink.write = counted_mark_done, counted_write
ZarrSink.rows_written, ZarrSink.build_ready, local._Writer.close = held_rows_written, held_build_ready, held_close
sys.exit(main(["restore", *sys.argv[4:]]))
"""


@pytest.fixture
def held_restore(tmp_path):
    """``held_restore(args, groups, blocks)``: start ``memnet restore ARGS`` (a Zarr output) held after
    ``groups`` new done-markers and then ``blocks`` more output blocks (or at its end, if fewer were left);
    later markers and pyramid rows are never written. Returns the process once it is held there (it waits
    for the test's signal). Fails if the run ends before it gets there."""

    def start(args, groups: int, blocks: int):
        assert groups > 0 or blocks > 0, "hold after at least one marker or block"
        held = tmp_path / "held"
        held.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", _HELD_RESTORE, str(held), str(groups), str(blocks),
                                 *map(str, args)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.monotonic()
        while not held.exists() and proc.poll() is None and time.monotonic() - t0 < 600:  # a hang guard only
            time.sleep(0.005)  # when the file appears changes nothing the test sees: the run waits there
        if not held.exists():
            proc.kill()
            raise AssertionError(f"the run ended (exit {proc.wait()}) before it was held after {groups} groups "
                                 f"and {blocks} blocks: {proc.stderr.read().decode()}")
        return proc

    return start


@pytest.fixture
def cancel_waits(monkeypatch):
    """``cancel_waits(after)``: from then on a `memnet.restore` given a ``cancel`` event (as the widgets
    pass) stops after ``after`` batches until that event is set, so a test that cancels from the GUI thread
    when the progress arrives does so before the run can end, however fast it runs."""

    def install(after: int):
        real = memnet.restore

        def restore(*args, progress=None, cancel=None, **kw):
            def held(p):
                if progress is not None:
                    progress(p)
                if p.done >= after and hasattr(cancel, "wait"):
                    assert cancel.wait(120), "the test never cancelled the run"

            return real(*args, progress=held, cancel=cancel, **kw)

        monkeypatch.setattr(memnet, "restore", restore)

    return install


@pytest.fixture
def wait_worker(qtbot):
    """``wait_worker(worker)``: block until a widget's background worker has finished."""

    def wait(worker, timeout=60_000):
        assert worker is not None, "the widget started no work"
        qtbot.waitUntil(lambda: worker.ended, timeout=timeout)  # BackgroundJob sets it when finished

    return wait


@pytest.fixture
def dock(make_napari_viewer):
    """``dock(name)``: a new viewer and the plugin's dock widget ``name`` as napari finds it (manifest)."""

    def make(name, viewer=None):
        viewer = viewer or make_napari_viewer()
        _, w = viewer.window.add_plugin_dock_widget("napari-memnet", name)
        return viewer, w

    return make


@pytest.fixture
def _digest():
    """``_digest(path)``: a hash of a file, or of a folder's file names and contents (to show an input untouched)."""

    def digest(path: Path) -> str:
        h = hashlib.sha256()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            h.update(f.read_bytes())
        return h.hexdigest()

    return digest


@pytest.fixture
def two_series(tmp_path, rng):
    """An OME-TIFF with two series: (path, series 0 (2, 30, 40) ZYX, series 1 (50, 20) YX)."""
    a = (rng.random((2, 30, 40)) * 3000).astype(np.uint16)
    b = (rng.random((50, 20)) * 3000).astype(np.uint16)
    p = tmp_path / "two.ome.tif"
    with tifffile.TiffWriter(p, ome=True) as tw:
        tw.write(a, metadata={"axes": "ZYX"})
        tw.write(b, metadata={"axes": "YX"})
    return p, a, b
