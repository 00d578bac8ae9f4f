import subprocess
import sys

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
