#!/usr/bin/env bash
# Everything the H100 checks and times, in one call (run from the repository root there):
#   bash perf/gpu.sh tests [paths/args]   # the GPU suite: pytest -m "gpu or slow" over tests/ in concurrent
#                                         # parts (below), or over the files given in one process
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
# The whole GPU suite does not finish in one process within a call's 600 s on one H100: much of
# it is Triton compiling on the host. `tests` without paths runs these parts as concurrent pytest
# processes, all on the one card or dealt round-robin over several, each stopped after LIMIT
# seconds (default 540) so that a slow part still leaves the others' summaries. The compiled eval
# grid runs alone: a CUDA error in a process ends its context, and every later test there fails.
PARTS=("tests/test_triton_objects.py -k 'fp32 or compile'"
       "tests/test_triton_objects.py -k 'not fp32 and not compile'"
       "tests/test_triton_readout.py tests/test_triton_segment.py"
       "tests/test_generate.py tests/test_cumsum_triton.py"
       "tests/test_eval.py"
       "tests/test_backbone_ssd.py"
       "tests/test_backbone_delta.py"
       "tests/test_readout_delta_objects.py -k 'compile_for_sm90'"
       "tests/test_readout_delta_objects.py -k 'forward'"
       "tests/test_readout_delta_objects.py -k 'backward and not fp32'"
       "tests/test_readout_delta_objects.py -k 'backward and fp32 and (2048 or 8192)'"
       "tests/test_readout_delta_objects.py -k 'backward and fp32 and not (2048 or 8192)'")
REST="tests"
for part in "${PARTS[@]}"; do
  for f in $part; do case $f in tests/*.py) REST="$REST --ignore=$f" ;; esac; done
done
PARTS+=("$REST")
# one log per part, its exit status on the last line, each test on a line of its own (-v: a part
# stopped by LIMIT still names its failures); the parts' logs end up in one file, gpu_tests.log
# (the device brings back a bounded number of files); pytest's 5 (nothing collected: no GPU test
# left in the rest) counts as a pass
tests_in_parts() {
  local n g i code rc=0
  n=$(nvidia-smi -L | wc -l)
  for i in "${!PARTS[@]}"; do
    g=$((i % n))
    ( eval "CUDA_VISIBLE_DEVICES=$g timeout ${LIMIT:-540} python3 -m pytest -v -p no:cacheprovider -m \"gpu or slow\" -rfs ${PARTS[$i]}" \
        > "$OUT/gpu_tests_$i.log" 2>&1
      echo "exit $?" >> "$OUT/gpu_tests_$i.log" ) &
  done
  wait
  for i in "${!PARTS[@]}"; do
    code=$(tail -n 1 "$OUT/gpu_tests_$i.log" | cut -d' ' -f2)
    echo "== part $i (GPU $((i % n))): ${PARTS[$i]}: exit $code (124: stopped by LIMIT)"
    grep -E " (FAILED|ERROR)( |$)" "$OUT/gpu_tests_$i.log" | head -n 5  # -v's per-test lines
    tail -n 4 "$OUT/gpu_tests_$i.log" | head -n 3
    case $code in 0|5) ;; *) rc=1 ;; esac
  done
  for i in "${!PARTS[@]}"; do
    echo "======== part $i: ${PARTS[$i]}"
    cat "$OUT/gpu_tests_$i.log"
  done > "$OUT/gpu_tests.log"
  rm -f "$OUT"/gpu_tests_[0-9]*.log
  return $rc
}
if [ "${1:-}" = tests ] && [ $# -eq 1 ]; then tests_in_parts; exit $?; fi
case "${1:-all}" in
  tests) python3 -m pytest -q -p no:cacheprovider -m "gpu or slow" -x -rs "${@:2}" 2>&1 | tee "$OUT/gpu_tests.log" ;;
  bench) python3 -m perf.bench_gpu --out "$OUT" "${@:2}" 2>&1 | tee "$OUT/bench.log" ;;
  *) echo "usage: bash perf/gpu.sh {tests|bench} [bench options]"; exit 2 ;;
esac
