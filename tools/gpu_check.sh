#!/usr/bin/env bash
# The GPU checks, in one pass, for a CUDA machine with torch, triton and transformers installed
# (the project's pins need not hold there: nothing is installed, the repo runs from its root).
#   tools/gpu_check.sh [OUT_DIR]
# Writes into OUT_DIR: env.txt, gpu_tests.txt (tests/gpu), kernels_<dtype>.txt (make bench-kernels),
# offline_gpu.md / offline_gpu.json (loadtest.offline_bench --device cuda). Each step has its own time
# limit and a failing step does not stop the next; the exit status is the number of failed steps.
set -u
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
failed=0
step() {  # step NAME LIMIT_S CMD...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - start)) s"; tail -n 25 "$out/$name.txt"
    [ $rc -eq 0 ] || failed=$((failed + 1))
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c 'import torch, triton, transformers, sys; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
} > "$out/env.txt" 2>&1; cat "$out/env.txt"
step gpu_tests 200 python3 -m pytest -q -p no:cacheprovider tests/gpu
step kernels_bfloat16 120 python3 -m kernels.bench --dtype bfloat16
step offline_gpu 120 python3 -m loadtest.offline_bench --device cuda --dtype bfloat16 --model /tmp/pdserve-small \
    --hf-batch-size 64 --json "$out/offline_gpu.json" --write "$out/offline_gpu.md"
exit $failed
