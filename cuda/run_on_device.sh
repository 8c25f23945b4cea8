#!/usr/bin/env bash
# One pass on a GPU machine: build the variant, run the GPU tests, the benchmark, and compute-sanitizer memcheck
# on a small subset of the tests. Every step runs even if an earlier one failed; logs and JSON go to $OUT.
#
#   OUT=/tmp/quest-out bash cuda/run_on_device.sh [quick]
set -u
OUT=${OUT:-/tmp/quest-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TRANSFORMERS_QUEST_KERNEL_PATH="$PWD/cuda"
export QUEST_COMMIT=${QUEST_COMMIT:-$(cat COMMIT 2>/dev/null || echo unknown)}
step() { echo; echo "=== $* ($(date +%T))"; }

step environment
nvidia-smi -L; nvcc --version | tail -2
python3 -c "import torch, transformers, kernels; print('torch', torch.__version__, 'transformers', transformers.__version__, 'kernels', kernels.__version__)"

step build
start=$SECONDS
timeout ${QUEST_BUILD_TIMEOUT:-300} python3 cuda/build_variant.py --archs 9.0 --verbose >"$OUT/build.log" 2>&1
echo "build rc=$? in $((SECONDS - start)) s"
grep -E "error|Function properties|registers|spill|bytes stack" "$OUT/build.log" | grep -v "^ninja" | head -80
ls -la cuda/build/*/ 2>/dev/null

step gpu tests
timeout ${QUEST_TEST_TIMEOUT:-200} python3 -m pytest -q -rfE -p no:cacheprovider tests/test_cuda_ops.py tests/test_reference.py \
  ${QUEST_TEST_FILTER:+-k "$QUEST_TEST_FILTER"} >"$OUT/tests.log" 2>&1
echo "tests rc=$?"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40

step gpu tests, GQA groups on the CUDA-core attention kernel
QUEST_KERNELS_MMA=0 timeout ${QUEST_TEST_TIMEOUT:-200} python3 -m pytest -q -rfE -p no:cacheprovider tests/test_cuda_ops.py \
  -k "decode or attend_all or generate" >"$OUT/tests-cuda-cores.log" 2>&1
echo "tests rc=$?"
grep -E "passed|failed|error" "$OUT/tests-cuda-cores.log" | tail -3

step benchmark
if [ "${1:-}" = quick ]; then bench_args=(--quick); else bench_args=(); fi
timeout ${QUEST_BENCH_TIMEOUT:-240} python3 benchmarks/attention.py "${bench_args[@]}" --out "$OUT/attention-h100.json" >"$OUT/bench.log" 2>&1
echo "benchmark rc=$?"

step memcheck
timeout ${QUEST_MEMCHECK_TIMEOUT:-120} compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_cuda_ops.py -k "(fused_append and dtype0) or (attend_all_pages and dtype0) or (refresh_pages and dtype0 and 16 and 64) or append_pages or select_pages or device_lengths or cuda_graph or (decode_matches_reference and dtype0 and (case2 or case3 or case6 or case9))" \
  >"$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?"
grep -E "ERROR SUMMARY|passed|failed|Invalid" "$OUT/memcheck.log" | head -20

step failures
grep -B5 -A40 -m3 "^_____" "$OUT/tests.log" | head -150
step benchmark table
tail -n 80 "$OUT/bench.log"
