#!/usr/bin/env bash
# GPU check of the kernels: run from the repo root on a CUDA machine, `bash benchmarks/gpu_check.sh`.
# 1) finds a python with torch + triton (tries pip only if they are missing), 2) runs the kernel
# tests on CUDA (pytest, or the benchmark's correctness section without pytest), 3) runs
# benchmarks/kernels_attention.py (correctness, decode HBM fraction, prefill vs SDPA).
# Every step prints its own failure and the script goes on. Results go to $OUT (or /tmp).
# Whole script: a few minutes (each step has a timeout).
set -u
cd "$(dirname "$0")/.."
RESULTS="${OUT:-/tmp/skybroker_gpu_check}"
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=4 PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET SKYBROKER_KERNELS

source benchmarks/gpu_lib.sh

step "nvidia-smi" 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

PY=""
for cand in "${PYTHON:-}" .venv/bin/python python3 python; do
  [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 || continue
  if "$cand" -c 'import torch, triton' >/dev/null 2>&1; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
  PY=python3
  echo "torch/triton not importable: trying pip (may be impossible offline)"
  step "pip install torch triton" 240 $PY -m pip install -q torch triton numpy
fi
step "versions" 120 $PY -c '
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
' || echo "no usable torch+triton+CUDA: later steps will fail"

if $PY -c 'import pytest' >/dev/null 2>&1 || step "pip install pytest" 60 $PY -m pip install -q pytest; then
  # On CUDA the Triton tests run compiled in-process (no interpreter child).
  step "kernel tests on CUDA (pytest)" 240 $PY -m pytest -q -p no:cacheprovider \
    -o addopts="" tests/test_kernels_triton.py tests/test_kernels_reference.py \
    --junitxml="$RESULTS/kernel_tests.xml"
else
  echo "no pytest: the benchmark's correctness section below is the CUDA correctness check"
fi

step "benchmark (correctness + decode bandwidth + prefill vs SDPA)" 300 \
  $PY benchmarks/kernels_attention.py --device cuda ${HBM_GBS:+--hbm-gbs $HBM_GBS} \
  --json "$RESULTS/kernels_attention.json"

echo "=== done: status $STATUS; results in $RESULTS"
exit $STATUS
