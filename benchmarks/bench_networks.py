"""Other people's networks, converted in one call: one training step (forward, cross-entropy,
backward, SGD step) of MONAI UNet, DynUNet (plain and res_block), BasicUNet, SegResNet and
nnU-Net's PlainConvUNet (3d_fullres defaults) and ResidualEncoderUNet (ResEnc M), each as

- stock: the network as its package builds it
- convert: `effseg.convert(model)` (fused in-place norm + activation)
- recompute: `effseg.convert(model, recompute=True, example_input=x)` (recomputing segments
  as well; the example input matters only where a forward branches on shapes: BasicUNet)
- stock + checkpoint: torch.utils.checkpoint (non-reentrant) around every stage or block

Rows: the step's peak (CPU: `effseg.memory.peak_allocated`, the tensor peak op by op; CUDA:
max_memory_allocated above what was allocated before), both on the second step, with the
gradients already allocated; bytes saved for backward by forward + loss; median step time;
each as a ratio to stock measured in the same run. Prints a table, writes JSON and a PNG.

    python benchmarks/bench_networks.py [--sizes 64 96] [--nets plain resenc ...]
        [--device cuda] [--reps 3] [--no-time] [--out DIR]

Networks whose package is missing (monai, dynamic-network-architectures) are skipped and listed.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, time_it, write_json  # noqa: E402

import effseg  # noqa: E402
from effseg.memory import peak_allocated, saved_bytes  # noqa: E402

VARIANTS = ["stock", "convert", "recompute", "stock + checkpoint"]
CLASSES = 2
LRELU = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def _dna():
    from dynamic_network_architectures.architectures import unet
    return unet


def plain_conv_unet():
    f = (32, 64, 128, 256, 320, 320)
    return _dna().PlainConvUNet(1, 6, f, nn.Conv3d, 3, (1, 2, 2, 2, 2, 2), (2,) * 6, CLASSES,
                                (2,) * 5, True, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True},
                                None, None, nn.LeakyReLU, {"inplace": True},
                                deep_supervision=False)


def resenc_m():
    f = (32, 64, 128, 256, 320, 320)
    return _dna().ResidualEncoderUNet(1, 6, f, nn.Conv3d, 3, (1, 2, 2, 2, 2, 2),
                                      (1, 3, 4, 6, 6, 6), CLASSES, (1,) * 5, True,
                                      nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None,
                                      None, nn.LeakyReLU, {"inplace": True},
                                      deep_supervision=False)


def monai_unet():
    from monai.networks.nets import UNet
    return UNet(3, 1, CLASSES, (32, 64, 128, 256, 512), (2, 2, 2, 2), num_res_units=2,
                norm="instance", act=LRELU)


def dynunet(res_block=False):
    from monai.networks.nets import DynUNet
    return DynUNet(3, 1, CLASSES, [3] * 6, [1, 2, 2, 2, 2, 2], [2] * 5,
                   norm_name=("instance", {"affine": True}), res_block=res_block)


def basic_unet():
    from monai.networks.nets import BasicUNet
    return BasicUNet(3, 1, CLASSES)


def segresnet():
    from monai.networks.nets import SegResNet
    return SegResNet(3, 32, 1, CLASSES)


# name: (builder, the modules stock + checkpoint wraps: paths' prefixes or class names)
NETWORKS = {
    "PlainConvUNet": (plain_conv_unet, ("encoder.stages.", "decoder.stages.")),
    "ResEncM": (resenc_m, ("BasicBlockD", "decoder.stages.")),
    "MONAI UNet": (monai_unet, ("ResidualUnit",)),
    "DynUNet": (dynunet, ("UnetBasicBlock",)),
    "DynUNet res_block": (lambda: dynunet(True), ("UnetResBlock", "UnetBasicBlock")),
    "BasicUNet": (basic_unet, ("TwoConv",)),
    "SegResNet": (segresnet, ("ResBlock",)),
}
SHORT = {"plain": "PlainConvUNet", "resenc": "ResEncM", "unet": "MONAI UNet",
         "dynunet": "DynUNet", "dynunet_res": "DynUNet res_block", "basic": "BasicUNet",
         "segresnet": "SegResNet"}


class Checkpointed(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False,
                                                 **kwargs)


def checkpointed(model: nn.Module, which) -> nn.Module:
    """Wraps every module whose path starts with one of `which` (a direct child of a container
    there) or whose class is named in `which`, outermost first, at every path that reaches it
    (DynUNet reaches its blocks through two parents)."""
    wrappers: dict[int, nn.Module] = {}
    done: list[str] = []
    for path, m in list(model.named_modules(remove_duplicate=False)):
        if not path or any(path.startswith(d + ".") for d in done):
            continue
        parent, _, name = path.rpartition(".")
        hit = id(m) in wrappers or type(m).__name__ in which or any(
            path.startswith(w) and path.count(".") == w.count(".") for w in which)
        if hit:
            wrapper = wrappers.setdefault(id(m), Checkpointed(m))
            setattr(model.get_submodule(parent) if parent else model, name, wrapper)
            done.append(path)
    return model


def build(net: str, variant: str, example: torch.Tensor | None = None) -> nn.Module:
    torch.manual_seed(0)
    make, which = NETWORKS[net]
    model = make()
    if variant == "convert":
        model, _ = effseg.convert(model)
    elif variant == "recompute":
        # the example's shapes let a shape-branching forward (BasicUNet) be traced whole
        model, _ = effseg.convert(model, recompute=True, example_input=example)
    elif variant == "stock + checkpoint":
        model = checkpointed(model, which)
    return model


def measure(net, variant, edge, device, reps, time_steps=True) -> dict:
    x = torch.randn(1, 1, edge, edge, edge, device=device)
    model = build(net, variant, x.cpu()).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    target = torch.randint(0, CLASSES, (1, edge, edge, edge), device=device)

    def forward_loss():
        out = model(x)
        return F.cross_entropy(out[0] if isinstance(out, (list, tuple)) else out, target)

    def step():
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as in a training loop
        forward_loss().backward()
        opt.step()

    step()  # first step: gradients allocated, algorithms chosen
    row = {"network": net, "variant": variant, "edge": edge,
           "parameters": sum(p.numel() for p in model.parameters()),
           "saved_bytes": saved_bytes(forward_loss)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        row["peak_measure"] = "cuda max_memory_allocated"
    else:
        row["peak_bytes"] = peak_allocated(step)
        row["peak_measure"] = "effseg.memory.peak_allocated"
    row["seconds"] = time_it(step, device, reps, warmup=0) if time_steps else None
    return row


def add_ratios(rows) -> None:
    stock = {(r["network"], r["edge"]): r for r in rows if r["variant"] == "stock"}
    for r in rows:
        s = stock.get((r["network"], r["edge"]))
        for key in ("peak_bytes", "saved_bytes", "seconds"):
            ok = s is not None and r[key] is not None and s[key]
            r[key.split("_")[0] + "_ratio"] = r[key] / s[key] if ok else None


def plot(rows, path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    edges = sorted({r["edge"] for r in rows})
    nets = list(dict.fromkeys(r["network"] for r in rows))
    fig, axes = plt.subplots(1, len(edges), figsize=(6 * len(edges), 4), squeeze=False)
    width = 0.8 / len(VARIANTS)
    for ax, edge in zip(axes[0], edges):
        for i, v in enumerate(VARIANTS):
            vals = [next((r["peak_ratio"] for r in rows if r["network"] == n and
                          r["variant"] == v and r["edge"] == edge), 0) or 0 for n in nets]
            ax.bar([j + i * width for j in range(len(nets))], vals, width, label=v)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(nets))])
        ax.set_xticklabels(nets, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("training-step peak / stock")
        ax.set_title(f"1x1x{edge}^3, one training step")
        ax.axhline(1.0, color="gray", lw=0.5)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def available(net: str) -> str | None:
    """None, or why `net` cannot be built here."""
    try:
        if net in ("PlainConvUNet", "ResEncM"):
            _dna()
        else:
            import monai  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed"
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    p.add_argument("--nets", nargs="+", choices=sorted(SHORT), default=sorted(SHORT))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-time", action="store_true", help="memory only (deterministic)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = ["stock"] + [v for v in args.variants if v != "stock"]
    rows, skipped = [], {}
    for short in args.nets:
        net = SHORT[short]
        why = available(net)
        if why:
            skipped[net] = why
            continue
        for edge in args.sizes:
            for v in variants:
                rows.append(measure(net, v, edge, device, args.reps, not args.no_time))
                r = rows[-1]
                print(f"{net:18s} {edge:4d} {v:18s} peak {r['peak_bytes'] / 2**20:9.1f} MiB "
                      f"saved {r['saved_bytes'] / 2**20:9.1f} MiB" + (
                          f" {r['seconds']:.2f} s" if r["seconds"] is not None else ""),
                      flush=True)
    add_ratios(rows)
    print(f"\n{'network':18s} {'edge':>4s} {'variant':18s} {'peak':>6s} {'saved':>6s} {'time':>6s}")
    for r in rows:
        t = f"{r['seconds_ratio']:6.2f}" if r["seconds_ratio"] is not None else "     -"
        print(f"{r['network']:18s} {r['edge']:4d} {r['variant']:18s} {r['peak_ratio']:6.3f} "
              f"{r['saved_ratio']:6.3f} {t}")
    for net, why in skipped.items():
        print(f"skipped {net}: {why}")
    tag = "bench_networks" + ("" if device.type == "cpu" else f"_{device.type}")
    write_json(os.path.join(args.out, tag + ".json"),
               {"machine": machine(), "device": str(device), "rows": rows,
                "skipped": skipped})
    if rows:
        plot(rows, os.path.join(args.out, tag + ".png"))


if __name__ == "__main__":
    main()
