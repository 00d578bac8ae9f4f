"""A context model's second stage: a per-pixel convex blend along Z (or T) of the first stage's outputs.

Stage 1 (the context MemNet) restores each plane from its own 2k+1 input planes. Stage 2 restores plane z as a
weighted mean of stage 1's outputs of planes z-K..z+K (mirrored at the ends, as the input planes are), the weights
a softmax of three 1x1 layers over local features only: the log local energy of (noisy z - stage 1's z) and of
(stage 1's z+d - stage 1's z) at a few box radii, and the local mean of stage 1's z. Where the neighbours agree
with the centre beyond the noise, they are averaged in; where the structure changes along Z, the centre is kept.
A few thousand weights and ~1 % of stage 1's time: it costs one stage-1 pass per plane when the planes run in
order (the engine keeps stage 1's outputs of the last 2K+1 planes, `kernel.Job`).

Numpy only (the restore path runs without torch); `memnet.stacktrain.BlendNet` is the same function in torch, for
training. Its weights live in the context model's .safetensors file under ``zblend.`` with a ``zblend`` metadata
entry (`ZBlend.spec`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PREFIX", "ZBlend", "blend_torch", "box_mean", "zblend_shapes"]

PREFIX = "zblend."
_LAYERS = ("m.0", "m.2", "m.4")  # the torch Sequential's names of the three 1x1 convolutions


def zblend_shapes(spec: dict) -> dict[str, tuple[int, ...]]:
    """The tensors (without the prefix) a blend with this metadata ``spec`` holds, and their shapes."""
    k, radii, hidden = spec["context"], spec["radii"], spec["hidden"]
    planes = 2 * k + 1
    feats = len(radii) * planes + 1
    out = {}
    for name, (cout, cin) in zip(_LAYERS, ((hidden, feats), (hidden, hidden), (planes, hidden))):
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, 1, 1), (cout,)
    return out


def check_spec(spec, label) -> dict:
    """A ``zblend`` metadata entry, checked (what a file may claim before anything is built)."""
    ok = isinstance(spec, dict) and all(isinstance(spec.get(k), int) and not isinstance(spec.get(k), bool)
                                        for k in ("context", "hidden")) and isinstance(spec.get("radii"), list)
    if ok:
        radii = spec["radii"]
        ok = 1 <= spec["context"] <= 8 and 1 <= spec["hidden"] <= 1024 and 1 <= len(radii) <= 8 and \
            all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= 64 for r in radii)
    if not ok:
        raise ValueError(f"{label}: metadata zblend={spec!r} is not a Z-blend spec (context 1-8, radii 1-64, "
                         "hidden 1-1024): the file is corrupt or not a napari-memnet model")
    return {"context": spec["context"], "radii": list(spec["radii"]), "hidden": spec["hidden"]}


def box_mean(x: np.ndarray, r: int) -> np.ndarray:
    """The mean over a (2r+1)^2 window of each pixel of ``x`` (..., Y, X), the edges replicated (as torch's
    avg_pool2d of a replicate-padded map). Summed in float64, so a window's result does not depend on where it
    sits in the image (tiled = whole-image to ~1e-7)."""
    p = np.pad(x.astype(np.float64), [(0, 0)] * (x.ndim - 2) + [(r + 1, r), (r + 1, r)], mode="edge")
    p[..., 0, :] = 0
    p[..., :, 0] = 0
    c = p.cumsum(-2).cumsum(-1)
    n = 2 * r + 1
    s = c[..., n:, n:] - c[..., :-n, n:] - c[..., n:, :-n] + c[..., :-n, :-n]
    return (s / (n * n)).astype(np.float32)


def blend_torch(s, noisy, layers: list, radii, context: int):
    """The blend in torch (any device; autograd for training): ``s`` (N, 2K+1, Y, X) stage 1's planes, ``noisy``
    (N, 1, Y, X), ``layers`` the three 1x1 convolutions' (weight, bias); (N, 1, Y, X)."""
    import torch
    import torch.nn.functional as F

    def box(x, r):
        return F.avg_pool2d(F.pad(x, (r, r, r, r), mode="replicate"), 2 * r + 1, stride=1)

    k = context
    c = s[:, k:k + 1]
    diffs = torch.cat([(noisy - c) ** 2] + [(s[:, j:j + 1] - c) ** 2 for j in range(2 * k + 1) if j != k], 1)
    x = torch.cat([torch.log10(box(diffs, r) + 1e-6) for r in radii] + [box(c, max(radii))], 1)
    for i, (w, b) in enumerate(layers):
        x = F.conv2d(x, w, b)
        if i < len(layers) - 1:
            x = torch.relu(x)
    return (torch.softmax(x, 1) * s).sum(1, keepdim=True)


@dataclass(eq=False)
class ZBlend:
    """The blend's spec (planes ``context`` on each side, box ``radii``, ``hidden`` width) and its weights
    (torch Conv2d names, without the prefix)."""

    context: int
    radii: tuple[int, ...]
    hidden: int
    tensors: dict[str, np.ndarray] = field(repr=False)

    @classmethod
    def from_tensors(cls, spec: dict, tensors: dict[str, np.ndarray]) -> ZBlend:
        """From a checked spec and its tensors (with or without the prefix)."""
        t = {k.removeprefix(PREFIX): np.asarray(v, np.float32) for k, v in tensors.items()}
        return cls(spec["context"], tuple(spec["radii"]), spec["hidden"], t)

    @property
    def spec(self) -> dict:
        """The ``zblend`` metadata entry."""
        return {"context": self.context, "radii": list(self.radii), "hidden": self.hidden}

    @property
    def radius(self) -> int:
        """Pixels of stage 1's output around an output pixel that it reads: the tiling halo grows by this."""
        return max(self.radii)

    @property
    def planes(self) -> int:
        """Stage-1 planes blended per output plane."""
        return 2 * self.context + 1

    def prefixed(self) -> dict[str, np.ndarray]:
        """The tensors as stored in the model file."""
        return {PREFIX + k: v for k, v in self.tensors.items()}

    def digest(self) -> str:
        """SHA-256 of the spec and tensors."""
        h = hashlib.sha256(repr(self.spec).encode())
        for k, v in sorted(self.tensors.items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes())
        return h.hexdigest()

    def on_device(self, s: np.ndarray, noisy: np.ndarray, device) -> np.ndarray:
        """`__call__` computed by torch on ``device`` (a GPU runs stage 1 faster than numpy would blend)."""
        import torch

        key = str(device)
        if getattr(self, "_device_layers", (None,))[0] != key:
            self._device_layers = key, [(torch.from_numpy(self.tensors[f"{n}.weight"]).to(device),
                                         torch.from_numpy(self.tensors[f"{n}.bias"]).to(device)) for n in _LAYERS]
        with torch.no_grad():
            st = torch.from_numpy(np.ascontiguousarray(s, np.float32))[None].to(device)
            nt = torch.from_numpy(np.ascontiguousarray(noisy, np.float32))[None, None].to(device)
            return blend_torch(st, nt, self._device_layers[1], self.radii, self.context)[0, 0].cpu().numpy()

    def features(self, s: np.ndarray, noisy: np.ndarray) -> np.ndarray:
        """(features, Y, X) for stage 1's planes ``s`` (2K+1, Y, X) and the noisy centre plane (Y, X)."""
        k = self.context
        c = s[k]
        diffs = np.concatenate([(noisy - c)[None], (np.delete(s, k, axis=0) - c) ** 2])
        diffs[0] **= 2
        feats = []
        for r in self.radii:
            feats.append(np.log10(box_mean(diffs, r) + np.float32(1e-6)))
        feats.append(box_mean(c[None], max(self.radii)))
        return np.concatenate(feats).astype(np.float32)

    def __call__(self, s: np.ndarray, noisy: np.ndarray) -> np.ndarray:
        """Plane z restored (Y, X), float32, from stage 1's planes z-K..z+K ``s`` and the noisy plane z."""
        s = np.asarray(s, np.float32)
        h, w = s.shape[1:]
        x = self.features(s, np.asarray(noisy, np.float32)).reshape(-1, h * w)
        for i, name in enumerate(_LAYERS):
            wt, b = self.tensors[f"{name}.weight"], self.tensors[f"{name}.bias"]
            x = wt.reshape(wt.shape[0], -1) @ x + b[:, None]
            if i < len(_LAYERS) - 1:
                np.maximum(x, 0, out=x)
        x -= x.max(0)
        np.exp(x, out=x)
        x /= x.sum(0)
        return (x * s.reshape(len(s), -1)).sum(0).reshape(h, w).astype(np.float32)
