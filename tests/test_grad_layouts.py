"""Gradients of any layout reach the in-place ops, the recomputing blocks, the decoder and the
fused loss: whatever strides stock PyTorch ops hand to backward (a channel slice of a
concatenation's gradient at N = 1, an expanded, transposed or channels-last gradient), the
result equals the stock layers' in float64."""
import copy

import pytest
import torch
import torch.nn.functional as F

import effseg
from effseg.losses import DiceCELoss, dice_ce_reference
from effseg.nn import DecoderBlock3d, RecomputeBlock3d
from test_blocks import ACTS, randomize, stock_block


def _fixed(shape, seed, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).contiguous(
        memory_format=memory_format)


def _transposed(shape, seed):
    s = list(shape)
    s[2], s[3] = s[3], s[2]
    return _fixed(s, seed).transpose(2, 3)


# Each consumer turns a module's output into a scalar the way a network's next layers would, so
# that the output's gradient arrives with that consumer's strides.
CONSUMERS = {
    # a channel slice of the concatenation's gradient: batch stride of the whole at N = 1
    "cat_channels": lambda y: torch.cat([y, _fixed(y[:, :1].shape, 1)], 1).square().sum(),
    "cat_channels_first": lambda y: torch.cat([_fixed(y[:, :2].shape, 2), y], 1).square().sum(),
    "cat_batch": lambda y: torch.cat([y, _fixed(y.shape, 3)], 0).square().sum(),
    # a gradient expanded along every spatial dimension (stride 0)
    "expand": lambda y: (y.sum(dim=(2, 3, 4)) * _fixed(y.shape[:2], 4)).sum(),
    "transpose": lambda y: (y * _transposed(y.shape, 5)).sum(),
    "channels_last": lambda y: (y * _fixed(y.shape, 6, torch.channels_last_3d)).sum(),
    "slice": lambda y: y[:, :, 1:, :, ::2].square().sum(),
    "transpose_contiguous": lambda y: (y.transpose(1, 4).contiguous().square()
                                       * _fixed(y.transpose(1, 4).shape, 7)).sum(),
}


def _check_same(model, stock, x, consumer):
    """Forward, the consumer and backward through `model` and `stock`: outputs, input and
    parameter gradients and buffers equal."""
    results = []
    for m in (model, stock):
        xi = x.clone().requires_grad_()
        y = m(xi)
        consumer(y).backward()
        # Running statistics (num_batches_tracked is not kept by the functional twins).
        results.append((y.detach(), xi.grad, [p.grad for p in m.parameters()],
                        [b for b in m.buffers() if b.is_floating_point()]))
    (y, dx, grads, bufs), (ry, rdx, rgrads, rbufs) = results
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(dx, rdx)
    assert len(grads) == len(rgrads) and len(bufs) == len(rbufs)
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g, rg)
    for b, rb in zip(bufs, rbufs):
        torch.testing.assert_close(b, rb)


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("norm", ["instance", "batch", "group", "batch+prelu"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_converted_norm_act_accepts_any_gradient_layout(consumer, n, norm, memory_format):
    torch.manual_seed(0)
    norm_layer = {"instance": lambda: torch.nn.InstanceNorm3d(4, affine=True),
                  "batch": lambda: torch.nn.BatchNorm3d(4),
                  "group": lambda: torch.nn.GroupNorm(2, 4),
                  "batch+prelu": lambda: torch.nn.BatchNorm3d(4)}[norm]()
    act = torch.nn.PReLU(4, init=0.2) if norm.endswith("prelu") else torch.nn.LeakyReLU(0.01)
    stock = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), norm_layer, act).double()
    with torch.no_grad():
        stock[1].weight.uniform_(0.5, 1.5)
        stock[1].bias.uniform_(-0.3, 0.3)
    model, report = effseg.convert(copy.deepcopy(stock))
    assert len(report.replaced) == 1
    x = torch.randn(n, 1, 6, 5, 4, dtype=torch.float64).contiguous(memory_format=memory_format)
    _check_same(model, stock, x, CONSUMERS[consumer])


def test_issue_reproduction_concatenation_at_batch_one():
    """The six lines of the report: a converted conv -> instance norm -> LeakyReLU whose output
    is concatenated with the input, at N = 1."""
    torch.manual_seed(0)
    stock = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1),
                                torch.nn.InstanceNorm3d(4, affine=True),
                                torch.nn.LeakyReLU(0.01))
    m, _ = effseg.convert(copy.deepcopy(stock))
    grads = []
    for net in (m, stock):
        x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        torch.cat([net(x), x], 1).square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


class _StockBlock(torch.nn.Module):
    def __init__(self, block, act_fn):
        super().__init__()
        self.block, self.act_fn = block, act_fn

    def forward(self, x):
        return stock_block(self.block, x, self.act_fn)


@pytest.mark.parametrize("consumer", ["cat_channels", "expand", "transpose", "channels_last"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("act,residual,norm", [("relu", True, "batch"),
                                               ("leaky_relu", False, "instance")])
def test_recompute_block_accepts_any_gradient_layout(consumer, n, act, residual, norm):
    torch.manual_seed(0)
    spec, fn = ACTS[act]
    block = RecomputeBlock3d(3, 4, stride=1, norm=norm, act=spec, residual=residual).double()
    randomize(block)
    twin = copy.deepcopy(block)
    twin.recompute = False
    x = torch.randn(n, 3, 5, 6, 4, dtype=torch.float64)
    # The stock functional twin reads (and updates) the copy's parameters and buffers.
    _check_same(block, _StockBlock(twin, fn), x, CONSUMERS[consumer])


class _StockDecoder(torch.nn.Module):
    """DecoderBlock3d from stock layers: conv(cat(skip, up(low))) -> norm -> act, twice."""

    def __init__(self, dec):
        super().__init__()
        self.dec = dec

    def forward(self, low, skip):
        d = self.dec
        up = F.conv_transpose3d(low, d.up.weight, None, d.up_stride)
        z = F.conv3d(torch.cat([skip, up], 1), d.concat_weight(), padding=1)
        z = F.leaky_relu(F.batch_norm(z, d.norm1.running_mean, d.norm1.running_var,
                                      d.norm1.weight, d.norm1.bias, True, d.norm1.momentum,
                                      d.norm1.eps), 0.01)
        u = d.unit2
        z = F.conv3d(z, u.conv.weight, None, 1, 1)
        return F.leaky_relu(F.batch_norm(z, u.norm.running_mean, u.norm.running_var,
                                         u.norm.weight, u.norm.bias, True, u.norm.momentum,
                                         u.norm.eps), 0.01)


@pytest.mark.parametrize("consumer", ["cat_channels", "cat_channels_first", "expand",
                                      "transpose", "channels_last"])
@pytest.mark.parametrize("n", [1, 2])
def test_decoder_accepts_any_gradient_layout(consumer, n):
    torch.manual_seed(0)
    dec = DecoderBlock3d(6, 3, 4).double()
    with torch.no_grad():
        for norm in (dec.norm1, dec.unit2.norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    twin = copy.deepcopy(dec)
    low = torch.randn(n, 6, 3, 2, 2, dtype=torch.float64)
    skip = torch.randn(n, 3, 6, 4, 4, dtype=torch.float64)
    results = []
    for m in (dec, _StockDecoder(twin)):
        lo, sk = low.clone().requires_grad_(), skip.clone().requires_grad_()
        y = m(lo, sk)
        CONSUMERS[consumer](y).backward()
        params = dict(m.named_parameters())
        weights = {k.removeprefix("dec."): v.grad for k, v in params.items()}
        results.append((y.detach(), lo.grad, sk.grad, weights))
    (y, dlow, dskip, g), (ry, rdlow, rdskip, rg) = results
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(dlow, rdlow)
    torch.testing.assert_close(dskip, rdskip)
    for name in g:
        torch.testing.assert_close(g[name], rg[name], msg=name)


@pytest.mark.parametrize("combine", ["stack", "expand", "scaled"])
def test_fused_loss_accepts_any_gradient_layout(combine):
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5, 4, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (1, 5, 4, 6))
    loss_fn = DiceCELoss()

    def combined(loss):
        if combine == "stack":
            return (torch.stack([loss, loss.detach() * 0 + 1]) * torch.tensor([2.0, 3.0],
                                                                             dtype=loss.dtype)).sum()
        if combine == "expand":
            return (loss.expand(4, 3) * torch.arange(12.0, dtype=loss.dtype).view(4, 3)).sum()
        return loss * 0.5

    grads = []
    for fn in (loss_fn, lambda lo, la: dice_ce_reference(lo, la)):
        lo = logits.clone().requires_grad_()
        combined(fn(lo, labels)).backward()
        grads.append(lo.grad)
    torch.testing.assert_close(grads[0], grads[1])
