"""A bioimage.io model package (spec 0.5) of a memnet model: ``memnet export --format bioimageio``.

The description is built from bioimageio.spec's own classes and written with its packaging function,
which validates the .zip as it writes it. The package holds the graph ``memnet export`` writes (SR:
Pillow's bicubic pre-upsampling inside) as TorchScript and ONNX, test tensors made by ``memnet.restore``
on a sample crop, a before/after cover and a model card (README.md) from the weights' metadata.

The intensity mapping, as the spec's processing steps:

- percentile models (microscopy): ``scale_range`` on the input with the model's percentiles, per image.
  The spec has no step that maps an output back through the input's percentiles, so the output stays
  in the normalised range (0 and 1 at the input's percentiles); the model card says so.
- natural-image models: 8-bit input, ``scale_linear`` by 1/255; the output ``scale_linear`` by 255,
  clipped to [0, 255], float32 (``memnet restore`` also rounds to uint8; the spec has no rounding step).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from .degrade import jpeg_degrade
from .graphs import CITATION, ONNX_OPSET, card, write_graph
from .model import receptive_field
from .normalize import Normalizer

__all__ = ["write_package", "package_geometry"]

STEP = 16  # input sizes are min + n * STEP: any size works (fully convolutional); 16 keeps the choice short
TEST_SIZE = 2 * STEP  # the test crop is this much larger than the smallest input


def package_geometry(radius: int, scale: int) -> tuple[int, int]:
    """(output halo, smallest input size) for a network of receptive-field ``radius`` behind an upsampling
    by ``scale``. The halo covers what tile borders change: the network's radius, plus for SR the
    bicubic support (2 input pixels); in output pixels, a multiple of ``scale`` (the spec wants the
    input-side halo whole). The smallest input leaves a core of at least STEP pixels."""
    halo = radius if scale == 1 else scale * (math.ceil(radius / scale) + 2)
    halo_in = halo // scale
    return halo, STEP * math.ceil((2 * halo_in + STEP) / STEP)


def _percentile(info) -> bool:
    return info.normalization.get("mode") == "percentile"


def _scene(rng: np.random.Generator, n: int) -> np.ndarray:
    """A synthetic clean image in [0, 1] (blurred disks, curves and dots): the default sample."""
    yy, xx = np.mgrid[:n, :n]
    img = np.full((n, n), 0.05)
    for _ in range(max(3, n // 12)):
        cy, cx = rng.uniform(0, n, 2)
        r = rng.uniform(n / 24, n / 8)
        img += rng.uniform(0.25, 0.6) * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
    for _ in range(max(2, n // 16)):
        p, ang = rng.uniform(0, n, 2), rng.uniform(0, 2 * np.pi)
        for _ in range(3 * n):
            ang += rng.normal(0, 0.1)
            p = p + np.array([np.sin(ang), np.cos(ang)])
            iy, ix = int(p[0]) % n, int(p[1]) % n
            img[iy, ix] += 0.8
    for _ in range(n // 2):
        img[rng.integers(0, n), rng.integers(0, n)] += rng.uniform(0.5, 2.0)
    f = np.fft.fftfreq(n)
    blur = np.exp(-2 * (np.pi * 1.2) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    img = np.real(np.fft.ifft2(np.fft.fft2(img) * blur))
    return np.clip(img / img.max(), 0, 1)


def _default_sample(info, scale: int, n: int) -> np.ndarray:
    """A degraded synthetic image of the model's task: what the model is for, when no sample is given."""
    rng = np.random.default_rng(20171022)
    clean = _scene(rng, n * scale)
    if _percentile(info):  # camera counts: shot noise, gain 2, read noise 3, offset 100
        return np.rint(2.0 * rng.poisson(clean * 30) + rng.normal(100, 3, clean.shape)).astype(np.float32)
    clean = 0.1 + 0.8 * clean  # mid-tones: 8-bit noise is then not clipped at black
    if info.task == "sr":
        lr = Image.fromarray(clean.astype(np.float32), mode="F").resize((n, n), Image.BICUBIC)
        img = np.asarray(lr, np.float64)
    elif info.task == "jpeg":
        img = jpeg_degrade(clean, 10)
    else:
        img = clean + rng.normal(0, 25 / 255, clean.shape)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _plane(sample) -> np.ndarray:
    """A 2-D plane of ``sample`` (array or image path): the middle plane of a stack, in YX order."""
    from .sources import open_input

    src = open_input(sample)
    plane = src.read_plane(tuple(n // 2 for n in src.lead_shape))
    src.close()
    return plane


def _crop(info, plane: np.ndarray, in_min: int) -> np.ndarray:
    """The centre of ``plane`` at a valid input size (at most the test size), in the package's input dtype."""
    sizes = []
    for n in plane.shape:
        if n < in_min:
            raise ValueError(f"the sample is {plane.shape[0]}x{plane.shape[1]} pixels: the package's test "
                             f"needs at least {in_min}x{in_min}")
        sizes.append(in_min + min(TEST_SIZE, (n - in_min) // STEP * STEP))
    (h, w), (ny, nx) = plane.shape, sizes
    crop = plane[(h - ny) // 2: (h - ny) // 2 + ny, (w - nx) // 2: (w - nx) // 2 + nx]
    if _percentile(info):
        return crop.astype(np.float32)
    if crop.dtype != np.uint8:  # the engine's own mapping to [0, 1], then 8 bits
        crop = np.rint(Normalizer.for_data(crop, info.normalization).forward(crop) * 255.0).clip(0, 255)
    return crop.astype(np.uint8)


def _restored(info, scale: int, x: np.ndarray) -> np.ndarray:
    """The engine's result on the test input, in the package's output units (float32)."""
    from .engine import restore

    # CPU and full precision: the test output is what the weights give, not a mixed-precision result.
    opts = {"scale": scale, "device": "cpu", "amp": "off"}
    if _percentile(info):
        raw = x.astype(np.float64)  # float64 out: no rounding before mapping back to normalised units
        return Normalizer.for_data(raw, info.normalization).forward(restore(raw, str(info.path), **opts))
    out = restore(x.astype(np.float32) / np.float32(255), str(info.path), **opts)
    return np.clip(out * np.float32(255), 0, 255).astype(np.float32)


def _cover(info, scale: int, x: np.ndarray, y: np.ndarray, path: Path) -> None:
    """Input (left, nearest-upscaled for SR) and result (right), side by side, one intensity mapping."""
    if _percentile(info):
        left = Normalizer.for_data(x, info.normalization).forward(x)
        right = y
    else:
        left, right = x / 255.0, y / 255.0
    left = np.kron(left, np.ones((scale, scale)))
    gap = np.ones((left.shape[0], max(2, left.shape[0] // 32)))
    panel = np.concatenate([left, gap, right], axis=1)
    k = max(1, 256 // panel.shape[0])  # small crops enlarged, pixels kept sharp
    panel = np.kron(panel, np.ones((k, k)))
    Image.fromarray(np.rint(np.clip(panel, 0, 1) * 255).astype(np.uint8)).save(path)


_TASKS = {
    "microscopy": ("denoising of fluorescence microscopy images", ["denoising", "fluorescence-light-microscopy"]),
    "denoise": ("blind Gaussian denoising of grayscale natural images", ["denoising"]),
    "jpeg": ("JPEG deblocking of grayscale natural images", ["image-restoration"]),
    "sr": ("single-image super-resolution of grayscale natural images", ["super-resolution"]),
}


def _training_lines(meta: dict) -> list[str]:
    """The training record of the weights' metadata, as the model card's list."""
    lines = []
    tr = meta.get("training") or {}
    if tr.get("data"):
        lines.append(f"- data: {tr['data']}")
    if meta.get("degradation"):
        lines.append(f"- degradation trained on: `{json.dumps(meta['degradation'], sort_keys=True)}`")
    steps = tr.get("total_steps", tr.get("steps"))
    hours = tr.get("total_hours", tr.get("hours"))
    if steps is not None:
        lines.append(f"- {steps} steps" + (f", {hours} h" if hours is not None else "")
                     + (f" on {tr['hardware']}" if tr.get("hardware") else ""))
    ft = meta.get("finetune")
    if ft:
        crit = ft.get("criterion", {})
        lines.append(f"- fine-tuned from `{ft.get('base_model')}` ({ft.get('config', {}).get('mode', '?')}) "
                     f"on `{json.dumps(ft.get('data', {}))}`; held-out PSNR {crit.get('baseline', '?')} dB "
                     f"before, {crit.get('best', '?')} dB after")
    return lines or ["- not recorded in the weights' metadata"]


def _mapping_lines(info, scale: int) -> list[str]:
    """How the package maps intensities (and size), and where that differs from ``memnet restore``."""
    if _percentile(info):
        lo, hi = info.normalization.get("low", 1.0), info.normalization.get("high", 99.8)
        lines = [f"- input: any intensities (cast to float32). `scale_range` maps each image's {lo} and {hi} "
                 "percentiles to 0 and 1, as `memnet restore` does (which takes them once over a whole stack).",
                 f"- output: float32 in those **normalised** units: 0 and 1 are the input's {lo} / {hi} "
                 "percentiles. `memnet restore` maps results back to the input's range and dtype "
                 "(`out * (p_high - p_low) + p_low`); the bioimage.io spec has no step that can: `scale_linear` "
                 "takes fixed numbers, and `scale_mean_variance` would give the result the noisy input's "
                 "spread, which is not the inverse. So the output stays normalised."]
    else:
        lines = ["- input: 8-bit (uint8, 0-255), `scale_linear` by 1/255.",
                 "- output: float32 on the 0-255 scale (`scale_linear` by 255, clipped to [0, 255]); "
                 "`memnet restore` also rounds it to uint8 (the spec has no rounding step)."]
    if scale > 1:
        lines.append(f"- the bicubic pre-upsampling (Pillow's, as in `memnet restore`) is inside the weights: "
                     f"the output is {scale} times the input per side.")
    return lines


def _readme(info, net, scale: int, halo: int, in_min: int, synthetic: bool) -> str:
    meta, cfg = info.metadata, info.config
    what = _TASKS.get(info.task, (info.task, []))[0] + (f", x{scale}" if scale > 1 else "")
    params = sum(p.numel() for p in net.parameters())
    metrics = "; ".join(f"{k}: {v}" for k, v in (meta.get("metrics") or {}).items()) or "none recorded"
    border = " plus the bicubic support" if scale > 1 else ""
    return "\n".join([
        f"# MemNet {info.name}" + (f" x{scale}" if scale > 1 else ""), "",
        f"MemNet M{cfg.blocks}R{cfg.recursions}C{cfg.channels} ({params} parameters) for {what}, exported by "
        f"napari-memnet from `{info.path.name}`.", "",
        "## Input and output", "",
        "One channel, axes (batch, channel, y, x); y and x in pixels (the model assumes no pixel size). "
        f"Tiles of {in_min} + n*{STEP} pixels per side, with a halo of {halo} output pixels (the receptive-field "
        f"radius{border}): cropped by it, tiles stitch without seams. bioimageio.core's tiled prediction equals "
        "`memnet restore` to float precision except within the halo of the image border, where it pads the "
        "image (symmetric) and `memnet restore` does not.", "",
        *_mapping_lines(info, scale), "",
        "## Training", "", *_training_lines(meta), "",
        "## Validation", "",
        f"{meta.get('validation', 'Validation data: not recorded')}. PSNR (dB): {metrics}.", "",
        "The test tensors were made by `memnet.restore` (napari-memnet's tiled engine, on the CPU in float32) "
        f"from a {'synthetic' if synthetic else 'user-given'} sample crop, which the cover shows (input left, "
        "result right).", "",
        "## License", "", f"{meta.get('license', 'BSD-3-Clause')}, as napari-memnet.", "",
        "## Citation", "", f"{CITATION[0]}. doi:{CITATION[1]}", ""])


def _axes(spec, scale: int, halo: int | None, in_min: int | None) -> list:
    """batch, channel, y, x: inputs sized min + n * STEP; outputs sized from the input, with the halo."""
    axes = [spec.BatchAxis(), spec.ChannelAxis(channel_names=["intensity"])]
    for a in ("y", "x"):
        if halo is None:
            axes.append(spec.SpaceInputAxis(id=spec.AxisId(a), size=spec.ParameterizedSize(min=in_min, step=STEP),
                                            description="pixels (the model assumes no pixel size)"))
        else:  # output pixels are 1/scale of an input pixel: size = input size * scale
            ref = spec.SizeReference(tensor_id=spec.TensorId("input"), axis_id=spec.AxisId(a))
            axes.append(spec.SpaceOutputAxisWithHalo(id=spec.AxisId(a), size=ref, halo=halo, scale=1 / scale,
                                                     description=f"pixels, {scale}x the input's" if scale > 1
                                                     else "pixels, as the input's"))
    return axes


def _processing(spec, info) -> tuple[list, list, str, str]:
    """(preprocessing, postprocessing, input dtype, output range note): the engine's intensity mapping."""
    if _percentile(info):
        lo, hi = float(info.normalization.get("low", 1.0)), float(info.normalization.get("high", 99.8))
        pre = [spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(
            axes=[spec.AxisId("channel"), spec.AxisId("y"), spec.AxisId("x")], min_percentile=lo, max_percentile=hi))]
        return pre, [], "float32", f"normalised: 0 and 1 at the input's {lo} / {hi} percentiles"
    # ends in float32 explicitly: else the spec appends a cast back to the input's uint8
    to_float = spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32"))
    pre = [to_float, spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=1 / 255)), to_float]
    post = [spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=255.0)),
            spec.ClipDescr(kwargs=spec.ClipKwargs(min=0.0, max=255.0))]
    return pre, post, "uint8", "0-255 scale, float32"


def _description(spec, info, net, scale: int, d: Path, synthetic: bool):
    """The ModelDescr of the files in ``d`` (validated by bioimageio.spec as it is built)."""
    halo, in_min = package_geometry(receptive_field(net), scale)
    pre, post, in_dtype, out_note = _processing(spec, info)
    what, tags = _TASKS.get(info.task, (info.task, []))
    name = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", f"MemNet {info.name}" + (f" x{scale}" if scale > 1 else ""))[:64]
    (d / "README.md").write_text(_readme(info, net, scale, halo, in_min, synthetic), encoding="utf-8")
    torch_version = torch.__version__.split("+")[0]
    return spec.ModelDescr(
        name=name,
        description=f"MemNet for {what}" + (f", x{scale}" if scale > 1 else "") + ", exported by napari-memnet",
        authors=[spec.Author(name="napari-memnet developers")],
        cite=[spec.CiteEntry(text=CITATION[0], doi=spec.Doi(CITATION[1]))],
        license=spec.LicenseId(info.metadata.get("license", "BSD-3-Clause")),
        documentation=spec.FileDescr(source=d / "README.md"),
        covers=[spec.FileDescr(source=d / "cover.png")],
        tags=["memnet", "napari-memnet", "pytorch", "2d", *tags],
        inputs=[spec.InputTensorDescr(
            id=spec.TensorId("input"), description=f"one channel ({what})", axes=_axes(spec, scale, None, in_min),
            test_tensor=spec.FileDescr(source=d / "test_input.npy"),
            sample_tensor=spec.FileDescr(source=d / "sample_input.tif"),
            data=spec.IntervalOrRatioDataDescr(type=in_dtype), preprocessing=pre)],
        outputs=[spec.OutputTensorDescr(
            id=spec.TensorId("output"), description=f"restored ({out_note})", axes=_axes(spec, scale, halo, None),
            test_tensor=spec.FileDescr(source=d / "test_output.npy"),
            sample_tensor=spec.FileDescr(source=d / "sample_output.tif"),
            data=spec.IntervalOrRatioDataDescr(type="float32"), postprocessing=post)],
        weights=spec.WeightsDescr(
            torchscript=spec.TorchscriptWeightsDescr(source=d / "weights.pt",
                                                     pytorch_version=spec.Version(torch_version)),
            onnx=spec.OnnxWeightsDescr(source=d / "weights.onnx", opset_version=ONNX_OPSET, parent="torchscript")),
        config={"memnet": card(info, scale, net)},
    )


def write_package(net, info, module, scale: int | None, path: Path, sample=None) -> Path:
    """Write the bioimage.io package of ``module`` (the traced graph of ``net``) to ``path`` (.zip)."""
    try:
        from bioimageio.spec import save_bioimageio_package
        from bioimageio.spec.model import v0_5 as spec
    except ModuleNotFoundError as e:  # name the package to install, not the namespace that is missing
        raise ModuleNotFoundError(str(e), name="bioimageio.spec") from e

    scale = scale or 1
    halo, in_min = package_geometry(receptive_field(net), scale)
    plane = _default_sample(info, scale, in_min + TEST_SIZE) if sample is None else _plane(sample)
    x = _crop(info, plane, in_min)
    y = _restored(info, scale, x)
    with tempfile.TemporaryDirectory(prefix="memnet-bioimageio-") as tmp:
        d = Path(tmp)
        np.save(d / "test_input.npy", x[None, None])
        np.save(d / "test_output.npy", y[None, None])
        tifffile.imwrite(d / "sample_input.tif", x)  # the same crop as a plain image, for people to look at
        tifffile.imwrite(d / "sample_output.tif", y)
        _cover(info, scale, x, y, d / "cover.png")
        meta = card(info, scale, net)
        write_graph(module, d / "weights.pt", "torchscript", meta)
        write_graph(module, d / "weights.onnx", "onnx", meta)
        descr = _description(spec, info, net, scale, d, synthetic=sample is None)
        return save_bioimageio_package(descr, output_path=path)
