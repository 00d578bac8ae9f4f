"""The command line (memnet.cli and its subcommands): messages, exit codes, signals, the progress bar."""

import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr

import memnet
from memnet.cli import main


def test_models_lists_user_models_in_a_table(tiny_model, _isolated_user_models, capsys):
    memnet.save_model(tiny_model, _isolated_user_models / "lab.safetensors", name="lab-denoiser",
                      task="microscopy", metadata={"metrics": {"W2S": 31.5}, "rank": 100})
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:4] == ["name", "task", "arch", "size"]
    row = next(line for line in out.splitlines() if line.startswith("lab-denoiser"))
    assert "microscopy" in row and "M2R2C8" in row and "W2S 31.50" in row and "user" in row
    assert "microscopy -> lab-denoiser" in out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "memnet.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "models" in out.stdout


def test_unknown_subcommand_exits_non_zero():
    out = subprocess.run([sys.executable, "-m", "memnet.cli", "frobnicate"], capture_output=True, text=True)
    assert out.returncode != 0 and "invalid choice" in out.stderr


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


def test_python_dash_m_memnet_is_the_command_line():
    r = subprocess.run([sys.executable, "-m", "memnet", "restore", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--resume" in r.stdout


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
