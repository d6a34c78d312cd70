#!/usr/bin/env bash
# GPU speed, ours against diffusers on the same UNet: `paper` training and DDIM-50 sampling
# throughput in bf16 at batch 16 and 256, peak memory, one GPU. Sized to finish in under 8
# minutes on an NVIDIA H200 (about 2 minutes of work there, the rest is margin).
#
#   bash bench/gpu.sh            # anywhere with CUDA PyTorch and this project installed
#
# On the lent GPU machine (the `device` tool), which has PyTorch but not diffusers or pydantic:
# run `bash bench/gpu_wheels.sh` here once, then `run` with carry [".whl"] and the command
# `bash bench/gpu.sh`; the JSON lands in $OUT. Figures go in bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import diffusers, pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/protomed-site .whl/*.whl
  export PYTHONPATH=/tmp/protomed-site${PYTHONPATH:+:$PYTHONPATH}
fi
DEST=${OUT:-bench/results}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
timeout "${GPU_BENCH_TIMEOUT:-450}" "$PY" -m bench.speed --device "${DEVICE:-cuda}" \
  --presets ${PRESETS:-paper} --precisions bf16 --batch-sizes ${BATCHES:-16 256} \
  --repeats "${REPEATS:-3}" --train-steps "${TRAIN_STEPS:-10}" --steps "${STEPS:-50}" \
  --out "$DEST/speed_gpu.json" 2>&1 | tee "$DEST/speed_gpu.log"
