"""Export a model for other runtimes: ONNX (onnxruntime, ilastik, deepImageJ, ...), TorchScript, or a
bioimage.io model package of both (``bioimage_package.py``).

The exported graph is the network in eval mode on one (N, 1, H, W) float32 tensor in the model's
intensity range, any N, H and W: the intensity mapping stays with the caller and is written into the
file's metadata (``memnet_normalization``; for microscopy models: the stack's 1 / 99.8 percentiles map to
0 / 1). Super-resolution models get the bicubic pre-upsampling inside the graph, for one factor per
file: Pillow's bicubic, border renormalisation included, as ``memnet restore`` upsamples (to float
precision), built from transposed convolutions so any input size works.
"""

from __future__ import annotations

from pathlib import Path

from .outputs import check_output_path

__all__ = ["export_model", "format_for", "FORMATS", "SUFFIXES"]

FORMATS = ("onnx", "torchscript", "bioimageio")
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".ts"), "bioimageio": (".zip",)}  # the first: the usual one


def format_for(output: str | Path) -> str:
    """The export format an output file's name asks for (its suffix)."""
    suffix = Path(output).suffix.lower()
    for fmt, sfx in SUFFIXES.items():
        if suffix in sfx:
            return fmt
    raise ValueError(f"cannot tell the export format from {Path(output).name!r}: name it .onnx, .pt or .zip "
                     "(bioimage.io), or pass --format")


def _check_suffix(out: Path, fmt: str) -> None:
    if out.suffix.lower() in SUFFIXES[fmt]:
        return
    usual = out.with_suffix(SUFFIXES[fmt][0]).name
    if fmt == "bioimageio":
        raise ValueError(f"a bioimage.io package is a .zip file: name the output e.g. {usual}")
    other = next((f for f, sfx in SUFFIXES.items() if out.suffix.lower() in sfx), None)
    mismatch = f"{out.name} is named like {other}" if other else f"{out.name} has no {fmt} suffix"
    raise ValueError(f"--format {fmt} writes {fmt}, but {mismatch}: name it e.g. {usual}"
                     + (f", or pass --format {other}" if other else ""))


def export_model(model: str | Path, output: str | Path, fmt: str = "onnx", scale: int | None = None,
                 overwrite: bool = False, sample=None) -> Path:
    """Write ``model`` (a zoo name, task or .safetensors path) to ``output`` as ONNX, TorchScript or a
    bioimage.io package (.zip; ``sample``: an optional 2-D image for its test tensors and cover)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = Path(output)
    _check_suffix(out, fmt)  # a file's name says what it holds
    from .graphs import card, graph_module, write_graph  # torch: loaded when exporting, not for `--help`
    from .zoo import load_model

    net, info = load_model(model, device="cpu")
    net.eval()
    if net.config.context:  # its graphs and packages take one plane; this model needs the planes around it
        blend = " and blends its outputs of neighbouring planes (Z-blend)" if net.zblend is not None else ""
        raise ValueError(f"{info.name} is a context model: it restores a plane from {net.config.planes} planes along Z "
                         f"or T{blend}, which the ONNX, TorchScript and bioimage.io exports (one plane in, one out) "
                         "cannot express. Export a 2-D model (e.g. 'microscopy'), or restore stacks with "
                         "`memnet restore` or the napari plugin")
    module = graph_module(net, info, scale)
    if sample is not None and fmt != "bioimageio":
        raise ValueError("a sample image is for --format bioimageio (its test tensors and cover)")
    check_output_path(out, [info.path] if info.path else [])
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another path, or overwrite it explicitly (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # The .zip suffix stays on the temporary name: bioimageio.spec reopens the package to validate it.
    tmp = out.with_name(f".{out.stem}.partial.zip") if fmt == "bioimageio" else out.with_name(out.name + ".partial")
    try:
        if fmt == "bioimageio":
            from .bioimage_package import write_package

            write_package(net, info, module, scale, tmp, sample=sample)
        else:
            write_graph(module, tmp, fmt, card(info, scale, net))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
