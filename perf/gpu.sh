#!/usr/bin/env bash
# Everything the H100 checks and times, in one call (run from the repository root there):
#   bash perf/gpu.sh tests [paths/args]   # the GPU suite: pytest -m gpu over tests/ (or the files given;
#                                         # without paths on a multi-GPU machine, one part per GPU)
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
# The whole GPU suite did not finish in 560 s on one H100; with several cards, `tests` without
# paths deals these parts out round-robin, each GPU running its parts one after another (on
# four cards the masked readout's float64 comparisons, the longest part, have a GPU to themselves).
PARTS=("tests/test_triton_segment.py tests/test_generate.py" "tests/test_triton_readout.py -k gpu_matches"
       "tests/test_triton_readout.py -k 'not gpu_matches'" "tests/test_triton_scan.py"
       "tests --ignore=tests/test_triton_segment.py --ignore=tests/test_generate.py --ignore=tests/test_triton_readout.py --ignore=tests/test_triton_scan.py")
tests_on_every_gpu() {
  local n g i rc=0
  n=$(nvidia-smi -L | wc -l)
  for g in $(seq 0 $((n - 1))); do
    ( for i in "${!PARTS[@]}"; do
        [ $((i % n)) -eq "$g" ] || continue
        eval "CUDA_VISIBLE_DEVICES=$g python3 -m pytest -q -p no:cacheprovider -m \"gpu or slow\" -rs ${PARTS[$i]}" \
          > "$OUT/gpu_tests_$i.log" 2>&1
        echo $? > "$OUT/gpu_tests_$i.rc"
      done ) &
  done
  wait
  for i in "${!PARTS[@]}"; do
    echo "== part $i (GPU $((i % n))): ${PARTS[$i]}: exit $(cat "$OUT/gpu_tests_$i.rc")"; tail -n 3 "$OUT/gpu_tests_$i.log"
    [ "$(cat "$OUT/gpu_tests_$i.rc")" = 0 ] || rc=1
  done
  return $rc
}
if [ "${1:-}" = tests ] && [ $# -eq 1 ]; then
  if [ "$(nvidia-smi -L | wc -l)" -gt 1 ]; then tests_on_every_gpu; exit $?; fi
  set -- tests tests  # one GPU: the whole suite in one process
fi
case "${1:-all}" in
  tests) python3 -m pytest -q -p no:cacheprovider -m "gpu or slow" -x -rs "${@:2}" 2>&1 | tee "$OUT/gpu_tests.log" ;;
  bench) python3 -m perf.bench_gpu --out "$OUT" "${@:2}" 2>&1 | tee "$OUT/bench.log" ;;
  *) echo "usage: bash perf/gpu.sh {tests|bench} [bench options]"; exit 2 ;;
esac
