#!/usr/bin/env bash
# The GPU suite in one command (see bench/gpu_suite.py): on the GPU machine, from the repository root,
# with a CUDA build of torch already installed. Results go to $OUT/gpu_suite (or out/gpu_suite).
# Installs the project (no dependencies beyond what is there, so a pinned CUDA torch stays) and
# monai for the peer row if pip can reach it; then runs, under a 5-minute limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || { echo "gpu_suite: torch is not installed for $PY" >&2; exit 2; }
"$PY" -m pip install -q --no-deps -e . >/dev/null 2>&1 || true
"$PY" -c "import memnet" || { echo "gpu_suite: cannot import memnet (pip install -e . failed)" >&2; exit 2; }
"$PY" -c "import monai" 2>/dev/null || "$PY" -m pip install -q --no-deps monai >/dev/null 2>&1 || true
exec timeout 300 "$PY" bench/gpu_suite.py "$@"
