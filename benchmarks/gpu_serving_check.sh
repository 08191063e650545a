#!/usr/bin/env bash
# Serving checks on a lent GPU machine (~6 min): the engine server against the offline engine
# (#7) and the planner's prediction against a real server (#10), on a quiet many-core host.
# From the repo root, with the project's pure-Python deps importable (fastapi, uvicorn, ...):
#   bash benchmarks/gpu_serving_check.sh
# In the background, on two CPUs of different physical cores (nothing else runs on them):
#   A) validate_perf.py on the CPU: the local profile measured, then predicted vs measured;
# on the other CPUs, one after the other:
#   B) serve.py on the CPU (tiny Llama): server / offline throughput;
#   C) serve.py on CUDA (random-weight SmolLM2-135M): server / offline throughput;
#   D) validate_perf.py on CUDA (same model): the GPU profile measured, then validated.
# Logs land in $OUT (or /tmp/skybroker_gpu). Each step has a timeout and reports its outcome.
set -u
cd "$(dirname "$0")/.."
RESULTS="${OUT:-/tmp/skybroker_gpu}"
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu_serving_check.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
unset TRITON_INTERPRET SKYBROKER_KERNELS
PY="${PYTHON:-python3}"
MODELS="${MODELS_DIR:-/tmp/skybroker_models}"
SMOL="$MODELS/SmolLM2-135M-Instruct"

source benchmarks/gpu_lib.sh

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c 'import torch, fastapi, uvicorn, pydantic; print("torch", torch.__version__,
"fastapi", fastapi.__version__, "uvicorn", uvicorn.__version__, "pydantic", pydantic.VERSION)'
# Two CPUs on different physical cores for A; every CPU of the other cores for B-D.
read -r A0 A1 REST < <($PY - <<'EOF'
import os
def core(c):
    t = f"/sys/devices/system/cpu/cpu{c}/topology/"
    try:
        return tuple(open(t + f).read().strip() for f in ("physical_package_id", "core_id"))
    except OSError:
        return (str(c),)
cpus = sorted(os.sched_getaffinity(0))
firsts = list({core(c): c for c in reversed(cpus)}.values())[::-1]
a0, a1 = firsts[0], firsts[1]
rest = [c for c in cpus if core(c) not in (core(a0), core(a1))]
print(a0, a1, ",".join(map(str, rest)))
EOF
)
echo "A on CPUs $A0,$A1; B-D on CPUs $REST ($(nproc) CPUs)"
B0=${REST%%,*}
B1=$(echo "$REST" | cut -d, -f2)

step "A: validate_perf on the CPU (background)" "${T_A:-420}" \
  $PY benchmarks/validate_perf.py --measure-profile --pin "$A0,$A1" --runs 3 --repeats 3 --profile "$RESULTS/tiny-llama-cpu-host.json" >"$RESULTS/validate_cpu.log" 2>&1 &
A_PID=$!

step "random SmolLM2-135M" 120 taskset -c "$REST" $PY benchmarks/random_model.py \
  SmolLM2-135M-Instruct "$MODELS" --device cuda
# the random model's tokenizer is the tests' small one: prompts are drawn below its vocabulary
VOCAB=$($PY -c "from engine.tokenizer import EngineTokenizer as T
print(T.from_pretrained('$SMOL').vocab_size)")
step "B: serve.py, CPU engine" "${T_B:-150}" taskset -c "$REST" $PY benchmarks/serve.py \
  --device cpu --num-prompts 128 --request-rate inf --repeats 3
step "C: serve.py, CUDA engine" "${T_C:-120}" taskset -c "$REST" $PY benchmarks/serve.py \
  --device cuda --model "$SMOL" --vocab-size "$VOCAB" --num-prompts 256 --max-num-seqs 64 \
  --request-rate inf --repeats 3
step "D: validate_perf on CUDA" "${T_D:-240}" taskset -c "$REST" $PY benchmarks/validate_perf.py \
  --device cuda --model "$SMOL" --vocab-size "$VOCAB" --measure-profile --pin "$B0,$B1" --runs 2 --repeats 3 \
  --profile "$RESULTS/smollm2-135m-random-gpu.json"
wait $A_PID
echo "=== A: validate_perf on the CPU: rc=$? (log below)"
cat "$RESULTS/validate_cpu.log"
echo "=== done: status $STATUS; results in $RESULTS"
