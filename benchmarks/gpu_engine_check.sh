#!/usr/bin/env bash
# GPU check of the engine, and a measured GPU profile for the planner, in one run (~8 min).
# From the repo root on a CUDA machine with torch, triton, transformers and safetensors:
#   bash benchmarks/gpu_engine_check.sh
# 1) benchmarks/engine_cuda.py: greedy parity with transformers (fp32) and bf16 tok/s vs HF;
# 2) a random-weight Llama-3.1-8B-Instruct (benchmarks/random_model.py) profiled with the GPU
#    grid (python -m engine.profile): the profile lands in $OUT (or /tmp/skybroker_gpu);
# 3) the kernel tests on CUDA, if time is left.
# Each step has a timeout, prints its own failure, and the script goes on.
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup gpu_engine_check.log 4

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
step "engine on CUDA: parity + throughput" "${T_ENGINE:-150}" $PY benchmarks/engine_cuda.py
step "random Llama-3.1-8B-Instruct" "${T_BUILD:-120}" \
  $PY benchmarks/random_model.py Llama-3.1-8B-Instruct "$MODELS" &&
  step "profile (GPU grid)" "${T_PROFILE:-240}" $PY -m engine.profile \
    --model "$MODELS/Llama-3.1-8B-Instruct" --dtype bfloat16 --grid gpu --repeats 3 \
    --no-serving --out "$RESULTS/llama-3.1-8b-gpu.json"
step "kernel tests on CUDA" "${T_KERNELS:-120}" $PY -m pytest -q -p no:cacheprovider \
  -o addopts="" tests/test_kernels_triton.py tests/test_kernels_reference.py
echo "=== done: status $STATUS; results in $RESULTS"
