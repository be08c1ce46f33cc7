"""Op-level benchmark: forward + backward of in-place activated normalization versus the stock
norm + activation (LeakyReLU; for group norm also PReLU, and batch norm + PReLU), at CT-like
sizes, in one run. Group norm uses 8 groups (MONAI's SegResNet default), PReLU one slope
(nn.PReLU's default).

Reports per size and variant: median time, bytes saved for backward, achieved bandwidth (the
nominal traffic of the fused algorithm, 8 tensor passes: stats 1, normalize 2, backward reduce 2,
backward input 3, divided by the time), and on GPU the peak allocated memory and the ratio to a
measured device-to-device copy bandwidth. On GPU also each effseg op alone (statistics, forward,
backward sums, backward input out of place and in place, the fused loss's forward and backward)
at the first size: its fewest bytes moved / its time, next to a device-to-device copy of the
same tensor measured in the same run, so the fraction of the memory roofline each kernel reaches
is read directly. Prints the tables and writes JSON.

    python benchmarks/bench_ops.py                 # CT-like sizes (minutes on a 2-core CPU)
    python benchmarks/bench_ops.py --quick         # small sizes, seconds
    python benchmarks/bench_ops.py --device cuda --dtype bfloat16 --out results.json
    python benchmarks/bench_ops.py --kinds group group_prelu batch_prelu   # only those
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, sync, time_it, write_json  # noqa: E402

from effseg.memory import saved_bytes  # noqa: E402
from effseg.nn import InPlaceABN, InPlaceAGN, InPlaceAIN  # noqa: E402

SIZES = [(2, 32, 96, 96, 96), (1, 16, 192, 192, 192)]
QUICK_SIZES = [(2, 16, 32, 32, 32), (1, 8, 64, 64, 64)]
PASSES = 8


KINDS = ("batch", "instance", "group", "group_prelu", "batch_prelu")
# the stock variant each kind is compared with
STOCK_OF = {"batch": "stock BatchNorm3d+LeakyReLU", "instance": "stock InstanceNorm3d+LeakyReLU",
            "group": "stock GroupNorm+LeakyReLU", "group_prelu": "stock GroupNorm+PReLU",
            "batch_prelu": "stock BatchNorm3d+PReLU"}


def variants(C: int, kinds=KINDS):
    act = torch.nn.LeakyReLU(0.01)
    nn = torch.nn
    G = min(8, C)
    all_variants = {
        "stock BatchNorm3d+LeakyReLU": (nn.Sequential(nn.BatchNorm3d(C), act), "batch"),
        "effseg InPlaceABN": (InPlaceABN(C), "batch"),
        "stock InstanceNorm3d+LeakyReLU": (
            nn.Sequential(nn.InstanceNorm3d(C, affine=True), act), "instance"),
        "effseg InPlaceAIN": (InPlaceAIN(C), "instance"),
        "stock GroupNorm+LeakyReLU": (nn.Sequential(nn.GroupNorm(G, C), act), "group"),
        "effseg InPlaceAGN": (InPlaceAGN(G, C), "group"),
        "stock GroupNorm+PReLU": (nn.Sequential(nn.GroupNorm(G, C), nn.PReLU()), "group_prelu"),
        "effseg InPlaceAGN prelu": (InPlaceAGN(G, C, activation="prelu"), "group_prelu"),
        "stock BatchNorm3d+PReLU": (nn.Sequential(nn.BatchNorm3d(C), nn.PReLU()),
                                    "batch_prelu"),
        "effseg InPlaceABN prelu": (InPlaceABN(C, activation="prelu"), "batch_prelu"),
    }
    return {name: v for name, v in all_variants.items() if v[1] in kinds}


def copy_bandwidth(device: torch.device, numel: int, dtype: torch.dtype, reps: int) -> float:
    src = torch.empty(numel, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_it(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / t


def op_bandwidth(shape, device, dtype, reps, layout, classes=14):
    """Each effseg op alone on one tensor of `shape`: seconds, the fewest bytes it must move (reads
    plus writes of the tensor; O(C) statistics left out) and GB/s, with a device-to-device copy of
    the same tensor timed in the same run; the loss on (N, classes, *spatial) logits with uint8
    labels. Repeated in-place calls keep values bounded: unit statistics, fixed-statistics
    backward."""
    E = torch.ops.effseg
    C = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
    dy = torch.randn_like(x)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.ones(C, device=device, dtype=acc)
    b = torch.zeros(C, device=device, dtype=acc)
    mean, var = torch.zeros(C, device=device, dtype=acc), torch.ones(C, device=device, dtype=acc)
    s1, s2 = E.norm_act_backward_reduce(x, dy, w, b, False, "leaky_relu", 0.01)
    n = x.numel() * x.element_size()
    logits = torch.randn((shape[0], classes) + tuple(shape[2:]), device=device, dtype=dtype)
    labels = torch.randint(0, classes, (shape[0],) + tuple(shape[2:]), device=device,
                           dtype=torch.uint8)
    ln, yn = logits.numel() * logits.element_size(), labels.numel()
    one = torch.ones((), device=device, dtype=acc)
    coef_dice = torch.randn(shape[0], classes, 2, device=device, dtype=acc)
    src = torch.empty(x.numel(), device=device, dtype=dtype).normal_()
    dst = torch.empty_like(src)
    cases = {
        "device-to-device copy": (lambda: dst.copy_(src), 2 * n),
        "norm_stats": (lambda: E.norm_stats(x, False), n),
        "norm_act_forward_": (
            lambda: E.norm_act_forward_(x, mean, var, w, b, 1e-5, "leaky_relu", 0.01), 2 * n),
        "norm_act_backward_reduce": (
            lambda: E.norm_act_backward_reduce(x, dy, w, b, False, "leaky_relu", 0.01), 2 * n),
        "norm_act_backward_input": (
            lambda: E.norm_act_backward_input(x, dy, var, w, b, s1, s2, None, 1e-5,
                                              "leaky_relu", 0.01), 3 * n),
        "norm_act_backward_input_ (dx = dy)": (
            lambda: E.norm_act_backward_input_(x, dy, var, w, b, None, None, None, 1e-5,
                                               "leaky_relu", 0.01), 3 * n),
        f"dice_ce_forward (K={classes})": (
            lambda: E.dice_ce_forward(logits, labels, None, -100), ln + yn),
        f"dice_ce_backward (K={classes})": (
            lambda: E.dice_ce_backward(one, logits, labels, None, -100, coef_dice, one),
            2 * ln + yn),
    }
    rows = []
    for name, (fn, nbytes) in cases.items():
        t = time_it(fn, device, reps)
        rows.append({"op": name, "shape": list(shape), "seconds": t, "bytes": nbytes,
                     "gbps": nbytes / t / 1e9})
    copy = rows[0]["gbps"]
    for r in rows:
        r["copy_fraction"] = r["gbps"] / copy
    return rows


def bench_size(shape, device, dtype, reps, layout, kinds=KINDS):
    C = shape[1]
    base = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
    grad = torch.randn_like(base)
    leaf = base.clone().requires_grad_()
    rows = []
    for name, (module, kind) in variants(C, kinds).items():
        module = module.to(device).train()

        def step():
            h = leaf.clone()  # a non-leaf input, as a conv output would be
            out = module(h)
            out.backward(grad)

        # clone() outside the timer: time only the norm-act forward and backward
        def timed():
            h = leaf.clone()
            sync(device)
            return h

        inputs = [timed() for _ in range(reps + 1)]
        it = iter(inputs)

        def fwd_bwd():
            leaf.grad = None  # the input gradient is handed over, not added into the last one
            module(next(it)).backward(grad)

        t = time_it(fwd_bwd, device, reps)
        del inputs
        saved = saved_bytes(lambda: module(leaf.clone()))
        peak = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            h = leaf.clone()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step_out = module(h)
            step_out.backward(grad)
            peak = torch.cuda.max_memory_allocated(device) - before
            del h, step_out
        nbytes = base.numel() * base.element_size()
        rows.append({
            "shape": list(shape), "variant": name, "kind": kind, "seconds": t,
            "saved_bytes": saved, "peak_bytes": peak,
            "gbps": PASSES * nbytes / t / 1e9,
        })
        leaf.grad = None
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="which norm + activation kinds to compare (default: all)")
    parser.add_argument("--out", default="benchmarks/out/bench_ops.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    layout = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    sizes = QUICK_SIZES if args.quick else SIZES
    reps = args.reps or (5 if device.type == "cuda" else 3)
    torch.manual_seed(0)

    rows = []
    for shape in sizes:
        rows += bench_size(shape, device, dtype, reps, layout, args.kinds)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    copy_bw = None
    if device.type == "cuda":
        copy_bw = copy_bandwidth(device, max(r["shape"][0] * r["shape"][1] * 96 ** 3 for r in rows),
                                 dtype, reps)
    by_key = {(tuple(r["shape"]), r["variant"]): r for r in rows}
    for r in rows:
        ref = by_key[(tuple(r["shape"]), STOCK_OF[r["kind"]])]
        r["time_vs_stock"] = r["seconds"] / ref["seconds"]
        r["saved_vs_stock"] = r["saved_bytes"] / ref["saved_bytes"]
        r["copy_bandwidth_fraction"] = r["gbps"] * 1e9 / copy_bw if copy_bw else None

    print(f"\nnorm + activation, forward + backward, {args.dtype}, {device.type}, "
          f"{'channels-last' if args.channels_last else 'contiguous'}")
    print(f"{'shape':<22} {'variant':<32} {'ms':>9} {'x stock':>8} {'saved MB':>9} "
          f"{'x stock':>8} {'GB/s':>7}" + (f" {'copy%':>6}" if copy_bw else ""))
    for r in rows:
        line = (f"{str(tuple(r['shape'])):<22} {r['variant']:<32} {r['seconds'] * 1e3:9.1f} "
                f"{r['time_vs_stock']:8.2f} {r['saved_bytes'] / 2**20:9.1f} "
                f"{r['saved_vs_stock']:8.2f} {r['gbps']:7.1f}")
        if copy_bw:
            line += f" {100 * r['copy_bandwidth_fraction']:6.1f}"
        print(line)
    if copy_bw:
        print(f"device-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    op_rows = []
    if device.type == "cuda":
        op_rows = op_bandwidth(sizes[0], device, dtype, reps, layout)
        print(f"\neach op alone at {tuple(sizes[0])}: fewest bytes moved / time, and that "
              f"bandwidth / a copy's in the same run")
        print(f"{'op':<36} {'ms':>8} {'MB':>8} {'GB/s':>7} {'x copy':>7}")
        for r in op_rows:
            print(f"{r['op']:<36} {r['seconds'] * 1e3:8.3f} {r['bytes'] / 1e6:8.1f} "
                  f"{r['gbps']:7.0f} {r['copy_fraction']:7.2f}")
    write_json(args.out, {"machine": machine(), "device": device.type, "dtype": args.dtype,
                          "channels_last": args.channels_last, "copy_bandwidth": copy_bw,
                          "rows": rows, "ops": op_rows})


if __name__ == "__main__":
    main()
