"""Peak memory of one forward pass against the estimate `memnet.memory.batch_peak_bytes` (issue #32, item 6).

  python bench/window_memory.py                       # a few configs, windows and backends on the CPU
  python bench/window_memory.py --configs 4,4,64 --windows 512 --backends eager onnxruntime

Each case runs in a fresh process: build the model and its backend, note the peak RSS, run one batch of
windows, and print the growth of the peak RSS (what the batch itself needed) next to the estimate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch, memnet
from memnet.inference import make_backend
m, r, c, win, batch, backend = sys.argv[1:7]
torch.manual_seed(0)
net = memnet.MemNet(int(m), int(r), int(c)).eval()
fwd, name = make_backend(net, torch.device("cpu"), backend)
x = torch.rand(int(batch), 1, int(win), int(win))
if not name.startswith("onnxruntime"):
    x = x.contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    fwd(torch.rand(1, 1, 32, 32))  # warm: lazy initialisation is not the batch's memory
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fwd(x)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"backend": name, "grew_mb": (peak - base) / 1024, "base_mb": base / 1024}))
"""


def main() -> None:
    from memnet.memory import batch_peak_bytes
    from memnet.model import MemNetConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["4,4,32", "4,4,64", "6,6,64"])
    ap.add_argument("--windows", nargs="+", type=int, default=[256, 512])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--backends", nargs="+", default=["eager", "onnxruntime"])
    a = ap.parse_args()
    print(f"{'model':<9} {'window':>6} {'batch':>5} {'backend':<12} {'measured MB':>11} {'estimate MB':>11} "
          f"{'ratio':>6}")
    for cfg in a.configs:
        m, r, c = map(int, cfg.split(","))
        for w in a.windows:
            for be in a.backends:
                res = subprocess.run([sys.executable, "-c", CHILD, str(m), str(r), str(c), str(w), str(a.batch), be],
                                     capture_output=True, text=True, env={"OMP_NUM_THREADS": "2",
                                                                          **__import__("os").environ})
                if res.returncode:
                    print(f"M{m}R{r}C{c} {w} {be}: failed: {res.stderr.strip().splitlines()[-1]}")
                    continue
                got = json.loads(res.stdout.strip().splitlines()[-1])
                est = batch_peak_bytes(MemNetConfig(m, r, c), (w, w), a.batch, got["backend"]) / 2**20
                print(f"M{m}R{r}C{c:<3} {w:>6} {a.batch:>5} {got['backend']:<12} {got['grew_mb']:>11.0f} "
                      f"{est:>11.0f} {got['grew_mb'] / est:>6.2f}")


if __name__ == "__main__":
    main()
