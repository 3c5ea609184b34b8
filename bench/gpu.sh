#!/usr/bin/env bash
# Benchmark 5: training throughput on one NVIDIA GPU (H100/H200: under 8 minutes), table on stdout.
#
#   bash bench/gpu.sh [--batch 32] [--steps 30] [--workers N] [--out DIR]
#
# Uses $PYTHON, else .venv/bin/python, else python3. Needs torch with CUDA, torchvision, opencv,
# scikit-learn and webdataset (see setup.cfg). Exit status: 0 floors met, 1 a floor missed,
# 3 no CUDA GPU, 124 over the time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "bench/gpu.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False)." >&2
    echo "Run it on a machine with one NVIDIA GPU; the CPU benchmarks are: python -m bench" >&2
    exit 3
fi
missing=$("$PY" -c 'import importlib.util as u
print(" ".join(m for m in ("webdataset", "cv2", "sklearn", "torchvision") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
    echo "bench/gpu.sh: $PY lacks: $missing (pip install -e . installs them)" >&2
    exit 3
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
    --format=csv 2>/dev/null || true
exec timeout "${BENCH_GPU_TIMEOUT:-470}" "$PY" -m bench.gpu "$@"
