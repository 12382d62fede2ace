#!/usr/bin/env bash
# Every GPU check of the project in ONE device call (at most about 8 minutes):
#
#   benchmarks/prepare_gpu_wheels.sh      # first, on the CPU machine: fills .whl/
#   device run: command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600
#
# Installs the carried wheels (mergekit, evaluate, datasets and the few requirements the GPU
# image lacks), runs the gpu-marked tests on the real kernels, the kernel benchmark on CUDA, then
# benchmarks/bench_mergekit.py --cuda and benchmarks/bench_sweep.py --device cuda where they
# exist. Each step has its own time limit. Flat files under $OUT (8, the device tool's maximum):
#   run.txt            date, nvidia-smi, versions, then each step's exit code and seconds
#   tests.log  kernels_cuda.{log,json}  mergekit_cuda.{log,json}  sweep_cuda.{log,json}
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    python3 -m pip list 2>/dev/null |
        grep -iE '^(torch|triton|transformers|peft|mergekit|evaluate|datasets|typing.extensions) '
} >"$OUT/run.txt" 2>&1

# step NAME LIMIT_SECONDS COMMAND...: log to $OUT/NAME.log, record exit code and duration.
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc seconds=$((SECONDS - start)) limit=$limit" | tee -a "$OUT/run.txt"
}

# optional_step NAME LIMIT_SECONDS SCRIPT ARGS...: step, or a note when SCRIPT does not exist yet.
optional_step() {
    local name=$1 limit=$2 script=$3
    shift 3
    if [[ -f $script ]]; then
        step "$name" "$limit" python3 "$script" "$@"
    else
        echo "$name: skipped, $script does not exist" | tee -a "$OUT/run.txt"
    fi
}

step tests 100 python3 -m pytest -m gpu tests/ -q
step kernels_cuda 200 python3 benchmarks/bench_kernels.py --device cuda \
    --out "$OUT/kernels_cuda.json"
# The issue's GPU target is ties vs ties_fused end to end with --cuda (~100M Llama, k = 8).
optional_step mergekit_cuda 170 benchmarks/bench_mergekit.py --cuda --methods ties,ties_fused \
    --out "$OUT/mergekit_cuda.json"
optional_step sweep_cuda 60 benchmarks/bench_sweep.py --device cuda --out "$OUT/sweep_cuda.json"

echo
tail -n 5 "$OUT/tests.log"
sed -n '/^| method/,$p' "$OUT/kernels_cuda.log"
