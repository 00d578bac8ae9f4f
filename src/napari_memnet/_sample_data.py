"""Sample data: a synthetic fluorescence z-stack with realistic Poisson-Gaussian camera noise
(made by scripts/make_sample.py), so a new user can try the plugin in one click."""

from __future__ import annotations

from pathlib import Path

import tifffile

DATA = Path(__file__).parent / "data"
NOISY = DATA / "sample_fluo_noisy.tif"
CLEAN = DATA / "sample_fluo_clean.tif"


def _layer(path: Path, name: str):
    with tifffile.TiffFile(path) as tif:
        data = tif.asarray()
        ij = tif.imagej_metadata or {}
        num, den = tif.pages[0].tags["XResolution"].value
    xy = den / num  # the resolution tag holds pixels per unit
    z = float(ij.get("spacing", xy))
    unit = ij.get("unit", "um")
    return (
        data,
        {"name": name, "scale": (z, xy, xy), "axis_labels": ("z", "y", "x"), "units": (unit,) * 3},
        "image",
    )


def make_sample_data():
    return [_layer(NOISY, "noisy fluorescence (sample)")]
