#!/usr/bin/env bash
# One-shot GPU session: build the CUDA extension, run the GPU tests, run the benchmarks, and copy
# logs and results to $OUT (the device tool's return folder) when it is set.
#
#   bash benchmarks/gpu_session.sh build test     # first device call (build + pytest -m gpu)
#   bash benchmarks/gpu_session.sh bench          # second call on the same warm machine
#
# Stages: build | test | bench | all. Uses the machine's python3 (torch, triton preinstalled);
# missing wheels carried in .whl/ (see benchmarks/GPU_SESSION.md) are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/pyencoder-out}
mkdir -p "$OUT"
stages=${*:-all}
PY=${PYTHON:-python3}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

run_build() {
  echo "== build $(date -u +%FT%TZ)"
  export PYENCODER_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -20
  $PY -m pyencoder info
}

run_test() {
  echo "== gpu tests $(date -u +%FT%TZ)"
  $PY -m pytest -q -m gpu -p no:cacheprovider tests --durations=20 2>&1 | tee "$OUT/gpu_tests.log" | tail -60
}

run_bench() {
  echo "== benchmarks $(date -u +%FT%TZ)"
  $PY -m benchmarks 2>&1 | tee "$OUT/bench.log" | tail -60
  slug=$($PY -c "from benchmarks._common import device_slug; print(device_slug())")
  tar -czf "$OUT/results-$slug.tgz" -C benchmarks/results "$slug"
}

for s in $stages; do
  case "$s" in
    build) run_build ;;
    test) run_test ;;
    bench) run_bench ;;
    all) run_build; run_test; run_bench ;;
    *) echo "unknown stage $s" >&2; exit 2 ;;
  esac
done
