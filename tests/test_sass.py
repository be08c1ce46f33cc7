"""The built extension's sm_90 SASS (benchmarks/sass_report.py), read without a GPU: issue 16's
static targets. At least 80% of the streaming kernels (those that read the N*C*S data) for
float, half and bfloat16 issue 128-bit global loads, and no kernel uses local memory (a stack
frame or LDL/STL: spills, or arrays the compiler could not keep in registers).

Skips, saying why, where there is no SASS to read: an extension built without CUDA (the CPU
wheel's CI job), or no cuobjdump (it ships with the CUDA toolkit and in the nvidia/triton wheels
next to a CUDA build of torch, as in the main CI)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import effseg

REPO = Path(__file__).resolve().parent.parent


SCRIPT = REPO / "benchmarks" / "sass_report.py"
if not SCRIPT.is_file():
    pytest.skip("needs benchmarks/sass_report.py (run from a checkout)", allow_module_level=True)


def _sass_report():
    spec = importlib.util.spec_from_file_location("sass_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sass = _sass_report()


@pytest.fixture(scope="module")
def report():
    so = next(iter(sorted(Path(effseg.__file__).parent.glob("_C*.so"))), None)
    if so is None:
        pytest.skip("effseg._C is not built")
    if sass.find_cuobjdump() is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or the nvidia/triton wheels); set "
                    "CUOBJDUMP")
    try:
        return sass.report(so)
    except sass.ToolMissing as e:
        pytest.skip(f"no SASS to read: {e}")


def test_every_family_of_kernels_is_found(report):
    kernels, _ = report
    families = {k.family.split("/")[0] for k in kernels}
    assert {"apply_kernel", "reduce_contiguous_kernel", "reduce_channels_last_kernel",
            "merge_kernel", "coef_kernel", "forward_partials_kernel", "backward_kernel",
            "merge_class_kernel", "merge_ce_kernel"} <= families
    for k in kernels:
        assert k.registers > 0 and k.block == 256, k
    # both apply layouts, for forward and backward, in every dtype
    for op in ("ForwardOp", "InputGradOp"):
        for layout in ("contiguous", "channels_last"):
            dtypes = {k.dtype for k in kernels if k.family == f"apply_kernel/{op}/{layout}"}
            assert dtypes == {"float", "half", "bfloat16", "double"}, (op, layout, dtypes)


def test_streaming_kernels_issue_128_bit_loads(report):
    kernels, totals = report
    target = [k for k in kernels if k.streaming and k.dtype in sass.TARGET_DTYPES]
    assert len(target) >= 60, len(target)
    wide = [k for k in target if k.widest_load == 128]
    assert len(wide) >= 0.8 * len(target), totals["streaming_without_128bit_loads"]
    assert totals["streaming_target_with_128bit_loads"] == len(wide)
    # the elementwise passes store what they load 16 bytes at a time, too
    apply = [k for k in target if k.family.startswith("apply_kernel/")]
    assert all(k.widest_store == 128 for k in apply), \
        [k.name for k in apply if k.widest_store != 128]


def test_no_kernel_uses_local_memory(report):
    kernels, totals = report
    assert totals["kernels_with_local_memory"] == []
    assert all(k.stack == 0 and k.local == 0 and k.local_instructions == 0 for k in kernels)


def test_the_parsers_read_what_cuobjdump_writes():
    """The pieces of the report on known inputs, so that a parser that stops matching fails
    here rather than passing with empty results."""
    assert sass.access_bits("LDG.E.128.CONSTANT") == 128
    assert sass.access_bits("LDG.E.64") == 64
    assert sass.access_bits("LDG.E") == 32
    assert sass.access_bits("STG.E.U16") == 16
    assert sass.access_bits("LDG.E.U8") == 8
    # 256 threads at 128 registers: 2 blocks (16 warps of 64); at 64 registers and 3 KiB shared
    # memory: 4 blocks; at 24 registers: 8 blocks, limited by the 2048 threads
    assert sass.occupancy(128, 0, 256) == (0.25, "registers")
    assert sass.occupancy(64, 3072, 256) == (0.5, "registers")
    assert sass.occupancy(24, 0, 256) == (1.0, "threads")
    assert sass.occupancy(32, 100 * 1024, 256)[1] == "shared"
    name = ("void effseg::apply_kernel<effseg::InputGradOp<c10::BFloat16, float, (effseg::Act)1, "
            "true>, c10::BFloat16, true>(effseg::InputGradOp<c10::BFloat16, float, "
            "(effseg::Act)1, true>, effseg::Segments)")
    assert sass.family_of(name) == "apply_kernel/InputGradOp/channels_last"
    assert sass.dtype_of(name) == "bfloat16"
    assert sass.dtype_of("void effseg::dice_ce::backward_kernel<float, long, float>(x)") == "float"
