"""Stale-lock takeover race (issue #32, item 5): TRIALS outputs each with a stale lock (a dead pid),
TAKERS processes released together by a barrier race for each; prints how many trials had exactly one
winner. Usage: python bench/lock_race.py [TRIALS] [TAKERS]"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_outputs import dead_pid, plant_stale_lock, race  # noqa: E402

if __name__ == "__main__":
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    takers = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    with tempfile.TemporaryDirectory() as d:
        pid = dead_pid()
        outs = [Path(d) / f"o{i}.zarr" for i in range(trials)]
        for o in outs:
            plant_stale_lock(o, pid)
        t0 = time.perf_counter()
        got = race(outs, takers)
        wins = [r.count("won") for r in got.values()]
        other = sum(1 for r in got.values() for w in r if w not in ("won", "refused"))
        print(f"{trials} trials x {takers} concurrent takers of one stale lock: exactly one winner in "
              f"{wins.count(1)}, two or more in {sum(w > 1 for w in wins)}, none in {wins.count(0)}; "
              f"other errors {other}; {time.perf_counter() - t0:.1f} s")
