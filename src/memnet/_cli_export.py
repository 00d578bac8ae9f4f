"""`memnet export`: a model as ONNX, TorchScript or a bioimage.io package, for other runtimes."""

from __future__ import annotations

import argparse

from . import _cli_types as T


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model, format_for

    fmt = args.format or format_for(args.output)
    try:
        path = export_model(args.model, args.output, fmt, scale=args.scale, overwrite=args.overwrite,
                            sample=args.sample)
    except ModuleNotFoundError as e:
        raise LookupError(f"--format {fmt} needs the {e.name!r} package: pip install "
                          "'napari-memnet[export]'") from e
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def register(sub) -> None:
    from .export import FORMATS

    e = sub.add_parser("export", help="write a model as ONNX, TorchScript or a bioimage.io package",
                       description="Write a model (shipped, fine-tuned or a .safetensors path) as ONNX or "
                       "TorchScript: input and output are float32 (N, 1, H, W) in the model's intensity "
                       "range, any size; the intensity mapping and the receptive field are in the file's "
                       "metadata. Or as a bioimage.io model package (.zip, for deepImageJ, ilastik, "
                       "bioimageio.core): both weight formats, the intensity mapping as the spec's processing, "
                       "test tensors from memnet restore, a model card. Super-resolution models carry the "
                       "bicubic pre-upsampling (--scale).")
    e.add_argument("model", help="task, model name (see `memnet models`) or .safetensors path")
    e.add_argument("-o", "--output", required=True, help="output file (.onnx, .pt, or .zip for bioimageio)")
    e.add_argument("--format", choices=FORMATS, default=None,
                   help="[from the output's suffix: .onnx, .pt/.ts (torchscript), .zip (bioimageio)]")
    e.add_argument("--sample", default=None, help="bioimageio: an image (TIFF/Zarr; a stack's middle plane) for the "
                   "package's test tensors and cover [a synthetic image of the model's task]")
    e.add_argument("--scale", type=T.sr_scale, default=None, help="super-resolution factor to build in (2, 3 or 4)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    e.set_defaults(func=cmd_export)
