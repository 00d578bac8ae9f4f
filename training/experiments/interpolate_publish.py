# Session 18 experiment (issue #35), kept for the record: paths are this machine's (/work/...).
# Written for the code before `interpolate` (7038f18): with it, `_publish` interpolates as well.
# Run: two processes, `python interpolate_publish.py 0 2` and `... 1 2`, one pinned core each.
"""#35: is the candidate's midpoint with the starting weights safer? Fine-tune (auto, publish always, 3 min),
then per alpha in (0.25, 0.5, 0.75, 1): interpolated weights' decision on the held-out crops and real change."""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

os.environ.setdefault("MEMNET_MODEL_DIR", f"/work/exp35/models{sys.argv[1]}")
import memnet
import memnet.finetune as ft
from memnet.evaluate import ood_pairs, percentile_normalize, predictor, w2s_pairs
from memnet.metrics import affine_fit, psnr

torch.set_num_threads(1)
OUT = Path("/work/exp35/interp")
ROOT = Path("/work/shared/data")
rows = [
    ("W2S_" + n.stem.replace("input_avg1_", ""), n, c)
    for n, c in w2s_pairs(ROOT / "W2S_train_8bit", range(31, 41), [1])
]
rows += [(n.stem, n, c) for n, c in ood_pairs(ROOT / "microscopy_ood")]
part, nparts = int(sys.argv[1]), int(sys.argv[2])
base, _ = memnet.load_model("microscopy")
base.eval()
CUR = {}
orig = ft._publish


def pub(cfg, state, run, out_path, info, baseline, log, held_out, base_errors, dev):
    cand, _ = memnet.load_model(run.best)
    cand.eval()
    x, cl = CUR["x"], CUR["c"]
    xn = percentile_normalize(x)
    p0 = psnr(affine_fit(predictor(base)(xn), cl), cl)
    res = {"image": CUR["name"], "mode": held_out.mode.name, "base_psnr": p0, "alphas": {}}
    sb, sc = base.state_dict(), cand.state_dict()
    (b, bc) = base_errors
    for a in (0.25, 0.5, 0.75, 1.0):
        m, _ = memnet.load_model("microscopy")
        m.eval()
        m.load_state_dict({k: (sb[k] + a * (sc[k] - sb[k])) if sb[k].is_floating_point() else sc[k] for k in sb})
        n, nc = held_out.errors(m, dev)
        d = ft.publish_decision(
            b,
            n,
            z=cfg.z,
            criterion=held_out.mode.decide_by or held_out.mode.criterion,
            check=None if bc is None else (bc, nc),
            check_name=held_out.mode.check,
        )
        out = predictor(m)(xn)
        res["alphas"][a] = {"real": psnr(affine_fit(out, cl), cl) - p0, "decision": d.as_dict()}
        print(CUR["name"], a, f"real {res['alphas'][a]['real']:+.3f}", d.summary(), flush=True)
    (OUT / f"{CUR['name']}.json").write_text(json.dumps(res, indent=1))
    return orig(cfg, state, run, out_path, info, baseline, log, held_out, base_errors, dev)


ft._publish = pub
for i, (name, n, c) in enumerate(rows):
    if i % nparts != part or (OUT / f"{name}.json").exists():
        continue
    CUR.update(name=name, x=tifffile.imread(n).astype(np.float64), c=tifffile.imread(c).astype(np.float64))
    cfg = ft.FinetuneConfig(
        model="microscopy", mode="auto", name=f"exp-{name}", minutes=3, device="cpu", overwrite=True, publish="always"
    )
    t0 = time.time()
    try:
        ft.finetune(cfg, CUR["x"].astype(np.float32), log=lambda s: None)
    except ft.NotImproved as e:
        print(name, "not improved", e, flush=True)
    print(name, "done", round(time.time() - t0), flush=True)
