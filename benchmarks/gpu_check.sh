#!/usr/bin/env bash
# The GPU check, for a bare machine with a CUDA GPU and a CUDA build of torch (the device tool's
# machines): build effseg from source against that torch, run the test suite (CUDA cases
# included), run compute-sanitizer memcheck and racecheck over every kernel on small inputs, run
# the op, block, synchronized-norm and model benchmarks (with the largest trainable cube), and print a short table
# last. Logs and JSON go to $OUT. Under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # OUT defaults to benchmarks/out/gpu
# Missing Python packages (nibabel, expecttest) travel as wheels in .whl/ (ignored by git):
# run benchmarks/fetch_gpu_wheels.sh here first, then call the device tool with carry [".whl"].
# Without them the data tests skip (nibabel missing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
: > "$OUT/steps.txt"

# The whole check stays within BUDGET seconds (default 450, so that a device call with
# timeout_s 600 always gets the summary back): each step's limit is cut to what is left, and a
# step with under 15 s left is skipped (recorded as rc "skip").
BUDGET=${GPU_CHECK_BUDGET:-450}
T0=$(date +%s)
step() {  # step NAME TIMEOUT CMD...: runs CMD, logs to $OUT/NAME.log, records rc and seconds
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if (( left < 15 )); then
    echo "$name skip 0" >> "$OUT/steps.txt"
    echo "== $name: skipped (${left} s of the budget left)"
    return 1
  fi
  (( limit > left )) && limit=$left
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$OUT/steps.txt"
  echo "== $name: rc=$rc ($(( $(date +%s) - t0 )) s)"
  tail -n 3 "$OUT/$name.log"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
step build 240 $PY -m pip install --no-build-isolation --no-deps -e . || { cat "$OUT/build.log"; exit 1; }
$PY -m effseg info --json > "$OUT/info.json" 2>&1
# The CUDA cases of the suite (the CPU cases run in CI on every submission).
step tests 180 $PY -m pytest -q -p no:cacheprovider tests -m cuda --junitxml="$OUT/tests.xml"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # memcheck sees every allocation's true bounds
step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 9 $PY benchmarks/cuda_kernel_check.py --quick
step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 9 $PY benchmarks/cuda_kernel_check.py --quick
unset PYTORCH_NO_CUDA_MEMORY_CACHING
# Issue 4's targets first (peak, time, largest cube in bf16), then the op and block figures.
step bench_model 150 $PY benchmarks/bench_model.py --device cuda --amp bf16 --quick --bisect 40 --out "$OUT/bench_model.json"
step bench_ops_fp32 60 $PY benchmarks/bench_ops.py --device cuda --out "$OUT/bench_ops_fp32.json"
step bench_ops_bf16 60 $PY benchmarks/bench_ops.py --device cuda --dtype bfloat16 --out "$OUT/bench_ops_bf16.json"
step bench_ops_fp32_cl 60 $PY benchmarks/bench_ops.py --device cuda --channels-last --out "$OUT/bench_ops_fp32_cl.json"
step bench_blocks 60 $PY benchmarks/bench_blocks.py --device cuda --out "$OUT/bench_blocks.json"
step bench_sync 60 $PY benchmarks/bench_sync.py --device cuda --out "$OUT/bench_sync.json"

$PY - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
print("\n=== GPU check summary:", open(os.path.join(out, "gpu.txt")).read().strip())
for line in open(os.path.join(out, "steps.txt")):
    name, rc, secs = line.split()
    state = {'0': 'ok', 'skip': 'SKIPPED (budget)'}.get(rc, 'FAILED rc=' + rc)
    print(f"{name:<20} {state:<16} {secs:>4} s")
for tag in ("fp32", "bf16", "fp32_cl"):
    path = os.path.join(out, f"bench_ops_{tag}.json")
    if not os.path.exists(path):
        continue
    for r in json.load(open(path))["rows"]:
        if r["variant"].startswith("effseg"):
            frac = r["copy_bandwidth_fraction"]
            print(f"{tag:<8} {str(tuple(r['shape'])):<22} {r['variant']:<20} "
                  f"time x{r['time_vs_stock']:.2f} saved x{r['saved_vs_stock']:.2f} "
                  f"{r['gbps']:.0f} GB/s" + (f" ({100 * frac:.0f}% of copy)" if frac else ""))
path = os.path.join(out, "bench_sync.json")
if os.path.exists(path):
    for r in json.load(open(path))["rows"]:
        print(f"bench_sync    {str(tuple(r['shape'])):<22} {r['what']:<24} sync overhead "
              f"{100 * r['overhead']:+.1f}% (max |sync - local| {r['max_abs_diff']:.1e})")
for name in ("bench_blocks", "bench_model"):
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        continue
    data = json.load(open(path))
    for r in data["rows"]:
        size = r.get("shape") or r.get("edge")
        print(f"{name:<13} {str(size):<22} {r['variant']:<24} saved x{r['saved_vs_stock']:.2f} "
              f"peak x{r['peak_vs_stock']:.2f} ({r['peak_bytes'] / 2**30:.2f} GiB) "
              f"time x{r['seconds_vs_stock']:.2f} ({r['seconds'] * 1e3:.0f} ms)")
    for variant, edge in data.get("largest_cube", {}).items():
        print(f"largest cube that trains (bf16), {variant}: {edge}^3")
PYEOF
