"""Export a model for other runtimes: ONNX (onnxruntime, ilastik, deepImageJ, ...) or TorchScript.

The exported graph is the network in eval mode on one (N, 1, H, W) float32 tensor in the model's
intensity range, any N, H and W: the intensity mapping stays with the caller and is written into the
file's metadata (``memnet_normalization``; for microscopy models: the stack's 1 / 99.8 percentiles map to
0 / 1). Super-resolution models get the bicubic pre-upsampling inside the graph, for one factor per
file: Pillow's bicubic, border renormalisation included, as ``memnet restore`` upsamples (to float
precision), built from transposed convolutions so any input size works.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .degrade import bicubic_up_kernel
from .model import receptive_field
from .outputs import check_output_path
from .zoo import load_model

__all__ = ["export_model", "FORMATS"]

FORMATS = ("onnx", "torchscript")


class _Upscaled(nn.Module):
    """Bicubic pre-upsampling by a fixed factor, then the network (the paper's SR pipeline).

    The upsampling is Pillow's, as the engine's: one transposed convolution per axis, divided by the
    same convolution of ones, which is Pillow's renormalisation of the weights cut off at the borders.
    (PyTorch's own bicubic has a = -0.75 and clamps at the borders: 0.05-0.26 dB below the engine.)"""

    def __init__(self, net: nn.Module, scale: int):
        super().__init__()
        self.net, self.scale = net, scale
        taps = torch.tensor(bicubic_up_kernel(scale), dtype=torch.float32)
        self.register_buffer("wx", taps.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("wy", taps.view(1, 1, -1, 1), persistent=False)

    def _pass(self, x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int], pad: tuple[int, int]):
        num = F.conv_transpose2d(x, w, stride=stride, padding=pad)
        return num / F.conv_transpose2d(torch.ones_like(x), w, stride=stride, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale
        up = self._pass(self._pass(x, self.wx, (1, s), (0, 2 * s)), self.wy, (s, 1), (2 * s, 0))
        return self.net(up)


def _card(info, scale: int | None, model) -> dict:
    return {"memnet_name": info.name, "memnet_task": info.task,
            "memnet_normalization": json.dumps(info.normalization),
            "memnet_receptive_field_px": str(receptive_field(model)),
            "memnet_scale": str(scale or 1), "memnet_input": "float32 (N, 1, H, W) in the model's intensity range",
            "memnet_citation": "Tai, Yang, Liu, Xu, MemNet: A Persistent Memory Network for Image Restoration, "
                               "ICCV 2017"}


def export_model(model: str | Path, output: str | Path, fmt: str = "onnx", scale: int | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``model`` (a zoo name, task or .safetensors path) to ``output`` as ONNX or TorchScript."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    net, info = load_model(model, device="cpu")
    net.eval()
    if info.task == "sr":
        if scale not in (2, 3, 4):
            raise ValueError(f"{info.name} is a super-resolution model: give the factor to build in "
                             "(--scale 2, 3 or 4)")
        module: nn.Module = _Upscaled(net, scale).eval()
    elif scale not in (None, 1):
        raise ValueError(f"--scale applies to super-resolution models; {info.name} is a {info.task!r} model")
    else:
        module = net
    out = Path(output)
    check_output_path(out, [info.path] if info.path else [])
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another path, or overwrite it explicitly (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(1, 1, 64, 64)
    tmp = out.with_name(out.name + ".partial")
    card = _card(info, scale, net)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about Python ints in the graph: shapes stay dynamic
        if fmt == "torchscript":
            traced = torch.jit.trace(module, example)
            torch.jit.save(traced, str(tmp), _extra_files={"memnet.json": json.dumps(card)})
        else:
            _onnx(module, example, tmp, card)
    tmp.replace(out)
    return out


def _onnx(module: nn.Module, example: torch.Tensor, path: Path, card: dict) -> None:
    import onnx

    dyn = {0: "n", 2: "height", 3: "width"}
    # The TorchScript-based exporter: one graph with dynamic N, H and W (the network is fully convolutional).
    torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": dyn, "output": dyn}, opset_version=18, dynamo=False)
    proto = onnx.load(str(path))
    for k, v in card.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
