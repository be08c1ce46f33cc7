"""Command line: `python -m effseg <command>`.

- `info`: the torch and CUDA in use, how effseg._C was built, which ops have CPU and CUDA kernels.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="effseg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="how effseg was built and which kernels it has")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
