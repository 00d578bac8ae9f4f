# Session 21 experiment (issue #35), kept for the record: paths are this machine's (/work/...).
# Run: two processes, `python trajectory_average.py 0 2` and `... 1 2`, each pinned to one core
# (taskset -c N, OMP_NUM_THREADS=1). Options (environment): EXP_OUT (folder of per-image JSON), EXP_ONLY (image
# names, comma-separated), EXP_CLIP=lo,hi (re-render the noisy image to 8 bits at those percentiles), EXP_MODE=paired
# (the clean image as the target: the oracle), EXP_GAMMA (nbr2nbr's consistency weight;
# with EXP_SKIP_FULL=1 and 0, its full-resolution forward is not run), EXP_MINUTES.
# Session 22: EXP_MODE=r2r (a full-resolution objective; EXP_R2R_ALPHA), EXP_PATIENCE (the run's patience; "none":
# never stop early), EXP_PLAN=short (score only the best checkpoint half way and the averages), EXP_CURVE=1 (also
# the real change at every validation, half way). Every validation's best-so-far checkpoint is scored half way
# (real change and publish decision), so that any smaller patience can be replayed from one run that never stops
# early. Session 23: EXP_PLAN=alpha (the second-half average at 0.5 to 1 of the way from the starting model);
# EXP_ERRORS=1 (keep every candidate's per-crop held-out errors). Session 24: EXP_CENSOR=hi|both (clipped pixels as
# censored targets; EXP_CENSOR_CHECK=1 censors the held-out scores too; each candidate also scored with its output
# clipped to the input's range, what an integer output file keeps), EXP_MODE=pd (nbr2nbr on a pixel-shuffle phase),
# EXP_SEED (the fine-tune's seed), EXP_NO_BESTS=1 (score only the planned averages, not every best checkpoint).
"""#35: is an average of the fine-tune's trajectory a better thing to publish than the best checkpoint half way?

Fine-tune (auto, publish always, 3 min, fp32, one thread) and keep, besides the run's own best checkpoint,
exponential moving averages of the weights (EMA, started at the starting weights), the uniform average of every
iterate and the average over the second half (every 10th step). Then score each candidate against the clean image
(real change, dB) and with the run's publish decision."""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

os.environ.setdefault("MEMNET_MODEL_DIR", f"/work/exp38/models{sys.argv[1]}")
import memnet
import memnet.finetune as ft
from memnet.evaluate import ood_pairs, percentile_normalize, predictor, w2s_pairs
from memnet.metrics import affine_fit, psnr

torch.set_num_threads(1)
OUT = Path(os.environ.get("EXP_OUT", "/work/exp38/traj"))
OUT.mkdir(parents=True, exist_ok=True)
ROOT = Path("/work/shared/data")
DECAYS = (0.98, 0.99, 0.995)
W2S = w2s_pairs(ROOT / "W2S_train_8bit", range(31, 41), [1])
rows = [("W2S_" + n.stem.replace("input_avg1_", ""), n, c) for n, c in W2S]
rows += [(n.stem, n, c) for n, c in ood_pairs(ROOT / "microscopy_ood")]
only = os.environ.get("EXP_ONLY")
if os.environ.get("EXP_GAMMA"):  # the weight of nbr2nbr's consistency term (the mode's default otherwise)
    import memnet.finetune_modes as fm

    fm.MODES["nbr2nbr"].gamma = float(os.environ["EXP_GAMMA"])
    if fm.MODES["nbr2nbr"].gamma == 0 and os.environ.get("EXP_SKIP_FULL"):  # no consistency term: skip its forward

        def plain_loss(self, model, mp, x, y, extra):
            from memnet.fitloop import multi_supervised_loss

            final, branches = mp.forward(model, x)
            return multi_supervised_loss(final, branches, y)

        fm.Nbr2Nbr.loss = plain_loss
PATIENCE = {"": None, "none": 10**9}.get(os.environ.get("EXP_PATIENCE", ""))
PATIENCE = PATIENCE or (int(os.environ["EXP_PATIENCE"]) if os.environ.get("EXP_PATIENCE") else None)
if os.environ.get("EXP_MODE") == "r2r":  # session 22: a full-resolution objective (Recorrupted-to-Recorrupted)
    import memnet.finetune_modes as fm

    @fm.register
    class R2R(fm.Mode):
        """Pang et al., CVPR 2021: input y + a·z, target y − z/a, z drawn from the Poisson-Gaussian noise model
        fitted against the starting model's output; unbiased for the clean-image error at full resolution (of a
        model that sees (1 + a²) times the noise variance)."""

        name = "r2r"
        pixel_independent = True
        alpha = float(os.environ.get("EXP_R2R_ALPHA", 0.5))

        def items(self, planes, others, ctx):
            pred = ctx.predictions(planes)
            ctx.noise_model = fm.fit_noise_model(np.concatenate([p.ravel() for p in planes]),
                                                 np.concatenate([q.ravel() for q in pred]))
            return list(zip(planes, pred))

        def batch(self, x, y, rng, ctx):
            a, b = ctx.noise_model
            z = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32)) * torch.sqrt(a * y.clamp(min=0) + b)
            return x + self.alpha * z, x - z / self.alpha, None

# Session 24: EXP_CENSOR=hi|both: pixels at the image's clip value (the top, or both ends, when >= 0.5 % of pixels sit
# there) are censored in the training loss: a prediction beyond a clipped target is not an error.
CENSOR = os.environ.get("EXP_CENSOR")
if CENSOR:
    import memnet.finetune_modes as fm
    import memnet.fitloop as fl

    def censored(o, y):
        d = o - y
        if CUR.get("hi") is not None:
            d = torch.where(y >= CUR["hi"], torch.clamp(d, max=0), d)
        if CUR.get("lo") is not None:
            d = torch.where(y <= CUR["lo"], torch.clamp(d, min=0), d)
        return d ** 2

    def msl(final, branches, target, kind="mse"):
        outs = branches + [final]
        return sum(torch.mean(censored(o, target)) for o in outs) / len(outs)

    def n2v_loss(self, model, mp, x, y, mask):
        final, branches = mp.forward(model, x)
        mask = mask.to(final.device)
        outs = branches + [final]
        return sum((censored(o, y) * mask).sum() / mask.sum() for o in outs) / len(outs)

    fl.multi_supervised_loss = msl
    fm.N2V.loss = n2v_loss

    class CensoredOutputs(torch.nn.Module):
        """The model with each output beyond a clipped target moved onto it, so that the held-out scores'
        squared error is the censored one; the targets in the order `_HeldOut._errors` runs its slices of 16."""

        def __init__(self, model, draws):
            super().__init__()
            self.model, self.targets = model, [y[i: i + 16] for _, y, _ in draws for i in range(0, len(y), 16)]
            self.train(model.training)

        def forward(self, x):
            o, y = self.model(x).float(), self.targets.pop(0).to(x.device)
            if CUR.get("hi") is not None:
                o = torch.where((y >= CUR["hi"]) & (o > y), y, o)
            if CUR.get("lo") is not None:
                o = torch.where((y <= CUR["lo"]) & (o < y), y, o)
            return o

    if os.environ.get("EXP_CENSOR_CHECK"):  # the held-out scores censored the same way
        plain_errors = ft._HeldOut._errors
        ft._HeldOut._errors = staticmethod(lambda model, dev, draws: plain_errors(CensoredOutputs(model, draws), dev,
                                                                                  draws))

if os.environ.get("EXP_MODE") == "pd":  # session 24: Neighbor2Neighbor on one pixel-shuffle phase (pixels 2 apart)
    sys.path.insert(0, str(Path(__file__).parent))
    import pd_vs_n2v_corr  # noqa: F401  (registers mode "pd")

MODE = os.environ.get("EXP_MODE", "auto")  # "paired": the clean image as the target, an oracle for the same recipe
CLIP = [float(v) for v in os.environ["EXP_CLIP"].split(",")] if os.environ.get("EXP_CLIP") else None
if only:
    rows = [r for r in rows if r[0] in only.split(",")]
part, nparts = int(sys.argv[1]), int(sys.argv[2])
CUR = {}
orig_fit, orig_publish = ft.fit, ft._publish


def tracked_fit(state, *, train_step, checkpoint, **kw):
    model = CUR["model"]
    params = [p for p in model.state_dict().values() if p.is_floating_point()]
    start = [p.detach().clone() for p in params]
    ema = {d: [p.clone() for p in start] for d in DECAYS}
    total = [torch.zeros_like(p) for p in params]
    tail = []  # iterates from the second half are summed once the step count is known: keep snapshots per 10 steps
    snaps = []

    def step(i):
        loss = train_step(i)
        with torch.no_grad():
            for d, e in ema.items():
                torch._foreach_mul_(e, d)
                torch._foreach_add_(e, params, alpha=1 - d)
            torch._foreach_add_(total, params)
        if (i + 1) % 10 == 0:
            tail.append([p.detach().clone() for p in params])
        return loss

    def ckpt(st, improved):
        snaps.append([p.detach().clone() for p in params])
        if improved:
            CUR.setdefault("bests", []).append(snaps[-1])
        CUR.setdefault("vals", []).append({"step": st.step, "score": st.history[-1]["score"], "improved": improved,
                                           "best": len(CUR.get("bests", [])) - 1})
        return checkpoint(st, improved)

    out = orig_fit(state, train_step=step, checkpoint=ckpt, **kw)
    n = max(state.step, 1)
    CUR["avg"] = {"start": start, "last": [p.detach().clone() for p in params],
                  **{f"ema{d}": e for d, e in ema.items()}, "uniform": [t / n for t in total],
                  "tail_half": [sum(s[j] for s in tail[len(tail) // 2:]) / max(len(tail) - len(tail) // 2, 1)
                                for j in range(len(params))] if tail else None,
                  "snapshots": [sum(s[j] for s in snaps) / len(snaps) for j in range(len(params))] if snaps else None}
    CUR["steps"], CUR["snaps"] = state.step, snaps
    return out


def publish(cfg, state, run, out_path, info, baseline, log, held_out, base_errors, dev, tail=None):
    base, _ = memnet.load_model("microscopy")
    base.eval()
    x, cl = CUR["x"], CUR["c"]
    xn = percentile_normalize(x)
    pred0 = predictor(base)(xn)
    p0 = psnr(affine_fit(pred0, cl), cl)
    p0c = psnr(affine_fit(np.clip(pred0, xn.min(), xn.max()), cl), cl)
    best, _ = memnet.load_model(run.best)
    keys = [k for k, v in best.state_dict().items() if v.is_floating_point()]
    cands = {"best": [best.state_dict()[k].clone() for k in keys]}
    cands.update({k: v for k, v in CUR["avg"].items() if v is not None and k != "start"})
    start = CUR["avg"]["start"]
    res = {"image": CUR["name"], "mode": held_out.mode.name, "steps": CUR["steps"], "base_psnr": p0, "cands": {}}
    (b, bc) = base_errors
    plan = {"best": (0.5, 1.0), "last": (0.5, 1.0), "ema0.98": (1.0,), "ema0.99": (1.0,), "uniform": (1.0, 0.5),
            "tail_half": (1.0, 0.5)}
    if os.environ.get("EXP_PLAN") == "short":
        plan = {"best": (0.5,), "uniform": (1.0, 0.5), "tail_half": (0.5,)}
    if os.environ.get("EXP_PLAN") == "alpha":  # session 23: how far towards the second-half average to publish
        plan = {"tail_half": (0.5, 0.625, 0.75, 0.875, 1.0)}
    if "vals" in CUR:  # each validation's best so far, half way: what a run stopped there would publish
        res["vals"] = CUR["vals"]
        if os.environ.get("EXP_CURVE"):  # and the real change of every validation's weights, half way (an oracle)
            for v, w in zip(res["vals"], CUR["snaps"]):
                m, _ = memnet.load_model("microscopy")
                m.eval()
                sd = m.state_dict()
                with torch.no_grad():
                    for k, s0, x1 in zip(keys, start, w):
                        sd[k].copy_(s0 + 0.5 * (x1 - s0))
                v["real@0.5"] = psnr(affine_fit(predictor(m)(xn), cl), cl) - p0
        for j, w in enumerate([] if os.environ.get("EXP_NO_BESTS") else CUR.get("bests", [])[:-1]):  # last: "best"
            cands[f"best{j}"] = w
            plan[f"best{j}"] = (0.5,)
    for name, w in cands.items():
        for a in plan.get(name, ()):
            m, _ = memnet.load_model("microscopy")
            m.eval()
            sd = m.state_dict()
            with torch.no_grad():
                for k, s, v in zip(keys, start, w):
                    sd[k].copy_(s + a * (v - s))
            n, nc = held_out.errors(m, dev)
            d = ft.publish_decision(b, n, z=cfg.z, criterion=held_out.mode.decide_by or held_out.mode.criterion,
                                    check=None if bc is None else (bc, nc), check_name=held_out.mode.check,
                                    min_gain=held_out.mode.min_gain_db)
            pred = predictor(m)(xn)
            real = psnr(affine_fit(pred, cl), cl) - p0
            # what an integer output file keeps: the prediction clipped to the input's range
            real_clip = psnr(affine_fit(np.clip(pred, xn.min(), xn.max()), cl), cl) - p0c
            res["cands"][f"{name}@{a:g}"] = {"real": real, "real_clip": real_clip, "decision": d.as_dict()}
            if os.environ.get("EXP_ERRORS"):  # per-crop held-out errors, to replay any choice between candidates
                res["cands"][f"{name}@{a:g}"]["errors"] = [np.asarray(n).tolist(),
                                                           None if nc is None else np.asarray(nc).tolist()]
                res["base_errors"] = [np.asarray(b).tolist(), None if bc is None else np.asarray(bc).tolist()]
            print(CUR["name"], f"{name}@{a:g}", f"real {real:+.3f} clipped {real_clip:+.3f}", d.summary(), flush=True)
    (OUT / f"{CUR['name']}.json").write_text(json.dumps(res, indent=1))
    return orig_publish(cfg, state, run, out_path, info, baseline, log, held_out, base_errors, dev, tail)


orig_start = ft._starting_model


def starting(cfg, dev):
    model, info = orig_start(cfg, dev)
    CUR.setdefault("model", model)
    return model, info


ft.fit, ft._publish, ft._starting_model = tracked_fit, publish, starting
for i, (name, n, c) in enumerate(rows):
    if i % nparts != part or (OUT / f"{name}.json").exists():
        continue
    CUR.clear()
    CUR.update(name=name, x=tifffile.imread(n).astype(np.float64), c=tifffile.imread(c).astype(np.float64))
    if CLIP:  # the same noisy image re-rendered to 8 bits with a display range that clips it; the reference unchanged
        lo, hi = np.percentile(CUR["x"], CLIP)
        CUR["x"] = np.round(np.clip((CUR["x"] - lo) / (hi - lo) * 255, 0, 255))
    if CENSOR:  # the clip values in the normalised units the fine-tune trains in
        xn = percentile_normalize(CUR["x"])
        for key, v, on in (("hi", CUR["x"].max(), True), ("lo", CUR["x"].min(), CENSOR == "both")):
            if on and np.mean(CUR["x"] == v) >= 0.005:
                CUR[key] = float(xn[CUR["x"] == v][0]) - 1e-6 * (1 if key == "hi" else -1)
        print(name, "censored", CUR.get("lo"), CUR.get("hi"), flush=True)
    # patience 5 and the best checkpoint: the product's defaults until session 22 (this script scores the averages)
    cfg = ft.FinetuneConfig(model="microscopy", mode=MODE, name=f"exp-{name}", device="cpu", patience=PATIENCE or 5,
                            seed=int(os.environ.get("EXP_SEED", 0)),
                            weights="best", minutes=float(os.environ.get("EXP_MINUTES", 3)), overwrite=True,
                            publish="always")
    t0 = time.time()
    try:
        ft.finetune(cfg, CUR["x"].astype(np.float32), target=CUR["c"].astype(np.float32) if MODE == "paired" else None,
                    log=lambda s: None)
    except ft.NotImproved as e:
        print(name, "not improved", e, flush=True)
    print(name, "done", round(time.time() - t0), flush=True)
