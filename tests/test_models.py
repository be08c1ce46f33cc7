"""FullVolumeFCN against itself without recompute and against its stock twin."""
import pytest
import torch
import torch.utils._python_dispatch

from effseg.losses import DiceCELoss
from effseg.memory import peak_allocated, saved_bytes
from effseg.pipeline.model_config import build_model, model_config
from effseg.models import FullVolumeFCN, StockUNet3d
from effseg.nn import DecoderBlock3d

from conftest import device_params

SMALL = dict(channels=(4, 8, 12), strides=(1, 2, 2))


def randomize(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "norm" in name and name.endswith("bias"):
                p.uniform_(-0.3, 0.3)
    return model


def run(model, x, grad_seed=0):
    x = x.clone().requires_grad_()
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed),
                    dtype=y.dtype)
    y.backward(g)
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("shape", [(1, 1, 21, 18, 13), (2, 1, 8, 9, 16), (1, 1, 6, 5, 7)])
def test_any_volume_size_is_padded_and_cropped_back(shape):
    model = FullVolumeFCN(out_channels=3, **SMALL)
    with torch.no_grad():
        assert model(torch.randn(shape)).shape == (shape[0], 3) + shape[2:]
    aniso = FullVolumeFCN(out_channels=2, channels=(4, 8, 8), strides=(1, (1, 2, 2), 2))
    assert aniso.total_stride == (2, 4, 4)
    with torch.no_grad():
        assert aniso(torch.randn(shape)).shape == (shape[0], 2) + shape[2:]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_output_is_dense_in_the_input_format_and_trains_with_dice_ce(layout, deep_supervision):
    """A volume that is no multiple of the total stride (padded, cropped back): every output is a
    dense tensor in the input's memory format, and DiceCELoss takes it as it is; loss and input
    gradient equal the stock twin's in float64."""
    from effseg.losses import DeepSupervisionLoss, dice_ce_reference
    torch.manual_seed(0)
    fcn = randomize(FullVolumeFCN(out_channels=3, deep_supervision=deep_supervision,
                                  **SMALL)).double()
    stock = fcn.to_stock()
    x = torch.randn(2, 1, 11, 10, 7, dtype=torch.float64).contiguous(memory_format=layout)
    labels = torch.randint(0, 3, (2, 11, 10, 7))
    results = []
    for model, loss in ((fcn, DiceCELoss()), (stock, dice_ce_reference)):
        xi = x.clone(memory_format=layout).requires_grad_()
        outs = model(xi)
        for out in outs if deep_supervision else [outs]:
            assert out.is_contiguous(memory_format=layout), (out.shape, out.stride())
        if deep_supervision:
            loss = DeepSupervisionLoss(loss, model.output_strides())
        value = loss(outs, labels)
        value.backward()
        results.append((value.detach(), xi.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("act", [("leaky_relu", {"negative_slope": 0.05}), "relu", "elu"])
def test_recompute_on_off_and_stock_twin_agree_float64(norm, act):
    torch.manual_seed(0)
    models = []
    # recomputing with the upsampling folded (the default), recomputing unfolded, no recompute
    for recompute, fold in ((True, True), (True, False), (False, True)):
        m = FullVolumeFCN(in_channels=2, out_channels=3, norm=norm, act=act, recompute=recompute,
                          fold_upsampling=fold, **SMALL).double()
        models.append(randomize(m))
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    stock = models[0].to_stock()
    assert isinstance(stock, StockUNet3d)
    x = torch.randn(2, 2, 9, 10, 11, dtype=torch.float64)
    results = [run(m, x) for m in models + [stock]]
    ref_y, ref_dx, ref_g = results[-1]
    for y, dx, grads in results[:-1]:
        torch.testing.assert_close(y, ref_y)
        torch.testing.assert_close(dx, ref_dx)
        for name, g in grads.items():
            if ".conv_skip." in name or ".conv_up." in name:
                continue  # compared through the concatenated weight below
            torch.testing.assert_close(g, ref_g[name], msg=name)
        for i, dec in enumerate(models[0].decoder):
            split = torch.cat([grads[f"decoder.{i}.conv_skip.weight"],
                               grads[f"decoder.{i}.conv_up.weight"]], dim=1)
            torch.testing.assert_close(split, ref_g[f"decoder.{i}.conv.weight"])
    for (name, b), ref in zip(models[0].named_buffers(), stock.buffers()):
        torch.testing.assert_close(b, ref, msg=name)


@pytest.mark.parametrize("device", device_params())
def test_fcn_training_step_on_each_device_equals_its_stock_twin(device):
    """The recomputing FCN (fused head, recomputed full-resolution units, cuDNN convolution
    backward on a GPU) against the stock twin in float64, then a bf16 autocast step."""
    torch.manual_seed(0)
    fcn = randomize(FullVolumeFCN(in_channels=1, out_channels=3, channels=(4, 8, 8),
                                  strides=(1, 2, 2))).double().to(device)
    stock = fcn.to_stock()
    x = torch.randn(2, 1, 12, 10, 9, dtype=torch.float64, device=device)
    g = torch.randn(2, 3, 12, 10, 9, dtype=torch.float64, device=device)
    results = []
    for model in (fcn, stock):
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.backward(g)
        results.append((y.detach(), xi.grad, model.head.weight.grad, model.head.bias.grad,
                        model.encoder[0].unit1.conv.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    fcn.float()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        y = fcn(x.float())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in fcn.parameters())


def test_skip_fusion_equals_concatenation():
    torch.manual_seed(0)
    dec = randomize(DecoderBlock3d(6, 3, 4, recompute=False)).double().eval()
    low = torch.randn(1, 6, 3, 4, 5, dtype=torch.float64)
    skip = torch.randn(1, 3, 6, 8, 10, dtype=torch.float64)
    fused = dec.conv_skip(skip) + dec.conv_up(dec.up(low))
    concat = torch.nn.functional.conv3d(torch.cat([skip, dec.up(low)], 1), dec.concat_weight(),
                                        padding=1)
    torch.testing.assert_close(fused, concat)


def test_deep_supervision_outputs():
    model = FullVolumeFCN(out_channels=2, channels=(4, 8, 8, 8), strides=(1, 2, 2, 2),
                          deep_supervision=True)
    x = torch.randn(1, 1, 17, 16, 16)
    outs = model(x)
    assert [tuple(o.shape[2:]) for o in outs] == [(17, 16, 16), (9, 8, 8), (5, 4, 4)]
    sum(o.sum() for o in outs).backward()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (1, 2, 17, 16, 16)


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_configured_stock_twin_starts_from_the_fcn_weights_of_its_seed(deep_supervision):
    config = model_config("small", out_channels=4, deep_supervision=deep_supervision)
    torch.manual_seed(7)
    fcn = build_model(config)
    torch.manual_seed(7)
    stock = build_model({**config, "arch": "stock"})
    assert isinstance(fcn, FullVolumeFCN) and isinstance(stock, StockUNet3d)
    expected = fcn.to_stock().state_dict()
    assert stock.state_dict().keys() == expected.keys()
    assert all(torch.equal(stock.state_dict()[k], v) for k, v in expected.items())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fcn.eval()(x), stock.eval()(x), atol=1e-5, rtol=1e-4)


def test_parameters_at_most_30_percent_of_classic():
    def count(m):
        return sum(p.numel() for p in m.parameters())
    ratio = count(FullVolumeFCN()) / count(StockUNet3d.classic())
    assert ratio <= 0.30, ratio


def test_saved_for_backward_at_most_25_percent_of_stock_at_ct_size():
    torch.manual_seed(0)
    fcn = FullVolumeFCN(in_channels=1, out_channels=3)  # 16 base channels
    stock = fcn.to_stock()
    x = torch.randn(1, 1, 96, 96, 96)
    ours = saved_bytes(lambda: fcn(x))
    theirs = saved_bytes(lambda: stock(x))
    assert ours / theirs <= 0.25, (ours, theirs, ours / theirs)


@pytest.mark.parametrize("edge,amp", [(96, None), (96, torch.bfloat16), (64, None),
                                      (64, torch.bfloat16)],
                         ids=["96-float32", "96-bf16-autocast", "64-float32",
                              "64-bf16-autocast"])
def test_second_training_step_peak_at_most_20_percent_of_stock_at_ct_size(edge, amp):
    """The whole second step (forward, fused Dice + CE, backward, Adam; the first step made the
    optimizer state) at 1x1x96^3 and 1x1x64^3, 16 base channels: peak bytes of the tensors the
    step allocates, tracked op by op (deterministic on CPU). Measured 0.198 (float32, both
    sizes), 0.194 (bf16 autocast, 96^3) and 0.198 (bf16 autocast, 64^3); the peak is in the
    backward of the two finest levels (see FullVolumeFCN's docstring)."""
    torch.manual_seed(0)
    fcn = FullVolumeFCN(in_channels=1, out_channels=3)
    stock = fcn.to_stock()
    x = torch.randn(1, 1, edge, edge, edge)
    target = torch.randint(0, 3, (1, edge, edge, edge))
    loss_fn = DiceCELoss()

    def step(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def run():
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss = loss_fn(model(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        run()
        return run

    ours, theirs = peak_allocated(step(fcn)), peak_allocated(step(stock))
    assert ours / theirs <= 0.20, (ours, theirs, ours / theirs)


def _nodes(loss, name):
    seen, stack, found = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == name:
            found.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return found


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_second_block_recomputes_the_finest_skip_instead_of_keeping_it(monkeypatch, layout):
    """FullVolumeFCN's second block recomputes its input (the finest skip) in slabs of rows
    from the network's input (`RowsSource`) rather than keep it: neither of its Functions holds
    the skip (with the source disabled, both do), and the gradients are the same (float64; odd
    sizes, so that the slabs' edges and the stride-2 halo rows are exercised). It does so under
    autocast (`trades_time_for_memory`), here asked for in float64."""
    import effseg.models.fcn
    from effseg.ops.recompute import RowsSource
    monkeypatch.setattr(effseg.models.fcn, "trades_time_for_memory", lambda *a: True)
    torch.manual_seed(0)
    fcn = FullVolumeFCN(in_channels=1, out_channels=3, channels=(4, 6, 8),
                        strides=(1, 2, 2), channels_last=layout == torch.channels_last_3d
                        ).double()
    x = torch.randn(2, 1, 21, 12, 10, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 21, 12, 10))

    def run(source: bool):
        fcn.zero_grad(set_to_none=True)
        loss = DiceCELoss()(fcn(x), target)
        # the second level's Functions: their first weight reads the finest level's 4 channels
        (first,) = [n for n in _nodes(loss, "_FirstConvFunctionBackward")
                    if n.saved_tensors[-1].shape[1] == 4]
        (rest,) = [n for n in _nodes(loss, "_RestFunctionBackward")
                   if n.saved_tensors[1].shape[1] == 4]
        # the finest skip: 4 channels of the padded 24 x 12 x 12 volume
        holds = [t for t in rest.saved_tensors if t is not None and t.shape[1:] == (4, 24, 12, 12)]
        assert (rest.saved_tensors[0] is None and not holds) == source
        assert (getattr(first, "kept", None) is None) == source
        assert (first.source is not None) == source
        loss.backward()
        return [p.grad.clone() for p in fcn.parameters()]

    grads = run(True)
    monkeypatch.setattr(RowsSource, "fill", lambda self, *a: None)
    for g, h in zip(grads, run(False)):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


def test_peak_allocated_follows_tensor_lifetimes():
    def fn():
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B
        b = torch.empty(500, dtype=torch.float64)   # 4000 B, both alive: 8000
        del a
        c = torch.empty(100, dtype=torch.uint8)     # 100 B: 4100 alive
        return b.sum() + c.sum()                     # one 8-byte result more

    assert peak_allocated(fn) == 8000


@pytest.mark.parametrize("act", ["leaky_relu", "relu"])
@pytest.mark.parametrize("keep_output", [False, True])
def test_decoder_with_fused_head_equals_head_after_decoder(act, keep_output):
    torch.manual_seed(0)
    dec = randomize(DecoderBlock3d(6, 3, 4, act=act, keep_output=keep_output)).double()
    head = torch.nn.Conv3d(4, 2, 1).double()
    low = torch.randn(2, 6, 3, 4, 2, dtype=torch.float64)
    skip = torch.randn(2, 3, 6, 8, 4, dtype=torch.float64)
    g = torch.randn(2, 2, 6, 8, 4, dtype=torch.float64)
    results = []
    for fused in (True, False):
        lo, sk = low.clone().requires_grad_(), skip.clone().requires_grad_()
        y = dec(lo, sk, head=head) if fused else head(dec(lo, sk))
        y.backward(g)
        params = list(dec.parameters()) + list(head.parameters())
        results.append([y.detach(), lo.grad, sk.grad] + [p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="1x1x1 nn.Conv3d"):
        dec(low, skip, head=torch.nn.Conv3d(4, 2, 3))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("norm", ["batch", "instance", ("batch", {"affine": False})])
@pytest.mark.parametrize("head", [False, True])
def test_lean_blocks_equal_stock_layers_float64(batch, norm, head):
    """The lean decoder (norm-act gradients written into the pre-activations block by block, in
    one pass or two) and the lean encoder block (first unit recomputed) against the same layers
    without recompute, in float64: outputs, input gradients, parameter gradients, buffers."""
    from effseg.nn import RecomputeBlock3d
    torch.manual_seed(batch)
    dec = randomize(DecoderBlock3d(6, 5, 5, norm=norm, lean=True)).double()
    enc = randomize(RecomputeBlock3d(2, 5, norm=norm, lean=True)).double()
    head_conv = torch.nn.Conv3d(5, 3, 1).double() if head else None
    low = torch.randn(batch, 6, 3, 4, 2, dtype=torch.float64)
    skip = torch.randn(batch, 5, 6, 8, 4, dtype=torch.float64)
    x = torch.randn(batch, 2, 6, 8, 4, dtype=torch.float64)
    results = []
    for recompute in (True, False):
        dec.recompute = enc.recompute = recompute
        lo, sk, xi = (t.clone().requires_grad_() for t in (low, skip, x))
        y = dec(lo, sk, head=head_conv)
        e = enc(xi)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        ge = torch.randn(e.shape, generator=torch.Generator().manual_seed(2), dtype=e.dtype)
        (y * g).sum().add((e * ge).sum()).backward()
        params = list(dec.parameters()) + list(enc.parameters()) + (
            list(head_conv.parameters()) if head else [])
        results.append([y.detach(), e.detach(), lo.grad, sk.grad, xi.grad]
                       + [p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


class _ConvBackends(torch.utils._python_dispatch.TorchDispatchMode):
    """Records, for every convolution forward and backward, the backend ATen selects for it, and
    the convolutions called on oneDNN directly ("OneDNN")."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def _note(self, kind, x, w, transposed, backend):
        key = (kind, tuple(x.shape[2:]), tuple(w.shape[2:]), transposed)
        self.seen.setdefault(key, set()).add(backend)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.convolution.default,
                    torch.ops.aten.convolution_backward.default):
            backward = func is torch.ops.aten.convolution_backward.default
            x, w = args[1:3] if backward else args[:2]
            stride, padding, dilation, transposed, output_padding, groups = args[4:10] \
                if backward else args[3:9]
            backend = torch._C._select_conv_backend(x, w, None, stride, padding, dilation,
                                                    transposed, output_padding, groups, None)
            # MkldnnTranspose has no Python name: named by its value
            name = {8: "Mkldnn", 9: "MkldnnTranspose"}.get(int(backend),
                                                          str(backend).rsplit(".", 1)[-1])
            self._note("backward" if backward else "forward", x, w, transposed, name)
        elif func is torch.ops.aten.mkldnn_convolution.default:
            self._note("forward", args[0], args[1], False, "OneDNN")
        elif func is torch.ops.mkldnn._convolution_transpose_pointwise.default:
            self._note("forward", args[0], args[1], True, "OneDNN")
        return func(*args, **(kwargs or {}))


def test_convolutions_run_on_onednn_or_where_stock_runs_them():
    """At the phantom's size (batch 1, float32 on a CPU, where ATen sends small inputs to its
    slow reference kernel and larger ones to oneDNN), every convolution of FullVolumeFCN's
    training step runs on oneDNN (through ATen or called directly), except those that ATen runs
    on the same slow kernel for the stock twin (weight gradients, transposed convolutions of
    the unfolded upsampling): the concatenation-free skip
    fusion, the folded upsampling and the slabs push nothing onto slow_conv3d, and the
    forward convolutions that ATen would run there run on oneDNN."""
    torch.manual_seed(0)
    fcn = FullVolumeFCN(in_channels=1, out_channels=4, channels=(16, 32, 64, 128),
                        strides=(1, 2, 2, 2), norm="instance")
    stock = fcn.to_stock()
    x = torch.randn(1, 1, 40, 40, 28)
    target = torch.randint(0, 4, (1, 40, 40, 28))
    seen = []
    for model in (fcn, stock):
        with _ConvBackends() as rec:
            DiceCELoss()(model(x), target).backward()
        seen.append(rec.seen)
    ours, theirs = seen
    onednn = {"Mkldnn", "MkldnnTranspose", "OneDNN"}
    for key, backends in ours.items():
        slow = backends - onednn
        assert not slow or (slow <= theirs.get(key, set()) and key[2] != (4, 4, 4)), (key, ours)
    # stock runs some of its convolutions on the slow kernel (the coarse levels), effseg runs
    # their forward on oneDNN
    stock_slow = {k for k, b in theirs.items() if k[0] == "forward" and "Slow3d" in b}
    assert stock_slow and all(ours.get(k, set()) <= onednn for k in stock_slow), theirs
    assert any("OneDNN" in b for b in ours.values())
    # the folded upsampling (a transposed convolution with a 4^3 kernel) and composing its
    # weight (a transposed convolution of the 2^3 upsampling weight) ran
    assert any(k[-1] and k[2] == (4, 4, 4) for k in ours), ours
    assert any(k[-1] and k[1] == (2, 2, 2) for k in ours), ours


def test_bad_model_input():
    model = FullVolumeFCN(**SMALL)
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="D, H, W"):
        model(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="strides"):
        FullVolumeFCN(channels=(4, 8), strides=(1, 2, 2))


def _two_shapes(seed, n=32):
    """A noisy volume with a bright sphere (class 1) and a dark box (class 2)."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij")
    c = torch.randint(10, 22, (3,), generator=g).float()
    sphere = (d - c[0]) ** 2 + (h - c[1]) ** 2 + (w - c[2]) ** 2 < 36
    box = (d > 3) & (d < 12) & (h > 20) & (h < 29) & (w > 2) & (w < 10) & ~sphere
    label = torch.zeros(n, n, n, dtype=torch.int64)
    label[sphere], label[box] = 1, 2
    image = label.float().mul(1.5).neg().add(sphere.float() * 4.5)
    image = image + 0.5 * torch.randn(n, n, n, generator=g)
    return image[None], label


def _dice(pred, label, k):
    p, t = pred == k, label == k
    return (2 * (p & t).sum() / (p.sum() + t.sum())).item()


@pytest.mark.slow
def test_short_training_segments_two_shapes():
    # (the stock twin learns the same task too, in twice the time here: equality with it in
    # float64 is asserted step by step elsewhere, so it is not trained here)
    from effseg.losses import DiceCELoss
    torch.manual_seed(0)
    model = FullVolumeFCN(in_channels=1, out_channels=3, channels=(8, 16, 32), strides=(1, 2, 2),
                          norm="instance")
    data = [_two_shapes(s) for s in range(4)]
    x = torch.stack([d[0] for d in data])
    y = torch.stack([d[1] for d in data])
    loss_fn = DiceCELoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    model.eval()
    xt, yt = _two_shapes(99)
    with torch.no_grad():
        pred = model(xt[None]).argmax(1)[0]
    assert _dice(pred, yt, 1) > 0.9 and _dice(pred, yt, 2) > 0.9, (
        _dice(pred, yt, 1), _dice(pred, yt, 2))


@pytest.mark.parametrize("stride,kernel", [((2, 2, 2), 3), ((1, 2, 2), 3), ((2, 2, 2), 5)])
def test_folded_upsampling_equals_upsample_then_convolve(stride, kernel):
    """The decoder's upsampling folded into its convolution (one transposed convolution of the
    coarse input, whole or in slabs) and the two weights' gradients through the composition,
    against ConvTranspose3d then Conv3d, in float64."""
    from effseg.ops.folded_up import (add_folded_conv_, folded_conv, folded_weight,
                                      folded_weight_backward)
    torch.manual_seed(0)
    low = torch.randn(2, 6, 7, 4, 3, dtype=torch.float64)
    w_up = torch.randn(6, 4, *stride, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, kernel, kernel, kernel, dtype=torch.float64, requires_grad=True)
    pad = (kernel - 1) // 2
    ref = torch.nn.functional.conv3d(torch.nn.functional.conv_transpose3d(low, w_up, None, stride),
                                     w, None, 1, pad)
    K = folded_weight(w_up.detach(), w.detach())
    torch.testing.assert_close(folded_conv(low, K, stride, (pad,) * 3), ref)
    for parts in (2, 5, 100):  # slabs of many coarse rows, of a few, of one
        z = torch.ones_like(ref)
        add_folded_conv_(z, low, K, stride, (pad,) * 3, parts)
        torch.testing.assert_close(z, ref + 1)
    g = torch.randn_like(ref)
    ref.backward(g)
    dlow, dK = torch.ops.aten.convolution_backward(
        g, low, K, None, list(stride), [pad] * 3, [1] * 3, True, [0] * 3, 1,
        [True, True, False])[:2]
    d_up, d_w = folded_weight_backward(dK, w_up.detach(), w.detach())
    torch.testing.assert_close(d_up, w_up.grad)
    torch.testing.assert_close(d_w, w.grad)


def test_lean_level_with_head_refuses_a_second_backward():
    torch.manual_seed(0)
    fcn = FullVolumeFCN(in_channels=1, out_channels=2, **SMALL)
    y = fcn(torch.randn(1, 1, 8, 8, 8))
    y.square().mean().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run backward twice"):
        y.square().mean().backward()
