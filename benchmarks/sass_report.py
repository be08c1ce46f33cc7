"""Static report of effseg's CUDA kernels from the built extension's sm_90 SASS; no GPU needed.

For every kernel in effseg/_C*.so (`cuobjdump -res-usage`, `-sass` and `-elf`): registers, stack
and local memory (a stack frame lives in local memory, and so do LDL/STL), shared memory, the
widest global load and store (LDG.E.128 moves 16 bytes), the block size (from
`__launch_bounds__`, else the 256 threads every effseg kernel launches with) and the theoretical
occupancy on an H100 (65536 registers, 2048 threads, 32 blocks and 228 KiB of shared memory per
SM; registers allocated per warp in units of 256, shared memory with 1 KiB reserved per block).

Streaming kernels are the ones that read the N*C*S tensor data (or the N*K*S logits):
norm-act's `apply_kernel` (forward and backward to the input), `reduce_contiguous_kernel` and
`reduce_channels_last_kernel` (statistics, backward sums), and dice_ce's `forward_partials_kernel`
and `backward_kernel`. The others (`coef_kernel`, `merge_kernel`, `merge_class_kernel`,
`merge_ce_kernel`) read O(N*C) coefficients or partial results. Issue 16's targets, which
tests/test_sass.py asserts: at least 80% of the streaming kernels for float, half and bfloat16
issue 128-bit global loads, and no kernel uses local memory.

    python benchmarks/sass_report.py [--so effseg/_C....so] [--json out.json] [--all]

Prints a summary table (one row per kernel family and dtype; --all: one row per kernel) and the
totals; --json writes every kernel's row and the totals. Exits 2 when the extension was built
without CUDA or cuobjdump is not found.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STREAMING = ("apply_kernel", "reduce_contiguous_kernel", "reduce_channels_last_kernel",
             "forward_partials_kernel", "backward_kernel")
TARGET_DTYPES = ("float", "half", "bfloat16")
DEFAULT_BLOCK = 256  # every effseg kernel launches with kThreads = 256

# H100 (sm_90) per-SM limits, for the theoretical occupancy.
H100 = {"regs": 65536, "threads": 2048, "warps": 64, "blocks": 32, "smem": 228 * 1024,
        "smem_reserved": 1024, "reg_unit": 256, "max_regs": 255}


class ToolMissing(RuntimeError):
    """cuobjdump or c++filt is not installed, or the extension has no CUDA code."""


def find_cuobjdump() -> str | None:
    """cuobjdump from $CUOBJDUMP, PATH, the CUDA toolkit, or the nvidia / triton pip wheels."""
    if os.environ.get("CUOBJDUMP"):
        return os.environ["CUOBJDUMP"] if os.path.isfile(os.environ["CUOBJDUMP"]) else None
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    for site in {sysconfig.get_paths()["purelib"], *sys.path}:
        candidates += glob.glob(os.path.join(site, "nvidia", "*", "bin", "cuobjdump"))
        candidates.append(os.path.join(site, "triton", "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def find_extension() -> Path | None:
    found = sorted((REPO / "effseg").glob("_C*.so"))
    return found[0] if found else None


def run(tool: str, *args: str) -> str:
    out = subprocess.run([tool, *args], capture_output=True, text=True, errors="replace",
                         timeout=600)
    if out.returncode != 0:
        raise ToolMissing(f"{os.path.basename(tool)} {' '.join(args)} failed: "
                          f"{out.stderr.strip()[-500:]}")
    return out.stdout


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        raise ToolMissing("c++filt (binutils) not found")
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True,
                         timeout=120).stdout.splitlines()
    return dict(zip(names, out))


@dataclass
class Kernel:
    mangled: str
    name: str = ""
    family: str = ""
    dtype: str = ""
    streaming: bool = False
    registers: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    local_instructions: int = 0  # LDL / STL in the SASS
    widest_load: int = 0   # bits of the widest global load (0: none)
    widest_store: int = 0
    block: int = DEFAULT_BLOCK
    occupancy: float = 0.0
    limiter: str = ""
    loads: dict = field(default_factory=dict)

    @property
    def uses_local_memory(self) -> bool:
        return self.stack > 0 or self.local > 0 or self.local_instructions > 0


def access_bits(opcode: str) -> int:
    """Bits moved by one LDG/STG opcode such as LDG.E.128.CONSTANT or STG.E.U16."""
    mods = opcode.split(".")[1:]
    for bits in ("128", "64"):
        if bits in mods:
            return int(bits)
    if any(m in ("U16", "S16") for m in mods):
        return 16
    if any(m in ("U8", "S8") for m in mods):
        return 8
    return 32


def dtype_of(name: str) -> str:
    for token, dtype in (("c10::Half", "half"), ("c10::BFloat16", "bfloat16"),
                         ("double", "double"), ("float", "float")):
        if token in name:
            return dtype
    return "-"


def family_of(name: str) -> str:
    base = re.sub(r"^void ", "", name.split("<")[0].split("(")[0])
    short = base.split("::")[-1]
    if short == "apply_kernel":
        op = re.search(r"apply_kernel<[^<]*?(ForwardOp|InputGradOp)", name)
        layout = "channels_last" if re.search(r", (true)>\(", name) else "contiguous"
        return f"apply_kernel/{op.group(1) if op else '?'}/{layout}"
    if short.startswith("reduce_"):
        reducer = re.search(r"(StatsReducer|GradReducer)", name)
        return f"{short}/{reducer.group(1) if reducer else '?'}"
    return short


def occupancy(regs: int, shared: int, block: int) -> tuple[float, str]:
    """Theoretical occupancy (active warps / 64) on an H100 and what limits it."""
    warps = -(-block // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // H100["reg_unit"]) * H100["reg_unit"]
    limits = {
        "registers": (H100["regs"] // regs_per_warp) // warps,
        "threads": H100["threads"] // (warps * 32),
        "blocks": H100["blocks"],
        "shared": H100["smem"] // (shared + H100["smem_reserved"]),
    }
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: limits[k])
    return blocks * warps / H100["warps"], limiter


def by_kernel(text: str, header: str):
    """(mangled kernel name, line) for every line after a `header` line that names a kernel."""
    current = None
    for line in text.splitlines():
        m = re.match(header, line)
        if m:
            current = m.group(1)
        elif current is not None:
            yield current, line


def parse(so: Path, cuobjdump: str) -> list[Kernel]:
    kernels: dict[str, Kernel] = {}
    usage = run(cuobjdump, "-res-usage", str(so))
    for name, line in by_kernel(usage, r"\s*Function (\S+):\s*$"):
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m:
            k = kernels.setdefault(name, Kernel(name))
            k.registers, k.stack, k.shared, k.local = map(int, m.groups())
    if not kernels:
        raise ToolMissing(f"{so.name} holds no CUDA kernels (a build without CUDA)")
    for name, line in by_kernel(run(cuobjdump, "-sass", str(so)), r"\s*Function : (\S+)"):
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?((?:LDG|STG|LDL|STL)\S*)", line)
        if not m:
            continue
        k = kernels.setdefault(name, Kernel(name))
        opcode = m.group(1)
        if opcode.startswith(("LDL", "STL")):
            k.local_instructions += 1
        elif opcode.startswith("LDG"):
            k.widest_load = max(k.widest_load, access_bits(opcode))
            k.loads[opcode] = k.loads.get(opcode, 0) + 1
        else:
            k.widest_store = max(k.widest_store, access_bits(opcode))
    # __launch_bounds__ block sizes from the ELF's .nv.info.<kernel> sections
    pending = set()
    for name, line in by_kernel(run(cuobjdump, "-elf", str(so)), r"\s*\.nv\.info\.(\S+)"):
        if name not in kernels:
            continue
        if "EIATTR_MAX_THREADS" in line:
            pending.add(name)
        elif name in pending and line.strip().startswith("Value:"):
            x, y, z = (int(v, 16) for v in line.split()[1:4])
            kernels[name].block = x * y * z
            pending.discard(name)
    names = demangle(list(kernels))
    for k in kernels.values():
        k.name = names.get(k.mangled, k.mangled).replace("(anonymous namespace)::", "")
        k.family = family_of(k.name)
        k.dtype = dtype_of(k.name)
        k.streaming = k.family.split("/")[0] in STREAMING
        k.occupancy, k.limiter = occupancy(k.registers, k.shared, k.block)
    return sorted(kernels.values(), key=lambda k: (k.family, k.dtype, k.name))


def totals(kernels: list[Kernel]) -> dict:
    target = [k for k in kernels if k.streaming and k.dtype in TARGET_DTYPES]
    wide = [k for k in target if k.widest_load >= 128]
    local = [k.name for k in kernels if k.uses_local_memory]
    regs = [k.registers for k in kernels]
    return {
        "kernels": len(kernels),
        "streaming_kernels": sum(k.streaming for k in kernels),
        "streaming_target_dtypes": len(target),
        "streaming_target_with_128bit_loads": len(wide),
        "fraction_128bit": len(wide) / len(target) if target else 0.0,
        "streaming_without_128bit_loads": sorted(k.name for k in target if k.widest_load < 128),
        "kernels_with_local_memory": local,
        "registers_min": min(regs),
        "registers_max": max(regs),
        "occupancy_min": min(k.occupancy for k in kernels),
        "occupancy_max": max(k.occupancy for k in kernels),
    }


def summary_rows(kernels: list[Kernel]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for k in kernels:
        key = (k.family, k.dtype)
        r = rows.setdefault(key, {"family": k.family, "dtype": k.dtype, "n": 0,
                                  "streaming": k.streaming, "regs": [], "local": 0,
                                  "load": [], "store": [], "occ": []})
        r["n"] += 1
        r["regs"].append(k.registers)
        r["local"] += k.uses_local_memory
        r["load"].append(k.widest_load)
        r["store"].append(k.widest_store)
        r["occ"].append(k.occupancy)
    return list(rows.values())


def span(values, fmt="{}"):
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def print_table(kernels: list[Kernel], every: bool) -> None:
    head = f"{'kernel':58s} {'dtype':9s} {'n':>3s} {'strm':>4s} {'regs':>7s} {'local':>5s} " \
           f"{'ld bits':>7s} {'st bits':>7s} {'occupancy':>9s}"
    print(head)
    print("-" * len(head))
    if every:
        for k in kernels:
            print(f"{k.name[:58]:58s} {k.dtype:9s} {1:3d} {'yes' if k.streaming else '':>4s} "
                  f"{k.registers:7d} {int(k.uses_local_memory):5d} {k.widest_load:7d} "
                  f"{k.widest_store:7d} {k.occupancy:9.0%}")
        return
    for r in summary_rows(kernels):
        print(f"{r['family'][:58]:58s} {r['dtype']:9s} {r['n']:3d} "
              f"{'yes' if r['streaming'] else '':>4s} {span(r['regs']):>7s} {r['local']:5d} "
              f"{span(r['load']):>7s} {span(r['store']):>7s} "
              f"{span([round(100 * o) for o in r['occ']], '{}%'):>9s}")


def report(so: Path | None = None) -> tuple[list[Kernel], dict]:
    """Every kernel of the extension and the totals; raises ToolMissing when it cannot."""
    so = so or find_extension()
    if so is None:
        raise ToolMissing("effseg/_C*.so not built")
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        raise ToolMissing("cuobjdump not found (CUDA toolkit, nvidia-cuda-cuobjdump or triton "
                          "wheels); set CUOBJDUMP")
    kernels = parse(so, cuobjdump)
    return kernels, totals(kernels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--so", type=Path, help="the extension (default: effseg/_C*.so)")
    parser.add_argument("--json", type=Path, help="write every kernel and the totals here")
    parser.add_argument("--all", action="store_true", help="one row per kernel")
    args = parser.parse_args(argv)
    try:
        kernels, tot = report(args.so)
    except ToolMissing as e:
        print(f"sass_report: {e}", file=sys.stderr)
        return 2
    print_table(kernels, args.all)
    print()
    print(f"{tot['kernels']} kernels, {tot['streaming_kernels']} streaming; streaming kernels "
          f"for float/half/bfloat16 with 128-bit global loads: "
          f"{tot['streaming_target_with_128bit_loads']}/{tot['streaming_target_dtypes']} "
          f"({tot['fraction_128bit']:.0%}); kernels with local memory: "
          f"{len(tot['kernels_with_local_memory'])}; registers {tot['registers_min']}-"
          f"{tot['registers_max']}; H100 occupancy {tot['occupancy_min']:.0%}-"
          f"{tot['occupancy_max']:.0%} (theoretical)")
    if args.json:
        args.json.write_text(json.dumps({"totals": tot, "kernels": [
            {**asdict(k), "uses_local_memory": k.uses_local_memory} for k in kernels]},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
