"""Every norm-act CUDA kernel once on small inputs (both layouts, every dtype, batch and instance
statistics, every activation), each compared with the pure-PyTorch reference.

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
    torch.cuda.synchronize()
    print(f"cuda kernel check: {failures} mismatch(es)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
