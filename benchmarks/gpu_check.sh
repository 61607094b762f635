#!/usr/bin/env bash
# The GPU checks in one short run (at most 8 minutes on an H100 or H200: the three steps are cut at
# 150 + 180 + 150 s, most of it compiling):
#   1. the Triton kernels' tests compiled on CUDA tensors (TRITON_INTERPRET unset): bit-exact masks
#      against the CPU kernels, the torch.library ops under torch.compile, the fused op;
#   2. `dropkit bench kernels --device cuda`: copy, torch eager and compiled, dropkit seed and bits,
#      fwd and fwd+bwd, fractions of copy bandwidth, bytes kept per element (2^24 and 2^26 elements);
#   3. `dropkit bench fused --device cuda`: the fused epilogue on 16384 x 8192 bf16 against eager and
#      torch.compile of the same composition, and a GPT-2-small block's training step.
# Everything lands in $OUT (default benchmarks/results): the device, the test log and JUnit XML, and
# the two benchmarks' JSON. Each step has its own time limit; a failed step does not stop the others,
# and the exit status is that of the first failure.
#   OUT=/tmp/out PYTHON=.venv/bin/python benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET DROPKIT_KERNELS
status=0
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, remember the first failure
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "gpu_check: $name exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/gpu_check_steps.txt"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}
: > "$OUT/gpu_check_steps.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu_check_device.csv"
"$PYTHON" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    >> "$OUT/gpu_check_device.csv"
step tests 150 "$PYTHON" -m pytest -q -p no:xdist -p no:cacheprovider tests/test_gpu_kernels.py tests/test_fused.py \
    --junitxml="$OUT/gpu_check_tests.xml" > "$OUT/gpu_check_tests.log" 2>&1
tail -n 3 "$OUT/gpu_check_tests.log"
step bench_kernels 180 "$PYTHON" -m dropkit bench kernels --device cuda --sizes 24 26 --dtypes float32 bfloat16 \
    --p 0.1 0.5 --repeats 7 --out "$OUT/gpu_kernels.json" > /dev/null
step bench_fused 150 "$PYTHON" -m dropkit bench fused --device cuda --out "$OUT/gpu_fused.json" > /dev/null
exit "$status"
