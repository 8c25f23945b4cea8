#!/usr/bin/env bash
# On a GPU machine: install the carried `kernels` wheel (if any), build the CUDA kernels, then run
# benchmarks/e2e.py with the given arguments; logs and JSON go to $OUT.
#
#   OUT=/tmp/out bash benchmarks/run_e2e_on_device.sh --shape llama2-7b --contexts 32768 65536 --out $OUT/e2e.json
set -u
OUT=${OUT:-/tmp/quest-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TRANSFORMERS_QUEST_KERNEL_PATH="$PWD/cuda"
start=$SECONDS
timeout 300 python3 cuda/build_variant.py --archs 9.0 >"$OUT/build.log" 2>&1
echo "build rc=$? in $((SECONDS - start)) s"
python3 benchmarks/e2e.py "$@" 2>&1 | grep -v -i "warn\|online softmax\|split the reduction\|important use case\|softmax\.$" | tee "$OUT/e2e.log"
