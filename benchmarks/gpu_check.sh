#!/usr/bin/env bash
# The GPU check, for a bare machine with a CUDA GPU and a CUDA build of torch (the device tool's
# machines): build effseg from source against that torch, check that every op has its CUDA
# kernel, run the CUDA cases of the test suite, the model benchmark in bf16 (issue 4's targets,
# with the largest cube that trains), compute-sanitizer memcheck and racecheck over every kernel
# on small inputs, then the op benchmarks (fp32 and bf16, contiguous and channels-last; each op
# alone with its GB/s next to a device-to-device copy timed in the same run: issue 16's fraction
# of the roofline), the block, network (issue 13), synchronized-norm and augmentation
# benchmarks; print a short table last.
# Within GPU_CHECK_BUDGET seconds (default 450, so under 8 minutes in all).
#
#   bash benchmarks/gpu_check.sh            # OUT defaults to benchmarks/out/gpu
#
# Device tool: run benchmarks/fetch_gpu_wheels.sh here first (nibabel and expecttest, which the
# machines lack, into .whl/, ignored by git), then
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], kind="nvidia-h100-x1",
#       timeout_s=600)
# (the H100 machines run compute-sanitizer; KINDS.md saw it refuse the device on a gVisor H200).
# The tool returns at most 8 files from $OUT: everything lands in $OUT/gpu_check.tgz, beside
# $OUT/summary.txt, $OUT/bench_model.json and $OUT/steps.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
W=$OUT/work  # logs and JSON, archived at the end
rm -rf "$W" && mkdir -p "$W"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
# The CUDA toolkit: CUDA_HOME if set, else /usr/local/cuda, else the folder above the nvcc on
# PATH, whichever holds bin/nvcc and the runtime's headers (an nvcc on PATH may be a wrapper
# script elsewhere); its bin/ goes on PATH for compute-sanitizer.
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_dir=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /none/bin/nvcc)")")")
  for c in /usr/local/cuda "$nvcc_dir"; do
    if [ -x "$c/bin/nvcc" ] && [ -f "$c/include/cuda_runtime.h" ]; then CUDA_HOME=$c; break; fi
  done
fi
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export CUDA_HOME PATH=$CUDA_HOME/bin:$PATH
SANITIZER=$(command -v compute-sanitizer || ls "$CUDA_HOME"/compute-sanitizer/compute-sanitizer \
            2>/dev/null || true)
: > "$W/steps.txt"

BUDGET=${GPU_CHECK_BUDGET:-450}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

finish() {  # summary, then one archive of everything; runs on every exit
  cp "$W/steps.txt" "$OUT/steps.txt"
  [ -f "$W/bench_model.json" ] && cp "$W/bench_model.json" "$OUT/bench_model.json"
  $PY benchmarks/gpu_check_summary.py "$W" | tee "$OUT/summary.txt"
  tar czf "$OUT/gpu_check.tgz" -C "$W" . && rm -rf "$W"
}
trap finish EXIT

# step NAME LIMIT CMD...: runs CMD with the smaller of LIMIT and what is left of the budget,
# logs to NAME.log, records rc and seconds; under 15 s left it is skipped (rc "skip").
step() {
  local name=$1 limit=$2; shift 2
  local rest; rest=$(left)
  if (( rest < 15 )); then
    echo "$name skip 0" >> "$W/steps.txt"
    echo "== $name: skipped (${rest} s of the budget left)"
    return 1
  fi
  (( limit > rest )) && limit=$rest
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$W/steps.txt"
  echo "== $name: rc=$rc ($(( $(date +%s) - t0 )) s)"
  tail -n 3 "$W/$name.log"
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "torch $($PY -c 'import torch; print(torch.__version__)'), CUDA_HOME=$CUDA_HOME," \
       "compute-sanitizer: ${SANITIZER:-not found}"; } > "$W/gpu.txt" 2>&1
step build 200 $PY -m pip install --no-build-isolation --no-deps -e . || exit 1
# Every op must have its CUDA kernel, or nothing below tests what it claims to.
$PY -m effseg info --json > "$W/info.json" 2> "$W/info.err"
step kernels 30 $PY -c "
import sys
import effseg
from effseg.ops import OP_NAMES, has_kernel
missing = [n for n in OP_NAMES if not has_kernel(n, 'cuda')]
sys.exit(f'no CUDA kernel for {missing}: {effseg.ops.load_error()}' if missing else 0)
" || exit 1
# The CUDA cases of the suite (the CPU cases run in CI on every submission).
step tests 150 $PY -m pytest -q -p no:cacheprovider tests -m cuda --junitxml="$W/tests.xml"
# Issue 4's targets (peak, time, largest cube in bf16): stops measuring at its time limit and
# keeps what it measured.
model_limit=$(( $(left) - 150 )); (( model_limit > 150 )) && model_limit=150
(( model_limit < 30 )) && model_limit=30  # a short budget: a few rows, the sanitizers after
step bench_model $(( model_limit + 20 )) $PY benchmarks/bench_model.py --device cuda --amp bf16 \
  --quick --bisect 40 --time-limit "$model_limit" --out "$W/bench_model.json"
if [ -n "$SANITIZER" ]; then
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # memcheck sees every allocation's true bounds
  step memcheck 90 "$SANITIZER" --tool memcheck --error-exitcode 9 \
    $PY benchmarks/cuda_kernel_check.py --quick
  step racecheck 90 "$SANITIZER" --tool racecheck --error-exitcode 9 \
    $PY benchmarks/cuda_kernel_check.py --quick
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
else
  echo "memcheck missing 0" >> "$W/steps.txt"
  step kernel_check 60 $PY benchmarks/cuda_kernel_check.py
fi
step bench_ops_fp32 40 $PY benchmarks/bench_ops.py --device cuda --out "$W/bench_ops_fp32.json"
step bench_ops_bf16 40 $PY benchmarks/bench_ops.py --device cuda --dtype bfloat16 \
  --out "$W/bench_ops_bf16.json"
step bench_ops_fp32_cl 40 $PY benchmarks/bench_ops.py --device cuda --channels-last \
  --out "$W/bench_ops_fp32_cl.json"
step bench_ops_bf16_cl 40 $PY benchmarks/bench_ops.py --device cuda --dtype bfloat16 \
  --channels-last --kinds batch instance --out "$W/bench_ops_bf16_cl.json"
step bench_blocks 60 $PY benchmarks/bench_blocks.py --device cuda --out "$W/bench_blocks.json"
# Issue 13: other people's networks converted with recompute=True (nnU-Net's and MONAI's).
step bench_networks 90 $PY benchmarks/bench_networks.py --device cuda --sizes 64 96 \
  --nets plain resenc dynunet_res basic --reps 3 --out "$W"
step bench_sync 40 $PY benchmarks/bench_sync.py --device cuda --out "$W/bench_sync.json"
step bench_augment 30 $PY benchmarks/bench_augment.py --device cuda --quick \
  --out "$W/bench_augment.json"
exit 0
