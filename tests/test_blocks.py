"""Recomputing blocks and the batch-norm-safe checkpoint."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import effseg
from conftest import device_params
from effseg.memory import saved_bytes
from effseg.nn import ConvNormAct3d, RecomputeBlock3d

ACTS = {
    "leaky_relu": (("leaky_relu", {"negative_slope": 0.1}), lambda z: F.leaky_relu(z, 0.1)),
    "elu": (("elu", {"alpha": 1.0}), F.elu),
    "relu": ("relu", F.relu),
    "identity": ("identity", lambda z: z),
}


@pytest.fixture
def norm_stats_calls(monkeypatch):
    """A list that gets one entry per call of the compiled CPU norm_stats op."""
    from effseg.ops import _library
    calls = []
    real = _library._COMPILED.get(("norm_stats", "cpu"))
    if real is None:
        pytest.skip("compiled ops not loaded")
    monkeypatch.setitem(_library._COMPILED, ("norm_stats", "cpu"),
                        lambda *a: calls.append(1) or real(*a))
    return calls


def stock_block(block, x, act_fn):
    """The same block from stock functional layers, with the block's parameters and buffers
    (buffers are updated in place, like stock modules do)."""
    def unit(h, m):
        z = F.conv3d(h, m.conv.weight, None, m.conv.stride, m.conv.padding)
        n = m.norm
        training = n.training or n.running_mean is None
        if n.per_sample:
            z = F.instance_norm(z, n.running_mean, n.running_var, n.weight, n.bias,
                                n.training or not n.track_running_stats, n.momentum, n.eps)
        else:
            z = F.batch_norm(z, n.running_mean, n.running_var, n.weight, n.bias, training,
                             n.momentum, n.eps)
        return act_fn(z)

    out = unit(unit(x, block.unit1), block.unit2)
    if block.residual:
        out = out + (x if block.skip is None else F.conv3d(x, block.skip.weight, None,
                                                            block.skip.stride))
    return out


def randomize(block):
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("norm.bias"):
                p.uniform_(-0.5, 0.5)


CONFIGS = [
    (norm, act, residual, stride, channels_last)
    for norm, act, (residual, stride), channels_last in itertools.product(
        ("batch", "instance"), ACTS, [(False, 1), (True, 1), (True, 2)], (False, True))
]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("norm,act,residual,stride,channels_last", CONFIGS,
                         ids=lambda v: str(v))
def test_recompute_matches_plain_and_stock_float64(device, norm, act, residual, stride,
                                                   channels_last):
    torch.manual_seed(0)
    cin, cout = (4, 4) if stride == 1 and norm == "batch" else (3, 5)
    spec, act_fn = ACTS[act]
    blocks = []
    for recompute, keep in ((True, False), (True, True), (False, False)):
        torch.manual_seed(1)
        b = RecomputeBlock3d(cin, cout, 3, stride, norm=norm, act=spec, residual=residual,
                             recompute=recompute, keep_output=keep).double().to(device)
        randomize(b)
        blocks.append(b)
    for b in blocks[1:]:
        b.load_state_dict(blocks[0].state_dict())
    stock = RecomputeBlock3d(cin, cout, 3, stride, norm=norm, act=spec,
                             residual=residual).double().to(device)
    stock.load_state_dict(blocks[0].state_dict())
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    results = []
    for step in range(3):
        x0 = torch.randn(2, cin, 6, 7, 8, dtype=torch.float64, device=device) * 2 + 0.5
        x0 = x0.contiguous(memory_format=fmt)
        grad = None
        outs = []
        for model in blocks + [stock]:
            x = x0.clone().requires_grad_()
            y = stock_block(model, x, act_fn) if model is stock else model(x)
            if grad is None:
                grad = torch.randn_like(y)
            y.backward(grad)
            outs.append((y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}))
            model.zero_grad()
        results.append(outs)
    for outs in results:
        ref_y, ref_dx, ref_grads = outs[-1]
        for y, dx, grads in outs[:-1]:
            torch.testing.assert_close(y, ref_y)
            torch.testing.assert_close(dx, ref_dx)
            for n, g in grads.items():
                torch.testing.assert_close(g, ref_grads[n], msg=n)
    for b in blocks:
        for (n, buf), ref in zip(b.named_buffers(), stock.buffers()):
            if not n.endswith("num_batches_tracked"):  # the functional stock path counts none
                torch.testing.assert_close(buf, ref, msg=n)
    if norm == "batch":
        assert int(blocks[0].unit1.norm.num_batches_tracked) == 3


def test_keep_output_recomputes_one_convolution_and_saves_no_more_in_a_stack(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 12, 12, 12, requires_grad=True)
    stacks = {keep: torch.nn.Sequential(*[RecomputeBlock3d(4, 4, keep_output=keep)
                                          for _ in range(3)]) for keep in (False, True)}
    stacks[True].load_state_dict(stacks[False].state_dict())
    # the kept outputs are the next blocks' inputs: only the last block's output is extra
    extra = x.numel() * 4
    assert saved_bytes(lambda: stacks[True](x)) == saved_bytes(lambda: stacks[False](x)) + extra
    convs = []
    real = torch.nn.functional.conv3d
    monkeypatch.setattr(torch.nn.functional, "conv3d",
                        lambda *a, **k: convs.append(1) or real(*a, **k))
    import effseg.ops.slabs as slabs  # where effseg calls oneDNN directly
    direct = slabs.onednn_conv
    monkeypatch.setattr(slabs, "onednn_conv", lambda *a, **k: convs.append(1) or direct(*a, **k))
    for keep, recomputed in ((False, 6), (True, 3)):
        out = stacks[keep](x)
        convs.clear()
        out.sum().backward()
        assert len(convs) == recomputed, (keep, len(convs))


def test_eval_mode_with_grad_uses_running_stats():
    torch.manual_seed(0)
    b = RecomputeBlock3d(3, 4).double()
    randomize(b)
    b.train()
    b(torch.randn(2, 3, 5, 5, 5, dtype=torch.float64))
    b.eval()
    plain = RecomputeBlock3d(3, 4, recompute=False).double().eval()
    plain.load_state_dict(b.state_dict())
    x = torch.randn(2, 3, 5, 5, 5, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    b(x).sum().backward()
    plain(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.unit1.conv.weight.grad, plain.unit1.conv.weight.grad)


def test_backward_replays_statistics_instead_of_reducing_again(norm_stats_calls):
    calls = norm_stats_calls
    b = RecomputeBlock3d(3, 4)
    x = torch.randn(2, 3, 6, 6, 6, requires_grad=True)
    out = b(x)
    assert len(calls) == 2
    out.sum().backward()
    assert len(calls) == 2, "backward must replay the saved statistics, not reduce again"
    assert int(b.unit1.norm.num_batches_tracked) == 1


def test_no_grad_runs_no_recompute_machinery(monkeypatch):
    from effseg.nn import blocks as blocks_mod

    def fail(*a, **k):
        raise AssertionError("RecomputeBlockFunction used without gradients")

    monkeypatch.setattr(blocks_mod.RecomputeBlockFunction, "apply", fail)
    b = RecomputeBlock3d(3, 4)
    with torch.no_grad():
        y = b(torch.randn(1, 3, 5, 5, 5))
    assert y.grad_fn is None
    b.eval()
    with torch.inference_mode():
        b(torch.randn(1, 3, 5, 5, 5))


def _stack(kind: str, C=8, n=4):
    if kind == "recompute":
        return torch.nn.Sequential(*[RecomputeBlock3d(C, C) for _ in range(n)])
    layers = []
    for _ in range(2 * n):
        layers += [torch.nn.Conv3d(C, C, 3, padding=1, bias=False), torch.nn.BatchNorm3d(C),
                   torch.nn.LeakyReLU(0.01)]
    return torch.nn.Sequential(*layers)


def test_stack_of_four_blocks_keeps_only_block_inputs():
    torch.manual_seed(0)
    C = 8
    x = torch.randn(1, C, 24, 24, 24, requires_grad=True)
    model = _stack("recompute", C)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    fused = saved_bytes(lambda: model(x).sum())
    stock = saved_bytes(lambda: _stack("stock", C)(x).sum())
    act = x.numel() * x.element_size()
    stats = 4 * 2 * 2 * C * 4  # 4 blocks x 2 units x (mean, var) x C float32
    assert fused <= 4 * act + stats + params, (fused, 4 * act, stats, params)
    assert fused / stock <= 0.30, (fused, stock)


def test_stock_checkpoint_updates_running_stats_twice_and_effseg_once():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3, padding=1), torch.nn.BatchNorm3d(3),
                              torch.nn.LeakyReLU(0.01), effseg.nn.InPlaceABN(3))
    x = torch.randn(2, 2, 5, 6, 7, requires_grad=True)
    results = {}
    for how in ("none", "torch", "effseg"):
        m = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3, padding=1), torch.nn.BatchNorm3d(3),
                                torch.nn.LeakyReLU(0.01), effseg.nn.InPlaceABN(3))
        m.load_state_dict(ref.state_dict())
        xi = x.detach().clone().requires_grad_()
        if how == "none":
            y = m(xi)
        elif how == "torch":
            y = torch.utils.checkpoint.checkpoint(m, xi, use_reentrant=False)
        else:
            y = effseg.checkpoint(m, xi)
        y.square().sum().backward()
        results[how] = (m, xi.grad)
    plain, torch_ck, effseg_ck = results["none"][0], results["torch"][0], results["effseg"][0]
    # the known failure (pytorch/pytorch#96136): stock checkpoint updates twice
    assert int(torch_ck[1].num_batches_tracked) == 2
    assert not torch.allclose(torch_ck[1].running_mean, plain[1].running_mean)
    # effseg.checkpoint: once, and everything equal to no checkpointing
    for (n, b), ref_b in zip(effseg_ck.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b, ref_b, msg=n)
    torch.testing.assert_close(results["effseg"][1], results["none"][1])
    for (n, p), ref_p in zip(effseg_ck.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, ref_p.grad, msg=n)


def test_checkpoint_replays_effseg_stats_and_wraps_recompute_blocks(norm_stats_calls):
    calls = norm_stats_calls
    torch.manual_seed(0)
    m = torch.nn.Sequential(ConvNormAct3d(2, 3), RecomputeBlock3d(3, 3))
    ref = torch.nn.Sequential(ConvNormAct3d(2, 3), RecomputeBlock3d(3, 3))
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 2, 5, 5, 5, requires_grad=True)
    effseg.checkpoint(m, x).sum().backward()
    assert len(calls) == 3, "3 norms: statistics reduced once each, replayed in recompute"
    x2 = x.detach().clone().requires_grad_()
    ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for (n, b), rb in zip(m.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, rb, msg=n)


def test_dropout_inside_checkpoint_gives_the_same_gradients():
    torch.manual_seed(0)
    m = torch.nn.Sequential(ConvNormAct3d(2, 4), torch.nn.Dropout3d(0.5), ConvNormAct3d(4, 4),
                            torch.nn.Dropout(0.3))
    x = torch.randn(2, 2, 5, 5, 5)
    grads = []
    for use_ck in (False, True):
        torch.manual_seed(123)
        xi = x.clone().requires_grad_()
        y = effseg.checkpoint(m, xi) if use_ck else m(xi)
        y.square().sum().backward()
        grads.append((xi.grad, [p.grad.clone() for p in m.parameters()]))
        m.zero_grad()
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_autocast_bfloat16_cpu():
    """Under bf16 autocast the recomputing block is as accurate as the same block run plainly
    (stock convolutions in bf16): both against the float64 block, error relative to each
    tensor's largest value. (The two bf16 runs round differently, e.g. the recomputing one
    writes an input gradient slab by slab, so they are compared to the truth, not to each
    other: the weight gradients' errors are a few percent in both.)"""
    torch.manual_seed(0)
    blocks = [RecomputeBlock3d(3, 4, residual=True, recompute=r) for r in (True, False)]
    blocks[1].load_state_dict(blocks[0].state_dict())
    truth_block = copy.deepcopy(blocks[1]).double()
    x = torch.randn(2, 3, 6, 6, 6)
    xi = x.double().requires_grad_()
    y = truth_block(xi)
    y.square().sum().backward()
    truth = (y.detach(), xi.grad, truth_block.unit1.conv.weight.grad,
             truth_block.unit2.conv.weight.grad)
    errors = []
    for b in blocks:
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = b(xi)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert xi.grad.dtype == torch.float32
        assert b.unit1.conv.weight.grad.dtype == torch.float32
        got = (y.float(), xi.grad, b.unit1.conv.weight.grad, b.unit2.conv.weight.grad)
        errors.append([((g.double() - t).abs().max() / t.abs().max()).item()
                       for g, t in zip(got, truth)])
    ours, stock = errors
    for mine, theirs in zip(ours, stock):
        assert mine <= 1.25 * theirs + 2e-3, (ours, stock)
        assert mine < 0.1, ours


@pytest.mark.parametrize("make,exc,words", [
    (lambda: RecomputeBlock3d(3, 4)(torch.randn(1, 5, 4, 4, 4)), ValueError, "3 input channels"),
    (lambda: RecomputeBlock3d(3, 4)(torch.randn(3, 4, 4, 4)), ValueError, "5-D"),
    (lambda: RecomputeBlock3d(3, 4)(torch.ones(1, 3, 4, 4, 4, dtype=torch.int64)), TypeError,
     "floating-point"),
    (lambda: ConvNormAct3d(3, 4)(torch.randn(1, 2, 4, 4, 4)), ValueError, "3 input channels"),
    (lambda: ConvNormAct3d(3, 4, norm="layer"), ValueError, "unknown norm"),
    (lambda: ConvNormAct3d(3, 4, act=("gelu", {})), ValueError, "unknown act"),
    (lambda: ConvNormAct3d(3, 4, act=("leaky_relu", {"alpha": 1.0})), ValueError, "alpha"),
])
def test_bad_block_input(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    assert words in str(info.value)


def test_conv_norm_act_relu_is_exact_through_a_separate_relu():
    torch.manual_seed(0)
    m = ConvNormAct3d(2, 3, act="relu").double()
    x = torch.randn(2, 2, 5, 5, 5, dtype=torch.float64, requires_grad=True)
    y = m(x)
    ref = F.relu(F.batch_norm(F.conv3d(x, m.conv.weight, None, 1, 1), None, None,
                              m.norm.weight, m.norm.bias, True))
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("keep", [False, True])
def test_split_block_equals_one_function_float64_and_frees_the_output_gradient_first(keep):
    """split=True (first convolution and the rest as two Functions) gives the same outputs,
    gradients and buffers as the one-Function block, in float64; and its backward never holds
    the output's gradient beside the input's: its peak is lower by at least that gradient."""
    from effseg.memory import peak_allocated
    torch.manual_seed(0)
    blocks = {s: RecomputeBlock3d(3, 6, stride=2, keep_output=keep, split=s).double()
              for s in (False, True)}
    blocks[True].load_state_dict(blocks[False].state_dict())
    x = torch.randn(2, 3, 12, 10, 8, dtype=torch.float64)
    g = torch.randn(2, 6, 6, 5, 4, dtype=torch.float64)
    results = []
    for split, block in blocks.items():
        xi = x.clone().requires_grad_()
        y = block(xi)
        y.backward(g)
        results.append([y.detach(), xi.grad] + [p.grad for p in block.parameters()]
                       + list(block.buffers()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)

    xf = torch.randn(1, 4, 32, 32, 32, requires_grad=True)
    peaks = {}
    for split in (False, True):
        block = RecomputeBlock3d(4, 8, stride=2, keep_output=keep, split=split)
        y = block(xf)
        gy = torch.randn_like(y)
        del y

        def step():  # the output's gradient made by autograd, not held by the caller
            (block(xf) * gy).sum().backward()
        peaks[split] = peak_allocated(step)
        xf.grad = None
    assert peaks[True] <= peaks[False] - gy.numel() * 4, peaks


def test_kept_output_modified_in_place_raises_and_retain_graph_recomputes_it():
    torch.manual_seed(0)
    block = RecomputeBlock3d(2, 3, keep_output=True).double()
    x = torch.randn(1, 2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    y = block(x)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an in-place operation"):
        y.sum().backward()
    # Backward twice (retain_graph): the second run recomputes the output it gave away.
    grads = []
    y = block(x)
    for _ in range(2):
        x.grad = None
        (y * y).sum().backward(retain_graph=True)
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("x_layout,grad_layout", [("contiguous", "contiguous"),
                                                  ("channels_last", "channels_last"),
                                                  ("channels_last", "contiguous"),
                                                  ("contiguous", "channels_last")])
def test_lean_block_backward_in_rows_equals_stock_float64(monkeypatch, norm, x_layout,
                                                         grad_layout):
    """The lean block whose incoming gradient is its own (`owns_grad`) writes every gradient
    into it and recomputes both units a slab of rows at a time (`_lean_backward_in_rows`,
    `norm_act_backward_rows`): equal to the plain units in float64, in either layout of the
    input and of the gradient (the slabs are read in the recomputed rows' layout). The block
    does so under autocast (`trades_time_for_memory`), here asked for in float64."""
    import effseg.ops.recompute as recompute
    monkeypatch.setattr(recompute, "trades_time_for_memory", lambda *a: True)
    cl = torch.channels_last_3d
    torch.manual_seed(0)
    lean = RecomputeBlock3d(1, 4, norm=norm, lean=True, owns_grad=True).double()
    randomize(lean)
    plain = RecomputeBlock3d(1, 4, norm=norm, recompute=False).double()
    plain.load_state_dict(lean.state_dict())
    x = torch.randn(2, 1, 11, 10, 9, dtype=torch.float64)
    if x_layout == "channels_last":  # one channel: the channel stride tells the layout
        x = x.as_strided(x.shape, (x[0].numel(), 1, 90, 9, 1))
    grad = torch.randn(2, 4, 11, 10, 9, dtype=torch.float64)
    if grad_layout == "channels_last":
        grad = grad.contiguous(memory_format=cl)
    import effseg.ops.recompute as recompute
    calls, real = [], recompute._lean_backward_in_rows
    monkeypatch.setattr(recompute, "_lean_backward_in_rows",
                        lambda *a: calls.append(1) or real(*a))
    grads = []
    for block in (lean, plain):
        xx = x.detach().clone().requires_grad_()
        block(xx).backward(grad.clone())
        grads.append([xx.grad] + [p.grad for p in block.parameters()])
    assert calls == [1]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
