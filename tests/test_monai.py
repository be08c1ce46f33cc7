"""effseg.monai.register(): effseg norms in MONAI's Norm factory; MONAI networks built with them
match the stock ones (state dicts both ways, outputs, gradients, running statistics), and
effseg.convert then fuses their activations."""
import sys

import pytest
import torch
from torch import nn

import effseg
import effseg.monai as emonai
from effseg.memory import saved_bytes
from effseg.nn import InPlaceABN, InPlaceAGN, InPlaceAIN
from effseg.nn.norm_act import FusedPReLU

from conftest import run_python

monai = pytest.importorskip("monai", reason="MONAI is not installed")
from monai.networks.layers.factories import Norm  # noqa: E402
from monai.networks.nets import UNet  # noqa: E402

D = torch.float64
ACT = ("leakyrelu", {"negative_slope": 0.01})


@pytest.fixture(autouse=True)
def _registered():
    emonai.register()


def _unet(norm, act=ACT):
    return UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, act=act,
                norm=norm).to(D)


def _train_step(model, x, w, lr=0.1):
    """One SGD step on sum(w * model(x)); returns (output, input grad)."""
    x = x.clone().requires_grad_()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    y = model(x)
    (y * w).sum().backward()
    opt.step()
    return y.detach(), x.grad


def test_register_adds_factory_entries_and_is_idempotent():
    names = emonai.register()
    assert names == ("effseg_batch", "effseg_instance", "effseg_group")
    assert emonai.register() == names
    for dim in (1, 2, 3):
        assert Norm["effseg_batch", dim].func is InPlaceABN
        assert Norm["effseg_instance", dim].func is InPlaceAIN
        assert Norm["effseg_group", dim].func is InPlaceAGN
    gnorm = Norm["effseg_group", 3](num_groups=2, num_channels=6)
    assert isinstance(gnorm, InPlaceAGN) and gnorm.activation == "identity"
    norm = Norm["effseg_batch", 3](num_features=5)
    assert isinstance(norm, InPlaceABN) and norm.activation == "identity"
    inorm = Norm["effseg_instance", 3](7)
    assert (inorm.affine, inorm.track_running_stats) == (False, False)
    with pytest.raises(ValueError, match="spatial dims"):
        Norm["effseg_batch", 4]


@pytest.mark.parametrize("ours, theirs", [
    ("effseg_batch", "batch"),
    (("effseg_instance", {"affine": True}), ("instance", {"affine": True})),
    ("effseg_instance", "instance"),
    (("effseg_group", {"num_groups": 2}), ("group", {"num_groups": 2})),
])
def test_unet_with_effseg_norm_trains_like_stock(ours, theirs):
    model, stock = _unet(ours), _unet(theirs)
    kinds = {type(m) for m in model.modules()}
    assert kinds & {InPlaceABN, InPlaceAIN, InPlaceAGN} and not kinds & {
        nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm}
    assert model.state_dict().keys() == stock.state_dict().keys()
    with torch.no_grad():  # non-trivial affine parameters
        for p in stock.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.load_state_dict(stock.state_dict())
    x = torch.randn(2, 1, 16, 16, 16, dtype=D)
    w = torch.randn(2, 2, 16, 16, 16, dtype=D)
    for _ in range(2):
        y, g = _train_step(model, x, w)
        ys, gs = _train_step(stock, x, w)
        torch.testing.assert_close(y, ys)
        torch.testing.assert_close(g, gs)
    for (name, a), b in zip(model.state_dict().items(), stock.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # and back: the effseg state dict loads into the stock network
    fresh = _unet(theirs)
    fresh.load_state_dict(model.state_dict())
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x.clone()), fresh(x.clone()))


def test_convert_fuses_the_activation_after_a_registered_norm():
    stock = _unet("batch")
    model = _unet("effseg_batch")
    model.load_state_dict(stock.state_dict())
    converted, report = effseg.convert(model)
    assert len(report.replaced) == 6 and report.skipped == []
    for r in report.replaced:
        norm = converted.get_submodule(r.path)
        assert (norm.activation, norm.activation_param) == ("leaky_relu", 0.01)
        assert type(converted.get_submodule(r.activation)) is nn.Identity
    x = torch.randn(2, 1, 16, 16, 16, dtype=D)
    w = torch.randn(2, 2, 16, 16, 16, dtype=D)
    y, g = _train_step(converted, x, w)
    ys, gs = _train_step(stock, x, w)
    torch.testing.assert_close(y, ys)
    torch.testing.assert_close(g, gs)


def test_inplace_activation_after_registered_norm_fails_loudly_until_converted():
    act = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
    model = _unet("effseg_batch", act)
    x = torch.randn(2, 1, 8, 8, 8, dtype=D)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()
    converted, report = effseg.convert(model)
    assert report.skipped == []
    converted(x).sum().backward()


@pytest.mark.parametrize("norm", ["batch", ("group", {"num_groups": 2}),
                                  ("effseg_group", {"num_groups": 2})])
def test_prelu_default_unet_converts_exactly(norm):
    """MONAI's default activation is PReLU: every norm of a UNet takes it in, the slopes keep
    their keys, and a training step equals the stock network's."""
    stock = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1,
                 norm=norm if norm == "batch" else ("group", {"num_groups": 2})).to(D)
    model = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1,
                 norm=norm).to(D)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            p.copy_(torch.rand_like(p) * 0.4 + 0.05 if name.endswith("A.weight")
                    else p + 0.1 * torch.randn_like(p))
    model.load_state_dict(stock.state_dict())
    converted, report = effseg.convert(model)
    assert len(report.replaced) == 6 and report.skipped == [], report
    for r in report.replaced:
        assert converted.get_submodule(r.path).activation == "prelu"
        assert type(converted.get_submodule(r.activation)) is FusedPReLU
    assert converted.state_dict().keys() == stock.state_dict().keys()
    x = torch.randn(2, 1, 16, 16, 16, dtype=D)
    w = torch.randn(2, 2, 16, 16, 16, dtype=D)
    for _ in range(2):
        # a small step: lr 0.1 drives some slopes below 0, which the fused norm refuses
        y, g = _train_step(converted, x, w, lr=1e-3)
        ys, gs = _train_step(stock, x, w, lr=1e-3)
        torch.testing.assert_close(y, ys)
        torch.testing.assert_close(g, gs)
    for (name, a), b in zip(converted.state_dict().items(), stock.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    stock.train(), converted.train()
    xg = x.clone().requires_grad_()
    assert saved_bytes(converted, xg) <= 0.6 * saved_bytes(stock, xg)


def test_segresnet_group_norms_are_reported():
    """SegResNet (GroupNorm + ReLU, pre-activation residual blocks) stays stock, each norm with
    its reason: ReLU is not invertible, the blocks' first norm reads the residual input, and
    the block's one activation module is shared by both norms."""
    from monai.networks.nets import SegResNet

    for act, words in [(("RELU", {"inplace": True}), "ReLU, which is not invertible"),
                       ("prelu", "also applied where no norm is fused")]:
        net = SegResNet(3, 8, 1, 2, act=act).to(D)
        converted, report = effseg.convert(net)
        assert report.replaced == [], report
        reasons = [s.reason for s in report.skipped]
        assert len(reasons) == sum(isinstance(m, nn.GroupNorm) for m in net.modules())
        assert any(words in r for r in reasons), reasons
        assert any("also read by iadd()" in r for r in reasons), reasons


def test_register_without_monai_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai.networks.layers.factories", None)
    with pytest.raises(ImportError, match="pip install monai"):
        emonai.register()


def test_importing_effseg_does_not_import_monai():
    r = run_python("import sys, effseg, effseg.monai; print('monai' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"
