"""Overhead of the synchronized in-place batch norm against the local one, on one rank.

A one-rank process group (NCCL on a GPU, gloo on CPU) makes InPlaceABNSync issue its real
collectives (one all-gather of 2C + 1 numbers in forward, one all-reduce of 2C + 1 in backward)
with nothing to wait for, so the difference to InPlaceABN is the cost of those collectives and of
the merge arithmetic. Also reported: the same for a recomputing block (two norms) and stock
SyncBatchNorm against BatchNorm3d for comparison (GPU only: torch's SyncBatchNorm refuses CPU
tensors, effseg's runs on gloo as well). Prints a table and writes JSON.

    python benchmarks/bench_sync.py                 # CT-like sizes
    python benchmarks/bench_sync.py --quick         # small sizes, seconds
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, sync, time_it, write_json  # noqa: E402

from effseg.nn import InPlaceABN, InPlaceABNSync, RecomputeBlock3d  # noqa: E402

SIZES = [(2, 32, 96, 96, 96), (1, 32, 64, 64, 64), (1, 320, 8, 8, 8)]
QUICK_SIZES = [(2, 16, 32, 32, 32), (1, 64, 8, 8, 8)]


def open_group(device: torch.device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120))


def run_module(module, shape, device, dtype, reps):
    """(median seconds of forward + backward, output and input gradient of one step)."""
    torch.manual_seed(1)
    leaf = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    out = module(leaf * 1.0)
    grad = torch.randn_like(out)
    out.backward(grad)
    result = (out.detach().float(), leaf.grad.float())

    def step():
        leaf.grad = None  # handed over, not accumulated
        module(leaf * 1.0).backward(grad)

    return time_it(step, device, reps), result


def pairs(C: int):
    return {
        "norm-act": (lambda: InPlaceABN(C), lambda: InPlaceABNSync(C)),
        # on one rank torch's SyncBatchNorm runs plain batch norm (it synchronizes only with
        # more than one process): this row is a baseline of the harness, not a sync cost
        "stock BatchNorm3d (no sync on 1 rank)": (lambda: torch.nn.BatchNorm3d(C),
                                                  lambda: torch.nn.SyncBatchNorm(C)),
        "recompute block": (lambda: RecomputeBlock3d(C, C, norm="batch"),
                            lambda: RecomputeBlock3d(C, C, norm="sync_batch")),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--out", default="benchmarks/out/bench_sync.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    reps = args.reps or 10
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else 0)
        torch.cuda.set_device(device)
    open_group(device)
    torch.manual_seed(0)
    rows = []
    try:
        for shape in QUICK_SIZES if args.quick else SIZES:
            for what, (local, synced) in pairs(shape[1]).items():
                if what == "recompute block" and shape[2] > 64 and device.type == "cpu":
                    continue  # minutes per step on a small CPU; the norm rows show the cost
                if what.startswith("stock BatchNorm3d") and device.type == "cpu":
                    continue  # torch's SyncBatchNorm refuses CPU tensors
                runs = []
                for make in (local, synced):
                    torch.manual_seed(0)  # the same initial weights for both
                    runs.append(run_module(make().to(device, dtype).train(), shape, device,
                                           dtype, reps))
                (t_local, (y0, g0)), (t_sync, (y1, g1)) = runs
                # One rank: the synchronized result equals the local one up to rounding.
                diff = max((y1 - y0).abs().max().item(), (g1 - g0).abs().max().item())
                rows.append({"shape": list(shape), "what": what, "local_s": t_local,
                             "sync_s": t_sync, "overhead": t_sync / t_local - 1.0,
                             "max_abs_diff": diff})
                sync(device)
    finally:
        dist.destroy_process_group()
    print(f"\nsynchronized vs local, one rank, forward + backward, {device.type}")
    print(f"{'shape':<22} {'what':<20} {'local ms':>9} {'sync ms':>9} {'overhead':>9} "
          f"{'max diff':>9}")
    for r in rows:
        print(f"{str(tuple(r['shape'])):<22} {r['what']:<20} {r['local_s'] * 1e3:9.2f} "
              f"{r['sync_s'] * 1e3:9.2f} {100 * r['overhead']:8.1f}% {r['max_abs_diff']:9.1e}")
    write_json(args.out, {"machine": machine(), "device": device.type, "dtype": args.dtype,
                          "world_size": 1, "rows": rows})


if __name__ == "__main__":
    main()
