"""In-place group norm (InPlaceAGN, inplace_agn) and PReLU fused into every in-place norm,
against stock float64 (nn.GroupNorm / BatchNorm / InstanceNorm + activation, nn.PReLU): outputs
and the gradients of the input, weight, bias and slope, over random shapes, group counts (1, C
and in between), activations, layouts, dtypes and train/eval; gradcheck, opcheck,
torch.compile, the bytes saved for backward, state dicts, and the errors of bad inputs."""
import random

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import effseg.functional as EF
from conftest import device_params, needs_extension
from effseg.memory import saved_bytes
from effseg.nn import InPlaceABN, InPlaceAGN, InPlaceAIN

D = torch.float64
ACTS = [("leaky_relu", 0.1), ("elu", 0.8), ("identity", 0.0), ("prelu", 1), ("prelu", "C")]


def _stock_act(y, activation, param):
    if activation == "leaky_relu":
        return TF.leaky_relu(y, param)
    if activation == "elu":
        return TF.elu(y, param)
    if activation == "prelu":
        return TF.prelu(y, param)
    return y


def _slope(act, C, device, dtype=D):
    """A random positive PReLU slope of 1 or C values for ("prelu", 1 | "C")."""
    n = C if act[1] == "C" else 1
    return torch.rand(n, dtype=dtype, device=device) * 0.5 + 0.05


def _random_case(rng: random.Random):
    G = rng.choice([1, 2, 3])
    K = rng.choice([1, 2, 4])
    if rng.random() < 0.3:
        G, K = G * K, 1  # one channel per group: group norm is instance norm
    N = rng.choice([1, 2, 3])
    spatial = [tuple(rng.randint(2, 6) for _ in range(3)), (rng.randint(2, 7), rng.randint(2, 7)),
               (rng.randint(3, 40),)][rng.randint(0, 2)]
    return G, G * K, (N, G * K) + spatial


def _layout(x, channels_last):
    if not channels_last or x.dim() not in (4, 5):
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5
                        else torch.channels_last)


def _grads(f, x, params, dy):
    x = x.clone().requires_grad_()
    ps = [None if p is None else p.clone().requires_grad_() for p in params]
    y = f(x, *ps)
    y.backward(dy)
    return [y.detach(), x.grad] + [None if p is None else p.grad for p in ps]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("seed", range(12))
def test_group_norm_matches_stock_float64(device, seed):
    rng = random.Random(seed)
    G, C, shape = _random_case(rng)
    for act in ACTS:
        for affine in (True, False):
            for channels_last in (False, True):
                x = _layout(torch.randn(shape, dtype=D, device=device) * 2 + 0.5, channels_last)
                dy = _layout(torch.randn(shape, dtype=D, device=device), channels_last)
                w = torch.rand(C, dtype=D, device=device) + 0.5 if affine else None
                b = torch.randn(C, dtype=D, device=device) if affine else None
                a = _slope(act, C, device) if act[0] == "prelu" else None
                param = act[1] if a is None else None

                def stock(x, w, b, a):
                    return _stock_act(TF.group_norm(x, G, w, b, 1e-5), act[0],
                                      a if a is not None else param)

                def ours(x, w, b, a):
                    return EF.inplace_agn(x.clone(), G, w, b, 1e-5, act[0],
                                          a if a is not None else param)

                want = _grads(stock, x, [w, b, a], dy)
                got = _grads(ours, x, [w, b, a], dy)
                for what, g, s in zip(["output", "input grad", "weight grad", "bias grad",
                                       "slope grad"], got, want):
                    if s is None:
                        assert g is None, what
                        continue
                    torch.testing.assert_close(g, s, rtol=1e-9, atol=1e-10,
                                               msg=f"{what} G={G} shape={shape} {act} "
                                                   f"affine={affine} cl={channels_last}")
                assert got[0].stride() == x.stride()


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("num_slopes", [1, "C"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_prelu_fused_into_batch_and_instance_norm_matches_stock(device, norm, training,
                                                                num_slopes, channels_last):
    C = 5
    shape = (3, C, 4, 5, 6)
    ours = (InPlaceABN(C, activation="prelu", num_slopes=C if num_slopes == "C" else 1)
            if norm == "batch" else
            InPlaceAIN(C, activation="prelu", track_running_stats=True,
                       num_slopes=C if num_slopes == "C" else 1)).to(device, D)
    bn = (nn.BatchNorm3d(C) if norm == "batch" else
          nn.InstanceNorm3d(C, affine=True, track_running_stats=True)).to(device, D)
    prelu = nn.PReLU(ours.slope.numel()).to(device, D)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
        prelu.weight.uniform_(0.05, 0.6)
        ours.slope.copy_(prelu.weight)
    ours.load_state_dict({**bn.state_dict(), "slope": prelu.weight.detach()})
    ours.train(training), bn.train(training)
    x = _layout(torch.randn(shape, dtype=D, device=device) * 2 + 1, channels_last)
    dy = _layout(torch.randn(shape, dtype=D, device=device), channels_last)
    xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    prelu(bn(xs)).backward(dy)
    ours(xo.clone()).backward(dy)
    torch.testing.assert_close(xo.grad, xs.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours.slope.grad, prelu.weight.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours.weight.grad, bn.weight.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours.bias.grad, bn.bias.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours.running_mean, bn.running_mean)
    torch.testing.assert_close(ours.running_var, bn.running_var)
    with torch.no_grad():
        torch.testing.assert_close(ours(x.clone()), prelu(bn(x)), rtol=1e-9, atol=1e-10)


TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("G", [1, 3, 6])
def test_group_norm_prelu_low_precision_against_float64(device, dtype, channels_last, G):
    C = 6
    x = _layout(torch.randn(2, C, 5, 6, 7, device=device) * 2 + 1, channels_last).to(dtype)
    dy = _layout(torch.randn(2, C, 5, 6, 7, device=device), channels_last).to(dtype)
    w = torch.rand(C, device=device) + 0.5
    b = torch.randn(C, device=device)
    a = torch.rand(C, device=device) * 0.5 + 0.05
    want = _grads(lambda x, w, b, a: TF.prelu(TF.group_norm(x, G, w, b, 1e-5), a),
                  x.double(), [w.double(), b.double(), a.double()], dy.double())
    got = _grads(lambda x, w, b, a: EF.inplace_agn(x.clone(), G, w, b, 1e-5, "prelu", a),
                 x, [w, b, a], dy)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for what, g, s in zip(["output", "input grad", "weight grad", "bias grad", "slope grad"],
                          got, want):
        # parameter gradients are sums over all elements: judge them against their scale
        scale = max(1.0, s.abs().max().item())
        err = (g.double() - s).abs().max().item()
        assert err <= TOL[dtype] * scale * (1 if g.numel() > C else 10), (what, err, scale)


@pytest.mark.parametrize("act", [("leaky_relu", 0.1), ("elu", 1.0), ("prelu", None)])
def test_gradcheck_group_norm(act):
    C = 4
    x = torch.randn(2, C, 3, 4, dtype=D, requires_grad=True)
    w = (torch.rand(C, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=D, requires_grad=True)
    a = (torch.rand(C, dtype=D) * 0.5 + 0.1).requires_grad_()

    def f(x, w, b, a):
        return EF.inplace_agn(x.clone(), 2, w, b, 1e-5, act[0], a if act[1] is None else act[1])

    assert torch.autograd.gradcheck(f, (x, w, b, a), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_prelu_in_batch_and_instance_norm(norm, training):
    C = 3
    x = torch.randn(2, C, 3, 4, dtype=D, requires_grad=True)
    w = (torch.rand(C, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=D, requires_grad=True)
    a = (torch.rand(1, dtype=D) * 0.5 + 0.1).requires_grad_()
    rm, rv = torch.randn(C, dtype=D), torch.rand(C, dtype=D) + 0.5
    fn = EF.inplace_ain if norm == "instance" else EF.inplace_abn

    def f(x, w, b, a):
        return fn(x.clone(), rm, rv, w, b, training, 0.0, 1e-5, "prelu", a)

    assert torch.autograd.gradcheck(f, (x, w, b, a), eps=1e-6, atol=1e-6, rtol=1e-5)


class ConvAGN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(2, 6, 3, padding=1)
        self.n1 = InPlaceAGN(3, 6, activation="prelu", num_slopes=6)
        self.c2 = nn.Conv3d(6, 6, 3, padding=1)
        self.n2 = InPlaceAGN(2, 6)

    def forward(self, x):
        return self.n2(self.c2(self.n1(self.c1(x))))


@needs_extension
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(1)
    eager, compiled_model = ConvAGN(), ConvAGN()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 2, 6, 7, 8)
    for _ in range(2):
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        ye.square().sum().backward()
        yc.square().sum().backward()
        scale = max(p.grad.abs().max().item() for p in eager.parameters())
        for (name, pe), pc in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=2e-6 * scale, msg=name)


def _stack(fused: bool, C=16, G=4):
    if fused:
        return nn.Sequential(
            nn.Conv3d(C, C, 3, padding=1), InPlaceAGN(G, C, activation="prelu", num_slopes=C),
            nn.Conv3d(C, C, 3, padding=1), InPlaceAGN(G, C, activation="prelu", num_slopes=C))
    return nn.Sequential(
        nn.Conv3d(C, C, 3, padding=1), nn.GroupNorm(G, C), nn.PReLU(C),
        nn.Conv3d(C, C, 3, padding=1), nn.GroupNorm(G, C), nn.PReLU(C))


def test_saved_for_backward_of_conv_groupnorm_prelu_at_most_55_percent_of_stock():
    x = torch.randn(1, 16, 24, 24, 24, requires_grad=True)
    fused = saved_bytes(lambda: _stack(True)(x))
    stock = saved_bytes(lambda: _stack(False)(x))
    act = x.numel() * 4
    # stock keeps the input and, per unit, the norm's input, the PReLU's input and its output
    # (the next conv's input): 6 volumes; in place: the input + 2 outputs
    assert fused / stock <= 0.55, (fused, stock)
    params = sum(p.numel() * 4 for p in _stack(True).parameters())
    assert fused <= 3 * act + params + 1024, (fused, act)
    assert stock >= 6 * act, (stock, act)


def test_state_dicts_load_both_ways():
    gn = nn.GroupNorm(3, 6)
    agn = InPlaceAGN(3, 6, activation="identity")
    assert list(gn.state_dict()) == list(agn.state_dict())
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-1, 1)
    agn.load_state_dict(gn.state_dict())
    x = torch.randn(2, 6, 4, 4, 4)
    for mode in (True, False):
        gn.train(mode), agn.train(mode)
        torch.testing.assert_close(agn(x.clone()), gn(x), rtol=1e-5, atol=1e-5)
    back = nn.GroupNorm(3, 6)
    back.load_state_dict(agn.state_dict())
    assert list(InPlaceAGN(3, 6, affine=False).state_dict()) == []
    assert list(InPlaceAGN(3, 6, activation="prelu").state_dict()) == ["weight", "bias", "slope"]
    assert InPlaceAGN(3, 6, activation="prelu").slope.tolist() == [0.25]


def test_export_records_stock_group_norm_and_prelu():
    m = InPlaceAGN(2, 4, activation="prelu", num_slopes=4).eval()
    with torch.no_grad():
        m.slope.uniform_(0.1, 0.5)
        m.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 3, 4, 5)
    program = torch.export.export(m, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("effseg" in t for t in targets), targets
    torch.testing.assert_close(program.module()(x), m(x.clone()))


# --------------------------------------------------------------------------- bad inputs

def test_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match="not divisible by num_groups"):
        EF.inplace_agn(torch.randn(2, 6, 4, 4), 4)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        InPlaceAGN(4, 6)
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        EF.inplace_agn(torch.randn(2, 6, 4, 4), 0)


def test_one_value_per_group_is_refused():
    with pytest.raises(ValueError, match="more than 1 value per sample and group"):
        EF.inplace_agn(torch.randn(2, 4, 1, 1), 4)
    with pytest.raises(ValueError, match="more than 1 value per sample and group"):
        InPlaceAGN(4, 4).eval()(torch.randn(3, 4, 1))
    # two channels of one voxel per group are two values
    EF.inplace_agn(torch.randn(2, 4, 1), 2)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan")])
def test_slope_not_positive_is_refused(bad):
    x = torch.randn(2, 4, 3, 3)
    slope = torch.full((4,), 0.2)
    slope[2] = bad
    for call in (lambda: EF.inplace_agn(x.clone(), 2, activation="prelu", activation_param=slope),
                 lambda: EF.inplace_abn(x.clone(), None, None, training=True,
                                        activation="prelu", activation_param=slope),
                 lambda: EF.inplace_ain(x.clone(), activation="prelu", activation_param=slope)):
        with pytest.raises(ValueError, match="prelu needs every slope > 0"):
            call()
    with pytest.raises(ValueError, match="slope > 0"):
        InPlaceAGN(2, 4, activation="prelu", activation_param=bad)
    m = InPlaceABN(4, activation="prelu")
    with torch.no_grad():
        m.slope.fill_(bad)  # what training could do to a learned slope
    with pytest.raises(ValueError, match="prelu needs every slope > 0"):
        m(x.clone())


@needs_extension
def test_ops_refuse_a_bad_slope():
    E = torch.ops.effseg
    x = torch.randn(2, 3, 4)
    m, v = E.norm_stats(x, False)
    with pytest.raises(ValueError, match="every slope > 0"):
        E.norm_act_forward_prelu_(x.clone(), m, v, None, None, 1e-5, torch.tensor([0.1, -1, 1.]))
    with pytest.raises(ValueError, match="slope must have shape"):
        E.norm_act_backward_reduce_prelu(x, x, None, None, torch.ones(2), False)
    with pytest.raises(TypeError, match="slope must be floating point"):
        E.norm_act_backward_input_prelu(x, x, v, None, None, torch.ones(3, dtype=torch.int32),
                                        None, None, None, 1e-5)


def test_slope_of_wrong_shape_or_type():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"shape \(1,\) or \(4,\)"):
        EF.inplace_agn(x.clone(), 2, activation="prelu", activation_param=torch.ones(3) * 0.2)
    with pytest.raises(TypeError, match="slope tensor as activation_param"):
        EF.inplace_agn(x.clone(), 2, activation="prelu", activation_param=0.2)
    with pytest.raises(ValueError, match="num_slopes must be 1 or num_features"):
        InPlaceABN(4, activation="prelu", num_slopes=3)
