#!/bin/bash
# Device run: measure training throughput, size a cosine to the time budget, train denoise M4R4C48 on from step 7,342.
set -o pipefail
PY=${PY:-python3}; FIT=${FIT:-420}; HOURS=${HOURS:-0.13}; BATCHES=${BATCHES:-"128 256 64"}
export PYTHONPATH=$PWD/src:$PWD/bench PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee $OUT/gpu.txt
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" | tee -a $OUT/gpu.txt
$PY bench/train_throughput.py --arch M4R4C48 --batch $BATCHES --warmup ${BW:-15} --steps ${BS:-40} --fit-seconds $FIT 2>&1 | tee $OUT/bench.txt
STEPS=$(grep -o 'STEPS=[0-9]*' $OUT/bench.txt | cut -d= -f2); STEPS=${STEPS:-20000}
echo "training for $STEPS steps"
$PY -m memnet.cli train --task denoise --data .gpudata/Train400 --val-root .gpudata \
  --init training/denoise-c48-run/best.safetensors --batch ${B:-128} --lr 3e-4 --warmup ${WU:-300} --steps $STEPS \
  --val-every $((STEPS / 6 + 1)) --hours $HOURS --loss psnr --name denoise-M4R4C48 --out $OUT/run 2>&1 | tee $OUT/train.log
ls -la $OUT/run
