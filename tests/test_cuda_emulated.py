"""effseg's CUDA kernels, run on the CPU by an emulator (tests/cuda_emu/cuda_emu.h).

No GPU is needed: csrc/*/*_cuda.cu is compiled as C++ with every `<<<...>>>` launch turned into
an emulated one whose threads run as fibers (shared memory, __syncthreads and warp shuffles
included), registered as torch.ops.effseg_emu on the CPU. Every kernel's own code and its host
code (grids, partial buffers, merges) then runs against the float64 references
(benchmarks/cuda_kernel_check.py, every dtype, layout, statistics kind and activation), and
against itself under other thread orders between barriers, which must give bit-identical
results (a shared-memory race would not). A barrier or full-mask shuffle that not every thread
reaches raises. What it cannot show (memory model, timing, hardware limits) is left to
benchmarks/gpu_check.sh on a GPU.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import child_env

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
EMU = Path(__file__).resolve().parent / "cuda_emu"

pytestmark = pytest.mark.skipif(
    not (CSRC / "norm_act" / "norm_act_cuda.cu").is_file(),
    reason="needs effseg's C++/CUDA sources (run from a checkout)")

LAUNCH = re.compile(r"(\w+(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\s*\((.*?)\)\s*;", re.S)


def emulated_source(text: str) -> str:
    """A .cu file as C++ for the emulator: launches rewritten, CUDA-only includes dropped, the
    library renamed to effseg_emu and the kernels registered for the CPU."""
    text = re.sub(r"#include <(ATen/cuda|c10/cuda)/[^>]*>\n", "", text)
    text, launches = LAUNCH.subn(
        lambda m: f"::emu::launch(::emu::config({m[2]}), [&] {{ {m[1]}({m[3]}); }});", text)
    assert launches > 0, "no kernel launch found"
    assert "<<<" not in text, "a kernel launch the emulator's rewrite missed"
    text = re.sub(r"(EFFSEG_REGISTER_\w+)\(CUDA,", r"\1(CPU,", text)
    return text


def renamed(text: str) -> str:
    return re.sub(r"(TORCH_LIBRARY(?:_IMPL|_FRAGMENT)?)\(effseg\b", r"\1(effseg_emu", text)


def _load(name: str, folder: Path, sources: list[Path], cflags: list[str]) -> None:
    """Compiles and loads `sources` (which include cuda_emu.h from `folder`) as a library."""
    import sys

    from torch.utils import cpp_extension

    # ninja may be installed only in this interpreter's environment (pip install ninja)
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    shutil.copy(EMU / "cuda_emu.h", folder / "cuda_emu.h")
    cpp_extension.load(name=name, sources=[str(p) for p in sources],
                       extra_include_paths=[str(folder)], extra_cflags=["-std=c++20", *cflags],
                       extra_ldflags=[f for f in cflags if f.startswith("-fsanitize")],
                       build_directory=str(folder), is_python_module=False, verbose=False)


def build_snippet(body: str, name: str, folder: Path, cflags: tuple[str, ...] = ()) -> None:
    """A small CUDA-style test kernel (with its own TORCH_LIBRARY `name`), emulated and loaded."""
    src = folder / f"{name}.cpp"
    src.write_text(emulated_source(body))
    _load(name, folder, [src], ["-O1", *cflags])


def build_emulator(build: Path, name: str = "effseg_cuda_emu", flags: tuple[str, ...] = ()):
    src = build / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    prelude = '#include "cuda_emu.h"\n#define effseg effseg_emu\n'
    for header in CSRC.glob("*.h"):  # shared by the families (cuda_vec.h)
        (src / header.name).write_text(header.read_text())
    for family in ("norm_act", "dice_ce"):
        for header in (CSRC / family).glob("*.h"):
            (src / header.name).write_text(renamed(header.read_text()))
        cu = (CSRC / family / f"{family}_cuda.cu").read_text()
        (src / f"{family}_emu.cpp").write_text(prelude + renamed(emulated_source(cu)))
    (src / "registry_emu.cpp").write_text(
        '#define EFFSEG_NO_PYTHON\n' + prelude + renamed((CSRC / "registry.cpp").read_text()) +
        '\nTORCH_LIBRARY_FRAGMENT(effseg_emu, m) {\n'
        '  m.def("emu_set_schedule(int order) -> ()",\n'
        '        [](int64_t order) { emu::set_schedule(int(order)); });\n}\n')
    # at most 2 row blocks per sample, so that the small channels-last cases also take the
    # path of large volumes (more than 256 rows per block)
    _load(name, src, sorted(src.glob("*.cpp")),
          ["-O2", "-DEFFSEG_CUDA_MAX_ROW_BLOCKS=2", *flags])
    return torch.ops.effseg_emu


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    build = tmp_path_factory.mktemp("cuda_emu")
    os.environ.setdefault("MAX_JOBS", "2")
    ops = build_emulator(build)
    yield ops
    ops.emu_set_schedule(0)


def kernel_check():
    spec = importlib.util.spec_from_file_location(
        "cuda_kernel_check", REPO / "benchmarks" / "cuda_kernel_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rewrite_covers_every_launch():
    for family in ("norm_act", "dice_ce"):
        text = (CSRC / family / f"{family}_cuda.cu").read_text()
        out = emulated_source(text)
        assert out.count("::emu::launch(") == text.count("<<<")


def test_emulated_kernels_match_the_references(emu, one_thread):
    check = kernel_check()
    torch.manual_seed(0)
    assert check.norm_act_failures(False, "cpu", emu) == 0
    assert check.dice_ce_failures("cpu", emu) == 0


def _norm_outputs(ops, x, dy, w, b, per_sample, act, p, offset=0):
    place = kernel_check().placed
    mean, var = ops.norm_stats(x, per_sample)
    y = place(x, "cpu", offset)
    ops.norm_act_forward_(y, mean, var, w, b, 1e-5, act, p)
    s1, s2 = ops.norm_act_backward_reduce(y, dy, w, b, per_sample, act, p)
    dx = ops.norm_act_backward_input(y, dy, var, w, b, s1, s2, None, 1e-5, act, p)
    dx_ = place(dy, "cpu", offset)  # in place over dy
    ops.norm_act_backward_input_(y, dx_, var, w, b, s1, s2, None, 1e-5, act, p)
    # PReLU: per-channel slopes and the third backward sum
    slope = torch.linspace(0.05, 0.5, x.shape[1])
    yp = place(x, "cpu", offset)
    ops.norm_act_forward_prelu_(yp, mean, var, w, b, 1e-5, slope)
    sums = list(ops.norm_act_backward_reduce_prelu(yp, dy, w, b, slope, per_sample))
    dxp = ops.norm_act_backward_input_prelu(yp, dy, var, w, b, slope, sums[0], sums[1], None,
                                            1e-5)
    return [mean, var, y, s1, s2, dx, dx_, yp, *sums, dxp]


# (shape, channels_last, dtype, offset in elements of x and dy): the shapes of the tiled and
# row-block paths, and the 16-byte paths: C = 16 and 17 channels-last, misaligned data (head and
# tail) in half and bfloat16.
ORDER_CASES = [((2, 33, 6, 7, 8), True, torch.float32, 0),
               ((1, 3, 9, 10, 11), True, torch.float32, 0),
               ((2, 3, 5, 6, 7), False, torch.float32, 0),
               ((3, 2, 9000), False, torch.float32, 0),
               ((2, 16, 4, 5, 6), True, torch.bfloat16, 0),
               ((2, 17, 3, 4, 5), True, torch.float16, 1),
               ((2, 3, 5, 6, 7), False, torch.bfloat16, 1)]


@pytest.mark.parametrize("shape, channels_last, dtype, offset", ORDER_CASES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_results_do_not_depend_on_the_thread_order(emu, one_thread, shape, channels_last, dtype,
                                                   offset, per_sample):
    place = kernel_check().placed
    fmt = torch.channels_last_3d if len(shape) == 5 and channels_last else torch.contiguous_format
    x = place((torch.randn(shape) * 2 + 1).to(dtype).contiguous(memory_format=fmt), "cpu",
              offset)
    dy = place(torch.randn(shape).to(dtype).contiguous(memory_format=fmt), "cpu", offset)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    # dice_ce: logits read one voxel at a time (S = 990) and V voxels at a time (S = 512)
    cases = []
    for spatial in ((9, 10, 11), (8, 8, 8)):
        logits = torch.randn(2, 40, *spatial).to(dtype)
        labels = torch.randint(0, 40, (2, *spatial))
        labels[:, 0] = -100
        cases.append((logits, labels))
    coef = torch.randn(2, 40, 2)
    runs = []
    for order in (0, 1, 2):
        emu.emu_set_schedule(order)
        outs = _norm_outputs(emu, x, dy, w, b, per_sample, "leaky_relu", 0.01, offset)
        for logits, labels in cases:
            outs += list(emu.dice_ce_forward(logits, labels, None, -100))
            outs.append(emu.dice_ce_backward(torch.tensor(0.5), logits, labels, None, -100,
                                             coef, torch.tensor(0.25)))
        runs.append(outs)
    emu.emu_set_schedule(0)
    for other in runs[1:]:
        for a, b_ in zip(runs[0], other):
            assert torch.equal(a, b_)


def test_the_emulator_catches_a_divergent_barrier_and_a_race(tmp_path):
    """The emulator's own checks can fail: a kernel whose barrier some threads skip raises, and
    one that reads a neighbour's shared slot without a barrier gives order-dependent results."""
    body = r'''
#include "cuda_emu.h"
namespace {
__global__ void divergent(float* out) {
  __shared__ float s[64];
  if (threadIdx.x < 32) return;      // half the block leaves before the barrier
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}
__global__ void racy(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = -1.0f;
  __syncthreads();
  s[threadIdx.x] = float(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];  // no __syncthreads before reading
}
at::Tensor run(int64_t which, int64_t order) {
  emu::set_schedule(int(order));
  at::Tensor out = at::zeros({64});
  float* p = out.data_ptr<float>();
  if (which == 0) divergent<<<1, 64>>>(p);
  else racy<<<1, 64>>>(p);
  emu::set_schedule(0);
  return out;
}
}  // namespace
TORCH_LIBRARY(effseg_emu_selftest, m) { m.def("run(int which, int order) -> Tensor", &run); }
'''
    build_snippet(body, "effseg_emu_selftest", tmp_path)
    ops = torch.ops.effseg_emu_selftest
    with pytest.raises(RuntimeError, match="stuck: 32 thread.s. at __syncthreads.*32 exited"):
        ops.run(0, 0)
    assert not torch.equal(ops.run(1, 0), ops.run(1, 1))


ASAN_RUN = r'''
import sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
import test_cuda_emulated as t
ops = t.build_emulator(Path(sys.argv[2]), "effseg_cuda_emu_asan",
                       ("-fsanitize=address", "-fno-omit-frame-pointer"))
check = t.kernel_check()
torch.manual_seed(0)
# the quick cases, with the huge-C vector case at C = 201 instead of 1001 (still odd, over four
# channel tiles with idle lanes in the last: the same paths; 1001 alone took 90 s under ASan)
cases = [case + (0, 0) for case in check.norm_cases(True)] + [
    ((2, 201) + case[0][2:],) + case[1:] if case[0][1] == 1001 else case
    for case in check.vector_cases()]
assert sum(case[0][1] == 201 for case in cases) == 4, cases
print("norm_act mismatches", sum(check.norm_case_failures(ops, "cpu", *case) for case in cases))
print("dice_ce mismatches", check.dice_ce_failures("cpu", ops))
'''


ASAN_PLANTED = r'''
import sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
import test_cuda_emulated as t
body = """
#include "cuda_emu.h"
namespace {
__global__ void past_the_end(float* out, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 1.0f;  // <= : one element too far
}
at::Tensor run(int64_t n) {
  at::Tensor out = at::zeros({n});
  past_the_end<<<1, 64>>>(out.data_ptr<float>(), n);
  return out;
}
}  // namespace
TORCH_LIBRARY(effseg_emu_asan_planted, m) { m.def("run(int n) -> Tensor", &run); }
"""
t.build_snippet(body, "effseg_emu_asan_planted", Path(sys.argv[2]), ("-fsanitize=address",))
torch.ops.effseg_emu_asan_planted.run(40)
print("planted write went unnoticed")
'''


def _asan_runtime() -> list[str] | None:
    """The compiler's AddressSanitizer runtime and the C++ runtime, to preload into Python (an
    instrumented library cannot be loaded into an uninstrumented process otherwise)."""
    import subprocess

    paths = []
    for lib in ("libasan.so", "libstdc++.so"):
        try:
            out = subprocess.run(["c++", f"-print-file-name={lib}"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None
        if not os.path.isabs(out):
            return None
        paths.append(out)
    return paths


def test_emulated_kernels_under_address_sanitizer(tmp_path):
    """The CPU counterpart of compute-sanitizer's memcheck: the emulated kernels built with
    -fsanitize=address read and write nothing outside their tensors and shared arrays, run in
    a subprocess with the sanitizer's runtime preloaded; first, a kernel that writes one
    element too far must be reported (an out-of-bounds write planted in a real kernel's
    partial-buffer store was reported as well, tried by hand)."""
    import subprocess
    import sys

    runtime = _asan_runtime()
    if runtime is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime")
    env = child_env(LD_PRELOAD=" ".join(runtime),
                    ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:"
                                 "detect_stack_use_after_return=0")
    env.setdefault("MAX_JOBS", "2")

    def run(script, folder):
        folder.mkdir()
        return subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent),
                               str(folder)], capture_output=True, text=True, timeout=900, env=env)

    # the sanitizer works here: a kernel that writes one element past its tensor is reported
    planted = run(ASAN_PLANTED, tmp_path / "planted")
    assert planted.returncode != 0, planted.stdout + planted.stderr[-3000:]
    assert "heap-buffer-overflow" in planted.stderr and "emu::trampoline" in planted.stderr, \
        planted.stderr[-3000:]
    proc = run(ASAN_RUN, tmp_path / "kernels")
    out = proc.stdout + proc.stderr
    assert "ERROR: AddressSanitizer" not in out, out[-6000:]
    assert proc.returncode == 0, out[-6000:]
    assert "norm_act mismatches 0" in out and "dice_ce mismatches 0" in out, out[-3000:]
