"""The CPU path on ONNX Runtime without torch: a model's weights (`arch.Weights`, numpy) folded in numpy, written as
an ONNX graph node by node, kept in a per-user cache, and run by an ONNX Runtime session on numpy batches.

The folding is `memnet.inference.fold`'s, done on arrays: in eval mode a BatchNorm is a per-channel affine map, so
the one after the shared ``conv_a`` (``bn_b[r]``) folds into one copy of that conv per recursion; the
multi-supervision weights fold into the reconstruction conv (one scaled copy per branch); the 1×1 gate over the
concatenated memories becomes a sum of one 1×1 conv per memory (BN and ReLU act per channel), so no concatenation
is ever alive. The remaining BNs sit in front of a ReLU after a sum, where nothing absorbs them exactly; ONNX
Runtime fuses them with their ReLU. Both the torch backends' ``onnxruntime`` and the torch-free path run the graph
written here (tests check it against the eager model and torch's own exporter).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .arch import MemNetConfig, Weights, feature_bytes_per_pixel

__all__ = ["ONNX_OPSET", "OrtSession", "cache_dir", "default_threads", "fold_state", "graph_bytes",
           "onnxruntime_available", "session_for"]

ONNX_OPSET = 18
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which every BN of a MemNet uses
_CACHE_KEEP = 32  # graphs kept in the cache (the most recently used); each is about 4 bytes per weight


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and onnx are installed (the onnxruntime backend needs both)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    # onnx writes a graph: found, not imported (a cached graph needs no writing)
    return importlib.util.find_spec("onnx") is not None


def default_threads() -> int:
    """Threads a CPU run uses: torch's count where torch is loaded (the torch backends share the process), else
    what torch would pick: ``OMP_NUM_THREADS``, or the physical cores this process may run on."""
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.strip().isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not on Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:  # hyper-threads of one core count once
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def _affine(t: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    """An eval-mode BN as ``x * a + b`` per channel (float32, as `inference` computes it in torch)."""
    a = t[f"{name}.weight"] / np.sqrt(t[f"{name}.running_var"] + np.float32(BN_EPS))
    return a, t[f"{name}.bias"] - t[f"{name}.running_mean"] * a


def fold_state(config: MemNetConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A MemNet's state dict (numpy) folded: the state dict of `memnet.inference.FoldedMemNet`, as float32 arrays
    (the BN running counts left out)."""
    t = {k: np.asarray(v, np.float32) for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
    c, r = config.channels, config.recursions
    out: dict[str, np.ndarray] = {}

    def bn(dst: str, src: str, part: slice = slice(None)) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{dst}.{k}"] = t[f"{src}.{k}"][part]

    def conv(dst: str, src: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = t[f"{src}.weight"], t[f"{src}.bias"]

    bn("fenet.bn", "fenet.bn")
    conv("fenet.conv", "fenet.conv")
    for m in range(config.blocks):
        p = f"blocks.{m}"
        for i in range(r):
            bn(f"{p}.bn_a.{i}", f"{p}.bn_a.{i}")
            a, b = _affine(t, f"{p}.bn_b.{i}")  # conv_a then bn_b[i]: W' = a W, b' = a b + c
            out[f"{p}.conv_a.{i}.weight"] = t[f"{p}.conv_a.weight"] * a[:, None, None, None]
            out[f"{p}.conv_a.{i}.bias"] = t[f"{p}.conv_a.bias"] * a + b
        conv(f"{p}.conv_b", f"{p}.conv_b")
        for i in range(m + 1 + r):  # the gate: one BN and one 1x1 conv per memory, the bias once
            part = slice(i * c, (i + 1) * c)
            bn(f"{p}.gate.bns.{i}", f"{p}.gate.bn", part)
            out[f"{p}.gate.convs.{i}.weight"] = t[f"{p}.gate.conv.weight"][:, part]
            if i == 0:
                out[f"{p}.gate.convs.{i}.bias"] = t[f"{p}.gate.conv.bias"]
    w = t["branch_weights"]
    for m in range(config.blocks):  # sum_m w_m (x + R(b_m)) = (sum_m w_m) x + sum_m (w_m R)(b_m)
        bn(f"recon_bn.{m}", f"recon_bn.{m}")
        out[f"recon.{m}.weight"] = t["recon_conv.weight"] * w[m]
        out[f"recon.{m}.bias"] = t["recon_conv.bias"] * w[m]
    out["input_weight"] = w.sum(dtype=np.float32).reshape(1)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def graph_bytes(config: MemNetConfig, folded: dict[str, np.ndarray]) -> bytes:
    """The folded model (`fold_state`) as an ONNX graph with dynamic N, H and W, written node by node with
    onnx.helper: milliseconds, and no exporter left in the process."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def bn_relu(x: str, key: str, name: str) -> str:
        ins = [x] + [const(f"{name}.{k}", folded[f"{key}.{k}"]) for k in ("weight", "bias", "running_mean",
                                                                           "running_var")]
        return node("Relu", [node("BatchNormalization", ins, f"{name}/BatchNormalization", epsilon=BN_EPS)],
                    f"{name}/Relu")

    def conv(x: str, key: str, name: str) -> str:
        w = folded[f"{key}.weight"]
        ins = [x, const(f"{name}.weight", w)] + ([const(f"{name}.bias", folded[f"{key}.bias"])]
                                                 if f"{key}.bias" in folded else [])
        k = w.shape[-1]
        return node("Conv", ins, f"{name}/Conv", kernel_shape=[k, k], pads=[k // 2] * 4)

    long_term = [conv(bn_relu("input", "fenet.bn", "/fenet/bn"), "fenet.conv", "/fenet/conv")]
    k, c = config.context, config.in_channels
    centre = node("Slice", ["input", const("centre.starts", np.array([k * c], np.int64)),
                            const("centre.ends", np.array([(k + 1) * c], np.int64)),
                            const("centre.axes", np.array([1], np.int64))], "/centre/Slice") if k else "input"
    out = node("Mul", [centre, const("input_weight", folded["input_weight"])], "/input_weight/Mul")
    for m in range(config.blocks):
        p, key = f"/blocks.{m}", f"blocks.{m}"

        def gate(acc, i, x, p=p, key=key):
            y = conv(bn_relu(x, f"{key}.gate.bns.{i}", f"{p}/gate/bns.{i}"), f"{key}.gate.convs.{i}",
                     f"{p}/gate/convs.{i}")
            return y if acc is None else node("Add", [acc, y], f"{p}/gate/Add_{i}")

        acc = None
        for i, b in enumerate(long_term):
            acc = gate(acc, i, b)
        h = long_term[-1]
        for r in range(config.recursions):
            t = node("Relu", [conv(bn_relu(h, f"{key}.bn_a.{r}", f"{p}/bn_a.{r}"), f"{key}.conv_a.{r}",
                                   f"{p}/conv_a.{r}")], f"{p}/conv_a.{r}/Relu")
            h = node("Add", [h, conv(t, f"{key}.conv_b", f"{p}/conv_b.{r}")], f"{p}/Add_{r}")
            acc = gate(acc, len(long_term) + r, h)  # h_r is not kept: only the running sum
        long_term.append(acc)
        y = conv(bn_relu(acc, f"recon_bn.{m}", f"/recon_bn.{m}"), f"recon.{m}", f"/recon.{m}")
        out = node("Add", [out, y], "output" if m == config.blocks - 1 else f"/out/Add_{m}")
    planes = config.in_channels * config.planes
    graph = helper.make_graph(
        nodes, "FoldedMemNet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", planes, "height", "width"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", config.out_channels, "height", "width"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="memnet")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def cache_dir() -> Path:
    """Where ONNX graphs are kept between runs (per user, never beside the data). ``MEMNET_CACHE_DIR``
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
    everything that shapes the graph (the versions of numpy, onnx, onnxruntime and of this code; an int8 graph
    is traced by torch and calibrated on simulated images: torch's version and that code too). Versions are
    read from the installed packages' metadata: nothing is imported."""
    from importlib.metadata import version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except Exception:
            return "?"

    code = hashlib.sha256()
    here = Path(__file__).parent
    names = ("ortgraph.py", "arch.py") + (("inference.py", "model.py", "degrade.py", "synthstack.py") if int8 else ())
    for name in names:
        code.update((here / name).read_bytes())
    key = {"weights": digest, "config": config.as_dict(), "int8": int8, "opset": ONNX_OPSET, "numpy": np.__version__,
           "onnx": ver("onnx"), "onnxruntime": ver("onnxruntime"), "code": code.hexdigest()}
    if int8:
        key["torch"] = ver("torch")
    return cache_dir() / "onnx" / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]}.onnx"


def _read_cached(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
        os.utime(path)  # recently used: kept when the cache is pruned
        return data
    except OSError:
        return None


def _write_cached(path: Path, graph: bytes) -> None:
    """Best effort (a read-only home only costs the next run a new graph): written whole, then renamed, so a
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


class OrtSession:
    """An ONNX Runtime session on the CPU for a model's graph, run on (N, planes, H, W) float32 numpy batches.
    The graph comes from the on-disk cache when it was written before (``digest`` given), else from ``make()``
    (then cached)."""

    def __init__(self, config: MemNetConfig, make: Callable[[], bytes], threads: int, digest: str | None = None,
                 int8: bool = False):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # warnings about unused initialisers are noise to a user
        # ONNX Runtime's CPU arena keeps every buffer it ever grew to, rounded up to powers of two: measured
        # at a 660² window, M6R6C64 peaked at 15.2 GB with it and 6.7 GB without (and ran faster without);
        # M4R4C32 at 580² ran faster with it. So: the arena only for models with small feature maps.
        so.enable_cpu_mem_arena = feature_bytes_per_pixel(config) <= 2048
        # The memory pattern allocates one block for a whole run's plan on top of what the arena already holds:
        # 2x the peak (M4R4C32, 512² window, bench/window_memory.py), and no faster.
        so.enable_mem_pattern = False
        providers = ["CPUExecutionProvider"]
        if digest is None:
            self.session = ort.InferenceSession(make(), so, providers=providers)
            return
        path = _graph_path(digest, config, int8)
        graph = _read_cached(path)
        if graph is not None:
            try:
                self.session = ort.InferenceSession(graph, so, providers=providers)
                return
            except Exception:  # a damaged cache file: write it again
                pass
        graph = make()
        self.session = ort.InferenceSession(graph, so, providers=providers)
        _write_cached(path, graph)

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model's output (N, out_channels, H, W) for a float32 batch (N, planes, H, W)."""
        return self.session.run(None, {"input": np.ascontiguousarray(x, np.float32)})[0]


_BUILT: OrderedDict = OrderedDict()  # the last few sessions built, by weights: a preview or a restore of the
_BUILT_MAX = 4                       # same model reuses its session
_BUILT_LOCK = threading.Lock()


def session_for(weights: Weights, threads: int | None = None,
                int8: Callable[[Weights], bytes] | None = None) -> OrtSession:
    """The ONNX Runtime session of ``weights``, built once per weights, graph and thread count (a small cache of
    the most recent): the fp32 graph, written without torch; or, given ``int8`` (what writes the int8 graph:
    `memnet.inference.int8_graph`, which needs torch), the int8 graph, written by it when it is not cached."""
    threads = threads or default_threads()
    key = (weights.digest(), int8 is not None, threads)
    with _BUILT_LOCK:
        if key in _BUILT:
            _BUILT.move_to_end(key)
            return _BUILT[key]
    built = _build(weights, int8, threads)
    with _BUILT_LOCK:
        _BUILT[key] = built
        while len(_BUILT) > _BUILT_MAX:
            _BUILT.popitem(last=False)
    return built


def _build(weights: Weights, int8: Callable[[Weights], bytes] | None, threads: int) -> OrtSession:
    if int8 is not None:
        def make() -> bytes:
            return int8(weights)
    else:
        def make() -> bytes:
            return graph_bytes(weights.config, fold_state(weights.config, weights.tensors))
    return OrtSession(weights.config, make, threads, digest=weights.digest(), int8=int8 is not None)
