"""Start-up in numbers: each case in a fresh process, several times; wall time, peak RSS and whether torch loaded.

    taskset -c 1 python bench/startup.py            # --runs 5
    PYTHONPATH=other/src python bench/startup.py    # another version of memnet, same conditions

Cases: `memnet --help`; `import memnet.engine`; the first `memnet.restore` of a 96 x 96 uint16 image with the
`microscopy` model in a new process, with the ONNX graph cache warm (a later session) and cold (the first run
ever: the graph is written). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPORT = "import resource, sys; print('torch' in sys.modules, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
CASES = {
    "memnet --help": "import sys; sys.argv = ['memnet', '--help']\nimport memnet.cli\ntry:\n    memnet.cli.main()\n"
                     "except SystemExit:\n    pass\n",
    "import memnet.engine": "import memnet.engine\n",
    "first restore, 96², cache warm": "import numpy as np, memnet\n"
                                      "memnet.restore(np.zeros((96, 96), np.uint16), 'microscopy')\n",
}
CASES["first restore, 96², cache cold"] = CASES["first restore, 96², cache warm"]


def run(code: str, env: dict) -> tuple[float, bool, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code + REPORT], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    torch, rss = r.stdout.split()[-2:]
    return dt, torch == "True", int(rss) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="memnet-startup-") as d:
        warm = {**os.environ, "MEMNET_CACHE_DIR": os.path.join(d, "warm")}
        run(CASES["first restore, 96², cache warm"], warm)  # fills the warm cache
        print(f"{'case':34s} {'median s':>8s} {'min-max s':>12s} {'peak RSS MiB':>12s} {'torch':>6s}")
        for name, code in CASES.items():
            times, rss, torch = [], [], set()
            for i in range(args.runs):
                env = warm if "cold" not in name else {**os.environ, "MEMNET_CACHE_DIR": os.path.join(d, f"cold{i}")}
                dt, t, m = run(code, env)
                times.append(dt)
                rss.append(m)
                torch.add(t)
            print(f"{name:34s} {np.median(times):8.2f} {min(times):5.2f}-{max(times):<6.2f} {np.median(rss):12.0f} "
                  f"{'/'.join(map(str, sorted(torch))):>6s}", flush=True)


if __name__ == "__main__":
    main()
