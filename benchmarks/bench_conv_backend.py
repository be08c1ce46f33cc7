"""What the CPU convolution backends cost for the shapes of a 3-D U-Net, the measurements behind
two choices effseg makes on a CPU (see `effseg.ops.slabs` and `FullVolumeFCN(channels_last=)`):

- layout: a 3x3x3 convolution of a few-channel full-resolution tensor on oneDNN, forward and
  backward (input and weight gradients), with the input contiguous and channels-last;
- backend: ATen's choice (`torch._C._select_conv_backend`; for a single float32 sample whose
  N*C*D*H is at most 20480, its slow im2col kernel) against oneDNN called directly
  (`aten.mkldnn_convolution`), forward.

Median wall time of --reps calls after one warm-up, float32, one process. Prints a table and
writes JSON.

    python benchmarks/bench_conv_backend.py [--threads 2] [--reps 15] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, time_it, write_json  # noqa: E402

CL = torch.channels_last_3d
LAYOUT_CASES = [((2, 16, 48, 48, 32), 16), ((1, 16, 64, 64, 64), 16), ((2, 32, 24, 24, 16), 32),
                ((2, 64, 12, 12, 8), 64)]
BACKEND_CASES = [((1, 1, 64, 64, 64), 16), ((1, 1, 96, 96, 96), 16), ((1, 1, 32, 32, 32), 16),
                 ((1, 16, 32, 32, 32), 16), ((1, 32, 16, 16, 16), 32), ((1, 64, 16, 16, 16), 64),
                 ((1, 64, 8, 8, 8), 64), ((1, 128, 8, 8, 8), 128), ((1, 128, 4, 4, 4), 128)]


def _backward(dz, x, w):
    return torch.ops.aten.convolution_backward(dz, x, w, None, [1] * 3, [1] * 3, [1] * 3, False,
                                               [0] * 3, 1, [True, True, False])


def _case(shape, co):
    """A random input of `shape` and a 3x3x3 weight to `co` channels, seeded."""
    torch.manual_seed(0)
    return torch.randn(shape), torch.randn(co, shape[1], 3, 3, 3)


def layout_rows(reps: int) -> list[dict]:
    rows = []
    for shape, co in LAYOUT_CASES:
        x0, w = _case(shape, co)
        row = {"shape": list(shape), "out_channels": co}
        for name, x in (("contiguous", x0), ("channels_last", x0.contiguous(memory_format=CL))):
            dz = torch.randn_like(F.conv3d(x, w, padding=1))
            row[f"{name}_forward_ms"] = 1e3 * time_it(
                lambda: F.conv3d(x, w, padding=1), torch.device("cpu"), reps)
            row[f"{name}_backward_ms"] = 1e3 * time_it(
                lambda: _backward(dz, x, w), torch.device("cpu"), reps)
        rows.append(row)
    return rows


def backend_rows(reps: int) -> list[dict]:
    rows = []
    for shape, co in BACKEND_CASES:
        x, w = _case(shape, co)
        backend = torch._C._select_conv_backend(x, w, None, [1] * 3, [1] * 3, [1] * 3, False,
                                                [0] * 3, 1, None)
        aten = time_it(lambda: F.conv3d(x, w, padding=1), torch.device("cpu"), reps)
        onednn = time_it(lambda: torch.ops.aten.mkldnn_convolution(
            x, w, None, [1] * 3, [1] * 3, [1] * 3, 1), torch.device("cpu"), reps)
        rows.append({"shape": list(shape), "out_channels": co,
                     "aten_backend": str(backend).split(".")[-1], "aten_ms": 1e3 * aten,
                     "onednn_ms": 1e3 * onednn})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/conv_backend.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layout, backend = layout_rows(args.reps), backend_rows(args.reps)
    print(f"3x3x3 convolution on oneDNN, float32, {args.threads} threads: ms (median of "
          f"{args.reps})")
    print(f"{'input':22s} {'Cout':>4s} {'fwd contig':>10s} {'fwd CL':>8s} {'bwd contig':>10s} "
          f"{'bwd CL':>8s}")
    for r in layout:
        print(f"{'x'.join(map(str, r['shape'])):22s} {r['out_channels']:4d} "
              f"{r['contiguous_forward_ms']:10.2f} {r['channels_last_forward_ms']:8.2f} "
              f"{r['contiguous_backward_ms']:10.2f} {r['channels_last_backward_ms']:8.2f}")
    print(f"\nforward, ATen's backend choice vs oneDNN called directly: ms")
    print(f"{'input':22s} {'Cout':>4s} {'ATen picks':>10s} {'ATen':>8s} {'oneDNN':>8s}")
    for r in backend:
        print(f"{'x'.join(map(str, r['shape'])):22s} {r['out_channels']:4d} "
              f"{r['aten_backend']:>10s} {r['aten_ms']:8.2f} {r['onednn_ms']:8.2f}")
    write_json(args.out, {"machine": machine(), "threads": args.threads,
                          "reps": args.reps, "layout": layout, "backend": backend})


if __name__ == "__main__":
    main()
