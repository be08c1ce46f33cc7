"""gradcheck, opcheck, torch.compile and the saved-for-backward memory of the norm-act ops."""
import pytest
import torch

import effseg.functional as EF
from conftest import device_params, needs_extension
from effseg.memory import saved_bytes
from effseg.nn import InPlaceABN, InPlaceAIN


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act", [("leaky_relu", 0.1), ("elu", 1.0), ("identity", 0.0)])
def test_gradcheck(device, per_sample, training, act):
    C = 3
    x = torch.randn(2, C, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = (torch.rand(C, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=torch.float64, device=device, requires_grad=True)
    rm = torch.randn(C, dtype=torch.float64, device=device)
    rv = torch.rand(C, dtype=torch.float64, device=device) + 0.5
    fn = EF.inplace_ain if per_sample else EF.inplace_abn

    def f(x, w, b):
        # running statistics are not updated here: gradcheck calls f many times
        return fn(x.clone(), rm, rv, w, b, training, 0.0, 1e-5, act[0], act[1])

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def _op_samples(device):
    from effseg.ops import op
    samples = []
    for shape, fmt in [((2, 3, 4, 5, 6), torch.contiguous_format),
                       ((2, 3, 4, 5, 6), torch.channels_last_3d),
                       ((3, 2, 9), torch.contiguous_format)]:
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            C = shape[1]
            w = torch.rand(C, device=device, dtype=acc) + 0.5
            b = torch.randn(C, device=device, dtype=acc)
            for per_sample in (False, True):
                mean, var = op("norm_stats", x.device)(x, per_sample)
                dy = torch.randn_like(x)
                s1, s2 = op("norm_act_backward_reduce", x.device)(x, dy, w, b, per_sample,
                                                                  "elu", 1.0)
                samples += [
                    ("norm_stats", (x, per_sample)),
                    ("norm_act_forward_", (x.clone(), mean, var, w, b, 1e-5, "elu", 1.0)),
                    ("norm_act_backward_reduce", (x, dy, w, b, per_sample, "elu", 1.0)),
                    ("norm_act_backward_input", (x, dy, var, w, b, s1, s2, None, 1e-5, "elu",
                                                 1.0)),
                    ("norm_act_backward_input", (x, dy, var, None, None, None, None, None, 1e-5,
                                                 "leaky_relu", 0.01)),
                    ("norm_act_backward_input_", (x, dy.clone(), var, w, b, s1, s2, None, 1e-5,
                                                  "elu", 1.0)),
                ]
                # PReLU: a per-channel slope; the reduce adds the slope's gradient sum
                slope = torch.rand(C, device=device, dtype=acc) * 0.5 + 0.05
                p1, p2, _ = op("norm_act_backward_reduce_prelu", x.device)(x, dy, w, b, slope,
                                                                           per_sample)
                samples += [
                    ("norm_act_forward_prelu_", (x.clone(), mean, var, w, b, 1e-5, slope)),
                    ("norm_act_backward_reduce_prelu", (x, dy, w, None, slope, per_sample)),
                    ("norm_act_backward_input_prelu", (x, dy, var, w, b, slope, p1, p2, None,
                                                       1e-5)),
                    ("norm_act_backward_input_prelu", (x, dy, var, None, None, slope, None, None,
                                                       None, 1e-5)),
                ]
    return samples


@needs_extension
@pytest.mark.parametrize("device", device_params())
def test_opcheck_every_op(device):
    from effseg.ops import OP_NAMES
    seen = set()
    for name, args in _op_samples(device):
        torch.library.opcheck(getattr(torch.ops.effseg, name).default, args)
        seen.add(name)
    assert seen == {n for n in OP_NAMES if n.startswith("norm_")}


class ConvABN(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.c1 = torch.nn.Conv3d(2, 4, 3, padding=1)
        self.n1 = norm(4)
        self.c2 = torch.nn.Conv3d(4, 4, 3, padding=1)
        self.n2 = norm(4)

    def forward(self, x):
        return self.n2(self.c2(self.n1(self.c1(x))))


@needs_extension
@pytest.mark.parametrize("norm", [InPlaceABN, InPlaceAIN])
def test_torch_compile_fullgraph_matches_eager(norm):
    torch.manual_seed(1)
    eager = ConvABN(norm)
    compiled_model = ConvABN(norm)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 2, 6, 7, 8)
    for step in range(2):
        ye = eager(x)
        yc = compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        ye.square().sum().backward()
        yc.square().sum().backward()
        # A conv bias before a batch norm has a true gradient of 0: what eager and compiled give
        # for it is float32 cancellation noise, so absolute errors are judged against the
        # largest gradient of the model (about 1e3 here), not against 1.
        scale = max(p.grad.abs().max().item() for p in eager.parameters())
        for (name, pe), pc in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=2e-6 * scale, msg=name)
    for be, bc in zip(eager.buffers(), compiled_model.buffers()):
        torch.testing.assert_close(bc, be)


def _stack(fused: bool, C=16):
    if fused:
        return torch.nn.Sequential(
            torch.nn.Conv3d(C, C, 3, padding=1), InPlaceABN(C),
            torch.nn.Conv3d(C, C, 3, padding=1), InPlaceABN(C))
    return torch.nn.Sequential(
        torch.nn.Conv3d(C, C, 3, padding=1), torch.nn.BatchNorm3d(C), torch.nn.LeakyReLU(0.01),
        torch.nn.Conv3d(C, C, 3, padding=1), torch.nn.BatchNorm3d(C), torch.nn.LeakyReLU(0.01))


def test_saved_for_backward_at_most_55_percent_of_stock():
    x = torch.randn(1, 16, 24, 24, 24, requires_grad=True)
    fused = saved_bytes(lambda: _stack(True)(x))
    stock = saved_bytes(lambda: _stack(False)(x))
    act = x.numel() * 4
    # stock keeps input + 6 activations; in-place ABN keeps input + 2 (+ parameters, O(C))
    assert fused / stock <= 0.55, (fused, stock)
    params = sum(p.numel() * 4 for p in _stack(True).parameters())
    assert fused <= 3 * act + params + 1024, (fused, act)


def test_module_state_dicts_load_both_ways():
    bn = torch.nn.BatchNorm3d(5)
    abn = InPlaceABN(5, activation="identity")
    assert list(bn.state_dict()) == list(abn.state_dict())
    bn.train()
    bn(torch.randn(3, 5, 4, 4, 4) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    abn.load_state_dict(bn.state_dict())
    bn.eval(), abn.eval()
    x = torch.randn(2, 5, 4, 4, 4)
    torch.testing.assert_close(abn(x.clone()), bn(x))
    back = torch.nn.BatchNorm3d(5)
    back.load_state_dict(abn.state_dict())
    inn = torch.nn.InstanceNorm3d(5, affine=True, track_running_stats=True)
    ain = InPlaceAIN(5, track_running_stats=True)
    assert list(inn.state_dict()) == list(ain.state_dict())
    ain.load_state_dict(inn.state_dict())
    inn.eval(), ain.eval()
    torch.testing.assert_close(ain(x.clone()), torch.nn.functional.leaky_relu(inn(x), 0.01))


def test_instance_module_defaults_like_nnunet():
    ain = InPlaceAIN(4)
    assert ain.affine and not ain.track_running_stats and ain.running_mean is None
    ain.eval()  # no running statistics: eval still normalizes with the sample's statistics
    x = torch.randn(2, 4, 5, 5, 5)
    ref = torch.nn.functional.leaky_relu(torch.nn.functional.instance_norm(x, eps=1e-5), 0.01)
    torch.testing.assert_close(ain(x.clone()), ref, rtol=1e-5, atol=1e-5)
