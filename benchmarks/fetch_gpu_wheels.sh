#!/usr/bin/env bash
# Fetches, into .whl/ (ignored by git), the Python packages that the GPU machines' image lacks
# and benchmarks/gpu_check.sh needs (Python 3.12 there): nibabel for the data tests, expecttest
# for torch.library.opcheck, MONAI and dynamic-network-architectures (pure Python, without
# their declared dependencies) for benchmarks/bench_networks.py. Run here before a GPU session's first call, then call the device
# tool with carry [".whl"]; gpu_check.sh installs them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl nibabel==5.3.2 expecttest==0.3.0 \
  importlib-resources==6.5.2 monai==1.6.1 dynamic-network-architectures==0.4.4
ls -l .whl
