"""The graphs ``memnet export`` writes: the network in eval mode on one (N, 1, H, W) float32 tensor in
the model's intensity range, any N, H and W; for SR models behind the bicubic pre-upsampling. Traced
once, written as TorchScript or ONNX with the model's card in the file's metadata."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .inference import ONNX_OPSET, fold, onnx_bytes
from .model import receptive_field
from .resample import bicubic_up_kernel

__all__ = ["CITATION", "ONNX_OPSET", "card", "graph_module", "onnx_bytes", "write_graph"]


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


CITATION = ('Tai, Yang, Liu, Xu, "MemNet: A Persistent Memory Network for Image Restoration", ICCV 2017',
            "10.1109/ICCV.2017.486")


def card(info, scale: int | None, model) -> dict:
    """What a file needs to be used right: the intensity mapping, the halo, the task (file metadata)."""
    return {"memnet_name": info.name, "memnet_task": info.task,
            "memnet_normalization": json.dumps(info.normalization),
            "memnet_receptive_field_px": str(receptive_field(model)),
            "memnet_scale": str(scale or 1), "memnet_input": "float32 (N, 1, H, W) in the model's intensity range",
            "memnet_citation": f"{CITATION[0]}, doi:{CITATION[1]}"}


def graph_module(net: nn.Module, info, scale: int | None) -> nn.Module:
    """The module an export traces: the network's inference form (BNs folded: `memnet.inference.fold`),
    behind the bicubic pre-upsampling for SR models."""
    net = fold(net)
    if info.task == "sr":
        if scale not in (2, 3, 4):
            raise ValueError(f"{info.name} is a super-resolution model: give the factor to build in "
                             "(--scale 2, 3 or 4)")
        return _Upscaled(net, scale).eval()
    if scale not in (None, 1):
        raise ValueError(f"--scale applies to super-resolution models; {info.name} is a {info.task!r} model")
    return net


def write_graph(module: nn.Module, path: Path, fmt: str, meta: dict) -> None:
    """``module`` traced once and written as TorchScript or ONNX, with ``meta`` in the file."""
    example = torch.rand(1, 1, 64, 64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about Python ints in the graph: shapes stay dynamic
        if fmt == "torchscript":
            traced = torch.jit.trace(module, example)
            torch.jit.save(traced, str(path), _extra_files={"memnet.json": json.dumps(meta)})
        else:
            _onnx(module, example, path, meta)


def _onnx(module: nn.Module, example: torch.Tensor, path: Path, card: dict) -> None:
    import onnx

    proto = onnx.load_from_string(onnx_bytes(module, example))
    for k, v in card.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
