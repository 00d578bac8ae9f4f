"""Synthetic degradations for training and validation inputs (noise, bicubic down-scaling, JPEG, the
camera model), as the evaluation conventions of ../shared/data/README.md make them. The restore-time
upsampler is in `resample`, the scores in `metrics`.

All images here are float arrays in [0, 1] unless a name says otherwise (``*_255``, uint8)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = [
    "gaussian_noise",
    "poisson_gaussian_noise",
    "bicubic_degrade",
    "jpeg_degrade",
    "camera_noise",
    "CAMERA_MIX_BEFORE_HEAVY_CLIP",
    "CAMERA_RANGES",
    "camera_ranges",
]


def gaussian_noise(clean: np.ndarray, sigma_255: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise, unclipped (the denoising convention); sigma in 8-bit units."""
    return (clean + rng.standard_normal(clean.shape) * (sigma_255 / 255.0)).astype(np.float32)


def poisson_gaussian_noise(clean: np.ndarray, photons: float, read_sigma: float,
                           rng: np.random.Generator) -> np.ndarray:
    """Camera noise: shot noise with ``photons`` expected photons at intensity 1, plus Gaussian read
    noise (std ``read_sigma`` in intensity units)."""
    lam = np.clip(clean, 0, None) * photons
    shot = rng.poisson(lam) / photons
    return (shot + rng.standard_normal(clean.shape) * read_sigma).astype(np.float32)


def bicubic_degrade(hr: np.ndarray, scale: int) -> np.ndarray:
    """Pillow bicubic down by ``scale`` and back up to the same size (the network's SR input).
    ``hr``'s shape must be a multiple of ``scale``."""
    h, w = hr.shape
    if h % scale or w % scale:
        raise ValueError(f"image {hr.shape} is not a multiple of the scale {scale}: crop it first")
    img = Image.fromarray(hr.astype(np.float32), mode="F")
    lr = img.resize((w // scale, h // scale), Image.BICUBIC)
    return np.asarray(lr.resize((w, h), Image.BICUBIC), dtype=np.float32)


def jpeg_degrade(clean: np.ndarray, quality: int) -> np.ndarray:
    """Encode a [0, 1] gray image as 8-bit JPEG at ``quality`` with Pillow and decode it."""
    u8 = np.clip(np.rint(clean * 255), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf), dtype=np.float32) / 255.0


# Wide-range fluorescence camera model (the generalist microscopy model's synthetic noise). Ranges are
# chosen to cover what labs' stacks look like after percentile normalisation, not one microscope.
CAMERA_RANGES = {
    "photons_at_1": [1.0, 1000.0],  # expected photo-electrons at clean intensity 1, log-uniform (3 decades)
    "background": [0.0, 0.3],  # autofluorescence / out-of-focus light, in clean units, under the shot noise
    "read_noise_e": [0.3, 6.0],  # Gaussian read noise (electrons), log-uniform
    "adu_per_e": [0.3, 3.0],  # camera gain: ADU per electron (quantisation), log-uniform
    "pixel_gain_cv": [0.0, 0.05],  # sCMOS pixel-to-pixel gain variation (std of the gain), half the time
    "pixel_offset_adu": [0.0, 2.0],  # sCMOS pixel offset variation (std, ADU), half the time
    "blur_sigma_px": [0.0, 1.2],  # mild optical blur of the content (input and target alike), a third of the time
    "gamma": [0.6, 1.6],  # intensity gamma of the content, log-uniform
    "clip_8bit": 0.5,  # fraction rendered to 8 bits with saturation, as exported 8-bit TIFFs are
    # Display range of an 8-bit rendering, as percentiles of the noisy counts: usually a few pixels clipped at
    # each end; in `clip_heavy` of them set for dim structures, flooring and saturating up to 40 % of the pixels
    # (the 3D-RCAN renderings: 3-43 % at 0, 8-45 % at 255; without these the model under-smooths them)
    "clip_percentiles": [[0.0, 2.0], [98.0, 100.0]],
    "clip_heavy": 0.6,
    "clip_heavy_percentiles": [[0.0, 40.0], [60.0, 98.0]],
    "percentiles": [1.0, 99.8],  # then normalised as `memnet restore` does for microscopy models
    # Fraction of acquisitions whose noise is correlated between neighbouring pixels (0 in the plain camera mix):
    # half of them isotropically (an image resized or interpolated after capture: lag-1 correlation 0.2-0.8),
    # half along X (a point scanner's detector bandwidth: an exponential tail of tau px, lag-1 0.14-0.6).
    "correlated": 0.0,
    "correlated_sigma_px": [0.4, 1.0],
    "scan_tau_px": [0.5, 2.0],
}


# The mix before the heavy display ranges (session 20): the context model was trained and selected on it, and int8
# calibration and its bench draw from it, so their random draws stay the ones they were measured with.
CAMERA_MIX_BEFORE_HEAVY_CLIP = {"clip_8bit": 0.3, "clip_heavy": 0.0}


def camera_ranges(noise: str) -> dict:
    """The camera mix of a ``--noise`` model: "camera" (pixel-independent noise) or "camera-correlated" (30 % of
    acquisitions with correlated noise)."""
    return dict(CAMERA_RANGES, correlated=0.3) if noise == "camera-correlated" else dict(CAMERA_RANGES)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.3:
        return x
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    # the last two axes (Y, X): a stack's planes are blurred each on its own
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(r, r), (r, r)], mode="reflect")
    p = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), -2, p)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), -1, p)


def _correlate(noise: np.ndarray, rng: np.random.Generator, c: dict) -> np.ndarray:
    """The noise made correlated between neighbouring pixels (the expectation is left as it was)."""
    if rng.random() < 0.5:
        return _gaussian_blur(noise, rng.uniform(*c["correlated_sigma_px"]))
    tau = rng.uniform(*c["scan_tau_px"])
    k = np.exp(-np.arange(int(np.ceil(5 * tau)) + 1) / tau)
    k /= k.sum()
    out = k[0] * noise
    for i in range(1, len(k)):  # a causal tail along X, the scan direction
        out[..., i:] += k[i] * noise[..., :-i]
    return out


def camera_noise(clean: np.ndarray, rng: np.random.Generator, ranges: dict | None = None) -> tuple[np.ndarray,
                                                                                                       np.ndarray]:
    """A fluorescence acquisition of ``clean`` (a 2-D crop, or a stack of them, roughly [0, 1]) by a randomly
    drawn camera.

    Returns ``(noisy, target)`` both normalised by the noisy crop's own 1 / 99.8 percentiles, the frame
    `memnet restore` puts a microscopy input in: ``target`` is the noise-free expectation of the
    acquisition in that frame, so the model learns to restore in the frame it will see at inference.
    """
    c = dict(CAMERA_RANGES, **(ranges or {}))
    x = np.clip(np.asarray(clean, np.float64), 0, None)
    x = x / max(float(np.percentile(x, 99.8)), 1e-6)  # content roughly in [0, 1] whatever its source
    x = np.clip(x, 0, 1.5) ** _log_uniform(rng, *c["gamma"])
    if rng.random() < 1 / 3:
        x = _gaussian_blur(x, rng.uniform(*c["blur_sigma_px"]))
    # Integer counts: under one count between the percentiles, the crop is (nearly) one level (dark content at a
    # few photons) and its other pixels would come out at ~1e6, which blew up a training run once in 1,700 steps:
    # such an acquisition is drawn again (a normal one is the first draw, so the mix's stream is unchanged).
    for _ in range(8):
        counts, expected = _acquire(x, rng, c)
        lo, hi = np.percentile(counts, c["percentiles"])
        if hi - lo >= 1:
            span = hi - lo
            break
    else:  # black content that no camera shows: scaled by its full range, or blank in and blank out
        span = float(counts.max()) - lo
        if span < 1:
            return np.zeros(x.shape, np.float32), np.zeros(x.shape, np.float32)
    return ((counts - lo) / span).astype(np.float32), ((expected - lo) / span).astype(np.float32)


def _acquire(x: np.ndarray, rng: np.random.Generator, c: dict) -> tuple[np.ndarray, np.ndarray]:
    """One random camera's counts of ``x`` (content in [0, ~1]) and their noise-free expectation."""
    photons = _log_uniform(rng, *c["photons_at_1"])
    electrons = photons * (x + rng.uniform(*c["background"]))  # expectation
    adu = _log_uniform(rng, *c["adu_per_e"])
    gain = 1.0 + (rng.standard_normal(x.shape) * rng.uniform(*c["pixel_gain_cv"]) if rng.random() < 0.5 else 0.0)
    offset_map = rng.standard_normal(x.shape) * rng.uniform(*c["pixel_offset_adu"]) if rng.random() < 0.5 else 0.0
    read = rng.standard_normal(x.shape) * _log_uniform(rng, *c["read_noise_e"])
    counts = (rng.poisson(electrons) * gain + read) * adu + offset_map
    expected = electrons * adu
    if c["correlated"] > 0 and rng.random() < c["correlated"]:  # no draw otherwise: the plain mix's stream unchanged
        counts = expected + _correlate(counts - expected, rng, c)
    counts = np.rint(counts)
    if rng.random() < c["clip_8bit"]:
        # An 8-bit rendering with a display range set on the noisy image, saturating its brightest pixels.
        q = c["clip_heavy_percentiles"] if c["clip_heavy"] > 0 and rng.random() < c["clip_heavy"] \
            else c["clip_percentiles"]
        lo, hi = np.percentile(counts, [rng.uniform(*q[0]), rng.uniform(*q[1])])
        s = 255.0 / max(hi - lo, 1.0)  # a display range at least one count wide
        counts = np.clip(np.rint((counts - lo) * s), 0, 255)
        expected = np.clip((expected - lo) * s, 0, 255)
    return counts, expected
