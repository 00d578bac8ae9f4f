"""The npe2 manifest: one copy in git, inside the package (src/napari_memnet/napari.yaml)."""

import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "src/napari_memnet/napari.yaml"


def test_manifest_validates_and_lists_contributions():
    from npe2 import PluginManager, PluginManifest

    mf = PluginManifest.from_distribution("napari-memnet")
    assert mf.name == "napari-memnet"
    pm = PluginManager()
    pm.discover()
    assert "napari-memnet" in [m.name for m in pm.iter_manifests()]
    contribs = pm.get_manifest("napari-memnet").contributions
    assert [s.key for s in contribs.sample_data] == ["noisy_fluorescence"]
    # Every command points at an importable callable.
    for cmd in contribs.commands:
        assert callable(_resolve(cmd.python_name)), cmd.id


def _resolve(python_name):
    import importlib

    mod, attr = python_name.split(":")
    return getattr(importlib.import_module(mod), attr)


def test_installed_manifest_is_the_package_file():
    installed = files("napari_memnet") / "napari.yaml"
    assert installed.is_file(), "napari.yaml missing from the installed package: reinstall (pip install -e .)"
    # A non-editable install copies the file: a stale copy means an old install.
    assert installed.read_text() == (ROOT / MANIFEST).read_text(), (
        f"the installed napari.yaml differs from {MANIFEST}: reinstall (pip install -e .)"
    )


def test_only_one_manifest_in_git():
    out = subprocess.run(["git", "ls-files", "*napari.yaml"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"git ls-files failed: {out.stderr}")
    assert out.stdout.split() == [MANIFEST]


def test_wheel_ships_manifest_weights_and_sample(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    cmd += ["-w", str(tmp_path), str(ROOT)]
    subprocess.run(cmd, check=True, capture_output=True)
    (whl,) = tmp_path.glob("napari_memnet-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "napari_memnet/napari.yaml" in names
    assert "napari_memnet/data/sample_fluo_noisy.tif" in names
    assert "memnet/model.py" in names
    assert any(n.startswith("memnet/weights/") and n.endswith(".safetensors") for n in names)
    assert not [n for n in names if n.startswith(("src/", "tests/"))]  # the src layout ships packages only
    eps = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "napari-memnet = napari_memnet:napari.yaml" in eps


def test_sample_data_is_a_real_noisy_stack():
    import numpy as np

    from napari_memnet._sample_data import make_sample_data

    ((data, meta, kind),) = make_sample_data()
    assert kind == "image" and data.dtype == np.uint16 and data.ndim == 3
    assert meta["scale"] == (0.5, 0.1, 0.1) and meta["axis_labels"] == ("z", "y", "x")
    # Poisson-Gaussian noise: variance grows with the signal.
    import tifffile

    from napari_memnet._sample_data import CLEAN

    clean = tifffile.imread(CLEAN).astype(float)
    resid = data.astype(float) - clean
    lo, hi = clean <= np.percentile(clean, 30), clean >= np.percentile(clean, 95)
    assert resid[hi].var() > 1.5 * resid[lo].var()
