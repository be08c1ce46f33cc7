"""Model-level benchmark: one training step (forward, Dice + CE loss, backward, Adam step) on
whole volumes of several sizes, in one run:

- effseg FullVolumeFCN (recomputing blocks, concatenation-free skips, in-place norms)
- the same computing in the input's (contiguous) layout (`channels_last=False`)
- the same FullVolumeFCN recomputing only its full-resolution level, and with recompute=False
  (in-place norms and concatenation-free skips only): the time/memory trade-off of
  recomputation, measured
- StockUNet3d with the same topology and weights (`FullVolumeFCN.to_stock()`), and the same
  in channels-last layout (weights and input; FullVolumeFCN computes in it on a CPU whatever
  the input's layout, so this row tells how much of its time is the layout)
- the same stock network with every block under torch.utils.checkpoint
- MONAI DynUNet with the same widths and strides, when MONAI is installed

Rows: bytes saved for backward, peak memory of the step (CUDA max_memory_allocated; on CPU the
peak RSS above the RSS before the step, each variant in its own process, and the peak of bytes
held by tensors tracked op by op, `effseg.memory.peak_allocated`), step time,
parameters; ratios to stock. With --bisect on a GPU, also the largest cubic volume that trains
for effseg and stock. Prints a table, writes JSON and a PNG of peak memory against volume size.

    python benchmarks/bench_model.py [--quick] [--device cuda] [--amp bf16] [--bisect]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, time_it, write_json  # noqa: E402

from effseg.memory import peak_allocated, saved_bytes, step_peak  # noqa: E402
from effseg.models import FullVolumeFCN  # noqa: E402
from effseg.models._shape import to_channels_last  # noqa: E402
from effseg.models.fcn import DEFAULT_CHANNELS  # noqa: E402

VARIANTS = ["effseg FullVolumeFCN", "effseg contiguous", "effseg recompute finest",
            "effseg no recompute",
            "StockUNet3d", "StockUNet3d channels-last", "stock + checkpoint", "MONAI DynUNet"]


class _Checkpointed(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False)


def build(variant: str, classes: int):
    torch.manual_seed(0)
    levels = len(DEFAULT_CHANNELS)
    recompute = {"effseg recompute finest": (True,) + (False,) * (levels - 1),
                 "effseg no recompute": False}.get(variant, True)
    fcn = FullVolumeFCN(in_channels=1, out_channels=classes, recompute=recompute,
                        channels_last=False if variant == "effseg contiguous" else None)
    if variant.startswith("effseg"):
        return fcn
    if variant == "MONAI DynUNet":
        from monai.networks.nets import DynUNet
        k = [[3, 3, 3]] * len(fcn.channels)
        return DynUNet(3, 1, classes, k, [list(s) for s in fcn.strides],
                       [list(s) for s in fcn.strides[1:]], filters=list(fcn.channels),
                       norm_name="batch", act_name=("leakyrelu", {"negative_slope": 0.01}))
    stock = fcn.to_stock()
    if variant == "StockUNet3d channels-last":
        stock = stock.to(memory_format=torch.channels_last_3d)
    if variant == "stock + checkpoint":
        stock.encoder = torch.nn.ModuleList(_Checkpointed(b) for b in stock.encoder)
        stock.decoder = torch.nn.ModuleList(_Checkpointed(b) for b in stock.decoder)
    return stock


def loss_fn(classes: int):
    from effseg.losses import DiceCELoss
    loss = DiceCELoss()
    return lambda out, target: loss(out.float(), target)


def as_shape(size) -> tuple[int, int, int, int]:
    """(batch, D, H, W) from an edge (a cube, batch 1) or a "NxDxHxW" string."""
    if isinstance(size, int):
        return (1, size, size, size)
    if isinstance(size, (tuple, list)):
        return tuple(int(v) for v in size)
    parts = [int(v) for v in str(size).lower().split("x")]
    if len(parts) != 4 or min(parts) < 1:
        raise ValueError(f"bench_model: a shape is NxDxHxW (batch and volume), got {size!r}")
    return tuple(parts)


def label(shape) -> str:
    n, d, h, w = shape
    return f"{d}^3" if n == 1 and d == h == w else f"{n}x{d}x{h}x{w}"


def measure(variant, size, device, amp, reps, classes=3):
    shape = as_shape(size)
    n, spatial = shape[0], shape[1:]
    model = build(variant, classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(n, 1, *spatial, device=device)
    if variant.endswith("channels-last"):
        x = to_channels_last(x)
    target = torch.randint(0, classes, (n,) + spatial, device=device)
    lf = loss_fn(classes)
    ctx = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def forward_loss():
        with ctx:
            return lf(model(x), target)

    def timed():
        opt.zero_grad(set_to_none=True)
        forward_loss().backward()
        opt.step()

    # Timed first, after a warm-up (algorithm choice, Adam state): the RSS probe below
    # (`step_peak`) switches glibc to mmap for every allocation above 64 KiB for the rest of the
    # process, which would charge page faults to every later temporary, as no training run has.
    timed()
    seconds = time_it(timed, device, reps, warmup=1)
    cube = n == 1 and len(set(spatial)) == 1
    row = {"variant": variant, "edge": spatial[0] if cube else None, "shape": list(shape),
           "voxels": n * spatial[0] * spatial[1] * spatial[2],
           "parameters": sum(p.numel() for p in model.parameters()),
           "saved_bytes": saved_bytes(forward_loss)}
    with ctx:
        row["peak_bytes"] = step_peak(model, x, target, lf, opt)
    # The same step's peak of bytes held by tensors, op by op: on CPU the reproducible figure
    # (RSS also counts the allocator's and oneDNN's own memory); on CUDA the allocator's peak
    # above is that already.
    row["alloc_bytes"] = None
    if device.type == "cpu":
        def step():
            with ctx:
                loss = lf(model(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        row["alloc_bytes"] = peak_allocated(step)
    row["seconds"] = seconds
    return row


def out_of_memory(e: BaseException) -> bool:
    """Whether a failed step ran out of device memory: torch's OutOfMemoryError, or cuDNN failing
    to get scratch memory near the limit, which surfaces as a plain RuntimeError."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("out of memory", "ALLOC_FAILED", "unable to find an engine"))


def fits(variant, edge, device, amp, classes=3) -> bool:
    try:
        measure(variant, edge, device, amp, 1, classes)
        return True
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        return False
    finally:
        gc.collect()  # the failed step's graph may hold tensors in reference cycles
        torch.cuda.empty_cache()


def largest_cube(variant, device, amp, lo=64, hi=1024, step=32, seconds=150.0) -> dict:
    """Largest edge (multiple of `step`) whose training step fits, by bisection within
    `seconds`: the edge that trained, the smallest that did not (None: none tried), whether the
    bracket closed, and every probe."""
    start, probes, failed = time.time(), [], None
    while hi - lo > step and time.time() - start < seconds:
        mid = (lo + hi) // 2 // step * step
        ok = fits(variant, mid, device, amp)
        probes.append([mid, ok])
        if ok:
            lo = mid
        else:
            hi = failed = mid
    return {"edge": lo, "fails_at": failed, "converged": hi - lo <= step, "probes": probes}


def predict(rows, edge: int) -> dict:
    """Least-squares line peak = a + b * voxels per variant, evaluated at edge^3."""
    rows = [r for r in rows if r["edge"] is not None]
    if not rows:
        return {}
    key = "alloc_bytes" if rows[0].get("alloc_bytes") is not None else "peak_bytes"
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = [(r["voxels"], r[key]) for r in rows if r["variant"] == variant]
        if len(pts) < 2:
            continue
        n = len(pts)
        mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
        b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        out[variant] = {"bytes": my + b * (edge ** 3 - mx), "per_voxel": b,
                        "edges": [r["edge"] for r in rows if r["variant"] == variant],
                        "measure": "tensor peak" if key == "alloc_bytes" else "allocator peak"}
    return out


def available(variant: str) -> bool:
    if variant != "MONAI DynUNet":
        return True
    try:
        import monai  # noqa: F401
        return True
    except ImportError:
        return False


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    # CPU: the peak of bytes held by tensors (RSS adds the allocator's and oneDNN's own memory);
    # CUDA: the allocator's peak.
    rows = [r for r in rows if r["edge"] is not None]
    if not rows:
        return
    key = "alloc_bytes" if rows[0].get("alloc_bytes") is not None else "peak_bytes"
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = ["o-", "s--", "^-.", "d:"]
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        pts = sorted((r["voxels"], r[key] / 2**30) for r in rows if r["variant"] == variant)
        ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], styles[i % len(styles)],
                label=variant)
    ax.set_xlabel("volume (million voxels)")
    ax.set_ylabel("peak memory of a training step (GiB)" + (
        ", tensors" if key == "alloc_bytes" else ""))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"], default="off")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--edges", type=int, nargs="*",
                        help="cubes (batch 1) to measure; given without values, only --shapes")
    parser.add_argument("--shapes", nargs="+", default=[], metavar="NxDxHxW",
                        help="also these batch sizes and volumes, e.g. 2x40x40x28 (the phantom "
                             "job's)")
    parser.add_argument("--bisect", type=float, default=0.0, metavar="SECONDS",
                        help="on a GPU, spend up to SECONDS per variant finding the largest "
                             "cube that trains")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--time-limit", type=float, metavar="SECONDS",
                        help="measure no new row after SECONDS and share what is left of them "
                             "between the two bisections (the JSON is rewritten after every "
                             "row, so a run stopped from outside keeps its rows too)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: all")
    parser.add_argument("--predict-edge", type=int, metavar="EDGE",
                        help="also fit peak = a + b * voxels over the measured sizes (per "
                             "variant, tensor peak on CPU) and extrapolate to EDGE^3")
    parser.add_argument("--out", default="benchmarks/out/bench_model.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    reps = args.reps or (5 if device.type == "cuda" else 2)
    if args.worker:
        print(json.dumps(measure(args.worker, as_shape(args.shape), device, amp, reps)))
        return
    if args.edges is not None:
        edges = args.edges
    elif device.type == "cuda":
        edges = [128, 256] if args.quick else [128, 192, 256, 320]
    else:
        edges = [48] if args.quick else [64, 96]
    start = time.time()
    rows, largest, skipped = [], {}, []

    def save():
        """The JSON so far: a run stopped by a time limit keeps what it measured."""
        for r in rows:
            ref = next((s for s in rows
                        if s["shape"] == r["shape"] and s["variant"] == "StockUNet3d"), None)
            for k in ("saved_bytes", "peak_bytes", "alloc_bytes", "seconds", "parameters"):
                r[k.split("_")[0] + "_vs_stock"] = (
                    None if ref is None or r[k] is None else r[k] / ref[k])
        write_json(args.out, {"machine": machine(), "device": device.type, "amp": args.amp,
                              "rows": rows, "largest_cube": largest, "skipped": skipped,
                              "predicted": predict(rows, args.predict_edge)
                              if args.predict_edge else {}})

    def time_left() -> float:
        return args.time_limit - (time.time() - start) if args.time_limit else float("inf")

    shapes = [as_shape(e) for e in edges] + [as_shape(s) for s in args.shapes]
    for shape in shapes:
        # FullVolumeFCN computes in the input's layout off the CPU: "effseg contiguous" is the
        # same network there, measured only when asked for
        default = [v for v in VARIANTS if device.type == "cpu" or v != "effseg contiguous"]
        for variant in filter(available, args.variants or default):
            if time_left() <= 0:
                skipped.append([variant, label(shape)])
                continue
            if device.type == "cpu":
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--shape",
                       "x".join(map(str, shape)), "--device", "cpu", "--amp", args.amp,
                       "--reps", str(reps)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            else:
                rows.append(measure(variant, shape, device, amp, reps))
                torch.cuda.empty_cache()
            save()
    if args.bisect and device.type == "cuda":
        for i, variant in enumerate(("effseg FullVolumeFCN", "StockUNet3d")):
            budget = min(args.bisect, time_left() / (2 - i))
            if budget > 0:
                largest[variant] = largest_cube(variant, device, amp, seconds=budget)
                save()
    peak_name = "peak alloc" if device.type == "cuda" else "peak RSS"
    print(f"\nOne training step (forward, Dice+CE, backward, Adam), batch 1, amp={args.amp}, "
          f"{device.type}")
    cpu = device.type == "cpu"
    print(f"{'volume':<10} {'variant':<22} {'params M':>8} {'saved MB':>9} {'x':>5} "
          f"{peak_name + ' MB':>14} {'x':>5} " + (f"{'tensors MB':>11} {'x':>5} " if cpu else "")
          + f"{'step s':>8} {'x':>5}")
    for r in filter(lambda r: r["saved_vs_stock"] is not None, rows):
        alloc = (f"{r['alloc_bytes'] / 2**20:11.1f} {r['alloc_vs_stock']:5.2f} " if cpu else "")
        print(f"{label(r['shape']):<10} {r['variant']:<22} {r['parameters'] / 1e6:8.2f} "
              f"{r['saved_bytes'] / 2**20:9.1f} {r['saved_vs_stock']:5.2f} "
              f"{r['peak_bytes'] / 2**20:14.1f} {r['peak_vs_stock']:5.2f} {alloc}"
              f"{r['seconds']:8.3f} {r['seconds_vs_stock']:5.2f}")
    for variant, b in largest.items():
        print(f"largest cube that trains, {variant}: {b['edge']}^3 (fails at "
              f"{b['fails_at']}^3{'' if b['converged'] else '; bisection not converged'})")
    predicted = predict(rows, args.predict_edge) if args.predict_edge else {}
    for variant, p in predicted.items():
        print(f"predicted peak at {args.predict_edge}^3, {variant}: {p['bytes'] / 2**30:.1f} GiB "
              f"(fit over {p['edges']}, {p['measure']})")
    if skipped:
        print(f"not measured (--time-limit {args.time_limit:.0f} s reached): {skipped}")
    save()
    plot(rows, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
