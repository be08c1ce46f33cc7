"""Every norm-act CUDA kernel once on small inputs (both layouts, every dtype, batch and instance
statistics, every activation), and every dice_ce kernel (every logits and label dtype, with and
without class weights and ignored voxels, more classes than one class chunk, bad labels), each
compared with the pure-PyTorch reference.

Small on purpose: benchmarks/gpu_check.sh runs it under compute-sanitizer (memcheck, racecheck).
Exits non-zero on a mismatch.
"""
import itertools
import sys

import torch

from effseg.ops import reference

E = torch.ops.effseg
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def close(a, b, dtype):
    scale = max(1.0, b.abs().max().item())
    return (a.double() - b.double()).abs().max().item() <= TOL[dtype] * scale


def main():
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    failures = 0
    shapes = [(2, 3, 5, 6, 7), (1, 40, 3, 4, 5), (3, 2, 9000)]
    for shape, dtype, per_sample, (act, p) in itertools.product(
            shapes, TOL, (False, True), [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0)]):
        for cl in ([False, True] if len(shape) == 5 else [False]):
            fmt = torch.channels_last_3d if cl else torch.contiguous_format
            x = (torch.randn(shape, device="cuda") * 2 + 1).to(dtype).contiguous(memory_format=fmt)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            w = torch.rand(shape[1], device="cuda", dtype=acc) + 0.5
            b = torch.randn(shape[1], device="cuda", dtype=acc)
            dy = torch.randn_like(x)
            mean, var = E.norm_stats(x, per_sample)
            rmean, rvar = reference.norm_stats(x, per_sample)
            y = x.clone()
            E.norm_act_forward_(y, mean, var, w, b, 1e-5, act, p)
            ry = x.clone()
            reference.norm_act_forward_(ry, rmean, rvar, w, b, 1e-5, act, p)
            s1, s2 = E.norm_act_backward_reduce(y, dy, w, b, per_sample, act, p)
            r1, r2 = reference.norm_act_backward_reduce(y, dy, w, b, per_sample, act, p)
            dx = E.norm_act_backward_input(y, dy, var, w, b, s1, s2, None, 1e-5, act, p)
            rdx = reference.norm_act_backward_input(y, dy, var, w, b, s1, s2, None, 1e-5, act, p)
            dx_ = dy.clone()
            E.norm_act_backward_input_(y, dx_, var, w, b, None, None, None, 1e-5, act, p)
            rdx_ = reference.norm_act_backward_input(y, dy, var, w, b, None, None, None, 1e-5,
                                                     act, p)
            checks = {"mean": (mean, rmean), "var": (var, rvar), "forward": (y, ry),
                      "sum_dz": (s1, r1), "sum_dz_xhat": (s2, r2), "dx": (dx, rdx),
                      "dx in place (eval)": (dx_, rdx_)}
            for what, (a, r) in checks.items():
                if not close(a, r, dtype):
                    failures += 1
                    print(f"MISMATCH {what} shape={shape} {dtype} per_sample={per_sample} "
                          f"{act} channels_last={cl}")
    failures += dice_ce_failures()
    torch.cuda.synchronize()
    print(f"cuda kernel check: {failures} mismatch(es)")
    return 1 if failures else 0


def dice_ce_failures():
    failures = 0
    # (1, 3, 4097): one voxel past a forward block; (2, 40, ...): two class chunks of 32.
    shapes = [(2, 3, 5, 6, 7), (1, 3, 4097), (2, 40, 3, 4, 5)]
    label_dtypes = (torch.int64, torch.int32, torch.uint8)
    # Label dtype, class weights and ignore_index rotate over the cases (few launches under
    # compute-sanitizer) so that each is seen with several shapes and dtypes.
    for i, (shape, dtype) in enumerate(itertools.product(shapes, TOL)):
        N, K = shape[:2]
        label_dtype = label_dtypes[i % 3]
        weighted = i % 2 == 0
        ignore_index = (255 if label_dtype == torch.uint8 else -100) if i % 4 < 2 else 1
        logits = (torch.randn(shape, device="cuda") * 3).to(dtype)
        labels = torch.randint(0, K, (N,) + shape[2:], device="cuda")
        labels[torch.rand(labels.shape, device="cuda") < 0.2] = ignore_index
        labels = labels.to(label_dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        w = torch.rand(K, device="cuda", dtype=acc) + 0.5 if weighted else None
        stats, ce = E.dice_ce_forward(logits, labels, w, ignore_index)
        rstats, rce = reference.dice_ce_forward(logits, labels, w, ignore_index)
        grad = torch.tensor(0.7, device="cuda", dtype=acc)
        coef_dice = torch.randn(N, K, 2, device="cuda", dtype=acc)
        coef_ce = torch.tensor(0.3, device="cuda", dtype=acc)
        dz = E.dice_ce_backward(grad, logits, labels, w, ignore_index, coef_dice, coef_ce)
        rdz = reference.dice_ce_backward(grad, logits, labels, w, ignore_index, coef_dice,
                                          coef_ce)
        for what, (a, r) in {"stats": (stats, rstats), "ce": (ce, rce),
                             "grad logits": (dz, rdz)}.items():
            if not close(a, r, dtype):
                failures += 1
                print(f"MISMATCH dice_ce {what} shape={shape} {dtype} labels={label_dtype} "
                      f"weighted={weighted} ignore_index={ignore_index}")
    # Bad labels: forward must refuse them, backward must only zero their voxels; neither may
    # read outside the logits or the weights (memcheck watches).
    logits = torch.randn(2, 3, 4, 5, device="cuda")
    labels = torch.randint(0, 3, (2, 4, 5), device="cuda")
    labels[0, 0, 0], labels[1, 3, 4] = 2**40, -7
    try:
        E.dice_ce_forward(logits, labels, torch.ones(3, device="cuda"), -100)
    except ValueError:
        pass
    else:
        failures += 1
        print("MISMATCH dice_ce forward accepted labels outside [0, K)")
    dz = E.dice_ce_backward(torch.tensor(1.0, device="cuda"), logits, labels, None, -100,
                            torch.randn(2, 3, 2, device="cuda"), torch.tensor(1.0, device="cuda"))
    if not (torch.all(dz[0, :, 0, 0] == 0) and torch.all(dz[1, :, 3, 4] == 0)
            and torch.isfinite(dz).all()):
        failures += 1
        print("MISMATCH dice_ce backward with bad labels")
    return failures


if __name__ == "__main__":
    sys.exit(main())
