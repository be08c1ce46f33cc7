"""effseg.convert: stock norm + activation pairs fused into the in-place modules, only where the
traced data flow proves it safe; MONAI UNet and DynUNet converted with identical outputs,
gradients and running statistics, and fewer bytes saved for backward."""
import copy

import pytest
import torch
from torch import nn

import effseg
from effseg.convert import ConversionReport
from effseg.memory import saved_bytes
from effseg.nn import InPlaceABN, InPlaceAGN, InPlaceAIN
from effseg.nn.norm_act import FusedPReLU

D = torch.float64


def _x(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=D, requires_grad=requires_grad)


def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics, so that copying them matters."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            if m.weight is not None:
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
            if m.running_mean is not None:
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(3)


def _step(model, x, w):
    """Forward + backward with a fixed random output weighting; returns (output, input grad)."""
    x = x.clone().requires_grad_()
    y = model(x)
    (y * w).sum().backward()
    return y.detach(), x.grad


def _assert_same_training_step(stock: nn.Module, converted: nn.Module, shape) -> None:
    x = _x(*shape)
    stock.train()
    converted.train()
    w = torch.randn_like(stock(x.clone()).detach())
    # the probing forward above moved the stock running statistics: start both from one state
    converted.load_state_dict(stock.state_dict())
    ys, gs = _step(stock, x, w)
    yc, gc = _step(converted, x, w)
    torch.testing.assert_close(yc, ys)
    torch.testing.assert_close(gc, gs)
    ps, pc = dict(stock.named_parameters()), dict(converted.named_parameters())
    assert ps.keys() == pc.keys()
    for name in ps:
        torch.testing.assert_close(pc[name].grad, ps[name].grad, msg=name)
    ss, sc = stock.state_dict(), converted.state_dict()
    assert ss.keys() == sc.keys()
    for name in ss:
        torch.testing.assert_close(sc[name], ss[name], msg=name)


def _assert_same_eval(stock: nn.Module, converted: nn.Module, shape) -> None:
    stock.eval()
    converted.eval()
    x = _x(*shape)
    with torch.no_grad():
        torch.testing.assert_close(converted(x.clone()), stock(x.clone()))


def _fused_pair(norm, act, x_shape, conv=nn.Conv3d):
    cin = x_shape[1]
    return nn.Sequential(conv(cin, 4, 3, padding=1), norm, act).to(D)


# --------------------------------------------------------------------------- small Sequentials

@pytest.mark.parametrize("norm, act, cls, activation", [
    (nn.BatchNorm3d(4), nn.LeakyReLU(0.2), InPlaceABN, ("leaky_relu", 0.2)),
    (nn.BatchNorm3d(4, momentum=None), nn.ELU(0.7), InPlaceABN, ("elu", 0.7)),
    (nn.InstanceNorm3d(4), nn.LeakyReLU(0.01, inplace=True), InPlaceAIN, ("leaky_relu", 0.01)),
    (nn.InstanceNorm3d(4, affine=True, track_running_stats=True), nn.Identity(), InPlaceAIN,
     ("identity", 0.0)),
    (nn.BatchNorm3d(4, affine=False, eps=1e-3), nn.LeakyReLU(0.05), InPlaceABN,
     ("leaky_relu", 0.05)),
])
def test_sequential_pair_is_fused_exactly(norm, act, cls, activation):
    stock = _fused_pair(norm, act, (2, 3))
    _randomize_norms(stock)
    converted, report = effseg.convert(stock)
    new = converted[1]
    assert type(new) is cls
    assert (new.activation, new.activation_param) == activation
    for attr in ("eps", "momentum", "affine", "track_running_stats", "num_features"):
        assert getattr(new, attr) == getattr(norm, attr), attr
    assert type(converted[2]) is nn.Identity
    assert [r.path for r in report.replaced] == ["1"] and report.skipped == []
    assert report.replaced[0].activation == (None if isinstance(act, nn.Identity) else "2")
    # the original is left alone
    assert stock[1] is norm and stock[2] is act
    _assert_same_training_step(stock, converted, (2, 3, 6, 5, 4))
    _assert_same_eval(stock, converted, (2, 3, 6, 5, 4))


def _randomize(model: nn.Module) -> None:
    """_randomize_norms, plus group norms and PReLU slopes."""
    _randomize_norms(model)
    for m in model.modules():
        with torch.no_grad():
            if isinstance(m, nn.GroupNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(0.05, 0.5)


@pytest.mark.parametrize("norm, act, cls, activation", [
    (nn.GroupNorm(2, 4), nn.LeakyReLU(0.2), InPlaceAGN, ("leaky_relu", 0.2)),
    (nn.GroupNorm(1, 4, eps=1e-3), nn.ELU(0.7), InPlaceAGN, ("elu", 0.7)),
    (nn.GroupNorm(4, 4, affine=False), nn.Identity(), InPlaceAGN, ("identity", 0.0)),
    (nn.GroupNorm(2, 4), nn.PReLU(), InPlaceAGN, "prelu"),
    (nn.GroupNorm(4, 4), nn.PReLU(4), InPlaceAGN, "prelu"),
    (nn.BatchNorm3d(4), nn.PReLU(4), InPlaceABN, "prelu"),
    (nn.InstanceNorm3d(4, affine=True), nn.PReLU(), InPlaceAIN, "prelu"),
])
def test_group_norm_and_prelu_pairs_are_fused_exactly(norm, act, cls, activation):
    stock = _fused_pair(norm, act, (2, 3))
    _randomize(stock)
    converted, report = effseg.convert(stock)
    new = converted[1]
    assert type(new) is cls
    assert [r.path for r in report.replaced] == ["1"] and report.skipped == [], report
    if activation == "prelu":
        # the slope keeps its key: the PReLU becomes the identity that holds it
        assert new.activation == "prelu" and type(converted[2]) is FusedPReLU
        assert converted[2].weight is not act.weight  # a deep copy
        assert new._slope() is converted[2].weight
    else:
        assert (new.activation, new.activation_param) == activation
        assert type(converted[2]) is nn.Identity
    assert stock[1] is norm and stock[2] is act
    _assert_same_training_step(stock, converted, (2, 3, 6, 5, 4))
    _assert_same_eval(stock, converted, (2, 3, 6, 5, 4))
    if activation == "prelu":
        # loading a state dict changes the slope the fused norm uses
        state = converted.state_dict()
        state["2.weight"] = torch.full_like(state["2.weight"], 0.3)
        converted.load_state_dict(state)
        stock.load_state_dict(state)
        _assert_same_eval(stock, converted, (2, 3, 6, 5, 4))


def test_prelu_inplace_conversion_keeps_the_slope_tensor():
    stock = _fused_pair(nn.GroupNorm(2, 4), nn.PReLU(4), (1, 2))
    slope = stock[2].weight
    converted, _ = effseg.convert(stock, inplace=True)
    assert converted[2].weight is slope and converted[1]._slope() is slope
    x = _x(1, 2, 4, 4, 4)
    converted(x).sum().backward()
    assert slope.grad is not None and slope.grad.abs().sum() > 0


def test_conv_groupnorm_prelu_stack_converted_saves_at_most_55_percent():
    stock = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.PReLU(8),
                          nn.Conv3d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.PReLU(8)).to(D)
    _randomize(stock)
    converted, report = effseg.convert(stock)
    assert len(report.replaced) == 2
    x = _x(1, 8, 12, 12, 12, requires_grad=True)
    assert saved_bytes(converted, x) <= 0.55 * saved_bytes(stock, x)


def test_1d_and_2d_norms_after_linear_and_conv2d():
    stock = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.LeakyReLU(0.1),
                          nn.Unflatten(1, (1, 2, 3)), nn.Conv2d(1, 4, 3, padding=1),
                          nn.BatchNorm2d(4), nn.ELU()).to(D)
    _randomize_norms(stock)
    converted, report = effseg.convert(stock)
    assert [r.path for r in report.replaced] == ["1", "5"]
    assert type(converted[1]) is InPlaceABN and type(converted[5]) is InPlaceABN
    _assert_same_training_step(stock, converted, (7, 5))
    _assert_same_eval(stock, converted, (7, 5))


def test_inplace_true_keeps_the_same_tensors():
    stock = _fused_pair(nn.BatchNorm3d(4), nn.LeakyReLU(0.01), (1, 2))
    weight, running = stock[1].weight, stock[1].running_var
    converted, _ = effseg.convert(stock, inplace=True)
    assert converted is stock
    assert type(stock[1]) is InPlaceABN
    assert stock[1].weight is weight and stock[1].running_var is running


# --------------------------------------------------------------------------- what is refused

def _reason(report: ConversionReport, path: str) -> str:
    assert path not in [r.path for r in report.replaced]
    reason = report.reason(path)
    assert reason is not None, report
    return reason


@pytest.mark.parametrize("act, words", [
    (nn.ReLU(), "not invertible"),
    (nn.ReLU(inplace=True), "not invertible"),
    (nn.PReLU(init=-0.1), "PReLU with a slope <= 0"),
    (nn.PReLU(3), "PReLU with 3 slopes"),
    (nn.GELU(), "GELU"),
    (nn.LeakyReLU(0.0), "not invertible"),
])
def test_non_invertible_or_unknown_activation_is_left_stock(act, words):
    stock = _fused_pair(nn.BatchNorm3d(4), act, (1, 2))
    converted, report = effseg.convert(stock)
    assert words in _reason(report, "1")
    assert type(converted[1]) is nn.BatchNorm3d and type(converted[2]) is type(act)


def test_dropout_between_norm_and_activation():
    blocked = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.Dropout(0.2),
                            nn.LeakyReLU())
    _, report = effseg.convert(blocked)
    assert "dropout (p=0.2)" in _reason(report, "1")
    # p = 0 is the identity; after the activation any p is fine
    for seq in (nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.Dropout(0.0),
                              nn.LeakyReLU()),
                nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4),
                              nn.Dropout(0.0, inplace=True), nn.LeakyReLU()),
                nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.LeakyReLU(),
                              nn.Dropout(0.5))):
        seq = seq.to(D)
        converted, report = effseg.convert(seq)
        assert [r.path for r in report.replaced] == ["1"]
        if isinstance(seq[2], nn.Dropout):
            _assert_same_training_step(seq, converted, (2, 2, 5, 5, 5))


def test_norm_without_activation_is_left_stock():
    stock = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.Conv3d(4, 4, 1))
    converted, report = effseg.convert(stock)
    assert "not by an activation module" in _reason(report, "1")
    assert type(converted[1]) is nn.BatchNorm3d


def test_norm_reading_the_model_input_is_left_stock():
    _, report = effseg.convert(nn.Sequential(nn.BatchNorm3d(2), nn.LeakyReLU()))
    assert "its input comes from the input of 'the model'" in _reason(report, "0")


class _ResidualAfterNorm(nn.Module):
    """out = act(bn(conv(x))) + conv(x): the conv output is read twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm3d(3)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        y = self.conv(x)
        return self.act(self.bn(y)) + y


class _PreActResidual(nn.Module):
    """x + act(bn(x)) behind a conv: the norm's input is also the residual branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 3, 3, padding=1)
        self.inner = nn.Sequential(nn.BatchNorm3d(3), nn.LeakyReLU(0.1))

    def forward(self, x):
        h = self.conv(x)
        return h + self.inner(h)


def _naive(model: nn.Module, norm_path: str, act_path: str) -> nn.Module:
    """What a conversion that looks only at the module tree would do."""
    naive = copy.deepcopy(model)
    norm = naive.get_submodule(norm_path)
    act = naive.get_submodule(act_path)
    fused = InPlaceABN(norm.num_features, activation="leaky_relu",
                       activation_param=act.negative_slope).to(D)
    fused.load_state_dict(norm.state_dict())
    for path, module in ((norm_path, fused), (act_path, nn.Identity())):
        parent, _, name = path.rpartition(".")
        setattr(naive.get_submodule(parent), name, module)
    return naive


@pytest.mark.parametrize("cls, norm_path, act_path", [
    (_ResidualAfterNorm, "bn", "act"),
    (_PreActResidual, "inner.0", "inner.1"),
])
def test_norm_input_read_elsewhere_is_left_stock(cls, norm_path, act_path):
    stock = cls().to(D)
    converted, report = effseg.convert(stock)
    assert "is also read by add()" in _reason(report, norm_path)
    assert type(converted.get_submodule(norm_path)) is nn.BatchNorm3d
    _assert_same_training_step(stock, converted, (2, 3 if cls is _ResidualAfterNorm else 2,
                                                  5, 4, 6))
    # the naive conversion overwrites the residual: wrong output and wrong gradients
    naive = _naive(stock, norm_path, act_path)
    x = _x(2, stock.conv.in_channels, 5, 4, 6)
    w = torch.randn(2, 3, 5, 4, 6, dtype=D)
    ys, gs = _step(stock, x, w)
    yn, gn = _step(naive, x, w)
    assert not torch.allclose(yn, ys)
    assert not torch.allclose(gn, gs)


class _ResidualInTrainingOnly(_ResidualAfterNorm):
    def forward(self, x):
        y = self.conv(x)
        z = self.act(self.bn(y))
        return z + y if self.training else z


def test_data_flow_of_both_modes_is_checked():
    stock = _ResidualInTrainingOnly().to(D).eval()
    converted, report = effseg.convert(stock)
    assert "is also read by add()" in _reason(report, "bn")
    _assert_same_training_step(stock, converted, (2, 3, 4, 4, 4))


class _ModifiedAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm3d(3)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        y += 1.0
        return y


def test_activation_output_modified_in_place_is_left_stock():
    stock = _ModifiedAfter().to(D)
    converted, report = effseg.convert(stock)
    assert "modified in place by iadd()" in _reason(report, "bn")
    _assert_same_training_step(stock, converted, (2, 2, 4, 4, 4))
    # fused anyway, backward refuses (the kept output was changed): loud, never wrong
    naive = _naive(stock, "bn", "act")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        naive(_x(2, 2, 4, 4, 4)).sum().backward()


class _SharedAct(nn.Module):
    """One activation module after a norm and after an addition (as MONAI's UnetResBlock)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv3d(2, 2, 3, padding=1), nn.Conv3d(2, 2, 3, padding=1)
        self.norm1 = nn.InstanceNorm3d(2)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x):
        return self.act(self.conv2(self.act(self.norm1(self.conv1(x)))) + x)


def test_shared_activation_with_an_unfusable_call_is_left_stock():
    stock = _SharedAct().to(D)
    converted, report = effseg.convert(stock)
    assert "also applied where no norm is fused" in _reason(report, "norm1")
    _assert_same_training_step(stock, converted, (2, 2, 4, 4, 4))


class _Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx; its nested Sequential is still traced."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm3d(3)
        self.act = nn.LeakyReLU(0.1)
        self.body = nn.Sequential(nn.Conv3d(3, 3, 3, padding=1), nn.BatchNorm3d(3),
                                  nn.LeakyReLU(0.1), nn.Conv3d(3, 3, 1), nn.BatchNorm3d(3),
                                  nn.LeakyReLU(0.1))

    def forward(self, x):
        h = self.act(self.bn(self.conv(x)))
        if h.mean() > 10:
            h = h * 2
        return self.body(h)


def test_untraceable_forward_leaves_its_own_norms_stock():
    stock = _Untraceable().to(D)
    converted, report = effseg.convert(stock)
    assert "cannot be traced by torch.fx" in _reason(report, "bn")
    # body's output goes back to the untraceable forward, which might change it in place
    assert "returned to the forward of 'the model'" in _reason(report, "body.4")
    assert [r.path for r in report.replaced] == ["body.1"]
    assert type(converted.bn) is nn.BatchNorm3d and type(converted.body[1]) is InPlaceABN
    _assert_same_training_step(stock, converted, (2, 2, 5, 5, 5))


def test_hooks_and_sync_batchnorm_are_left_stock():
    hooked = _fused_pair(nn.BatchNorm3d(4), nn.LeakyReLU(), (1, 2))
    hooked[1].register_forward_hook(lambda m, i, o: None)
    _, report = effseg.convert(hooked)
    assert "hooks" in _reason(report, "1")
    sync = nn.Sequential(nn.Conv3d(2, 4, 3), nn.SyncBatchNorm(4), nn.LeakyReLU())
    _, report = effseg.convert(sync)
    assert "SyncBatchNorm" in _reason(report, "1")


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        effseg.convert(lambda x: x)
    with pytest.raises(TypeError, match="inplace"):
        effseg.convert(nn.Sequential(), inplace="yes")


# --------------------------------------------------------------------------- MONAI networks

def _unet(monai_nets, norm="batch"):
    return monai_nets.UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1,
                           act=("leakyrelu", {"negative_slope": 0.01}), norm=norm).to(D)


def _dynunet(monai_nets, norm="batch", res_block=False):
    return monai_nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                              upsample_kernel_size=[2, 2], filters=[4, 8, 16], norm_name=norm,
                              res_block=res_block).to(D)


# saved-for-backward bytes of the converted network / the stock one, measured at 2x1x16^3
# float64: UNet 0.556, DynUNet 0.625 (its stock LeakyReLU is already in place, so it keeps one
# tensor less per unit to begin with); at 2x1x32^3 0.524 and 0.608
MONAI_CASES = [(_unet, "batch", 6, 0.57), (_unet, ("instance", {"affine": True}), 6, 0.57),
               (_dynunet, "batch", 10, 0.64), (_dynunet, ("instance", {"affine": True}), 10, 0.64)]


@pytest.mark.parametrize("build, norm, replaced, ratio", MONAI_CASES)
def test_monai_network_converts_exactly(build, norm, replaced, ratio, monai_nets):
    stock = build(monai_nets, norm)
    _randomize_norms(stock)
    converted, report = effseg.convert(stock)
    assert len(report.replaced) == replaced and report.skipped == [], report
    for r in report.replaced:
        assert isinstance(converted.get_submodule(r.path), (InPlaceABN, InPlaceAIN))
        assert type(converted.get_submodule(r.activation)) is nn.Identity
        assert type(stock.get_submodule(r.activation)) is nn.LeakyReLU
    shape = (2, 1, 16, 16, 16)
    _assert_same_eval(stock, converted, shape)
    _assert_same_training_step(stock, converted, shape)
    stock.train()
    converted.train()
    x = _x(*shape, requires_grad=True)
    assert saved_bytes(converted, x) <= ratio * saved_bytes(stock, x)


def test_dynunet_residual_blocks_are_refused_with_reasons(monai_nets):
    stock = _dynunet(monai_nets, ("instance", {"affine": True}), res_block=True)
    converted, report = effseg.convert(stock)
    assert "input_block.norm1" in dict((s.path, s.reason) for s in report.skipped)
    assert "also applied where no norm is fused" in report.reason("input_block.norm1")
    assert "followed by iadd()" in report.reason("input_block.norm2")
    # the up path uses UnetBasicBlock even with res_block=True
    assert {r.path for r in report.replaced} == {
        f"upsamples.{i}.conv_block.norm{j}" for i in (0, 1) for j in (1, 2)}
    _assert_same_training_step(stock, converted, (2, 1, 16, 16, 16))


def test_every_norm_left_stock_is_reported_with_its_reason():
    """Norms convert has no fused module for are listed too, not passed over in silence."""
    class RMSLikeNorm(nn.Module):  # a third-party norm, known by its name only
        def forward(self, x):
            return x / x.square().mean(1, keepdim=True).add(1e-5).sqrt()

    class ConvNormBlock(nn.Module):  # a container named like a norm: not a norm itself
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(4, 4, 3, padding=1)
            self.norm = nn.InstanceNorm3d(4, affine=True)
            self.act = nn.LeakyReLU(0.01)

        def forward(self, x):
            return self.act(self.norm(self.conv(x)))

    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Dropout(0.0), nn.ReLU(),
                          ConvNormBlock(), nn.LayerNorm([6, 6, 6]), RMSLikeNorm(),
                          nn.LocalResponseNorm(2))
    converted, report = effseg.convert(model)
    assert [r.path for r in report.replaced] == ["3.norm"]
    skipped = {s.path: s.reason for s in report.skipped}
    assert set(skipped) == {"4", "5", "6"}, skipped
    for path, name in (("4", "LayerNorm"), ("5", "RMSLikeNorm"), ("6", "LocalResponseNorm")):
        assert skipped[path].startswith(f"{name} is not a norm effseg has a fused module for")
    assert "skipped 3" in str(report) and "5: left stock: RMSLikeNorm" in str(report)
    x = torch.randn(2, 1, 6, 6, 6)
    torch.testing.assert_close(converted(x), model(x))
