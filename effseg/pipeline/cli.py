"""Command line: `python -m effseg <command>`.

- `info`: the torch and CUDA in use, how effseg._C was built, which ops have CPU and CUDA kernels.
- `plan`: from a short calibration on small volumes, the peak memory of a FullVolumeFCN training
  step on a whole volume, which levels must recompute to fit a budget, and the largest volume
  that fits.
- `train`: whole-volume training on an nnU-Net/Decathlon dataset (default: the built-in CT
  phantom), with checkpoints, metrics and curves in the run folder (`effseg.pipeline.train`).
- `predict`: label maps from a checkpoint, in the source images' geometry (`effseg.pipeline.predict`).
- `evaluate`: Dice and HD95 (mm) of predictions against references (`effseg.pipeline.evaluate`).
- `nnunet-path`: the folder for nnU-Net v2's `nnUNet_extTrainer` (it holds `nnUNetTrainerEffseg`).
- `nnunet-plan`: nnU-Net v2 plans with effseg's measured memory saving, then preprocessing
  (`effseg.nnunet.plan_and_preprocess`).

Errors a user can fix (a bad dataset file, a bad checkpoint, a run folder in use) print one line
and exit with status 2; an interrupted training exits with 130 after saving its state.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def build_report() -> dict:
    from .. import __version__
    from ..ops import OP_NAMES, _library, has_kernel, load_error

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
        "built_version": getattr(build, "VERSION", None),
        "built_with_torch": getattr(build, "TORCH_VERSION", None),
        "built_with_torch_cuda": getattr(build, "TORCH_CUDA_VERSION", None),
        "built_with_cuda": getattr(build, "CUDA_VERSION", None),
        "cpu_only": None if build is None else not build.WITH_CUDA,
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
    if report["built_with_torch"] is not None:
        print(f"effseg._C {report['built_version']}: compiled against torch "
              f"{report['built_with_torch']}, "
              + (f"CUDA {report['built_with_cuda']}, architectures {report['cuda_archs']}"
                 if not report["cpu_only"] else "CPU-only build"))
    if report["extension_loaded"]:
        print("effseg._C: loaded")
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
                         "calibration": o.fit.points, "linear": o.fit.linear,
                         "same_backends": o.fit.same_backends}
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
            "" if o.fit.linear else "  (calibration not linear: " + (
                "peak fell as the volume grew" if o.fit.same_backends else
                "its volumes ran other convolution backends than the target's") +
            "; calibrate closer to the target with --cap)")
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


def _fail(command: str, exc: Exception) -> int:
    message = " ".join(str(exc).split())  # one line, whatever the exception held
    print(f"effseg {command}: error: {message}", file=sys.stderr)
    return 2


def _deprecated(command: str, old: str, new: str) -> None:
    print(f"effseg {command}: note: {old} is deprecated and will be removed in the next "
          f"release; use {new}", file=sys.stderr)


def _note(command: str, message: str) -> None:
    print(f"effseg {command}: {message}", file=sys.stderr)


def _checkpoint_arg(command: str, args: argparse.Namespace) -> str | None:
    """--checkpoint, or the deprecated --model spelling of it."""
    if args.model_deprecated is not None:
        _deprecated(command, "--model", "--checkpoint")
        return args.checkpoint or args.model_deprecated
    return args.checkpoint


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .data import DataError
    from .run_checkpoint import CheckpointError
    from .train import RunError, TrainConfig, train

    if args.model_deprecated is not None:
        preset = {"default": "large"}.get(args.model_deprecated, args.model_deprecated)
        _deprecated("train", "--model", f"--preset {preset}")
        if args.model is None:
            args.model = preset
    options = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
               if getattr(args, f.name) is not None}
    if args.resume:
        fixed = sorted(k for k in options if k not in ("out", "device"))
        if fixed:
            flags = " ".join("--" + k.replace("_", "-") for k in fixed)
            return _fail("train", ValueError(f"--resume continues the run with the settings in "
                                             f"its checkpoint; drop {flags}"))
    try:
        result = train(TrainConfig(**options), resume=args.resume,
                       dist_timeout=args.dist_timeout)
    except (DataError, RunError, CheckpointError) as exc:
        return _fail("train", exc)
    except KeyboardInterrupt:
        print(f"effseg train: aborted; {args.out}/last.pt holds the last saved state",
              file=sys.stderr)
        return 130
    return 130 if result.interrupted else 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .data import DataError
    from .predict import predict_paths
    from .run_checkpoint import CheckpointError

    checkpoint = _checkpoint_arg("predict", args)
    if checkpoint is None:
        return _fail("predict", ValueError("give --checkpoint (a run folder or its best.pt)"))
    try:
        written = predict_paths(checkpoint, args.input, args.out, args.device, args.amp,
                                args.probabilities, args.tta, args.labels_json,
                                note=lambda m: _note("predict", m))
    except (DataError, CheckpointError) as exc:
        return _fail("predict", exc)
    for path in written:
        print(path)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data import DataError
    from .evaluate import evaluate_files, find_pairs, format_table, matched_labels, write_csv

    if args.dataset and (args.pred_labels or args.ref_labels):
        return _fail("evaluate", ValueError("--dataset names the labels of both sides; give it, "
                                            "or --pred-labels/--ref-labels, not both"))
    pred_table = args.pred_labels or args.dataset
    default_table = Path(args.pred) / "labels.json"
    if pred_table is None and default_table.is_file():
        pred_table = default_table  # written by predict --labels-json
    ref_table = args.ref_labels or args.dataset
    if args.labels and pred_table is None and ref_table is None:
        return _fail("evaluate", ValueError("--labels picks labels by name: give --dataset (the "
                                            "dataset.json that declares them) too"))
    try:
        labels = matched_labels(pred_table, ref_table, args.labels,
                                note=lambda m: _note("evaluate", m))
        pairs = find_pairs(args.pred, args.ref, note=lambda m: _note("evaluate", m))
        rows = evaluate_files(pairs, labels)
    except DataError as exc:
        return _fail("evaluate", exc)
    csv_path = write_csv(rows, args.csv or Path(args.pred) / "evaluation.csv")
    print(format_table(rows))
    print(f"per-case scores and summary rows: {csv_path}")
    return 0


def cmd_nnunet_path(args: argparse.Namespace) -> int:
    import importlib.util

    from ..integrations.nnunet import EXT_TRAINER_DIR, MISSING_NNUNET

    # Only a path is printed, but one that nnU-Net cannot use helps nobody.
    if importlib.util.find_spec("nnunetv2") is None:
        return _fail("nnunet-path", ImportError(MISSING_NNUNET))
    print(EXT_TRAINER_DIR)
    return 0


def cmd_nnunet_plan(args: argparse.Namespace) -> int:
    try:
        from ..nnunet import plan_and_preprocess
    except ImportError as exc:
        return _fail("nnunet-plan", exc)
    try:
        identifier = plan_and_preprocess(
            args.d, args.gpu_memory_target, args.c, args.np, not args.no_pp,
            args.overwrite_target_spacing, args.plans_name)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        return _fail("nnunet-plan", exc)
    print(f"plans: {identifier} (train with: nnUNetv2_train D CONFIGURATION FOLD "
          f"-tr nnUNetTrainerEffseg -p {identifier})")
    return 0


def _add_nnunet(sub) -> None:
    n = sub.add_parser("nnunet-path", help="the folder to export as nnUNet_extTrainer (nnU-Net "
                       "v2 then finds nnUNetTrainerEffseg)")
    n.set_defaults(func=cmd_nnunet_path)
    p = sub.add_parser("nnunet-plan", help="nnU-Net v2 plans for effseg's networks (larger "
                       "patches for the same GPU memory), then nnU-Net's preprocessing")
    p.add_argument("-d", nargs="+", type=int, required=True, metavar="DATASET_ID",
                   help="nnU-Net dataset ids (in nnUNet_raw)")
    p.add_argument("-gpu_memory_target", "--gpu-memory-target", dest="gpu_memory_target",
                   type=float, default=8.0, metavar="GB",
                   help="GPU memory target in GB, as nnU-Net's planners take it (default 8)")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], metavar="CONFIGURATION",
                   help="configurations to preprocess (default 3d_fullres)")
    p.add_argument("-np", type=int, default=1, help="processes for fingerprint and "
                   "preprocessing (default 1)")
    p.add_argument("--no_pp", action="store_true", help="plan only, do not preprocess")
    p.add_argument("-overwrite_target_spacing", nargs=3, type=float, metavar="MM",
                   help="3d_fullres target spacing instead of nnU-Net's choice")
    p.add_argument("-plans_name", default="nnUNetPlansEffseg",
                   help="plans identifier (default nnUNetPlansEffseg)")
    p.set_defaults(func=cmd_nnunet_plan)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train on whole CT volumes (default: the built-in phantom)")
    t.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="run folder: plans.json, preprocessed/, last.pt, best.pt, metrics.jsonl, "
                   "metrics.csv, curves.png, validation/")
    t.add_argument("--data", metavar="DIR", help="nnU-Net v2 or Decathlon dataset folder "
                   "(default: the built-in CT phantom, generated once into ~/.cache/effseg)")
    t.add_argument("--labels", nargs="+", metavar="NAME",
                   help="train on these labels only (names from dataset.json; default: all)")
    t.add_argument("--spacing", nargs="+", type=float, metavar="MM",
                   help="target spacing, one or three values (default: the training cases' "
                   "median)")
    t.add_argument("--epochs", type=int, help="default 50")
    t.add_argument("--lr", type=float, help="initial learning rate (default 1e-3 for adamw, "
                   "1e-2 for sgd), decayed by a poly schedule")
    t.add_argument("--optimizer", choices=["adamw", "sgd"], help="default adamw")
    t.add_argument("--batch-size", type=int, help="whole volumes per step (default 1)")
    t.add_argument("--preset", dest="model", choices=["tiny", "small", "large"],
                   help="network widths: tiny (4, 8, 16: smoke tests only), small (16, 32, 64, "
                   "128; the default), large (16, 32, 64, 128, 160)")
    t.add_argument("--model", dest="model_deprecated", choices=["tiny", "small", "default",
                                                                 "large"],
                   help=argparse.SUPPRESS)
    t.add_argument("--arch", choices=["fcn", "stock"], help="fcn: effseg's FullVolumeFCN "
                   "(default); stock: its StockUNet3d twin, the memory baseline")
    t.add_argument("--channels", nargs="+", type=int, help="widths per level (overrides the "
                   "preset)")
    t.add_argument("--strides", nargs="+", type=int, help="stride per level (default 1, 2, 2, "
                   "...)")
    t.add_argument("--norm", choices=["instance", "batch"], help="default instance")
    t.add_argument("--amp", choices=["bf16", "fp16", "off"],
                   help="mixed precision (default bf16 on GPUs that support it, else off)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    t.add_argument("--val-fraction", type=float, help="share of cases held out for validation "
                   "(default 0.2, at least one case when there are two or more)")
    t.add_argument("--val-cases", nargs="+", metavar="CASE", help="validation cases by name "
                   "(instead of --val-fraction)")
    t.add_argument("--seed", type=int, help="default 0")
    t.add_argument("--augment", choices=["off", "intensity", "all"],
                   help="augment each training volume on the device: intensity (noise, "
                   "brightness, contrast, gamma) or all (also rotations and zooms); default off")
    t.add_argument("--mirror-axes", nargs="+", type=int, metavar="AXIS",
                   help="also mirror along these RAS array axes (0: left-right, 1: "
                   "posterior-anterior, 2: inferior-superior) with p 0.5, and at test time in "
                   "predict; never 0 with left/right labels")
    t.add_argument("--deep-supervision", action="store_true", default=None,
                   help="also supervise the coarser decoder levels (loss weights 1, 1/2, ...)")
    t.add_argument("--resume", action="store_true", help="continue RUN_DIR/last.pt exactly "
                   "(only --device may be given with it)")
    t.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="under torchrun: how long a collective waits for the other ranks "
                   "before the run fails (default 600; rank 0 prepares the data meanwhile)")
    t.set_defaults(func=cmd_train)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="label maps from a checkpoint, in the source geometry")
    p.add_argument("--checkpoint", metavar="RUN_DIR|CHECKPOINT",
                   help="a training run's folder (its best.pt) or a checkpoint file")
    p.add_argument("--model", dest="model_deprecated", help=argparse.SUPPRESS)
    p.add_argument("--input", required=True, metavar="CT.nii.gz|DIR",
                   help="a NIfTI file or a folder of them")
    p.add_argument("--out", required=True, metavar="DIR", help="where the label maps go")
    p.add_argument("--probabilities", action="store_true",
                   help="also write {case}_probabilities.nii.gz (X, Y, Z, classes) and "
                   "classes.json")
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"],
                   help="default bf16 on GPUs that support it, else off")
    p.add_argument("--labels-json", action="store_true",
                   help="also write OUT/labels.json: the label names and ids of the "
                   "predictions (what evaluate reads to match labels by name)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average the probabilities over the mirrorings along the run's "
                   "--mirror-axes (default: on when the run mirrored)")
    p.set_defaults(func=cmd_predict)


def _add_evaluate(sub) -> None:
    e = sub.add_parser("evaluate", help="Dice and HD95 (mm) of predictions against references")
    e.add_argument("--pred", required=True, metavar="DIR", help="predicted label maps")
    e.add_argument("--ref", required=True, metavar="DIR",
                   help="reference label maps, matched to the predictions by case id "
                   "(nnU-Net naming: CASE.nii.gz, CASE_0000.nii.gz); references without a "
                   "prediction are left out and listed")
    e.add_argument("--dataset", metavar="DATASET_JSON|DIR",
                   help="the label names and ids of both sides: score all of them (default: "
                   "every id found, named label_<id>)")
    e.add_argument("--pred-labels", metavar="JSON",
                   help="label table of the predictions (labels.json from predict "
                   "--labels-json, or a dataset.json; default: PRED/labels.json if present)")
    e.add_argument("--ref-labels", metavar="JSON",
                   help="label table of the references (a dataset.json or labels.json): labels "
                   "are matched by name, so the ids may differ from the predictions'")
    e.add_argument("--labels", nargs="+", metavar="NAME", help="only these labels (by name; "
                   "needs a label table)")
    e.add_argument("--csv", metavar="PATH", help="per-case CSV (default: PRED/evaluation.csv)")
    e.set_defaults(func=cmd_evaluate)


def main(argv: list[str] | None = None) -> int:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="effseg", description=__doc__.replace("`", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"effseg {__version__}")
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
    _add_train(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_nnunet(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`effseg info --json | head`): no traceback, and none at exit
        # when Python flushes stdout into the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
