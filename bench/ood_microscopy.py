"""Microscopy models on microscopes they never saw: every image of ../shared/data/microscopy_ood, and
W2S 031-040 (channels 0-2) as the in-distribution check. Prints one markdown row per image: the noisy
input, BM3D at its best-case sigma (with --bm3d, needs `pip install bm3d`), then each model, with the
seconds each took. Scored like W2S: percentile-normalised input, least-squares affine fit of the result
to the clean image, PSNR peak 255. The rcan_* targets are deconvolved high-SNR images: compare rows,
not absolute values.

--finetune MODE...: for every OOD image, `memnet finetune` of the first model on that image alone for
--minutes (one thread), as a user would; the cell is what the user then has: the published model's
result, or the starting model's (marked *) when the fine-tune did not beat it on held-out data and
nothing was published. --careamics FILE adds CAREamics N2V trained on each image alone for the same
minutes (the JSON lines of bench/careamics_n2v.py, run in its own venv).

  python bench/ood_microscopy.py --data-root ../shared/data --models microscopy runs/x/best.safetensors
  python bench/ood_microscopy.py --data-root ../shared/data --models microscopy --backends onnxruntime-int8
  python bench/ood_microscopy.py --data-root ../shared/data --no-w2s --finetune nbr2nbr n2v2 --minutes 3 \
      --careamics careamics.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from _common import machine

import memnet
from memnet.evaluate import ood_pairs, percentile_normalize, predictor, w2s_pairs
from memnet.metrics import affine_fit, psnr


def _bm3d(noisy: np.ndarray, clean: np.ndarray) -> np.ndarray:
    import bm3d

    sigma = float(np.std(noisy - affine_fit(clean, noisy)))  # best case: the true noise level
    return bm3d.bm3d(noisy, sigma_psd=sigma)


def _finetuned(base: str, mode: str, minutes: float, kept: set, decisions: dict, amp: str = "auto", seed: int = 0):
    """A method: fine-tune ``base`` on the image itself, then restore it with whatever the user ends with.
    ``decisions[name]``: the publish decision (criterion gain ± SE), the mode that ran, and the real PSNR of
    the starting model and of the candidate (scored even when it was not published)."""
    from memnet.finetune import FinetuneConfig, NoiseCorrelated, NotImproved, finetune
    from memnet.zoo import user_model_dir

    base_model, _ = memnet.load_model(base)

    def run(x, c, name):
        cfg = FinetuneConfig(model=base, mode=mode, name=f"bench-{mode}-{name}", minutes=minutes, device="cpu",
                             overwrite=True, amp=amp, seed=seed)
        logs = []
        try:
            path = finetune(cfg, x.astype(np.float32), log=logs.append)
            model, _ = memnet.load_model(path)
            d = path.decision
        except NotImproved as e:  # the user keeps the starting model
            kept.add(name + (" (noise check)" if isinstance(e, NoiseCorrelated) else ""))
            model, d = base_model, e.decision
        xn = percentile_normalize(x)
        rec = {"decision": None if d is None else d.as_dict(),
               "mode": next((ln.split("mode ")[1].split(" ")[0] for ln in logs if ln.startswith("auto: ")), mode),
               "base_psnr": psnr(affine_fit(predictor(base_model)(xn), c), c)}
        cand, judged = (user_model_dir() / ".runs" / cfg.name / f for f in ("best.safetensors", "judged.safetensors"))
        # The run's best checkpoint, and the model the decision judged (the average or the checkpoint moved
        # `interpolate` of the way from the starting weights: the published one when published).
        if d is not None and cand.exists():
            ckpt = memnet.load_model(cand)[0]
            rec["checkpoint_psnr"] = psnr(affine_fit(predictor(ckpt)(xn), c), c)
            judged_model, judged_info = memnet.load_model(judged)
            rec["candidate_psnr"] = psnr(affine_fit(predictor(judged_model)(xn), c), c)
            rec["interpolate"] = judged_info.metadata["finetune"]["interpolate"]  # the fraction of the way judged
        decisions[name] = rec
        return predictor(model)(xn)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--models", nargs="+", default=["microscopy"], help="zoo names or .safetensors paths")
    ap.add_argument("--bm3d", action="store_true", help="add BM3D at its best-case sigma (slow)")
    ap.add_argument("--no-w2s", action="store_true", help="skip W2S 031-040")
    ap.add_argument("--no-ood", action="store_true", help="skip microscopy_ood")
    ap.add_argument("--w2s-channels", type=int, nargs="+", default=[0, 1, 2], help="W2S channels [0 1 2]")
    ap.add_argument("--finetune-w2s", action="store_true", help="fine-tune on each W2S image too")
    ap.add_argument("--finetune", nargs="*", default=[], metavar="MODE",
                    help="self-supervised fine-tune of the first model on each OOD image alone")
    ap.add_argument("--minutes", type=float, default=3.0, help="fine-tuning budget per image [3]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    ap.add_argument("--seed", type=int, default=0, help="the fine-tunes' seed: held-out crops and patches [0]")
    ap.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                    help="fine-tuning's mixed precision, as `memnet finetune --amp` [auto]")
    ap.add_argument("--backends", nargs="+", default=[], metavar="BACKEND",
                    help="also run each model on these restore backends (e.g. onnxruntime onnxruntime-int8)")
    ap.add_argument("--backends-only", action="store_true", help="with --backends: no column for the module itself")
    ap.add_argument("--careamics", help="JSON lines of bench/careamics_n2v.py (same threads)")
    ap.add_argument("--careamics-minutes", type=float, help="the minutes CAREamics trained [--minutes]")
    ap.add_argument("--save", help="also write the per-image scores as JSON here")
    ap.add_argument("--images", nargs="*", help="only these microscopy_ood names (default: all)")
    ap.add_argument("--save-outputs", metavar="DIR",
                    help="also write each method's restored image as DIR/<method>/<image>.tif (float32)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MEMNET_MODEL_DIR", tempfile.mkdtemp(prefix="memnet-bench-"))  # never the user's models
    root = Path(args.data_root)
    methods = {"noisy": lambda x, c: x}
    if args.bm3d:
        methods["BM3D best σ"] = lambda x, c: _bm3d(x, c)
    for spec in args.models:
        model, info = memnet.load_model(spec)
        pred = predictor(model)
        label = info.name if spec == info.name or not spec.endswith(".safetensors") else f"{info.name} ({spec})"
        if not (args.backends and args.backends_only):
            methods[label] = lambda x, c, pred=pred: pred(percentile_normalize(x))
        for b in args.backends:
            bpred = predictor(model, backend=b)
            methods[f"{label} [{b}]"] = lambda x, c, pred=bpred: pred(percentile_normalize(x))
    kept = {m: set() for m in args.finetune}
    decisions = {m: {} for m in args.finetune}
    for mode in args.finetune:
        methods[f"+ {mode} {args.minutes:g} min"] = _finetuned(args.models[0], mode, args.minutes, kept[mode],
                                                               decisions[mode], args.amp, args.seed)
    if args.careamics:
        methods[f"CAREamics N2V {args.careamics_minutes or args.minutes:g} min"] = None  # read at the end
    rows = [] if args.no_ood else [(n.stem, n, c) for n, c in ood_pairs(root / "microscopy_ood")
                                   if not args.images or n.stem in args.images]
    if not args.no_w2s:
        rows += [("W2S " + n.stem.replace("input_avg1_", ""), n, c)
                 for n, c in w2s_pairs(root / "W2S_train_8bit", range(31, 41), args.w2s_channels)]
    scores = {m: {} for m in methods}
    secs = {m: 0.0 for m in methods}
    for name, n, c in rows:
        noisy = tifffile.imread(n).astype(np.float64)
        clean = tifffile.imread(c).astype(np.float64)
        for m, fn in methods.items():
            if fn is None or (m.startswith("+ ") and name.startswith("W2S") and not args.finetune_w2s):
                continue  # the peer comes from its own venv; per-image fine-tuning is for the other microscopes
            t0 = time.perf_counter()
            res = fn(noisy, clean, name) if m.startswith("+ ") else fn(noisy, clean)
            secs[m] += time.perf_counter() - t0
            scores[m][name] = psnr(affine_fit(res, clean), clean)
            if args.save_outputs:  # for other measures of the same outputs (training/experiments/curve_free_psnr.py)
                out = Path(args.save_outputs) / re.sub(r"[^A-Za-z0-9.+-]+", "_", m).strip("_")
                out.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(out / f"{name.replace(' ', '_')}.tif", np.asarray(res, np.float32))
        said = [f"{mode}: {r['mode']} {'published' if r['decision'] and r['decision']['published'] else 'kept'}"
                + (f" {r['decision']['gain']:+.3f} ± {r['decision']['se']:.3f}" if r["decision"] else "")
                for mode, recs in decisions.items() for r in [recs.get(name)] if r]
        print(f"# {name}: " + ", ".join(f"{m} {scores[m][name]:.2f}" for m in methods if name in scores[m])
              + "".join(f"; {d}" for d in said), file=sys.stderr, flush=True)
    if args.careamics:  # read now: the peer may have been running beside this script
        m = f"CAREamics N2V {args.careamics_minutes or args.minutes:g} min"
        lines = [ln for ln in Path(args.careamics).read_text().splitlines() if ln.startswith("{")]  # skip its logs
        for r in map(json.loads, lines):
            scores[m][r["image"]] = r["psnr"]
            secs[m] += r["train_s"] + r["predict_s"]
    _table(methods, scores, secs, rows, kept)
    for mode, recs in decisions.items():
        _decisions(mode, recs, scores.get(f"CAREamics N2V {args.careamics_minutes or args.minutes:g} min", {}))
    if args.save:
        Path(args.save).write_text(json.dumps({"scores": scores, "seconds": secs, "decisions": decisions,
                                               "kept": {k: sorted(v) for k, v in kept.items()}}, indent=1))


def _table(methods, scores, secs, rows, kept) -> None:
    print(f"# {machine()}")
    print("| image | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    ood = [r[0] for r in rows if not r[0].startswith("W2S")]
    w2s = [r[0] for r in rows if r[0].startswith("W2S")]

    def cell(m, k):
        if k not in scores[m]:
            return "—"
        star = "*" if any(k in {n.split(" ")[0] for n in names} for mode, names in kept.items()
                          if m.startswith(f"+ {mode} ")) else ""
        return f"{scores[m][k]:.2f}{star}"

    for k in ood:
        print(f"| {k} | " + " | ".join(cell(m, k) for m in methods) + " |")
    if ood:
        print("| **OOD mean** | " + " | ".join(
            f"**{np.mean([scores[m][k] for k in ood]):.2f}**" if all(k in scores[m] for k in ood) else "—"
            for m in methods) + " |")
    if w2s:
        print(f"| W2S 031-040 mean ({len(w2s)}) | " + " | ".join(
            f"{np.mean([scores[m][k] for k in w2s]):.2f}" if all(k in scores[m] for k in w2s) else "—"
            for m in methods) + " |")
    print("| seconds (all rows) | " + " | ".join(f"{secs[m]:.0f}" for m in methods) + " |")
    first = next(m for m in methods if m not in ("noisy", "BM3D best σ"))
    for m in list(methods)[list(methods).index(first) + 1:]:
        common = [k for k in ood + w2s if k in scores[m]]
        ahead = sum(scores[m][k] > scores[first][k] for k in common)
        print(f"# {m}: ahead of {first} on {ahead}/{len(common)} images")
    for mode, names in kept.items():
        print(f"# {mode}: * = not published, the starting model kept: {len(names)}/{len(ood) + len(w2s)} images: "
              + ", ".join(sorted(names)))


def _decisions(mode: str, recs: dict, peer: dict) -> None:
    """Per image: the mode that ran, the publish decision with the criterion's gain ± standard error, the real
    PSNR change of the run's best checkpoint and of the judged model (the average of the run's second half, or the
    checkpoint, moved `interpolate` of the way from the starting weights; published or not) and what the user ends
    with; then how well the criterion's gain tracks the judged model's real change."""
    print(f"\n# fine-tune {mode}: publish decisions (criterion gain on held-out crops) vs the real PSNR change")
    print("| image | mode | decision | criterion gain (dB) | checkpoint's real change (dB) | judged model's (dB) "
          "| user's change (dB) |" + (" vs CAREamics (dB) |" if peer else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if peer else ""))
    pairs = []
    for name, r in recs.items():
        d = r["decision"]
        real = r.get("candidate_psnr", r["base_psnr"]) - r["base_psnr"]
        mine = real if d and d["published"] else 0.0
        crit = "—" if d is None else f"{d['gain']:+.3f} ± {d['se']:.3f} ({d['crops']} crops)"
        what = "refused (noise check)" if d is None else ("published" if d["published"] else "kept start")
        what += f", {r['interpolate']:g} of the way" if "interpolate" in r else ""
        ahead = f" {r['base_psnr'] + mine - peer[name]:+.2f} |" if name in peer else (" — |" if peer else "")
        ckpt = f"{r['checkpoint_psnr'] - r['base_psnr']:+.2f}" if "checkpoint_psnr" in r else "—"
        print(f"| {name} | {r['mode']} | {what} | {crit} | {ckpt} | {real:+.2f} | {mine:+.2f} |{ahead}")
        if d is not None and "candidate_psnr" in r:
            pairs.append((d["gain"], real))
    if len(pairs) >= 3:
        g, t = np.array(pairs).T
        rank = np.corrcoef(np.argsort(np.argsort(g)), np.argsort(np.argsort(t)))[0, 1]
        print(f"# criterion gain vs real change over {len(pairs)} images: Pearson {np.corrcoef(g, t)[0, 1]:+.2f}, "
              f"Spearman {rank:+.2f}; sign agrees on {int(np.sum(np.sign(g) == np.sign(t)))}/{len(pairs)}")


if __name__ == "__main__":
    main()
