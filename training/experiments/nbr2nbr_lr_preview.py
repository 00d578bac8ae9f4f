"""Preview (session 25): nbr2nbr at another lr (argv[1]) through bench/ood_microscopy.py, on a subset of W2S fields
of view (env W2S_FOVS, e.g. "33 35 38 40"); the remaining arguments go to the bench. Run from the repository root."""

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

import memnet.evaluate as ev  # noqa: E402
from memnet.finetune_modes import Nbr2Nbr  # noqa: E402

Nbr2Nbr.lr = float(sys.argv[1])
fovs = [int(f) for f in os.environ.get("W2S_FOVS", "").split()]
if fovs:  # the bench imports w2s_pairs by name when it runs, so this replaces it there
    orig = ev.w2s_pairs
    ev.w2s_pairs = lambda root, _fovs, channels=(0, 1, 2): orig(root, fovs, channels)
sys.argv = ["ood_microscopy.py"] + sys.argv[2:]
runpy.run_path(str(ROOT / "bench" / "ood_microscopy.py"), run_name="__main__")
