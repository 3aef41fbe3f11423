#!/usr/bin/env bash
# Everything the H100 checks and times, in one call (run from the repository root there):
#   bash perf/gpu.sh tests [paths/args]   # the GPU suite: pytest -m gpu over tests/ (or the files given)
#   bash perf/gpu.sh bench   # perf/bench_gpu.py with the anchors beside us
# Missing packages travel as wheels in .whl/ (fla-core, flash-linear-attention, pytest, hypothesis, ...).
set -uo pipefail
OUT=${OUT:-perf/results/gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
[ "${1:-}" = tests ] && [ $# -eq 1 ] && set -- tests tests  # no paths given: the whole suite
case "${1:-all}" in
  tests) python3 -m pytest -q -p no:cacheprovider -m gpu -x -rs "${@:2}" 2>&1 | tee "$OUT/gpu_tests.log" ;;
  bench) python3 -m perf.bench_gpu --out "$OUT" "${@:2}" 2>&1 | tee "$OUT/bench.log" ;;
  *) echo "usage: bash perf/gpu.sh {tests|bench} [bench options]"; exit 2 ;;
esac
