"""Slab-by-slab convolutions (effseg.ops.slabs) and the backward paths built on them: each
equals the whole computation, and the blocks that use them equal the plain block."""
import pytest
import torch
import torch.nn.functional as F

from effseg.nn import RecomputeBlock3d
from effseg.ops.recompute import (Unit, conv_backend, conv_input_grad, second_conv_backward,
                                  sole_tensor)
from effseg.ops.folded_up import input_grad_into_, slab_rows
from effseg.ops.slabs import conv_rows, runs_on_onednn, same_rows, slab_conv


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size,stride,k,pad", [((47, 45, 31), 2, 3, 1), ((48, 48, 32), 2, 3, 1),
                                               ((20, 18, 16), 1, 3, 1), ((12, 12, 8), 1, 1, 0),
                                               ((9, 8, 7), 2, 3, 1)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_conv_input_grad_from_the_shape_alone(dtype, size, stride, k, pad, layout):
    """conv_input_grad: the input gradient of a convolution from its output gradient and the
    input's shape, equal to convolution_backward's in float64 (on oneDNN where effseg runs the
    convolution there, in the gradient's layout: odd sizes need output padding; on the stand-in
    path elsewhere: float64, bf16 where ATen would not use oneDNN)."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    x = torch.randn((2, 16) + size, dtype=torch.float64)
    w = torch.randn(32, 16, k, k, k, dtype=torch.float64) / (16 * k ** 3) ** 0.5
    dz = torch.randn_like(F.conv3d(x, w, None, stride, pad)).to(dtype).contiguous(
        memory_format=layout)
    ref = torch.ops.aten.convolution_backward(
        dz.double(), x, w, None, [stride] * 3, [pad] * 3, [1] * 3, False, [0] * 3, 1,
        [True, False, False])[0]
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        dx = conv_input_grad(dz, x.shape, w.to(dtype), (stride,) * 3, (pad,) * 3, (1,) * 3, 1)
    onednn = any("convolution_transpose_pointwise" in e.name for e in prof.events())
    assert onednn == (dtype != torch.float64 and runs_on_onednn(
        conv_backend(tuple(x.shape), dz, tuple(w.shape), (stride,) * 3, (pad,) * 3), dz))
    if dtype == torch.float32:
        assert onednn  # the case it is for: effseg's oneDNN convolutions, in either layout
    assert dx.shape == x.shape and dx.dtype == dtype
    if onednn:
        assert dx.is_contiguous(memory_format=layout)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(dx.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size,stride,k,pad,parts", [((47, 45, 31), 2, 3, 1, 8),
                                                     ((48, 48, 32), 2, 3, 1, 3),
                                                     ((20, 18, 16), 1, 3, 1, 8),
                                                     ((9, 8, 7), 2, 3, 1, 16),
                                                     ((12, 12, 8), 1, 1, 0, 5)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_conv_input_grad_added_in_slabs(dtype, size, stride, k, pad, parts, layout):
    """add_conv_input_grad_: dst + the input gradient of a convolution, the transposed
    convolution computed over slabs of the output gradient's rows whose output rows overlap,
    equal to dst + convolution_backward's in float64 (odd sizes need output padding; more slabs
    than rows; on oneDNN and on ATen's backends)."""
    from effseg.ops.recompute import add_conv_input_grad_
    torch.manual_seed(0)
    x = torch.randn((2, 6) + size, dtype=torch.float64)
    w = torch.randn(10, 6, k, k, k, dtype=torch.float64) / (6 * k ** 3) ** 0.5
    dz = torch.randn_like(F.conv3d(x, w, None, stride, pad)).to(dtype).contiguous(
        memory_format=layout)
    dst = torch.randn_like(x).to(dtype).contiguous(memory_format=layout)
    ref = dst.double() + torch.ops.aten.convolution_backward(
        dz.double(), x, w, None, [stride] * 3, [pad] * 3, [1] * 3, False, [0] * 3, 1,
        [True, False, False])[0]
    with torch.no_grad():
        add_conv_input_grad_(dst, dz, w.to(dtype), (stride,) * 3, (pad,) * 3, parts)
    assert dst.is_contiguous(memory_format=layout)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(dst.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,rows", [(3, 1), (3, 4), (5, 3), (1, 2)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_conv_rows_equal_the_whole_convolution(dtype, k, rows, layout):
    torch.manual_seed(0)
    p = (k - 1) // 2
    x = torch.randn(2, 5, 11, 7, 6, dtype=dtype).contiguous(memory_format=layout)
    w = torch.randn(4, 5, k, k, 3, dtype=dtype)
    padding = (p, p, 1)
    whole = F.conv3d(x.double(), w.double(), padding=padding)
    conv = slab_conv(conv_backend(tuple(x.shape), x, tuple(w.shape), (1, 1, 1), padding))
    for r0 in range(0, 11, rows):
        r1 = min(r0 + rows, 11)
        # the input given as only the rows the slab needs, offset t0
        a, b = max(r0 - p, 0), min(r1 + p, 11)
        part = conv_rows(conv, x[:, :, a:b], a, 11, r0, r1, w, padding)
        tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 2e-2
        ref = whole[:, :, r0:r1]
        assert part.shape == ref.shape
        assert ((part.double() - ref).abs().max() / ref.abs().max()).item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,d,k,layout", [
    (1, 16, 64, 3, torch.contiguous_format), (2, 8, 40, 3, torch.channels_last_3d),
    (1, 16, 48, 5, torch.contiguous_format), (1, 16, 40, 3, torch.channels_last_3d)])
def test_input_gradient_written_over_the_output_gradient_equals_the_whole(dtype, n, c, d, k,
                                                                          layout):
    """Sizes where ATen runs the whole on oneDNN (N*C*D*H above its threshold), so slabs run."""
    torch.manual_seed(0)
    p = (k - 1) // 2
    w = torch.randn(c, c, k, k, k, dtype=dtype)
    dz = torch.randn(n, c, d, d - 4, d + 2, dtype=dtype).contiguous(memory_format=layout)
    ref = torch.ops.aten.convolution_backward(
        dz.double(), dz.double(), w.double(), None, [1] * 3, [p] * 3, [1] * 3, False, [0] * 3, 1,
        [True, False, False])[0]
    mine = dz.clone()
    assert input_grad_into_(mine, w, (p, p, p))
    assert mine.is_contiguous(memory_format=layout)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((mine.double() - ref).abs().max() / ref.abs().max()).item() < tol


def test_input_gradient_in_slabs_only_where_the_cpu_runs_the_whole_on_onednn():
    """Float64 (ATen's reference kernel at every size) and small float32 volumes (its slow
    kernel below oneDNN's threshold) compute the gradient whole: input_grad_into_ leaves dz
    untouched, and `slab_rows`, which the planner asks, says the same."""
    w = torch.randn(16, 16, 3, 3, 3)
    for dz in (torch.randn(1, 16, 24, 64, 64, dtype=torch.float64),
               torch.randn(1, 16, 12, 32, 32)):
        before = dz.clone()
        assert slab_rows(tuple(dz.shape), dz, tuple(w.shape), (1, 1, 1)) is None
        assert not input_grad_into_(dz, w.to(dz.dtype), (1, 1, 1))
        assert torch.equal(dz, before)
    big = torch.randn(1, 16, 24, 64, 64)
    assert slab_rows(tuple(big.shape), big, tuple(w.shape), (1, 1, 1)) == 3


def test_same_rows_only_for_stride_one_same_convolutions():
    assert same_rows((4, 4, 3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1)
    assert not same_rows((4, 4, 3, 3, 3), (2, 1, 1), (1, 1, 1), (1, 1, 1), 1)
    assert not same_rows((4, 4, 3, 3, 3), (1, 1, 1), (0, 1, 1), (1, 1, 1), 1)
    assert not same_rows((4, 2, 3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 2)
    assert not same_rows((4, 4, 2, 3, 3), (1, 1, 1), (0, 1, 1), (1, 1, 1), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_second_conv_backward_in_slabs_equals_whole(dtype):
    """Where ATen runs the whole on oneDNN (float32/bf16 on a CPU at this size: N*C*D*H above
    its 20480 threshold), the input gradient is written over dz2 slab by slab; both gradients
    equal the whole computation."""
    torch.manual_seed(0)
    y1 = torch.randn(1, 16, 24, 64, 64, dtype=dtype)
    dz2 = torch.randn(1, 16, 24, 64, 64, dtype=dtype)
    w2 = torch.randn(16, 16, 3, 3, 3, dtype=dtype)
    u2 = Unit((1, 1, 1), (1, 1, 1), (1, 1, 1), 1, False, True, None, None, 0.1, 1e-5,
              "leaky_relu", 0.01, None)
    ref_dx, ref_dw = torch.ops.aten.convolution_backward(
        dz2.double(), y1.double(), w2.double(), None, [1] * 3, [1] * 3, [1] * 3, False,
        [0] * 3, 1, [True, True, False])[:2]
    mine = dz2.clone()
    ptr = mine.data_ptr()
    dy1, dw2 = second_conv_backward([mine, y1], w2, u2, owned=True)
    assert dy1.data_ptr() == ptr  # written over dz2
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, ref in ((dy1, ref_dx), (dw2, ref_dw)):
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < tol
    # not owned: dz2 is left as it was
    keep = dz2.clone()
    second_conv_backward([keep, y1], w2, u2, owned=False)
    assert torch.equal(keep, dz2)


def test_sole_tensor_sees_views_and_aliases():
    t = torch.randn(8)
    assert sole_tensor(t)
    v = t[2:]
    assert not sole_tensor(t)
    del v
    a = t.detach()
    assert not sole_tensor(t)
    del a
    assert sole_tensor(t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_lean_block_owning_its_gradient_equals_the_plain_block(dtype, norm):
    """`owns_grad=True` (the lean backward writes into the incoming gradient and recomputes the
    second unit in slabs) gives the plain block's outputs, gradients and buffers; the caller's
    gradient tensor is the one overwritten (given here as a clone)."""
    torch.manual_seed(0)
    blocks = [RecomputeBlock3d(2, 8, norm=norm, lean=True, owns_grad=True).to(dtype),
              RecomputeBlock3d(2, 8, norm=norm, recompute=False).to(dtype)]
    blocks[1].load_state_dict(blocks[0].state_dict())
    x = torch.randn(2, 2, 19, 9, 8, dtype=dtype)
    g = torch.randn(2, 8, 19, 9, 8, dtype=dtype)
    results = []
    for block in blocks:
        xi = x.clone().requires_grad_()
        y = block(xi)
        y.backward(g.clone())
        results.append([y.detach(), xi.grad] + [p.grad for p in block.parameters()]
                       + list(block.buffers()))
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


def test_released_input_refuses_a_second_backward():
    torch.manual_seed(0)
    block = RecomputeBlock3d(4, 8, stride=2, split=True, release_input=True)
    x = torch.randn(1, 4, 8, 8, 8, requires_grad=True)
    y = block(x)
    y.square().mean().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run backward twice"):
        y.square().mean().backward()
