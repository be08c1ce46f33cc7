"""What whole-volume augmentation (`effseg.pipeline.augment`, `train --augment all`) costs beside the
training step it feeds: for a CT-like volume, the time of one augmentation with every transform
drawn (rotation + zoom in one resampling, mirroring, noise, brightness, contrast, gamma), of the
spatial resampling alone, and of one training step of the default FullVolumeFCN (small preset,
fused Dice+CE, AdamW) on the same volume; and the peak memory the augmentation adds (bytes held
by the tensors it creates, over the bytes of the float32 image). In training the augmentation
runs with p 0.2 for each spatial transform, so on average it costs less than this worst case.

    python benchmarks/bench_augment.py [--quick] [--device cuda] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, time_it, write_json  # noqa: E402

from effseg.pipeline.augment import Augmentation, CaseTransform, rotation_matrix, voxel_matrix  # noqa
from effseg.losses import DiceCELoss  # noqa: E402
from effseg.memory import peak_allocated  # noqa: E402
from effseg.pipeline.model_config import build_model, model_config  # noqa: E402

SPACING = (1.5, 1.5, 3.0)


def worst_case() -> CaseTransform:
    rotation = rotation_matrix(np.radians([10.0, -20.0, 25.0]))
    matrix = tuple(map(tuple, voxel_matrix(rotation, 1.2, SPACING).tolist()))
    return CaseTransform(matrix=matrix, flips=(1, 2), noise_std=0.2, noise_seed=1,
                         brightness=1.1, contrast=0.9, gamma=1.3)


def peak_bytes(fn, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        kept = [fn()]  # held until the peak is read, as peak_allocated counts it
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        kept.clear()
        return peak
    return peak_allocated(fn)


def row(shape, device, reps):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, *shape, generator=g).to(device)
    label = torch.randint(0, 4, shape, generator=g, dtype=torch.uint8).to(device)
    augmentation = Augmentation(SPACING, (-1.0,), 255, "all", (1, 2))
    full, spatial = worst_case(), CaseTransform(matrix=worst_case().matrix)

    net = build_model(model_config("small", out_channels=4)).to(device)
    loss_fn = DiceCELoss(include_background=False, ignore_index=255)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x, y = image[None], label[None]

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x).contiguous(), y).backward()
        opt.step()

    t_full = time_it(lambda: augmentation.apply(image, label, full), device, reps)
    t_spatial = time_it(lambda: augmentation.apply(image, label, spatial), device, reps)
    t_step = time_it(step, device, reps)
    peak = peak_bytes(lambda: augmentation.apply(image, label, full), device)
    volume = image.numel() * image.element_size()
    r = {"shape": list(shape), "augment_s": t_full, "spatial_s": t_spatial, "step_s": t_step,
         "augment_over_step": t_full / t_step, "augment_peak_bytes": peak,
         "augment_peak_over_image": peak / volume}
    print(f"{str(tuple(shape)):>18}  augment {t_full * 1e3:8.1f} ms  (spatial "
          f"{t_spatial * 1e3:8.1f} ms)  step {t_step * 1e3:9.1f} ms  ratio "
          f"{r['augment_over_step']:.3f}  peak {peak / 2**20:7.1f} MiB = "
          f"{r['augment_peak_over_image']:.1f}x image", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        shapes = [(128, 128, 128), (256, 256, 128)] if args.quick else \
            [(128, 128, 128), (256, 256, 128), (256, 256, 256)]
    else:
        shapes = [(64, 64, 64)] if args.quick else [(64, 64, 64), (96, 96, 96)]
    rows = [row(s, device, reps=3 if args.quick else 5) for s in shapes]
    name = "gpu" if device.type == "cuda" else "cpu"
    write_json(args.out or f"benchmarks/out/augment_{name}.json",
               {"machine": machine(), "device": str(device), "spacing": SPACING, "rows": rows})


if __name__ == "__main__":
    main()
