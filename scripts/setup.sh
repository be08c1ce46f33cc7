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

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

if ! python -c "import torch" 2>/dev/null; then
  pip install -q "$TORCH_SPEC"
fi
pip install -q numpy pytest expecttest ninja "cmake==3.31.10" nibabel scipy matplotlib tqdm monai onnx onnxscript onnxruntime
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
if ! pip show -q effseg >/dev/null 2>&1; then
  # First time: build and register the package (editable: the extension lands in effseg/).
  pip install -q --no-build-isolation --no-deps -e .
elif [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ] || ! ls effseg/_C*.so >/dev/null 2>&1; then
  # build_ext keeps build/ between runs, so only what changed is compiled again.
  python setup.py -q build_ext --inplace
fi
mkdir -p build && echo "$stamp" > "$stamp_file"
python -m effseg info
