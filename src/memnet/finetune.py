"""Fine-tuning a model on a lab's own data (``memnet finetune`` and the Fine-tune widget).

Modes:
- ``paired``: noisy/clean pairs;
- ``n2n``: two independent noisy acquisitions of the same field (Noise2Noise; each predicts the other);
- ``n2v``: the noisy data alone, blind-spot masking (Noise2Void style): a few pixels per patch are
  replaced by a random neighbour and the loss is taken on those pixels only;
- ``synthetic``: a Poisson-Gaussian noise model (variance = a·signal + b) is fitted on the noisy data
  against the current model's prediction; training pairs are that prediction plus calibrated noise.

The result is a .safetensors model in the user model directory, with its provenance in the metadata.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .degrade import psnr
from .engine import Cancelled, resolve_device
from .io import is_zarr_path, open_input
from .normalize import Normalizer
from .outputs import check_output_path
from .train import MixedPrecision, PatchSampler, _hardware, _list, multi_supervised_loss, paired_target_frame
from .zoo import load_model, save_model, user_model_dir

__all__ = ["FinetuneConfig", "FinetuneProgress", "finetune", "MODES", "fit_noise_model"]

MODES = ("paired", "n2n", "n2v", "synthetic")


@dataclass
class FinetuneProgress:
    step: int
    total: int
    loss: float
    val_psnr: float | None
    elapsed: float
    history: list = field(default_factory=list)  # [(step, train loss, val psnr)]


@dataclass
class FinetuneConfig:
    model: str = "microscopy"
    mode: str = "n2v"
    name: str = "finetuned"
    steps: int = 1000
    patch: int = 48
    batch: int = 16
    lr: float = 2e-4
    val_fraction: float = 0.1
    val_every: int = 100
    patience: int = 5  # validation rounds without improvement before stopping
    mask_fraction: float = 0.015  # n2v: blind-spot pixels per patch
    axes: str | None = None
    include: str | None = None  # regex on file names when the data are folders
    device: str = "auto"
    amp: str = "auto"  # mixed precision: "auto" (on for CUDA), "on" (also bf16 on CPU), "off"
    seed: int = 0
    max_planes: int = 64  # planes sampled from large stacks
    overwrite: bool = False  # replace an existing user model of the same name


def _sources(data, include: str | None) -> list:
    """The images in ``data``: one image/stack (path or array), a folder of TIFF/Zarr images (sorted by
    name, filtered by the ``include`` regex), or a list of paths."""
    if isinstance(data, (list, tuple)):
        items = list(data)
    elif isinstance(data, (str, os.PathLike)) and Path(data).is_dir() and not is_zarr_path(data):
        items = _list(Path(data), include, what="TIFF or Zarr images",
                      keep=lambda p: p.suffix.lower() in (".tif", ".tiff") or (p.is_dir() and is_zarr_path(p)))
    else:
        items = [data]
    if not items:
        raise ValueError("no input images given")
    return items


def _planes(data, axes, max_planes: int, policy: dict, include: str | None = None) -> list[np.ndarray]:
    """Normalised 2-D planes (Y, X) from the images in ``data``: at most ``max_planes`` in all, a regular
    sample. Each image is normalised on its own with the model's policy, as `restore` would."""
    sources = _sources(data, include)
    if len(sources) > max_planes:
        sources = [sources[i] for i in np.unique(np.linspace(0, len(sources) - 1, max_planes).round().astype(int))]
    per_source = max(1, max_planes // len(sources))
    out = []
    for item in sources:
        src = open_input(item, axes=axes)
        yi, xi = src.axes.index("Y"), src.axes.index("X")
        lead_shape = [n for d, n in enumerate(src.shape) if d not in (yi, xi)]
        n = int(np.prod(lead_shape)) if lead_shape else 1
        picks = np.unique(np.linspace(0, n - 1, min(n, per_source)).round().astype(int))
        planes = []
        for flat in picks:
            lead = iter(np.unravel_index(flat, lead_shape) if lead_shape else ())
            idx = tuple(slice(None) if d in (yi, xi) else int(next(lead)) for d in range(len(src.shape)))
            p = np.asarray(src.array[idx])
            planes.append(p.T if yi > xi else p)
        stack = np.stack(planes)
        out.extend(Normalizer.for_data(stack, policy).forward(stack))
    return out


def fit_noise_model(noisy: np.ndarray, signal: np.ndarray, bins: int = 32) -> tuple[float, float]:
    """Fit var(noisy - signal) = a·signal + b by least squares over intensity bins (robust to
    structure left in the residual because it uses the median absolute deviation per bin)."""
    s, r = signal.ravel(), (noisy - signal).ravel()
    edges = np.quantile(s, np.linspace(0.02, 0.98, bins + 1))
    xs, vs = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (s >= lo) & (s < hi)
        if m.sum() > 50:
            xs.append(s[m].mean())
            vs.append((1.4826 * np.median(np.abs(r[m] - np.median(r[m])))) ** 2)
    if len(xs) < 2:
        return 0.0, float(np.var(r))
    a, b = np.polyfit(np.array(xs), np.array(vs), 1)
    return max(float(a), 0.0), max(float(b), 1e-8)


def _n2v_mask(x: torch.Tensor, fraction: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ~fraction of pixels by a random neighbour (5x5, not itself); return input and mask."""
    b, _, h, w = x.shape
    n = max(1, int(round(fraction * h * w)))
    xi = x.clone()
    mask = torch.zeros_like(x)
    for i in range(b):
        ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
        dy, dx = rng.integers(-2, 3, n), rng.integers(-2, 3, n)
        same = (dy == 0) & (dx == 0)
        dx[same] = 1  # never the pixel itself
        ny, nx = np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)
        xi[i, 0, ys, xs] = x[i, 0, ny, nx]
        mask[i, 0, ys, xs] = 1.0
    return xi, mask


def _split(items: list, fraction: float, rng, patch: int) -> tuple[list, list]:
    """Hold out whole planes when there are several; else the bottom strip of each plane, at least one
    patch tall (validation must never see training pixels, or early stopping measures memorisation)."""
    if len(items) >= 4:
        k = max(1, int(round(fraction * len(items))))
        order = rng.permutation(len(items))
        val = [items[i] for i in order[:k]]
        train = [items[i] for i in order[k:]]
        return train, val
    train, val = [], []
    for it in items:
        arrs = it if isinstance(it, tuple) else (it,)
        h = arrs[0].shape[0]
        cut = min(int(h * (1 - fraction)), h - patch)
        if cut < patch:
            raise ValueError(f"a {h}-row image is too small to hold out a validation strip: with --patch {patch} "
                             f"it needs at least {2 * patch} rows; give more images (4 or more hold out whole "
                             "ones) or a smaller --patch")
        tr = tuple(a[:cut] for a in arrs)
        va = tuple(a[cut:] for a in arrs)
        train.append(tr if isinstance(it, tuple) else tr[0])
        val.append(va if isinstance(it, tuple) else va[0])
    return train, val


def finetune(cfg: FinetuneConfig, noisy, target=None, noisy2=None, *, progress=None, cancel=None,
             resume: bool = False, log=None) -> Path:
    """Fine-tune ``cfg.model`` on the user's data; returns the saved model's path.

    ``noisy``: image/stack (array or path), a folder of images, or a list of paths. ``target``: clean
    counterpart (``paired``, matched image for image in sorted order).
    ``noisy2``: second noisy acquisition (``n2n``). A checkpoint is kept under the user model
    directory (``.runs/NAME``) so ``resume=True`` continues an interrupted run."""
    if cfg.mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode {cfg.mode!r}: expected one of {', '.join(MODES)}")
    if cfg.mode == "paired" and target is None:
        raise ValueError("mode 'paired' needs clean targets (--target)")
    if cfg.mode == "n2n" and noisy2 is None:
        raise ValueError("mode 'n2n' needs a second noisy acquisition of the same field (--data2)")
    if target is not None and cfg.mode not in ("paired", "synthetic"):
        raise ValueError(f"mode {cfg.mode!r} learns from the noisy data alone: --target is used only by "
                         "'paired' and 'synthetic' (clean images to add the fitted noise to)")
    if not cfg.name or any(c in cfg.name for c in "/\\:"):
        raise ValueError(f"invalid model name {cfg.name!r}: use letters, digits, '-' or '_'")
    log = log or (lambda s: None)
    existing = user_model_dir() / f"{cfg.name}.safetensors"
    inputs = [p for d in (noisy, target, noisy2) for p in (d if isinstance(d, (list, tuple)) else [d])]
    check_output_path(existing, [p for p in inputs if isinstance(p, (str, os.PathLike))])  # never over the data
    run_dir = user_model_dir() / ".runs" / cfg.name
    ckpt, weights, best_path = run_dir / "state.pt", run_dir / "last.safetensors", run_dir / "best.safetensors"
    resuming = resume and ckpt.exists() and weights.exists()
    if resume and not resuming:
        log(f"nothing to resume for {cfg.name!r}: starting from {cfg.model}")
    if existing.exists() and not (resuming or cfg.overwrite):
        raise FileExistsError(f"a user model named {cfg.name!r} already exists ({existing}): choose another name, "
                              "or overwrite it explicitly")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    dev = resolve_device(cfg.device)
    model, info = load_model(cfg.model, device=dev)
    if info.name == cfg.name:
        raise ValueError(f"the new model needs a name different from the model it starts from ({cfg.name!r})")
    policy = info.normalization

    planes = _planes(noisy, cfg.axes, cfg.max_planes, policy, cfg.include)
    if cfg.mode == "paired":
        others = _planes(target, cfg.axes, cfg.max_planes, policy, cfg.include)
    elif cfg.mode == "n2n":
        others = _planes(noisy2, cfg.axes, cfg.max_planes, policy, cfg.include)
    else:
        others = None
    if others is not None:
        if len(others) != len(planes) or any(a.shape != b.shape for a, b in zip(planes, others)):
            raise ValueError(f"the {cfg.mode} data do not match the noisy data plane for plane "
                             f"({len(planes)} planes of {planes[0].shape} vs {len(others)} of {others[0].shape})")
        # paired: the clean target in the noisy plane's intensity frame (see paired_target_frame). Not for
        # n2n: fitting one noisy image to another shrinks the gain (noise on both sides of the fit).
        items = [paired_target_frame(p, q) for p, q in zip(planes, others)] if cfg.mode == "paired" \
            else list(zip(planes, others))
    elif cfg.mode == "synthetic":
        pred = [_predict(model, p, dev) for p in planes]
        a, b = fit_noise_model(np.concatenate([p.ravel() for p in planes]), np.concatenate([q.ravel() for q in pred]))
        log(f"noise model: variance = {a:.4g}·signal + {b:.4g} (normalised units)")
        # The fitted noise is added per batch (below) to clean images when given, else to the denoised data.
        clean = _planes(target, cfg.axes, cfg.max_planes, policy, cfg.include) if target is not None else pred
        items = [(q, q) for q in clean]
        noise_ab = (a, b)
    else:  # n2v
        items = [(p, p) for p in planes]
    if min(min(it[0].shape) for it in items) < cfg.patch:
        raise ValueError(f"images are smaller than the patch size {cfg.patch}: use a smaller --patch")
    train_items, val_items = _split(items, cfg.val_fraction, rng, cfg.patch)
    sampler = PatchSampler(info.task, [], train_items, cfg.patch, seed=cfg.seed, pairs_only=True)
    val_sampler = PatchSampler(info.task, [], val_items, cfg.patch, seed=cfg.seed + 1, pairs_only=True)
    vx, vy = val_sampler.batch(32)
    vmask = None
    if cfg.mode == "n2v":
        vx, vmask = _n2v_mask(vx, cfg.mask_fraction * 4, np.random.default_rng(7))
    elif cfg.mode == "synthetic":
        vx = _synth(vy, noise_ab, np.random.default_rng(7))

    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:  # a fresh run: nothing of an earlier run of this name may end up in the result
        for f in (ckpt, weights, best_path):
            f.unlink(missing_ok=True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    mp = MixedPrecision(cfg.amp, dev)
    step, best, bad, history = 0, -math.inf, 0, []
    hours_before, early_stopped = 0.0, False
    if resuming:
        m2, _ = load_model(weights, device=dev)
        model.load_state_dict(m2.state_dict())
        st = torch.load(ckpt, weights_only=True)
        opt.load_state_dict(st["optimizer"])
        if st.get("scaler"):
            mp.scaler.load_state_dict(st["scaler"])
        step, best, bad = int(st["step"]), float(st["best"]), int(st["bad"])
        history = [tuple(h) for h in st["history"].tolist()] if st["history"].numel() else []
        hours_before = float(st.get("hours", 0.0))
        sampler.rng = np.random.default_rng(cfg.seed + step)  # new patches, not a replay of the first ones
        log(f"resumed at step {step}")
    out_path = user_model_dir() / f"{cfg.name}.safetensors"
    meta = {
        "description": f"{info.name} fine-tuned ({cfg.mode}) on user data",
        "normalization": policy,
        "degradation": info.metadata.get("degradation", {}),
        "finetune": {"base_model": info.name, "base_metadata_training": info.metadata.get("training", {}),
                     "config": asdict(cfg), "data": {k: _describe(v) for k, v in
                                                     (("noisy", noisy), ("target", target), ("noisy2", noisy2))
                                                     if v is not None},
                     "hardware": _hardware(dev)},
        "rank": info.rank - 0.5,  # a user model never silently replaces the shipped default
    }
    if cfg.mode == "synthetic":
        meta["finetune"]["noise_model"] = {"variance": "a*signal + b (normalised units)", "a": a, "b": b}
    t0 = time.time()

    def checkpoint():
        # Weights and optimizer state together, so a resume continues exactly where this left off.
        meta["finetune"]["hours"] = round(hours_before + (time.time() - t0) / 3600, 4)
        _save(model, weights, cfg, info, meta, step, history)
        torch.save({"optimizer": opt.state_dict(), "step": step, "best": best, "bad": bad,
                    "history": torch.tensor(history, dtype=torch.float64), "scaler": mp.scaler.state_dict(),
                    "hours": hours_before + (time.time() - t0) / 3600}, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)

    def publish(ended: str):
        # The user's model: the best checkpoint, with the record of the whole run.
        final, final_info = load_model(best_path)
        fm = dict(final_info.metadata)
        fm["finetune"] = {**fm["finetune"], "steps_run": step, "ended": ended,
                          "early_stopped": ended == "early stop",
                          "history": [list(map(float, h)) for h in history[-100:]],
                          "hours": round(hours_before + (time.time() - t0) / 3600, 4)}
        save_model(final, out_path, name=cfg.name, task=info.task, metadata=fm)

    model.train()
    loss_acc, n_acc = 0.0, 0
    while step < cfg.steps:
        if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
            checkpoint()
            if best_path.exists():  # Stop means "enough": the best model so far becomes the user's model
                publish("stopped")
                raise Cancelled(f"fine-tuning stopped at step {step}: the best model so far is saved as "
                                f"{cfg.name!r}; resume to continue training it")
            raise Cancelled(f"fine-tuning stopped at step {step}, before its first validation: no model saved; "
                            "resume to continue")
        x, y = sampler.batch(cfg.batch)
        mask = None
        if cfg.mode == "n2v":
            x, mask = _n2v_mask(x, cfg.mask_fraction, sampler.rng)
        elif cfg.mode == "synthetic":
            x = _synth(y, noise_ab, sampler.rng)
        elif cfg.mode == "n2n" and sampler.rng.random() < 0.5:
            x, y = y, x
        x, y = x.to(dev), y.to(dev)
        final, branches = mp.forward(model, x)
        if mask is not None:
            mask = mask.to(dev)
            outs = branches + [final]
            loss = sum(((o - y) ** 2 * mask).sum() / mask.sum() for o in outs) / len(outs)
        else:
            loss = multi_supervised_loss(final, branches, y)
        mp.step(loss, opt)
        step += 1
        loss_acc += loss.item()
        n_acc += 1
        val = None
        if step % cfg.val_every == 0 or step == cfg.steps:
            val = _val_psnr(model, vx, vy, vmask, dev)
            model.train()
            history.append((step, loss_acc / n_acc, val))
            loss_acc, n_acc = 0.0, 0
            if val > best + 1e-3:
                best, bad = val, 0
                # The best so far stays in the run folder: the user's model appears only when the run ends.
                meta["finetune"]["hours"] = round(hours_before + (time.time() - t0) / 3600, 4)
                _save(model, best_path, cfg, info, {**meta, "metrics": {"val_psnr": val}}, step, history)
            else:
                bad += 1
            checkpoint()
            log(f"step {step}/{cfg.steps}  loss {history[-1][1]:.5f}  validation PSNR {val:.2f} dB")
            if bad >= cfg.patience:
                log(f"early stop: no improvement in {cfg.patience} validations")
                early_stopped = True
                break
        if progress is not None:
            progress(FinetuneProgress(step, cfg.steps, loss.item(), val, time.time() - t0, list(history)))
    if not best_path.exists():
        _save(model, best_path, cfg, info, {**meta, "metrics": {"val_psnr": best}}, step, history)
    publish("early stop" if early_stopped else "completed")
    return out_path


def _save(model, path, cfg, info, meta, step, history):
    m = {**meta, "finetune": {**meta["finetune"], "steps": step,
                              "history": [list(map(float, h)) for h in history[-100:]]}}
    save_model(model, path, name=cfg.name if path.parent == user_model_dir() else f"{cfg.name}-last",
               task=info.task, metadata=m)


def _describe(data):
    """Where fine-tuning data came from, for the model's provenance (paths, or an array's shape)."""
    if isinstance(data, (list, tuple)):
        return [_describe(d) for d in data]
    if isinstance(data, (str, os.PathLike)):
        return str(Path(data).resolve())
    return {"array": list(map(int, data.shape)), "dtype": str(data.dtype)}


def _synth(clean: torch.Tensor, ab: tuple[float, float], rng) -> torch.Tensor:
    a, b = ab
    var = np.clip(a * clean.numpy(), 0, None) + b
    return clean + torch.from_numpy((rng.standard_normal(clean.shape) * np.sqrt(var)).astype(np.float32))


def _predict(model, plane: np.ndarray, dev) -> np.ndarray:
    """The model's output on a normalised plane, tile by tile (exact halo: the same as whole-plane
    inference, without its memory on large planes)."""
    from .engine import restore

    out = restore(np.ascontiguousarray(plane, dtype=np.float32), model, device=dev, halo="exact")
    return np.asarray(out, dtype=np.float32)


def _val_psnr(model, vx, vy, vmask, dev) -> float:
    """PSNR (peak 1, normalised units) on the held-out batch; for n2v on the masked pixels against
    the noisy values, which tracks the true PSNR up to a constant offset."""
    model.eval()
    with torch.inference_mode():
        out = model(vx.to(dev)).cpu()
    if vmask is not None:
        m = vmask.bool()
        return psnr(out[m].numpy(), vy[m].numpy(), peak=1.0)
    return psnr(out.numpy(), vy.numpy(), peak=1.0)
