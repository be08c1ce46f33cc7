"""Every norm-act CUDA kernel on small inputs (both layouts, every dtype, batch and instance
statistics, every activation, PReLU's per-channel slope with its third backward sum), and every
dice_ce kernel (every logits and label dtype, with and without class weights and ignored
voxels, more classes than one class chunk, bad labels), each compared with the pure-PyTorch
reference.

Small on purpose: benchmarks/gpu_check.sh runs it under compute-sanitizer (memcheck, racecheck).
Inputs are made on the CPU and copied over, and the references run on the CPU, so that the only
kernels the sanitizer instruments are effseg's own (a copy is not a kernel). --quick rotates the
dtype, activation and statistics over the shapes and layouts instead of taking every
combination. Exits non-zero on a mismatch. `--device cpu` runs the same checks on the CPU kernels
(to try this script on a machine without a GPU).
"""
import argparse
import itertools
import sys

import torch

from effseg.ops import reference

TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
# "prelu": the *_prelu ops, with a random per-channel slope
ACTS = [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0), ("prelu", None)]


def close(a, b, dtype):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    scale = max(1.0, b.abs().max().item())
    return (a - b).abs().max().item() <= TOL[dtype] * scale


def norm_cases(quick):
    # (2, 33, 6, 7, 8): channels-last over two channel tiles (31 idle lanes) and two row blocks;
    # (1, 3, 9, 10, 11): 990 rows (more than 256 per row block under the emulator's small
    # EFFSEG_CUDA_MAX_ROW_BLOCKS); (3, 2, 9000): two contiguous spans per (n, c)
    shapes = [(2, 3, 5, 6, 7), (1, 40, 3, 4, 5), (2, 33, 6, 7, 8), (1, 3, 9, 10, 11),
              (3, 2, 9000)]
    layouts = [(shape, cl) for shape in shapes for cl in ([False, True] if len(shape) == 5
                                                          else [False])]
    if not quick:
        for (shape, cl), dtype, per_sample, act in itertools.product(layouts, TOL, (False, True),
                                                                      ACTS):
            yield shape, cl, dtype, per_sample, act
        return
    for i, ((shape, cl), dtype) in enumerate(itertools.product(layouts, TOL)):
        yield shape, cl, dtype, i % 2 == 1, ACTS[i % len(ACTS)]


# (shape, channels_last, offset of x / y, offset of dy): the kernels' 16-byte paths and their
# fallbacks. An offset of 1 element puts the data off a 16-byte boundary.
VECTOR_CASES = [
    ((2, 16, 4, 4, 4), True, 0, 0),    # C = 16: 2 bf16 vectors per row in a reduction tile
    ((2, 17, 3, 4, 5), True, 0, 0),    # C a multiple of no vector width: vectors wrap around C
    ((2, 1, 5, 6, 7), False, 0, 0),    # one channel
    ((2, 1001, 2, 3, 2), True, 0, 0),  # huge odd C: 1001 distinct channel offsets, several tiles
    ((2, 4, 8, 8, 8), False, 0, 0),    # S a multiple of every vector width: no head, no tail
    ((2, 3, 5, 6, 7), False, 1, 1),    # misaligned but congruent: scalar head and tail
    ((2, 8, 3, 5, 7), True, 1, 1),
    ((2, 3, 5, 6, 7), False, 0, 1),    # y and dy not congruent: element by element
    ((2, 8, 4, 5, 6), True, 1, 0),
]


def placed(t, device, offset):
    """A copy of `t` on `device` with t's strides, its data `offset` elements into its storage."""
    if offset == 0:
        return t.to(device, copy=True)
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=device)
    out = buf[offset:].as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


def vector_cases():
    """VECTOR_CASES with every dtype, rotating statistics and activation."""
    for i, ((shape, cl, xo, dyo), dtype) in enumerate(itertools.product(VECTOR_CASES, TOL)):
        yield shape, cl, dtype, i % 2 == 1, ACTS[i % len(ACTS)], xo, dyo


def norm_act_failures(quick, gpu, E=None):
    """Mismatches of the norm-act ops `E` (default torch.ops.effseg) on device `gpu`."""
    failures = 0
    cases = [case + (0, 0) for case in norm_cases(quick)] + list(vector_cases())
    for shape, cl, dtype, per_sample, act, xo, dyo in cases:
        failures += norm_case_failures(E or torch.ops.effseg, gpu, shape, cl, dtype, per_sample,
                                       act, xo, dyo)
    return failures


def norm_case_failures(E, gpu, shape, cl, dtype, per_sample, act_param, xo, dyo):
    act, p = act_param
    failures = 0
    fmt = torch.channels_last_3d if cl else torch.contiguous_format
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xc = (torch.randn(shape) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    wc = torch.rand(shape[1], dtype=acc) + 0.5
    bc = torch.randn(shape[1], dtype=acc)
    dyc = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    # copies (also with --device cpu): y and dx_ below are overwritten in place
    x, dy = placed(xc, gpu, xo), placed(dyc, gpu, dyo)
    w, b = wc.to(gpu, copy=True), bc.to(gpu, copy=True)
    assert x.stride() == xc.stride() and dy.stride() == dyc.stride()
    mean, var = E.norm_stats(x, per_sample)
    rmean, rvar = reference.norm_stats(xc, per_sample)
    y = placed(xc, gpu, xo)
    ry = xc.clone()
    varc = var.cpu()
    checks = {"mean": (mean, rmean), "var": (var, rvar)}
    if act == "prelu":
        ac = torch.rand(shape[1], dtype=acc) * 0.5 + 0.05
        a = ac.to(gpu, copy=True)
        E.norm_act_forward_prelu_(y, mean, var, w, b, 1e-5, a)
        reference.norm_act_forward_prelu_(ry, rmean, rvar, wc, bc, 1e-5, ac)
        yc = y.cpu()
        s1, s2, s3 = E.norm_act_backward_reduce_prelu(y, dy, w, b, a, per_sample)
        r1, r2, r3 = reference.norm_act_backward_reduce_prelu(yc, dyc, wc, bc, ac, per_sample)
        s1c, s2c = s1.cpu(), s2.cpu()
        dx = E.norm_act_backward_input_prelu(y, dy, var, w, b, a, s1, s2, None, 1e-5)
        rdx = reference.norm_act_backward_input_prelu(yc, dyc, varc, wc, bc, ac, s1c, s2c,
                                                      None, 1e-5)
        dx_ = E.norm_act_backward_input_prelu(y, dy, var, w, b, a, None, None, None, 1e-5)
        rdx_ = reference.norm_act_backward_input_prelu(yc, dyc, varc, wc, bc, ac, None, None,
                                                       None, 1e-5)
        checks["sum_dy_z"] = (s3, r3)
    else:
        E.norm_act_forward_(y, mean, var, w, b, 1e-5, act, p)
        reference.norm_act_forward_(ry, rmean, rvar, wc, bc, 1e-5, act, p)
        # backward from effseg's own output and statistics, so that each kernel is checked alone
        yc = y.cpu()
        s1, s2 = E.norm_act_backward_reduce(y, dy, w, b, per_sample, act, p)
        r1, r2 = reference.norm_act_backward_reduce(yc, dyc, wc, bc, per_sample, act, p)
        s1c, s2c = s1.cpu(), s2.cpu()
        dx = E.norm_act_backward_input(y, dy, var, w, b, s1, s2, None, 1e-5, act, p)
        rdx = reference.norm_act_backward_input(yc, dyc, varc, wc, bc, s1c, s2c, None, 1e-5,
                                                act, p)
        # in place: dx written over dy (the kernels' aliasing path)
        dx_ = placed(dyc, gpu, dyo)
        E.norm_act_backward_input_(y, dx_, var, w, b, None, None, None, 1e-5, act, p)
        rdx_ = reference.norm_act_backward_input(yc, dyc, varc, wc, bc, None, None, None,
                                                 1e-5, act, p)
    checks.update({"forward": (y, ry), "sum_dz": (s1, r1), "sum_dz_xhat": (s2, r2),
                   "dx": (dx, rdx), "dx (eval)": (dx_, rdx_)})
    for what, (a, r) in checks.items():
        if not close(a, r, dtype):
            failures += 1
            print(f"MISMATCH {what} shape={shape} {dtype} per_sample={per_sample} "
                  f"{act} channels_last={cl} offsets={xo},{dyo}")
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("cuda_kernel_check: needs a CUDA GPU (or --device cpu)")
    torch.manual_seed(0)
    failures = norm_act_failures(args.quick, args.device) + dice_ce_failures(args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"{args.device} kernel check: {failures} mismatch(es)")
    return 1 if failures else 0


def dice_ce_failures(gpu, E=None):
    """Mismatches of the dice_ce ops `E` (default torch.ops.effseg) on device `gpu`."""
    E = E or torch.ops.effseg
    failures = 0
    # (1, 3, 4097): one voxel past a forward block; (2, 40, ...): three class chunks of 16;
    # (2, 3, 5000): 10000 voxels, more than one pass of a small device's backward grid;
    # (2, 5, 4, 4, 4) and (2, 3, 5000): S a multiple of every vector width, so contiguous logits
    # are read V voxels at a time; (2, 3, 5, 6, 7): S = 210, one voxel at a time in half precision.
    shapes = [(2, 3, 5, 6, 7), (1, 3, 4097), (2, 40, 3, 4, 5), (2, 3, 5000), (2, 5, 4, 4, 4)]
    label_dtypes = (torch.int64, torch.int32, torch.uint8)
    # Label dtype, class weights and ignore_index rotate over the cases (few launches under
    # compute-sanitizer) so that each is seen with several shapes and dtypes.
    for i, (shape, dtype) in enumerate(itertools.product(shapes, TOL)):
        N, K = shape[:2]
        label_dtype = label_dtypes[i % 3]
        weighted = i % 2 == 0
        ignore_index = (255 if label_dtype == torch.uint8 else -100) if i % 4 < 2 else 1
        logits_c = (torch.randn(shape) * 3).to(dtype)
        labels_c = torch.randint(0, K, (N,) + shape[2:])
        labels_c[torch.rand(labels_c.shape) < 0.2] = ignore_index
        labels_c = labels_c.to(label_dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        w_c = torch.rand(K, dtype=acc) + 0.5 if weighted else None
        grad_c = torch.tensor(0.7, dtype=acc)
        coef_dice_c = torch.randn(N, K, 2, dtype=acc)
        coef_ce_c = torch.tensor(0.3, dtype=acc)
        logits, labels, w, grad, coef_dice, coef_ce = (
            None if t is None else t.to(gpu, copy=True)
            for t in (logits_c, labels_c, w_c, grad_c, coef_dice_c, coef_ce_c))
        # 5-D logits rotate over the layouts the kernels read in place (channels-last, strided
        # reads; contiguous one element off a 16-byte boundary, read without vectors) and one
        # they get a contiguous copy of (a crop); values stay logits_c's.
        layout = ("contiguous", "channels-last", "crop", "offset")[i % 4] if len(shape) == 5 \
            else "contiguous"
        if layout == "offset":
            logits = placed(logits_c, gpu, 1)
        elif layout == "channels-last":
            logits = logits.contiguous(memory_format=torch.channels_last_3d)
        elif layout == "crop":
            D, H, W = shape[2:]
            big = logits.new_zeros((N, K, D + 1, H, W + 2))
            big[:, :, 1:, :, :W] = logits
            logits = big[:, :, 1:, :, :W]
        stats, ce = E.dice_ce_forward(logits, labels, w, ignore_index)
        rstats, rce = reference.dice_ce_forward(logits_c, labels_c, w_c, ignore_index)
        dz = E.dice_ce_backward(grad, logits, labels, w, ignore_index, coef_dice, coef_ce)
        rdz = reference.dice_ce_backward(grad_c, logits_c, labels_c, w_c, ignore_index,
                                         coef_dice_c, coef_ce_c)
        for what, (a, r) in {"stats": (stats, rstats), "ce": (ce, rce),
                             "grad logits": (dz, rdz)}.items():
            if not close(a, r, dtype):
                failures += 1
                print(f"MISMATCH dice_ce {what} shape={shape} {dtype} labels={label_dtype} "
                      f"weighted={weighted} ignore_index={ignore_index} layout={layout}")
    # Bad labels: backward must only zero their voxels, without reading outside the logits or
    # the weights (memcheck watches); forward must refuse them. On the CPU (and the emulator)
    # forward raises ValueError; on a GPU it fails with a device-side assertion, which ends the
    # process's use of the device, so that is tested in a subprocess (tests/test_losses.py).
    labels_c = torch.randint(0, 3, (2, 4, 5))
    labels_c[0, 0, 0], labels_c[1, 3, 4] = 2**40, -7
    logits, labels, ones, grad, coef_dice, coef_ce = (
        t.to(gpu, copy=True) for t in (torch.randn(2, 3, 4, 5), labels_c, torch.ones(3),
                                       torch.tensor(1.0), torch.randn(2, 3, 2), torch.tensor(1.0)))
    dz = E.dice_ce_backward(grad, logits, labels, None, -100, coef_dice, coef_ce).cpu()
    if not (torch.all(dz[0, :, 0, 0] == 0) and torch.all(dz[1, :, 3, 4] == 0)
            and torch.isfinite(dz).all()):
        failures += 1
        print("MISMATCH dice_ce backward with bad labels")
    if torch.device(gpu).type == "cpu":
        try:
            E.dice_ce_forward(logits, labels, ones, -100)
        except ValueError:
            pass
        else:
            failures += 1
            print("MISMATCH dice_ce forward accepted labels outside [0, K)")
    return failures


if __name__ == "__main__":
    sys.exit(main())
