"""The GPU playbook starts (on the CPU, with a tiny model and two steps), so a lent GPU is not spent
finding out that it does not."""

import importlib.util
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import memnet

ROOT = Path(__file__).resolve().parent.parent


def _playbook():
    spec = importlib.util.spec_from_file_location("gpu_playbook", ROOT / "scripts" / "gpu_playbook.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_playbook_packs_and_runs_a_chunk_from_the_previous_checkpoint(tmp_path, tiny_model, rng, monkeypatch):
    root = tmp_path / "data"
    for folder, n, size in (("Train400", 3, 64), ("Set12", 2, 56)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            yy, xx = np.mgrid[0:size, 0:size] / size
            img = (127 + 100 * np.sin(6 * xx + 4 * yy + i) + rng.normal(0, 3, (size, size))).clip(0, 255)
            Image.fromarray(img.astype(np.uint8)).save(root / folder / f"{i:02d}.png")
    pb = _playbook()
    packed = tmp_path / "gpudata"
    pb.main(["pack", "--data-root", str(root), "--tasks", "denoise", "--dest", str(packed)])
    assert sorted(p.name for p in (packed / "Train400").iterdir()) == ["00.png", "01.png", "02.png"]
    # A previous chunk's checkpoint: the next chunk continues from it (and grows it to --arch).
    (packed / "ckpt").mkdir()
    memnet.save_model(tiny_model, packed / "ckpt" / "denoise.safetensors", name="denoise-M2R2C8", task="denoise")
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    pb.main(["run", "--tasks", "denoise", "--arch", "M2R3C8", "--batch", "2", "--steps", "2", "--bn-batches", "1",
             "--device", "cpu", "--data", str(packed), "--work", str(tmp_path / "work")])
    model, info = memnet.load_model(out / "denoise.safetensors")
    assert (model.config.blocks, model.config.recursions, model.config.channels) == (2, 3, 8)
    steps = info.metadata["training"]["steps"]  # the best of the chunk's validations
    assert steps in (1, 2) and info.metadata["training"]["total_steps"] == steps
    assert info.metadata["training"]["continued_from"]["name"] == "denoise-M2R2C8"
    assert "sigma25" in info.metrics  # validated on the packed Set12
    with tarfile.open(out / "logs.tar.gz") as tar:
        log = tar.extractfile("denoise.log").read().decode()
    assert "deepening denoise-M2R2C8 from M2R2 to M2R3" in log and "step 2/2" in log and "chunk done" in log


def _run_suite(*args, env=None):
    import subprocess
    import sys
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_gpu_suite_refuses_clearly_without_cuda():
    import torch
    if torch.cuda.is_available():
        return  # on a GPU machine the suite runs for real (bench/gpu_suite.sh)
    r = _run_suite()
    assert r.returncode == 2
    assert "no CUDA device here" in r.stderr and "--allow-cpu" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_gpu_suite_runs_end_to_end_on_the_cpu_in_smoke_mode(tmp_path):
    import json
    r = _run_suite("--allow-cpu", "--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    whats = {(row.get("what"), row.get("precision")) for row in rows}
    assert {("bare eager", "fp32"), ("bare folded", "fp32"), ("engine", "fp32"), ("exactness", None)} <= whats
    exact = next(row for row in rows if row.get("what") == "exactness")
    assert exact["ok"] is True and exact["vs_whole"] <= 1e-5
    assert all(row["mpx_s"] > 0 for row in rows if "mpx_s" in row)
    assert "done in" in (tmp_path / "results.txt").read_text()
