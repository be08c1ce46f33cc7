"""Command line: `python -m effseg <command>`.

- `info`: the torch and CUDA in use, how effseg._C was built, which ops have CPU and CUDA kernels.
- `plan`: from a short calibration on small volumes, the peak memory of a FullVolumeFCN training
  step on a whole volume, which levels must recompute to fit a budget, and the largest volume
  that fits.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def build_report() -> dict:
    from . import __version__
    from .ops import OP_NAMES, _library, has_kernel, load_error

    build = _library.BUILD
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "effseg": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": devices,
        "extension_loaded": load_error() is None,
        "extension_error": load_error(),
        "built_with_torch": getattr(build, "TORCH_VERSION", None),
        "built_with_cuda": getattr(build, "CUDA_VERSION", None),
        "cuda_archs": getattr(build, "CUDA_ARCHS", None),
        "ops": {name: {"cpu": has_kernel(name, "cpu"), "cuda": has_kernel(name, "cuda")}
                for name in OP_NAMES},
    }


def cmd_info(args: argparse.Namespace) -> int:
    report = build_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"effseg {report['effseg']}")
    print(f"torch {report['torch']} (CUDA {report['torch_cuda'] or 'none'}), "
          f"GPUs: {', '.join(report['gpus']) or 'none visible'}")
    if report["extension_loaded"]:
        print(f"effseg._C: compiled against torch {report['built_with_torch']}, CUDA "
              f"{report['built_with_cuda'] or 'none (CPU-only build)'}"
              + (f", architectures {report['cuda_archs']}" if report["cuda_archs"] else ""))
    else:
        print(f"effseg._C: not in use ({report['extension_error']}); ops run the pure-PyTorch "
              "reference")
    print(f"{'op':<28} {'CPU':>4} {'CUDA':>5}")
    for name, k in report["ops"].items():
        print(f"{name:<28} {'yes' if k['cpu'] else 'no':>4} {'yes' if k['cuda'] else 'no':>5}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import math

    from .planner import ModelConfig, parse_bytes, plan

    budget = parse_bytes(args.budget)
    shape = [int(n) for n in args.shape]
    if args.spacing and args.target_spacing:
        shape = [max(1, round(n * s / t)) for n, s, t in
                 zip(shape, args.spacing, args.target_spacing)]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    config = ModelConfig(args.in_channels, args.out_channels, tuple(args.channels),
                         tuple(args.strides), args.norm)
    cap = None if args.cap is None else round(args.cap ** 3)
    result = plan(config, budget, shape, device, amp, cap)
    gib = 2**30
    if args.json:
        print(json.dumps({
            "device": str(device), "shape": list(result.shape), "budget_bytes": budget,
            "options": [{"recompute": list(o.recompute), "predicted_bytes": o.predicted,
                         "calibration": o.fit.points, "linear": o.fit.linear}
                        for o in result.options],
            "chosen": None if result.chosen is None else list(result.chosen.recompute),
            "largest_shape": list(result.largest_shape),
            "largest_predicted_bytes": result.largest_predicted}, indent=2))
        return 0 if result.chosen is not None else 1
    print(f"FullVolumeFCN channels={config.channels} strides={config.strides} norm={config.norm}"
          f" on {device}, amp={args.amp}; volume {tuple(shape)} "
          f"({math.prod(shape) / 1e6:.1f} M voxels); budget {budget / gib:.2f} GiB")
    for o in result.options:
        mark = "  <- chosen" if o is result.chosen else (
            "" if o.fit.linear else "  (calibration not linear: peak fell as the volume grew; "
            "calibrate closer to the target with --cap)")
        print(f"  {o.label:<32} predicted peak {o.predicted / gib:8.2f} GiB{mark}")
    full = result.options[-1].fit
    if not any(o.fit.linear for o in result.options):
        print("  no calibration was linear: no prediction can be trusted here")
    elif result.chosen is None:
        print("  nothing fits: reduce the volume (spacing), the widths or use bf16")
    if full.linear:
        print(f"largest volume of this aspect ratio with every level recomputing: "
              f"{result.largest_shape} (predicted {result.largest_predicted / gib:.2f} GiB)")
    return 0 if result.chosen is not None else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="effseg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="how effseg was built and which kernels it has")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(func=cmd_info)
    p = sub.add_parser("plan", help="predict the memory of whole-volume training")
    p.add_argument("--budget", required=True, help="memory budget, e.g. 80GB")
    p.add_argument("--shape", nargs=3, type=int, required=True, metavar=("D", "H", "W"),
                   help="the volume in voxels (at --spacing)")
    p.add_argument("--spacing", nargs=3, type=float, help="the volume's voxel spacing (mm)")
    p.add_argument("--target-spacing", nargs=3, type=float,
                   help="the spacing the network sees (mm): the volume is resampled to it")
    p.add_argument("--channels", nargs="+", type=int, default=[16, 32, 64, 128, 160])
    p.add_argument("--strides", nargs="+", type=int, default=[1, 2, 2, 2, 2])
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=2)
    p.add_argument("--norm", choices=["batch", "instance"], default="batch")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default="off")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cap", type=float, help="edge of the largest calibration volume, as a "
                   "cube (default 160 on GPU, 96 on CPU; at most half the target's voxels)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
