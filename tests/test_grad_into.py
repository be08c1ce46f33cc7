"""effseg.ops.grad_into: a convolution whose weight gradient goes into `.grad` a slice at a time
where that is safe, and comes back whole (as autograd's) where it is not."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effseg.memory import peak_allocated
from effseg.ops import grad_into

D = torch.float64


def _pair(conv_type, cin, cout, **kw):
    torch.manual_seed(0)
    stock = conv_type(cin, cout, 3, **kw).to(D)
    ours = conv_type(cin, cout, 3, **kw).to(D)
    ours.load_state_dict(stock.state_dict())
    return stock, ours


@pytest.mark.parametrize("conv_type, kw", [(nn.Conv3d, {"padding": 1}),
                                           (nn.ConvTranspose3d, {"stride": 2, "padding": 1,
                                                                 "output_padding": 1})],
                         ids=["conv", "transposed"])
def test_accumulates_like_autograd_in_slices(conv_type, kw):
    stock, ours = _pair(conv_type, 48, 40, **kw)
    x = torch.randn(1, 48, 3, 3, 3, dtype=D)
    for step in range(3):  # the first step allocates .grad (whole), the next add into it
        grads = []
        for model, run in ((stock, stock), (ours, lambda t: grad_into.conv(ours, t))):
            xi = x.clone().requires_grad_()
            y = run(xi)
            (y * torch.linspace(-1, 1, y.numel(), dtype=D).reshape(y.shape)).sum().backward()
            grads.append((xi.grad, model.weight.grad.clone(), model.bias.grad.clone()))
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_no_weight_sized_transient_once_grad_exists():
    stock, ours = _pair(nn.Conv3d, 64, 64, padding=1)
    x = torch.randn(1, 64, 2, 2, 2, dtype=D, requires_grad=True)
    peaks = {}
    for name, run in (("stock", stock), ("ours", lambda t: grad_into.conv(ours, t))):
        run(x).sum().backward()  # .grad allocated
        y = run(x)
        peaks[name] = peak_allocated(lambda: y.sum().backward())
    w = stock.weight.nbytes
    assert peaks["stock"] >= w  # autograd's whole weight gradient
    # slices of at most 1/MAX_SLICES of the weight, besides the activations' gradients
    assert peaks["ours"] <= w / grad_into.MAX_SLICES + 4 * x.nbytes, (peaks, w)
    torch.testing.assert_close(ours.weight.grad, stock.weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale_weights", [0.1, 0.5, 2.0])
def test_slices_no_smaller_than_twice_the_networks_largest_tensor(scale_weights):
    """With `scale` (the largest tensor of the network's pass) the slices are at most
    1/MAX_SLICES of the weight but need not be smaller than twice `scale`: a transient of that
    size sets no peak where the network keeps such tensors. Gradients unchanged."""
    stock, ours = _pair(nn.Conv3d, 64, 64, padding=1)
    x = torch.randn(1, 64, 2, 2, 2, dtype=D, requires_grad=True)
    w = stock.weight
    scale = int(scale_weights * w.numel())
    run = (lambda t: grad_into.conv(ours, t, scale=scale))
    stock(x).sum().backward()
    run(x).sum().backward()  # .grad allocated
    calls = []
    real = grad_into._backward

    def counting(*args):
        calls.append(args[4])
        return real(*args)
    grad_into._backward = counting
    try:
        y = run(x)
        peak = peak_allocated(lambda: y.sum().backward())
    finally:
        grad_into._backward = real
    stock(x).sum().backward()
    want = min(grad_into.MAX_SLICES, -(-w.numel() // (2 * scale)))
    weight_calls = [m for m in calls if m[1]]
    assert len(weight_calls) == want, (calls, want)
    assert peak <= w.nbytes / want + 4 * x.nbytes, (peak, w.nbytes, want)
    torch.testing.assert_close(ours.weight.grad, stock.weight.grad, rtol=1e-10, atol=1e-12)


def test_part_of_the_input_channels():
    """The convolution of one part of a concatenation with its weight slice: its gradient
    lands in that slice of .grad, the rest untouched."""
    for conv_type, dim in ((nn.Conv3d, 1), (nn.ConvTranspose3d, 0)):
        stock, ours = _pair(conv_type, 24, 16)
        for model in (stock, ours):
            model.weight.grad = torch.ones_like(model.weight)
        w = stock.weight.narrow(dim, 10, 14)
        part = torch.randn(1, 14, 3, 3, 3, dtype=D)
        fn = F.conv3d if conv_type is nn.Conv3d else F.conv_transpose3d
        fn(part, w, None).square().sum().backward()
        grad_into.conv(ours, part, (10, 14), bias=False).square().sum().backward()
        torch.testing.assert_close(ours.weight.grad, stock.weight.grad, rtol=1e-10, atol=1e-12)
        assert (ours.weight.grad.narrow(dim, 0, 10) == 1).all()


def test_autograd_grad_returns_the_gradient_and_leaves_grad_alone():
    stock, ours = _pair(nn.Conv3d, 32, 32, padding=1)
    x = torch.randn(1, 32, 2, 2, 2, dtype=D)
    ours.weight.grad = torch.zeros_like(ours.weight)
    (want,) = torch.autograd.grad(stock(x).sum(), [stock.weight])
    (got,) = torch.autograd.grad(grad_into.conv(ours, x).sum(), [ours.weight])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (ours.weight.grad == 0).all()
    # backward(inputs=) that leaves the weight out does not write into its .grad either
    xi = x.clone().requires_grad_()
    grad_into.conv(ours, xi).sum().backward(inputs=[xi])
    assert (ours.weight.grad == 0).all() and xi.grad is not None


def test_hooks_see_the_gradient():
    stock, ours = _pair(nn.Conv3d, 32, 32, padding=1)
    x = torch.randn(1, 32, 2, 2, 2, dtype=D)
    stock(x).sum().backward()
    want = stock.weight.grad.clone()
    ours.weight.grad = torch.zeros_like(ours.weight)
    seen = {}
    # a tensor hook must see the whole gradient: that backward returns it, as autograd does
    handle = ours.weight.register_hook(lambda g: seen.__setitem__("hook", g.clone()))
    grad_into.conv(ours, x).sum().backward()
    handle.remove()
    torch.testing.assert_close(seen["hook"], want, rtol=1e-10, atol=1e-12)
    # a post-accumulate hook (what DDP and optimizers-in-backward use) sees the full .grad
    ours.weight.grad.zero_()
    ours.weight.register_post_accumulate_grad_hook(
        lambda p: seen.__setitem__("post", p.grad.clone()))
    grad_into.conv(ours, x).sum().backward()
    torch.testing.assert_close(seen["post"], want, rtol=1e-10, atol=1e-12)


def test_double_backward_through_the_fallback():
    stock, ours = _pair(nn.Conv3d, 16, 16, padding=1)
    x = torch.randn(1, 16, 3, 3, 3, dtype=D)
    results = []
    for model, run in ((stock, stock), (ours, lambda t: grad_into.conv(ours, t))):
        model.weight.grad = torch.zeros_like(model.weight)
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(run(xi).square().sum(), [xi], create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), [xi])
        results.append((gx.detach(), ggx))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_falls_back_to_the_module_where_it_cannot_run():
    conv = nn.Conv3d(4, 4, 3, padding=1, padding_mode="reflect").to(D)
    x = torch.randn(1, 4, 4, 4, 4, dtype=D)
    assert not grad_into.usable(conv, x)
    torch.testing.assert_close(grad_into.conv(conv, x), conv(x))
    assert not grad_into.usable(nn.Conv3d(4, 4, 3), x)  # float32 weight, float64 input


@pytest.mark.parametrize("grad_exists", [False, True], ids=["returned", "into-grad"])
def test_transposed_part_runs_on_onednn_where_the_whole_would(grad_exists):
    """A transposed convolution over one part of a concatenation (MONAI UNet's decoder,
    concatenation-free): ATen's CPU rule would send the part (64 of 128 channels at 16^3) to
    its slow kernel while the whole runs on oneDNN, as stock's does; the part runs on oneDNN
    directly, forward (`mkldnn._convolution_transpose_pointwise`) and backward (through the
    adjoint convolution), and equals the float64 reference: output, input, weight and bias
    gradients."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("needs oneDNN")
    torch.manual_seed(0)
    up = nn.ConvTranspose3d(128, 32, 3, stride=2, padding=1, output_padding=1)
    ref = nn.ConvTranspose3d(128, 32, 3, stride=2, padding=1, output_padding=1).double()
    ref.load_state_dict(up.state_dict())
    x = torch.randn(1, 64, 16, 16, 16)
    spec = grad_into.ConvSpec.of(up, (64, 64))
    with torch.no_grad():  # as inside the Function
        assert grad_into._part_on_onednn(x, up.weight, spec)
        assert not grad_into._part_on_onednn(x.double(), ref.weight, spec)  # float64: ATen's
    assert not grad_into._part_on_onednn(x, up.weight, spec)  # autograd recording: ATen's
    if grad_exists:
        up.weight.grad = torch.zeros_like(up.weight)
        ref.weight.grad = torch.zeros_like(ref.weight)
    gy = torch.randn(1, 32, 32, 32, 32)
    outs = []
    for m, t, g in ((up, x, gy), (ref, x.double(), gy.double())):
        t = t.clone().requires_grad_()
        y = grad_into.conv(m, t, (64, 64))
        y.backward(g)
        outs.append((y, t.grad, m.weight.grad[64:], m.bias.grad))
    for got, want in zip(*outs):
        scale = want.abs().max()
        assert ((got.double() - want).abs().max() / scale).item() < 1e-5
    assert torch.count_nonzero(up.weight.grad[:64]) == 0  # the other part's rows untouched


def test_transposed_part_where_autograd_records_runs_through_aten():
    """The same part convolution on the module's fallback path (a forward hook makes the
    module not `usable`: autograd records the functional form) stays on ATen's differentiable
    convolution and equals the float64 reference."""
    torch.manual_seed(0)
    up = nn.ConvTranspose3d(128, 32, 3, stride=2, padding=1, output_padding=1)
    up.register_forward_hook(lambda *a: None)
    ref = nn.ConvTranspose3d(128, 32, 3, stride=2, padding=1, output_padding=1).double()
    ref.load_state_dict(up.state_dict())
    x = torch.randn(1, 64, 16, 16, 16)
    grads = []
    for m, t in ((up, x), (ref, x.double())):
        t = t.clone().requires_grad_()
        grad_into.conv(m, t, (64, 64)).square().sum().backward()
        grads.append((t.grad, m.weight.grad[64:]))
    for got, want in zip(*grads):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5
