#!/usr/bin/env bash
# One command for a GPU machine, run from the repository root (needs no install: PYTHONPATH=.):
#   bash benchmarks/gpu_check.sh            # GPU tests + released-size benchmark, under 8 minutes
#   bash benchmarks/gpu_check.sh --quick    # shorter benchmark (~2 min)
# Extra arguments go to benchmarks/gpu_scoring.py. Figures: $OUT/gpu_check.json (or benchmarks/results/).
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-benchmarks/results}"
mkdir -p "$OUTDIR"
start=$(date +%s)

echo "== [gpu_check] environment"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'transformers', transformers.__version__)"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv 2>/dev/null || true

echo "== [gpu_check] tests: tests/gpu (marked gpu) + tests/test_kernels.py (CPU parity incl. Triton interpreter)"
if $PY -c "import pytest" 2>/dev/null; then
  timeout 110 $PY -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/gpu tests/test_kernels.py \
    2>&1 | tee "$OUTDIR/gpu_tests.log" | tail -25
  echo "[gpu_check] pytest exit status: ${PIPESTATUS[0]}"
else
  echo "[gpu_check] pytest is not installed here: tests skipped (the benchmark's parity and kernels stages still"
  echo "            compare the GPU kernels and the packed path with their references)"
fi

echo "== [gpu_check] benchmark (released architecture, random weights)"
timeout 370 $PY benchmarks/gpu_scoring.py --total-limit 300 --out "$OUTDIR/gpu_check.json" "$@"
echo "[gpu_check] benchmark exit status: $?"
echo "[gpu_check] figures: $OUTDIR/gpu_check.json; total $(( $(date +%s) - start )) s"
