"""Build effseg._C from csrc/: a CUDAExtension when torch has CUDA and nvcc is found, a
CppExtension otherwise or when EFFSEG_CPU_ONLY=1.

Install with `pip install --no-build-isolation -e .` so the extension is built against the torch
that is already installed (build isolation would fetch another one). CMakeLists.txt builds the
same sources (the globs in `sources()`) as a library for C++ users.
"""
import glob
import os
import sys

# torch's CUDA_HOME auto-detection takes the folder above the first `nvcc` on PATH; where that is
# a wrapper script (/usr/local/bin/nvcc) it guesses /usr/local. Prefer the real toolkit.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
BASE_VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def sources(with_cuda):
    """The one source list: the op registry, every *_cpu.cpp and, with CUDA, every *_cuda.cu."""
    found = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*/*_cpu.cpp"))
    if with_cuda:
        found += sorted(glob.glob("csrc/*/*_cuda.cu"))
    return found


def cuda_decision():
    if os.environ.get("EFFSEG_CPU_ONLY", "0") == "1":
        return False, "EFFSEG_CPU_ONLY=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    return True, f"CUDA {torch.version.cuda}, toolkit at {cpp_extension.CUDA_HOME}"


def cuda_library_includes():
    """Headers of cuBLAS/cuSPARSE/NVRTC that pip-installed CUDA torch keeps in its nvidia-* wheels
    (site-packages/nvidia/cu13/include); ATen's CUDA headers include them."""
    dirs = []
    for site in sys.path:
        for header in glob.glob(os.path.join(site, "nvidia", "*", "include", "cusparse.h")):
            dirs.append(os.path.dirname(header))
    return sorted(set(dirs))


def local_version(with_cuda):
    """0.1.0+cu130torch2.14: the kernels' CUDA (or cpu) and the torch built against; a CPU-only
    build against a CUDA torch also names that torch's CUDA (0.1.0+cputorch2.14.cu130), since it
    loads only under that torch."""
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    torch_cuda = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else None
    if with_cuda:
        return f"{BASE_VERSION}+{torch_cuda}torch{torch_mm}"
    return f"{BASE_VERSION}+cputorch{torch_mm}" + (f".{torch_cuda}" if torch_cuda else "")


def write_build_config(with_cuda, archs, version):
    path = os.path.join(ROOT, "effseg", "_build_config.py")
    with open(path, "w") as f:
        f.write('"""Written by setup.py at build time: what effseg._C was built against."""\n')
        f.write(f"VERSION = {version!r}\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n")
        # The CUDA of the torch it was compiled against (None: a CPU build of torch), which the
        # running torch must share even when the extension itself has no CUDA kernels.
        f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCHS = {archs!r}\n")


def extension(with_cuda):
    # -fno-trapping-math lets the compiler turn the activations' selects into vector blends (it
    # changes no result: effseg installs no floating-point trap handlers). -fopenmp: ATen's
    # at::parallel_for is inline OpenMP code, compiled into the extension; without the flag it
    # silently runs every CPU kernel on one thread. C++20 (templated lambdas in the dispatch)
    # named here: torch before 2.14 would otherwise add -std=c++17.
    cxx = ["-O3", "-std=c++20", "-fno-trapping-math", "-fopenmp"]
    link = ["-fopenmp"]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "effseg._C", sources(False), extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    return cpp_extension.CUDAExtension(
        "effseg._C",
        sources(True),
        include_dirs=[os.path.join(ROOT, "csrc"), *cuda_library_includes()],
        define_macros=[("EFFSEG_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
        extra_link_args=link,
    )


with_cuda, why = cuda_decision()
archs = None
if with_cuda:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Without a visible GPU torch cannot pick an architecture and fails with IndexError.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "visible GPU"
print(f"effseg: building effseg._C {'with' if with_cuda else 'without'} CUDA ({why})"
      + (f", architectures {archs}" if archs else ""))
version = local_version(with_cuda)
write_build_config(with_cuda, archs, version)

setup(
    version=version,
    packages=find_packages(include=["effseg", "effseg.*"]),
    # nnU-Net imports this folder's modules by path (nnUNet_extTrainer): data, not a package.
    package_data={"effseg.integrations.nnunet": ["ext_trainers/*.py"]},
    ext_modules=[extension(with_cuda)],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
