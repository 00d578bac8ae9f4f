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
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .model import MemNet, MemNetConfig, feature_bytes_per_pixel, weights_digest
from .options import BACKENDS

__all__ = ["BACKENDS", "ONNX_OPSET", "FoldedMemNet", "cache_dir", "calibration_inputs", "choose_backend", "fold",
           "folded_onnx_bytes", "int8_onnx_bytes", "make_backend", "onnx_bytes", "onnxruntime_available"]



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


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and onnx are installed (the onnxruntime backend needs both)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    # torch's exporter needs onnx: found, not imported (~2.5 s, and a cached graph needs no export)
    return importlib.util.find_spec("onnx") is not None


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
    """An ONNX Runtime session called like a module on (N, planes, H, W) float32 tensors on the CPU."""

    def __init__(self, net: nn.Module, threads: int, int8: bool = False, digest: str | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # warnings about unused initialisers are noise to a user
        # ONNX Runtime's CPU arena keeps every buffer it ever grew to, rounded up to powers of two: measured
        # at a 660² window, M6R6C64 peaked at 15.2 GB with it and 6.7 GB without (and ran faster without);
        # M4R4C32 at 580² ran faster with it. So: the arena only for models with small feature maps.
        so.enable_cpu_mem_arena = feature_bytes_per_pixel(net.config) <= 2048
        # The memory pattern allocates one block for a whole run's plan on top of what the arena already holds:
        # 2x the peak (M4R4C32, 512² window, bench/window_memory.py), and no faster.
        so.enable_mem_pattern = False

        def export() -> bytes:
            return int8_onnx_bytes(net) if int8 else folded_onnx_bytes(net)

        if digest is None:
            self.session = ort.InferenceSession(export(), so, providers=["CPUExecutionProvider"])
            return
        path = _graph_path(digest, net.config, int8)
        graph = _read_cached(path)
        if graph is not None:
            try:
                self.session = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
                return
            except Exception:  # a damaged cache file: export again and replace it
                pass
        graph = export()
        self.session = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        _write_cached(path, graph)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(torch.float32).contiguous()
        return torch.from_numpy(self.session.run(None, {"input": x.numpy()})[0])


ONNX_OPSET = 18
_CACHE_KEEP = 32  # graphs kept in the cache (the most recently used); each is about 4 bytes per weight


def cache_dir() -> Path:
    """Where exported ONNX graphs are kept between runs (per user, never beside the data). ``MEMNET_CACHE_DIR``
    overrides the platform default."""
    env = os.environ.get("MEMNET_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "napari-memnet" / "Cache"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches" / "napari-memnet"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "napari-memnet"
    return base


def _graph_path(digest: str, config: MemNetConfig, int8: bool) -> Path:
    """The cache file of a model's graph: named by its weights, its architecture, whether it is int8, and
    everything that shapes the export (the versions of torch, onnx, onnxruntime and of this code)."""
    from importlib.metadata import version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except Exception:
            return "?"

    code = hashlib.sha256()
    here = Path(__file__).parent
    # this module and the model shape the graph; an int8 graph also depends on its calibration images
    for name in ("inference.py", "model.py") + (("degrade.py", "synthstack.py") if int8 else ()):
        code.update((here / name).read_bytes())
    key = json.dumps({"weights": digest, "config": config.as_dict(), "int8": int8, "opset": ONNX_OPSET,
                      "torch": torch.__version__, "onnx": ver("onnx"), "onnxruntime": ver("onnxruntime"),
                      "code": code.hexdigest()}, sort_keys=True)
    return cache_dir() / "onnx" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.onnx"


def _read_cached(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
        os.utime(path)  # recently used: kept when the cache is pruned
        return data
    except OSError:
        return None


def _write_cached(path: Path, graph: bytes) -> None:
    """Best effort (a read-only home only costs the next run an export): written whole, then renamed, so a
    concurrent reader never sees half a file; the oldest graphs beyond ``_CACHE_KEEP`` are removed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(graph)
        os.replace(tmp, path)
        kept = sorted(path.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[_CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass

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
    """``net`` as the ONNX graph `FoldedMemNet.forward` computes, written node by node with onnx.helper (dynamic N,
    H and W): what the onnxruntime backend runs. torch.onnx.export traces the same graph, but its tracer left
    ~50 MB in the process for good (measured on M4R4C32) and took seconds; this takes milliseconds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cfg = net.config
    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def tensor(name: str, t: torch.Tensor) -> str:
        return const(name, t.detach().cpu().float().numpy())

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def bn_relu(x: str, bn: nn.BatchNorm2d, name: str) -> str:
        ins = [x] + [tensor(f"{name}.{k}", getattr(bn, k)) for k in ("weight", "bias", "running_mean", "running_var")]
        return node("Relu", [node("BatchNormalization", ins, f"{name}/BatchNormalization", epsilon=bn.eps)],
                    f"{name}/Relu")

    def conv(x: str, c: nn.Conv2d, name: str) -> str:
        if c.padding_mode != "zeros" or c.stride != (1, 1) or c.dilation != (1, 1) or c.groups != 1:
            raise ValueError(f"{name}: only stride-1 zero-padded convolutions are exported")
        ins = [x, tensor(f"{name}.weight", c.weight)] + ([tensor(f"{name}.bias", c.bias)] if c.bias is not None else [])
        py, px = c.padding
        return node("Conv", ins, f"{name}/Conv", kernel_shape=list(c.kernel_size), pads=[py, px, py, px])

    long_term = [conv(bn_relu("input", net.fenet.bn, "/fenet/bn"), net.fenet.conv, "/fenet/conv")]
    k, c = cfg.context, cfg.in_channels
    centre = node("Slice", ["input", const("centre.starts", np.array([k * c], np.int64)),
                            const("centre.ends", np.array([(k + 1) * c], np.int64)),
                            const("centre.axes", np.array([1], np.int64))], "/centre/Slice") if k else "input"
    out = node("Mul", [centre, tensor("input_weight", net.input_weight)], "/input_weight/Mul")
    for m, block in enumerate(net.blocks):
        p = f"/blocks.{m}"
        acc = None

        def gate(acc, i, x, block=block, p=p):
            y = conv(bn_relu(x, block.gate.bns[i], f"{p}/gate/bns.{i}"), block.gate.convs[i], f"{p}/gate/convs.{i}")
            return y if acc is None else node("Add", [acc, y], f"{p}/gate/Add_{i}")

        for i, b in enumerate(long_term):
            acc = gate(acc, i, b)
        h = long_term[-1]
        for r in range(block.recursions):
            t = node("Relu", [conv(bn_relu(h, block.bn_a[r], f"{p}/bn_a.{r}"), block.conv_a[r], f"{p}/conv_a.{r}")],
                     f"{p}/conv_a.{r}/Relu")
            h = node("Add", [h, conv(t, block.conv_b, f"{p}/conv_b.{r}")], f"{p}/Add_{r}")
            acc = gate(acc, len(long_term) + r, h)
        long_term.append(acc)
        y = conv(bn_relu(acc, net.recon_bn[m], f"/recon_bn.{m}"), net.recon[m], f"/recon.{m}")
        out = node("Add", [out, y], "output" if m == len(net.blocks) - 1 else f"/out/Add_{m}")
    planes = cfg.in_channels * cfg.planes
    graph = helper.make_graph(
        nodes, "FoldedMemNet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", planes, "height", "width"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", cfg.out_channels, "height", "width"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="memnet")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def calibration_inputs(config: MemNetConfig, count: int = 32, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    """``count`` windows (planes x in_channels, size, size), float32, to calibrate int8 activations: simulated
    fluorescence (`synthstack.simulate_stack`) through a random camera (`degrade.camera_noise`), normalised as
    restore normalises a microscopy input. Made here, from a fixed seed: nothing downloads, every user gets the
    same quantized model."""
    from .degrade import camera_noise
    from .synthstack import simulate_stack

    rng = np.random.default_rng(seed)
    planes = config.planes
    out: list[np.ndarray] = []
    while len(out) < count:
        noisy, _ = camera_noise(simulate_stack(rng, planes=max(4, planes), size=size).clean, rng)  # one camera
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
    net = fold(model).to(device)
    if name.startswith("onnxruntime"):  # the graph from the on-disk cache when this model was exported before
        return _OrtModule(net.float(), torch.get_num_threads(), int8=name == "onnxruntime-int8", digest=digest)
    net = net.to(memory_format=torch.channels_last)
    return torch.compile(net, dynamic=False) if name == "compile" else net
