#!/usr/bin/env bash
# Serving checks on a GPU machine (~7 min): the planner's prediction against a real
# server and the engine server against the offline engine, on a quiet many-core host.
# From the repo root, with the project's pure-Python deps importable (fastapi, uvicorn, ...):
#   bash benchmarks/gpu_serving_check.sh
# One after the other, so that nothing else runs beside a measurement:
#   D) validate_perf.py on CUDA (random-weight SmolLM2-135M): the GPU profile measured, then
#      predicted vs measured at three rates;
#   A) validate_perf.py on the CPU (the tiny Llama), likewise;
#   B) serve.py on the CPU (tiny Llama): server / offline throughput;
#   C) serve.py on CUDA (random-weight SmolLM2-135M): server / offline throughput.
# The validations pin the client to one CPU and the engine to another, of different physical
# cores. Logs, profiles and the validation dumps (per-request times and step logs) land in
# $OUT (or /tmp/skybroker_gpu). Each step has a timeout and reports its outcome.
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup gpu_serving_check.log
SMOL="$MODELS/SmolLM2-135M-Instruct"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c 'import torch, fastapi, uvicorn, pydantic; print("torch", torch.__version__,
"fastapi", fastapi.__version__, "uvicorn", uvicorn.__version__, "pydantic", pydantic.VERSION)' || exit 1
read -r C0 C1 < <($PY -c '
import os
def core(c):
    t = f"/sys/devices/system/cpu/cpu{c}/topology/"
    try:
        return tuple(open(t + f).read().strip() for f in ("physical_package_id", "core_id"))
    except OSError:
        return (str(c),)
firsts = list({core(c): c for c in sorted(os.sched_getaffinity(0), reverse=True)}.values())
print(firsts[-1], firsts[-2])')
echo "pinned runs: client on CPU $C0, engine on CPU $C1"

step "random SmolLM2-135M" 120 $PY benchmarks/random_model.py SmolLM2-135M-Instruct "$MODELS" \
  --device cuda
# the random model's tokenizer is the tests' small one: prompts are drawn below its vocabulary
VOCAB=$($PY -c "from engine.tokenizer import EngineTokenizer as T
print(T.from_pretrained('$SMOL').vocab_size)")
# ~40 s per light-rate run of 120 requests (the GPU engine is host-bound: ~17 req/s saturated)
step "D: validate_perf on CUDA" "${T_D:-240}" $PY benchmarks/validate_perf.py --device cuda \
  --model "$SMOL" --vocab-size "$VOCAB" --measure-profile --pin "$C0,$C1" --runs 2 --repeats 3 \
  --num-prompts 120 \
  --profile "$RESULTS/smollm2-135m-random-gpu.json" --dump "$RESULTS/validate_gpu.json"
step "A: validate_perf on the CPU" "${T_A:-150}" $PY benchmarks/validate_perf.py --device cpu \
  --measure-profile --pin "$C0,$C1" --runs 3 --repeats 3 \
  --profile "$RESULTS/tiny-llama-cpu-host.json" --dump "$RESULTS/validate_cpu.json"
step "B: serve.py, CPU engine" "${T_B:-90}" $PY benchmarks/serve.py --device cpu \
  --num-prompts 128 --request-rate inf --repeats 3
step "C: serve.py, CUDA engine" "${T_C:-110}" $PY benchmarks/serve.py --device cuda \
  --model "$SMOL" --vocab-size "$VOCAB" --num-prompts 256 --max-num-seqs 64 \
  --request-rate inf --repeats 3
echo "=== done: status $STATUS; results in $RESULTS"
