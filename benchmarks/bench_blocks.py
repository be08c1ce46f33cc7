"""Block-level benchmark: a stack of conv blocks (2 x Conv3d -> norm -> LeakyReLU each) at
CT-like sizes, one training step (forward, backward, SGD step), in four variants in one run:

- stock:               nn.Conv3d + nn.BatchNorm3d + nn.LeakyReLU
- stock + checkpoint:  the same, each block under torch.utils.checkpoint
- effseg in-place ABN: RecomputeBlock3d(recompute=False) (Conv3d + InPlaceABN)
- effseg recompute:    RecomputeBlock3d (keeps only each block's input)
- effseg recompute, keep output: the same with keep_output=True (recomputes one unit per block;
  the kept outputs are the next blocks' inputs)

Reports saved-for-backward bytes, peak memory of the step (CUDA max_memory_allocated on GPU; on
CPU the peak RSS above the RSS before the step, each variant in its own process) and step
time, each as a ratio to stock. Prints a table and writes JSON.

    python benchmarks/bench_blocks.py [--quick] [--device cuda] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, time_it, write_json  # noqa: E402

from effseg.memory import peak_rss_bytes, reset_peak_rss, rss_bytes, saved_bytes  # noqa: E402
from effseg.nn import RecomputeBlock3d  # noqa: E402

VARIANTS = ["stock", "stock + checkpoint", "effseg in-place ABN", "effseg recompute",
            "effseg recompute+keep"]


class StockBlock(torch.nn.Sequential):
    def __init__(self, c):
        super().__init__(torch.nn.Conv3d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm3d(c),
                         torch.nn.LeakyReLU(0.01), torch.nn.Conv3d(c, c, 3, padding=1, bias=False),
                         torch.nn.BatchNorm3d(c), torch.nn.LeakyReLU(0.01))


class Checkpointed(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def build(variant: str, channels: int, blocks: int) -> torch.nn.Module:
    if variant == "stock":
        return torch.nn.Sequential(*[StockBlock(channels) for _ in range(blocks)])
    if variant == "stock + checkpoint":
        return torch.nn.Sequential(*[Checkpointed(StockBlock(channels)) for _ in range(blocks)])
    recompute = variant.startswith("effseg recompute")
    keep = variant.endswith("+keep")
    return torch.nn.Sequential(*[RecomputeBlock3d(channels, channels, recompute=recompute,
                                                  keep_output=keep) for _ in range(blocks)])


def measure(variant, shape, blocks, device, dtype, reps):
    torch.manual_seed(0)
    model = build(variant, shape[1], blocks).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(shape, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
        out.float().square().mean().backward()
        opt.step()

    step()  # warm-up: allocator, cuDNN/oneDNN algorithm choice, optimizer state
    row = {"variant": variant, "shape": list(shape), "blocks": blocks}
    with autocast:
        row["saved_bytes"] = saved_bytes(lambda: model(x).float().square().mean())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs) here")
        base = rss_bytes()
        step()
        row["peak_bytes"] = peak_rss_bytes() - base
    row["seconds"] = time_it(step, device, reps, warmup=0)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/out/bench_blocks.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one variant, JSON to stdout
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    reps = args.reps or (5 if device.type == "cuda" else 3)
    if args.worker:
        shape = tuple(int(v) for v in args.shape.split(","))
        print(json.dumps(measure(args.worker, shape, args.blocks, device, dtype, reps)))
        return
    if device.type == "cuda":
        shapes = [(1, 16, 64, 64, 64)] if args.quick else [(1, 32, 128, 128, 128),
                                                            (1, 16, 256, 256, 256)]
    else:
        shapes = [(1, 8, 32, 32, 32)] if args.quick else [(1, 16, 64, 64, 64),
                                                          (1, 8, 96, 96, 96)]
    rows = []
    for shape in shapes:
        for variant in VARIANTS:
            if device.type == "cpu":  # own process: the peak RSS of this variant alone
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant,
                       "--shape", ",".join(map(str, shape)), "--device", "cpu",
                       "--dtype", args.dtype, "--blocks", str(args.blocks), "--reps", str(reps)]
                # Memory: a fixed mmap threshold makes glibc return every large tensor's memory
                # on free, so that RSS follows what is alive (by default freed memory stays
                # resident). Time: default malloc, as users run it.
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
                mem = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                row = json.loads(mem.stdout.strip().splitlines()[-1])
                fast = subprocess.run(cmd, check=True, capture_output=True, text=True)
                row["seconds"] = json.loads(fast.stdout.strip().splitlines()[-1])["seconds"]
                rows.append(row)
            else:
                rows.append(measure(variant, shape, args.blocks, device, dtype, reps))
                torch.cuda.empty_cache()
    for r in rows:
        ref = next(s for s in rows if s["shape"] == r["shape"] and s["variant"] == "stock")
        for k in ("saved_bytes", "peak_bytes", "seconds"):
            r[k.split("_")[0] + "_vs_stock"] = r[k] / ref[k]
    peak_name = "peak alloc" if device.type == "cuda" else "peak RSS"
    print(f"\n{args.blocks} blocks, one training step, {args.dtype}, {device.type}")
    print(f"{'shape':<22} {'variant':<22} {'saved MB':>9} {'x':>5} {peak_name + ' MB':>14} "
          f"{'x':>5} {'step s':>8} {'x':>5}")
    for r in rows:
        print(f"{str(tuple(r['shape'])):<22} {r['variant']:<22} {r['saved_bytes'] / 2**20:9.1f} "
              f"{r['saved_vs_stock']:5.2f} {r['peak_bytes'] / 2**20:14.1f} "
              f"{r['peak_vs_stock']:5.2f} {r['seconds']:8.3f} {r['seconds_vs_stock']:5.2f}")
    write_json(args.out, {"machine": machine(), "device": device.type, "dtype": args.dtype,
                          "rows": rows})


if __name__ == "__main__":
    main()
