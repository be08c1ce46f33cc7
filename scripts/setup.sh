#!/usr/bin/env bash
# Sets up a development environment from a fresh machine: a virtualenv in .venv with torch
# 2.14.1 (a CUDA 13.0 build that also runs without a GPU) and the test and data dependencies,
# then builds effseg._C, with its CUDA kernels when nvcc is found.
#
#   scripts/setup.sh                 # idempotent: reuses .venv and rebuilds only what changed
#   EFFSEG_CPU_ONLY=1 scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${EFFSEG_VENV:-.venv}
TORCH_SPEC=${EFFSEG_TORCH:-torch==2.14.1}

setup_start=$(date +%s)
stage() { echo "==> [setup $(( $(date +%s) - setup_start ))s] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  stage "creating the virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

if ! python -c "import torch" 2>/dev/null; then
  stage "installing $TORCH_SPEC (a CUDA build, 5.5 GB: usually 2 minutes from a local mirror, longer from PyPI)"
  pip install --progress-bar on "$TORCH_SPEC"
else
  stage "torch $(python -c 'import torch; print(torch.__version__)') already installed"
fi
stage "installing the test and data dependencies (numpy, nibabel, scipy, matplotlib, tqdm, pytest, monai, onnx...; under a minute when cached)"
pip install --progress-bar on numpy pytest expecttest ninja "cmake==3.31.10" nibabel scipy matplotlib tqdm monai onnx onnxscript onnxruntime \
  | grep -v "^Requirement already satisfied" || true
# nnU-Net v2 for the tests of effseg's nnU-Net trainer and planner (never needed by `import effseg`).
stage "installing nnunetv2 2.8.1 (the nnU-Net integration's tests; under a minute when cached)"
pip install --progress-bar on "nnunetv2==2.8.1" | grep -v "^Requirement already satisfied" || true
# nnU-Net's networks (PlainConvUNet, ResidualEncoderUNet) for the convert tests and
# benchmarks/bench_networks.py, without the timm and einops it declares (the U-Nets need
# neither). A test extra: effseg itself never imports it.
pip install -q --no-deps "dynamic-network-architectures==0.4.4"

# CUDA toolkit location (torch's own guess stops at /usr/local when nvcc there is a wrapper),
# architectures (needed when no GPU is visible) and parallel jobs (each nvcc job takes ~1.5 GB).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}

# Rebuild only when the sources or the build settings changed since the last build here.
stamp_file=build/.effseg-sources
stamp=$( (cat setup.py csrc/*.cpp csrc/*/*; python -c "import torch; print(torch.__version__)"; \
          echo "${EFFSEG_CPU_ONLY:-0} $TORCH_CUDA_ARCH_LIST") | sha256sum | cut -d' ' -f1)
if [ "${EFFSEG_CPU_ONLY:-0}" = 1 ] || [ ! -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]; then
  what="effseg._C (CPU kernels only: about 1 minute on 2 cores)"
else
  what="effseg._C with its CUDA kernels for sm_${TORCH_CUDA_ARCH_LIST//[^0-9;]/} (about 5 minutes on 2 cores, MAX_JOBS=$MAX_JOBS)"
fi
if ! pip show -q effseg >/dev/null 2>&1; then
  # First time: build and register the package (editable: the extension lands in effseg/).
  stage "building $what"
  pip install -q --no-build-isolation --no-deps -e .
elif [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ] || ! ls effseg/_C*.so >/dev/null 2>&1; then
  # build_ext keeps build/ between runs, so only what changed is compiled again.
  stage "rebuilding what changed of $what"
  python setup.py -q build_ext --inplace
else
  stage "effseg._C is up to date"
fi
mkdir -p build && echo "$stamp" > "$stamp_file"
stage "done; what was built:"
python -m effseg info
