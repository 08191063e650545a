# Shared by the GPU check scripts: `step NAME TIMEOUT_S CMD...` runs CMD under a timeout,
# prints its outcome and wall time, sets STATUS=1 on failure, and never aborts the caller.
STATUS=0

step() {
  local name=$1 limit=$2 t0 rc
  shift 2
  echo "=== $name"
  t0=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "=== $name: OK ($(($(date +%s) - t0)) s)"
  else
    echo "=== $name: FAILED (rc=$rc after $(($(date +%s) - t0)) s)"
    STATUS=1
  fi
  return $rc
}

# `gpu_setup LOG [OMP_THREADS]`, from a script in benchmarks/: the repo root as the working
# directory, RESULTS ($OUT, else /tmp/skybroker_gpu) with all further output teed to
# RESULTS/LOG, the engine's environment (the repo on PYTHONPATH, real kernels), PY and MODELS.
gpu_setup() {
  set -u
  cd "$(dirname "${BASH_SOURCE[1]}")/.." || exit 1
  RESULTS="${OUT:-/tmp/skybroker_gpu}"
  mkdir -p "$RESULTS"
  exec > >(tee "$RESULTS/$1") 2>&1
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${2:-1}
  unset TRITON_INTERPRET SKYBROKER_KERNELS
  PY="${PYTHON:-python3}"
  MODELS="${MODELS_DIR:-/tmp/skybroker_models}"
}
