"""In-place activated normalization against stock PyTorch layers (float64 autograd)."""
import itertools

import pytest
import torch

import effseg.functional as EF
from conftest import device_params, needs_extension
from reference import stock_norm_act

ACTIVATIONS = [("leaky_relu", 0.01), ("leaky_relu", 0.3), ("elu", 1.0), ("elu", 0.5),
               ("identity", 0.0)]
SHAPES = [
    (1, 1, 7),            # N=1, C=1, 1D, prime
    (2, 3, 5, 7),         # 2D, odd
    (3, 4, 5, 6, 7),      # 3D, odd
    (2, 37, 3, 4, 5),     # more channels than one CUDA channel tile
    (1, 2, 40, 40, 41),   # large spatial: many reduction blocks per channel
    (16, 3),              # no spatial dimensions (batch norm only)
]
TOL = {  # (rtol, atol relative to the largest expected magnitude)
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def to_layout(t, channels_last):
    if not channels_last:
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last_3d if t.dim() == 5
                        else torch.channels_last)


def make_params(C, device, dtype=torch.float64):
    sign = torch.where(torch.rand(C) < 0.25, -1.0, 1.0)
    weight = (sign * torch.empty(C).uniform_(0.3, 1.5)).to(device, dtype)
    bias = torch.empty(C).uniform_(-1, 1).to(device, dtype)
    rmean = torch.randn(C).to(device, dtype)
    rvar = torch.empty(C).uniform_(0.5, 2.0).to(device, dtype)
    return weight, bias, rmean, rvar


def run_case(shape, dtype, device, channels_last, activation, param, per_sample, training,
             affine=True, track=True, momentum=0.1):
    C = shape[1]
    x0 = (torch.randn(shape, dtype=torch.float64) * 2.5 + 0.7).to(device)
    x0 = to_layout(x0.to(dtype), channels_last)
    weight, bias, rmean, rvar = make_params(C, device)
    if not affine:
        weight = bias = None
    grad = to_layout(torch.randn(shape, dtype=torch.float64, device=device).to(dtype),
                     channels_last)

    # effseg, in the tested dtype (parameters and statistics float32 for low precision inputs,
    # as under autocast)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w_e = None if weight is None else weight.to(pdt, copy=True).requires_grad_()
    b_e = None if bias is None else bias.to(pdt, copy=True).requires_grad_()
    rm_e, rv_e = (rmean.to(pdt, copy=True), rvar.to(pdt, copy=True)) if track else (None, None)
    leaf = x0.clone().requires_grad_()
    inp = leaf.clone()
    fn = EF.inplace_ain if per_sample else EF.inplace_abn
    y = fn(inp, rm_e, rv_e, w_e, b_e, training, momentum, 1e-5, activation, param)
    assert y is inp, "the op must return its input, overwritten"
    assert y.is_contiguous(memory_format=torch.channels_last_3d if y.dim() == 5
                           else torch.channels_last) if channels_last else y.is_contiguous()
    y.backward(grad)

    # stock, float64
    w_s = None if weight is None else weight.clone().requires_grad_()
    b_s = None if bias is None else bias.clone().requires_grad_()
    rm_s, rv_s = (rmean.clone(), rvar.clone()) if track else (None, None)
    # The oracle runs in contiguous layout: stock instance_norm's backward is wrong for
    # channels-last inputs with N=1 (torch 2.14: its input gradient differs from the
    # contiguous one by O(1)); the math does not depend on the layout.
    xs = x0.double().contiguous().requires_grad_()
    ys = stock_norm_act(xs, w_s, b_s, rm_s, rv_s, training, per_sample, momentum, 1e-5,
                        activation, param)
    ys.backward(grad.double().contiguous())

    assert_close(y.detach(), ys.detach(), dtype, "output")
    assert_close(leaf.grad, xs.grad, dtype, "input grad")
    if affine:
        assert_close(w_e.grad, w_s.grad, dtype, "weight grad")
        assert_close(b_e.grad, b_s.grad, dtype, "bias grad")
    if track:
        assert_close(rm_e, rm_s, dtype, "running_mean")
        assert_close(rv_e, rv_s, dtype, "running_var")


def layouts_for(shape):
    return [False, True] if len(shape) in (4, 5) else [False]


CASES = [
    (shape, cl, act, per_sample, training)
    for shape in SHAPES
    for cl in layouts_for(shape)
    for act in ACTIVATIONS
    for per_sample in (False, True)
    for training in (True, False)
    if not (per_sample and len(shape) == 2)
]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("shape,channels_last,act,per_sample,training", CASES,
                         ids=lambda v: str(v).replace(" ", ""))
def test_matches_stock_float64(device, shape, channels_last, act, per_sample, training):
    run_case(shape, torch.float64, device, channels_last, act[0], act[1], per_sample, training)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("act", [("leaky_relu", 0.01), ("elu", 1.0)])
def test_low_precision(device, dtype, channels_last, per_sample, act):
    for training in (True, False):
        run_case((2, 5, 6, 7, 9), dtype, device, channels_last, act[0], act[1], per_sample,
                 training)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("per_sample", [False, True])
def test_without_affine_and_running_stats(device, per_sample):
    run_case((2, 3, 4, 5, 6), torch.float64, device, False, "leaky_relu", 0.01, per_sample, True,
             affine=False, track=False)


@pytest.mark.parametrize("device", device_params())
def test_tiny_gamma_is_clamped_in_forward_and_backward(device):
    shape = (2, 4, 5, 6, 7)
    x0 = torch.randn(shape, dtype=torch.float64, device=device)
    weight = torch.tensor([0.0, 1e-6, -1e-6, 0.8], dtype=torch.float64, device=device)
    bias = torch.tensor([0.5, -0.2, 0.1, 0.0], dtype=torch.float64, device=device)
    clamped = torch.tensor([1e-4, 1e-4, -1e-4, 0.8], dtype=torch.float64, device=device)
    leaf = x0.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    y = EF.inplace_abn(leaf.clone(), None, None, w, bias, True, 0.1, 1e-5, "leaky_relu", 0.01)
    g = torch.randn_like(y)
    y.backward(g)
    xs = x0.clone().requires_grad_()
    ws = clamped.clone().requires_grad_()
    ys = stock_norm_act(xs, ws, bias, None, None, True, False, 0.1, 1e-5, "leaky_relu", 0.01)
    ys.backward(g)
    torch.testing.assert_close(y.detach(), ys.detach())
    torch.testing.assert_close(leaf.grad, xs.grad, rtol=1e-6, atol=1e-6)
    # The stored weight gets the gradient at the clamped value (straight through the clamp).
    torch.testing.assert_close(w.grad, ws.grad, rtol=1e-6, atol=1e-6)


def test_momentum_none_is_cumulative_average():
    from effseg.nn import InPlaceABN
    m = InPlaceABN(3, momentum=None).double()
    bn = torch.nn.BatchNorm3d(3, momentum=None).double()
    for _ in range(4):
        x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64) * 3 + 1
        m(x.clone())
        bn(x)
    assert int(m.num_batches_tracked) == 4
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)


@needs_extension
def test_cpu_results_do_not_depend_on_thread_count():
    x = torch.randn(2, 6, 30, 31, 32)
    dy = torch.randn_like(x)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(torch.ops.effseg.norm_stats(x, False)
                           + torch.ops.effseg.norm_act_backward_reduce(x, dy, w, b, True, "elu",
                                                                       1.0))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_every_element_of_inplace_backward_is_written():
    # The in-place backward writes dx over grad_output: no element may keep its old value.
    from effseg.ops import op
    y = torch.randn(2, 3, 17, 19)
    dy = torch.randn_like(y)
    var = torch.rand(3) + 0.5
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    s1, s2 = op("norm_act_backward_reduce", y.device)(y, dy, w, b, False, "leaky_relu", 0.01)
    expected = op("norm_act_backward_input", y.device)(y, dy, var, w, b, s1, s2, None, 1e-5,
                                                       "leaky_relu", 0.01)
    buf = dy.clone()
    op("norm_act_backward_input_", y.device)(y, buf, var, w, b, s1, s2, None, 1e-5,
                                             "leaky_relu", 0.01)
    torch.testing.assert_close(buf, expected, rtol=0, atol=0)
    assert not torch.isclose(buf, dy).any()


@pytest.mark.parametrize("shape", [(3, 4, 5, 6, 7), (2, 40, 3, 3, 3)])
def test_reference_ops_match_stock(shape):
    from effseg.ops import reference
    for per_sample, (act, param) in itertools.product((False, True), ACTIVATIONS):
        x = torch.randn(shape, dtype=torch.float64) * 2 + 1
        w, b, _, _ = make_params(shape[1], "cpu")
        mean, var = reference.norm_stats(x, per_sample)
        y = x.clone()
        reference.norm_act_forward_(y, mean, var, w, b, 1e-5, act, param)
        ys = stock_norm_act(x, w, b, None, None, True, per_sample, 0.1, 1e-5, act, param)
        torch.testing.assert_close(y, ys)
