#!/usr/bin/env bash
# Builds effseg (CUDA kernels included when that torch is a CUDA build and nvcc is found) against
# another torch version in a scratch virtualenv and clone, and runs the whole test suite there.
# The oldest torch that passes is the floor in pyproject.toml; the GPU machines' image runs
# torch 2.11, so a GPU session's build step is proven here first.
#
#   scripts/check_torch.sh 2.11.0            # venv and clone under build/torch-2.11.0/
#   KEEP=1 scripts/check_torch.sh 2.11.0     # reuse that venv (the install is the slow part)
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/check_torch.sh TORCH_VERSION}
repo=$(pwd)
work=$repo/build/torch-$version
start=$(date +%s)

if [ -z "${KEEP:-}" ] || [ ! -x "$work/venv/bin/python" ]; then
  rm -rf "$work" && mkdir -p "$work"
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install -q "torch==$version" numpy pytest expecttest ninja setuptools \
    nibabel scipy matplotlib tqdm
fi
# A clean copy of the committed tree plus the working tree's changes to tracked files.
rm -rf "$work/src"
git clone -q "$repo" "$work/src"
git diff HEAD | (cd "$work/src" && git apply --allow-empty)
cd "$work/src"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} \
  "$work/venv/bin/python" setup.py -q build_ext --inplace
"$work/venv/bin/python" -m effseg info
EFFSEG_CT_DATA=${EFFSEG_CT_DATA:-$repo/../shared/data/ct} \
  "$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests
echo "torch $version: built and tested in $(( $(date +%s) - start )) s"
