"""Regenerate the bundled sample (src/napari_memnet/data/): a synthetic widefield-like fluorescence
z-stack — nuclei, filaments and puncta, blurred by a Gaussian PSF — with Poisson-Gaussian camera
noise (photon shot noise, gain, read noise, offset), stored as uint16 TIFF with its clean
counterpart. Deterministic (fixed seed). Usage: python scripts/make_sample.py"""

from pathlib import Path

import numpy as np
import tifffile

OUT = Path(__file__).resolve().parents[1] / "src" / "napari_memnet" / "data"
Z, Y, X = 4, 384, 384
GAIN, READ_NOISE, OFFSET, PEAK_PHOTONS = 2.0, 3.0, 100.0, 40.0


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable blur by FFT, periodic borders (the scene is padded first)."""
    fy = np.fft.fftfreq(img.shape[-2])[:, None]
    fx = np.fft.fftfreq(img.shape[-1])[None, :]
    k = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.real(np.fft.ifft2(np.fft.fft2(img) * k))


def scene(rng: np.random.Generator) -> np.ndarray:
    pad = 32
    h, w = Y + 2 * pad, X + 2 * pad
    vol = np.zeros((Z, h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(28):  # nuclei: ellipses with texture, spanning a few z
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        a, b, th = rng.uniform(12, 26), rng.uniform(9, 18), rng.uniform(0, np.pi)
        zc, bright = rng.uniform(-1, Z), rng.uniform(0.35, 0.7)
        u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / a
        v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / b
        mask = (u**2 + v**2 < 1).astype(float)
        for z in range(Z):
            vol[z] += bright * mask * np.exp(-((z - zc) ** 2) / 4)
    for _ in range(60):  # filaments: smooth random walks
        p = np.array([rng.uniform(0, h), rng.uniform(0, w)])
        ang = rng.uniform(0, 2 * np.pi)
        z = rng.integers(0, Z)
        for _ in range(int(rng.uniform(80, 300))):
            ang += rng.normal(0, 0.12)
            p += 1.2 * np.array([np.sin(ang), np.cos(ang)])
            iy, ix = int(p[0]) % h, int(p[1]) % w
            vol[z, iy, ix] += 0.9
            if z + 1 < Z:
                vol[z + 1, iy, ix] += 0.4
    for _ in range(400):  # puncta
        z, iy, ix = rng.integers(0, Z), rng.integers(0, h), rng.integers(0, w)
        vol[z, iy, ix] += rng.uniform(1, 4)
    vol = np.stack([gaussian_blur(s, 1.6) for s in vol])
    vol += 0.04  # autofluorescence background
    vol = vol[:, pad:-pad, pad:-pad]
    return vol / vol.max()


def main() -> None:
    rng = np.random.default_rng(20171022)
    clean_photons = scene(rng) * PEAK_PHOTONS
    noisy = GAIN * rng.poisson(clean_photons) + rng.normal(0, READ_NOISE, clean_photons.shape) + OFFSET
    clean = GAIN * clean_photons + OFFSET
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"axes": "ZYX", "unit": "um", "spacing": 0.5}
    res = (1 / 0.1, 1 / 0.1)  # 0.1 um pixels
    kw = dict(imagej=True, resolution=res, metadata=meta, compression="zlib")
    tifffile.imwrite(OUT / "sample_fluo_noisy.tif", np.clip(np.round(noisy), 0, 65535).astype(np.uint16), **kw)
    tifffile.imwrite(OUT / "sample_fluo_clean.tif", np.round(clean).astype(np.uint16), **kw)
    print("wrote", OUT, "noisy mean", noisy.mean().round(1), "clean max", clean.max().round(1))


if __name__ == "__main__":
    main()
