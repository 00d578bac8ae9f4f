#!/bin/bash
set -o pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
python3 -m memnet.cli train --task denoise --data .gpudata/Train400 --val-root .gpudata \
  --init .gpudata/c64gpu.safetensors --batch 128 --lr 3e-4 --warmup 200 --steps ${STEPS:-3200} \
  --val-every 850 --hours ${HOURS:-0.05} --loss psnr --name denoise-M4R4C64 --out $OUT/run 2>&1 | tee $OUT/train.log
