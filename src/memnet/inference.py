"""The inference form of a trained MemNet, and the backends that run it.

`fold(model)` builds an eval-only copy that computes the same function with less work: in eval mode a
BatchNorm is a per-channel affine map, so the one that directly follows a convolution (``bn_b[r]``
after the shared ``conv_a``) folds into that conv, one folded copy per recursion (the conv is shared,
its BNs are not); the multi-supervision weights fold into the reconstruction conv. The remaining
BNs sit in front of a ReLU after a sum or a concatenation (pre-activation), where nothing can absorb
them exactly; the backends fuse them with their ReLU.

Backends (`make_backend`): ``eager`` (PyTorch, channels_last), ``compile`` (``torch.compile``, the
inductor; ~30 s to compile a shape, then faster), ``onnxruntime`` (ONNX Runtime's CPU execution
provider, which fuses conv+ReLU and conv+add and runs blocked convolutions), ``onnxruntime-int8`` (the
same graph with its 3×3 convolutions statically quantized to int8, calibrated on `calibration_inputs`; opt-in:
see docs/performance.md for what it gains and costs). ``auto`` picks by the measurement in bench/roofline.py:
ONNX Runtime on CPU (about 3× eager there), eager elsewhere.

The ONNX Runtime graph is folded and written from the weights as numpy arrays (`memnet.ortgraph`), the same graph
for a torch module and for the torch-free CPU path (`runner.OrtRunner`); `FoldedMemNet` is its torch reference
and what eager, compile and the int8 trace run.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .arch import Weights
from .model import MemNet, MemNetConfig, weights_digest
from .options import BACKENDS
from .ortgraph import ONNX_OPSET, OrtSession, cache_dir, fold_state, graph_bytes, onnxruntime_available, session_for

__all__ = ["BACKENDS", "ONNX_OPSET", "FoldedMemNet", "cache_dir", "calibration_inputs", "choose_backend", "fold",
           "fold_state", "folded_onnx_bytes", "int8_graph", "int8_onnx_bytes", "make_backend", "onnx_bytes",
           "onnxruntime_available"]



def _affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BN as ``x * a + b`` per channel."""
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return a, bn.bias - bn.running_mean * a


class _SplitGate(nn.Module):
    """The gate unit, BN → ReLU → 1×1 conv over the concatenated memories, as a sum over the memories: BN and
    ReLU act per channel and a 1×1 conv is a sum over its input channels, so conv(relu(bn(cat(x_i)))) =
    Σ_i conv_i(relu(bn_i(x_i))). Each memory is added as soon as it exists: no (m+R)·C-channel concatenation
    (nor its BN and ReLU copies) is ever alive: a forward pass's peak fell about 3× (M4R4C32 on ONNX Runtime at
    a 512² window: 3.1 to 1.1 KB per pixel; bench/window_memory.py)."""

    def __init__(self, gate, channels: int):
        super().__init__()
        c, n = channels, gate.conv.in_channels // channels
        like = {"dtype": gate.conv.weight.dtype, "device": gate.conv.weight.device}
        self.bns, self.convs = nn.ModuleList(), nn.ModuleList()
        for i in range(n):
            bn = nn.BatchNorm2d(c, eps=gate.bn.eps, **like).eval()
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(gate.bn, name)[i * c: (i + 1) * c])
            conv = nn.Conv2d(c, gate.conv.out_channels, 1, bias=i == 0, **like)  # the bias once
            conv.weight.copy_(gate.conv.weight[:, i * c: (i + 1) * c])
            if i == 0:
                conv.bias.copy_(gate.conv.bias)
            self.bns.append(bn)
            self.convs.append(conv)

    def add(self, acc: torch.Tensor | None, i: int, x: torch.Tensor) -> torch.Tensor:
        """``acc`` plus memory ``i``'s term (``acc`` None: the first term)."""
        y = self.convs[i](torch.relu(self.bns[i](x)))
        return y if acc is None else acc + y


class _FoldedBlock(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.recursions = block.recursions
        self.bn_a = block.bn_a
        self.conv_b = block.conv_b
        self.gate = _SplitGate(block.gate, block.conv_a.out_channels)
        # conv_a followed by bn_b[r] -> one conv per recursion: W' = a W, b' = a b + c.
        self.conv_a = nn.ModuleList()
        for bn in block.bn_b:
            a, c = _affine(bn)
            conv = copy.deepcopy(block.conv_a)
            conv.weight.copy_(block.conv_a.weight * a[:, None, None, None])
            conv.bias.copy_(block.conv_a.bias * a + c)
            self.conv_a.append(conv)

    def forward(self, long_term: list[torch.Tensor]) -> torch.Tensor:
        acc = None
        for i, b in enumerate(long_term):
            acc = self.gate.add(acc, i, b)
        h = long_term[-1]
        for r in range(self.recursions):
            t = torch.relu(self.conv_a[r](torch.relu(self.bn_a[r](h))))
            h = h + self.conv_b(t)
            acc = self.gate.add(acc, len(long_term) + r, h)  # h_r is not kept: only the running sum
        return acc


class FoldedMemNet(nn.Module):
    """Eval-only MemNet with the foldable BatchNorms and the branch weights folded (see module doc).
    Equal to ``model.eval()(x)`` up to float rounding."""

    def __init__(self, model: MemNet):
        super().__init__()
        model = copy.deepcopy(model).eval()
        self.config: MemNetConfig = model.config
        with torch.no_grad():
            self.fenet = model.fenet
            self.blocks = nn.ModuleList(_FoldedBlock(b) for b in model.blocks)
            self.recon_bn = model.recon_bn
            # sum_m w_m (x + R(b_m)) = (sum_m w_m) x + sum_m (w_m R)(b_m): one scaled recon conv per branch.
            w = model.branch_weights.detach()
            self.recon = nn.ModuleList()
            for m in range(len(model.blocks)):
                conv = copy.deepcopy(model.recon_conv)
                conv.weight.mul_(w[m])
                conv.bias.mul_(w[m])
                self.recon.append(conv)
            self.register_buffer("input_weight", w.sum().reshape(1))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # eval-only: BN statistics are baked in
        """Stay in eval mode whatever ``mode`` asks: the BN statistics are folded into the convs."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The restored image, as `MemNet.forward` gives it (no branch outputs)."""
        long_term = [self.fenet(x)]
        k, c = self.config.context, self.config.in_channels
        out = (x[:, k * c: (k + 1) * c] if k else x) * self.input_weight  # the centre plane (context models)
        for m, block in enumerate(self.blocks):
            b = block(long_term)
            long_term.append(b)
            out = out + self.recon[m](torch.relu(self.recon_bn[m](b)))
        return out


@torch.no_grad()
def fold(model: MemNet) -> FoldedMemNet:
    """The inference form of a trained ``model`` (the model itself is not changed)."""
    if not isinstance(model, MemNet):
        raise TypeError(f"fold needs a memnet.MemNet, got {type(model).__name__}")
    return FoldedMemNet(model)


def choose_backend(backend: str, device: torch.device) -> str:
    """The backend ``auto`` means on ``device``; an explicit choice checked against the device."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "onnxruntime" if device.type == "cpu" and onnxruntime_available() else "eager"
    if backend.startswith("onnxruntime"):
        if device.type != "cpu":
            raise ValueError(f"backend {backend!r} runs on the CPU (device {device}); use --backend eager "
                             f"or compile on {device.type.upper()}")
        if not onnxruntime_available():
            raise ValueError(f"backend {backend!r} needs the onnx and onnxruntime packages: "
                             "pip install onnx onnxruntime (or use --backend eager)")
    return backend


class _OrtModule:
    """An ONNX Runtime session (`ortgraph.OrtSession`) called like a module on (N, planes, H, W) float32 tensors on
    the CPU."""

    def __init__(self, session: OrtSession):
        self.ort = session
        self.session = session.session

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.ort.run(x.detach().to(torch.float32).contiguous().numpy()))


_BUILT: OrderedDict = OrderedDict()  # the last few backends built, by weights digest: a preview or a
_BUILT_MAX = 4                       # restore of the same model reuses its ONNX session (~3 s to build)
_BUILT_LOCK = threading.Lock()
_EXPORT_LOCK = threading.Lock()


def onnx_bytes(module: nn.Module, example: torch.Tensor | None = None) -> bytes:
    """``module`` as an ONNX graph with dynamic N, H and W (the network is fully convolutional)."""
    if example is None:
        cfg = module.config
        example = torch.rand(1, cfg.in_channels * cfg.planes, 64, 64)
    buf = io.BytesIO()
    dyn = {0: "n", 2: "height", 3: "width"}
    # torch.onnx.export keeps global state: two threads exporting at once (a napari warm-up and a restore of
    # another model) fail with "GLOBALS.in_onnx_export must be False". One export at a time.
    with _EXPORT_LOCK, torch.inference_mode(False), warnings.catch_warnings():  # the exporter traces
        warnings.simplefilter("ignore")  # tracer notes about Python ints in the graph: shapes stay dynamic
        # The TorchScript-based exporter: one graph, dynamic axes, no onnxscript needed.
        torch.onnx.export(module, (example,), buf, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": dyn, "output": dyn}, opset_version=ONNX_OPSET, dynamo=False)
    return buf.getvalue()


def folded_onnx_bytes(net: FoldedMemNet) -> bytes:
    """``net`` as the ONNX graph `FoldedMemNet.forward` computes, written node by node (`ortgraph.graph_bytes`;
    dynamic N, H and W). torch.onnx.export traces the same graph, but its tracer left ~50 MB in the process for
    good (measured on M4R4C32) and took seconds; this takes milliseconds."""
    state = {k: v.detach().cpu().float().numpy() for k, v in net.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    return graph_bytes(net.config, state)


def int8_graph(weights: Weights) -> bytes:
    """The int8 graph (`int8_onnx_bytes`) of a model given as numpy `Weights` (the torch model is built for the
    trace)."""
    model = MemNet(**weights.config.as_dict())
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.tensors.items()}, strict=True)
    return int8_onnx_bytes(fold(model.eval()))


def calibration_inputs(config: MemNetConfig, count: int = 32, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    """``count`` windows (planes x in_channels, size, size), float32, to calibrate int8 activations: simulated
    fluorescence (`synthstack.simulate_stack`) through a random camera (`degrade.camera_noise`), normalised as
    restore normalises a microscopy input. Made here, from a fixed seed: nothing downloads, every user gets the
    same quantized model."""
    from .degrade import CAMERA_MIX_BEFORE_HEAVY_CLIP, camera_noise
    from .synthstack import simulate_stack

    rng = np.random.default_rng(seed)
    planes = config.planes
    out: list[np.ndarray] = []
    while len(out) < count:
        # one camera, from the mix int8 was measured with (the calibration set stays the same)
        noisy, _ = camera_noise(simulate_stack(rng, planes=max(4, planes), size=size).clean, rng,
                                CAMERA_MIX_BEFORE_HEAVY_CLIP)
        for i in range(0, len(noisy) - planes + 1, planes):
            # plane-major channels, as FoldedMemNet.forward reads them
            out.append(np.repeat(noisy[i: i + planes], config.in_channels, axis=0).astype(np.float32))
    return out[:count]


# Left in float: the 1x1 gates (their input concatenates features of very different ranges, which one int8
# scale per tensor cannot hold: quantizing them made the error 3.7x larger), the first conv (it reads the image
# itself: +0.1-0.35 dB on W2S in float) and the reconstruction convs (they write the output); together under
# 10 % of the multiply-adds of M4R4C32.
_INT8_FLOAT_CONVS = ("/gate/", "/convs.", "/recon.", "/fenet/")  # the split gate traces as "/blocks.M/convs.I"


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantizer logs advice on the root logger (pre-processing, per-channel axes of BN weights
    it leaves alone): noise to a user."""
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR
    try:
        yield
    finally:
        root.setLevel(level)


def int8_onnx_bytes(module: nn.Module) -> bytes:
    """``module`` (a FoldedMemNet) as an ONNX graph whose 3x3 convolutions run in int8: static quantization
    (QDQ, per-channel symmetric int8 weights, uint8 activations with min/max ranges) calibrated on
    `calibration_inputs`. Deterministic for given weights and package versions."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fp32 = onnx_bytes(module)
    floats = [n.name for n in onnx.load_from_string(fp32).graph.node
              if n.op_type == "Conv" and any(k in n.name for k in _INT8_FLOAT_CONVS)]
    samples = calibration_inputs(module.config)

    class _Reader(CalibrationDataReader):  # one window at a time (set_range): see CalibStridedMinMax below
        def __init__(self):
            self.todo = iter(())

        def __len__(self):
            return len(samples)

        def set_range(self, start_index: int, end_index: int):
            self.todo = iter(samples[start_index:end_index])

        def get_next(self):
            x = next(self.todo, None)
            return None if x is None else {"input": x[None]}

    with tempfile.TemporaryDirectory(prefix="memnet-int8-") as d, _quiet_quantizer():
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        src.write_bytes(fp32)
        quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv"],
                        nodes_to_exclude=floats,
                        # ranges merged window by window: the calibrator otherwise keeps every activation of
                        # every window (~170 MB per 128² window for M4R4C32)
                        extra_options={"CalibStridedMinMax": 1})
        return dst.read_bytes()


def make_backend(model: MemNet, device: torch.device, backend: str = "auto") -> tuple[Callable, str]:
    """A callable running the inference form of ``model`` on ``device`` (tensors in, tensors out) and
    the backend's name. The caller moves inputs to ``device`` (channels_last for eager and compile).
    Built once per weights, device and backend (a small cache of the most recent)."""
    name = choose_backend(backend, device)
    key = (weights_digest(model), str(device), name, torch.get_num_threads())
    with _BUILT_LOCK:
        if key in _BUILT:
            _BUILT.move_to_end(key)
            return _BUILT[key], name
    built = _build(model, device, name, key[0])
    with _BUILT_LOCK:
        _BUILT[key] = built
        while len(_BUILT) > _BUILT_MAX:
            _BUILT.popitem(last=False)
    return built, name


def _build(model: MemNet, device: torch.device, name: str, digest: str) -> Callable:
    if name.startswith("onnxruntime"):  # the graph written from the folded weights (or the on-disk cache)
        state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        weights = Weights(model.config, state, _digest=digest)
        return _OrtModule(session_for(weights, threads=torch.get_num_threads(),
                                      int8=int8_graph if name == "onnxruntime-int8" else None))
    net = fold(model).to(device).to(memory_format=torch.channels_last)
    return torch.compile(net, dynamic=False) if name == "compile" else net
