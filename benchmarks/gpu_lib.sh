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
