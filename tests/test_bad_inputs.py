"""Bad input gets a Python exception naming the problem: never a crash, a hang or a silently
wrong result (DESIGN.md, "What every op must survive")."""
import pytest
import torch

import effseg.functional as EF
from conftest import needs_extension, run_python
from effseg.nn import InPlaceABN, InPlaceAIN


def x5(*shape, **kw):
    return torch.randn(*(shape or (2, 3, 4, 5, 6)), **kw)


def abn(x, **kw):
    args = dict(running_mean=None, running_var=None, weight=None, bias=None, training=True)
    args.update(kw)
    return EF.inplace_abn(x, **args)


@pytest.mark.parametrize("make,exc,words", [
    (lambda: abn(torch.randn(5)), ValueError, "(N, C, *)"),
    (lambda: abn(torch.randint(0, 5, (2, 3, 4))), TypeError, "float"),
    (lambda: abn(torch.randn(2, 3, 4, dtype=torch.complex64)), TypeError, "float"),
    (lambda: abn(x5(), weight=torch.ones(4)), ValueError, "weight"),
    (lambda: abn(x5(), bias=torch.ones(2, 3)), ValueError, "bias"),
    (lambda: abn(x5(), weight=torch.ones(3, dtype=torch.int64)), TypeError, "weight"),
    (lambda: abn(x5(), weight=torch.ones(3, device="meta")), ValueError, "meta"),
    (lambda: abn(x5(), running_mean=torch.zeros(3)), ValueError, "together"),
    (lambda: abn(x5(), training=False), ValueError, "eval"),
    (lambda: abn(x5().transpose(2, 4)), ValueError, "contiguous"),
    (lambda: abn(x5()[:, :, ::2]), ValueError, "contiguous"),
    (lambda: abn(torch.randn(0, 3, 4)), ValueError, "empty batch"),
    (lambda: abn(torch.randn(2, 3, 0)), ValueError, "no elements"),
    (lambda: abn(torch.randn(1, 3)), ValueError, "more than 1 value per channel"),
    (lambda: EF.inplace_ain(torch.randn(4, 3, 1, 1)), ValueError, "sample and channel"),
    (lambda: abn(x5(), activation="relu"), ValueError, "leaky_relu"),
    (lambda: abn(x5(), activation="leaky_relu", activation_param=0.0), ValueError, "slope"),
    (lambda: abn(x5(), activation="elu", activation_param=-1.0), ValueError, "alpha"),
    (lambda: abn(x5(), activation="gelu"), ValueError, "unknown activation"),
    (lambda: abn(x5(), momentum=1.5), ValueError, "momentum"),
    (lambda: abn(x5(), eps=0.0), ValueError, "eps"),
    (lambda: abn(x5(requires_grad=True)), RuntimeError, "leaf"),
    (lambda: InPlaceABN(3, activation="relu"), ValueError, "not invertible"),
    (lambda: InPlaceAIN(3)(torch.randn(2, 4, 5, 5)), ValueError, "4 channels"),
])
def test_bad_input_raises_clear_error(make, exc, words):
    with pytest.raises(exc, match=None) as info:
        make()
    assert words in str(info.value), str(info.value)


def test_leaf_without_grad_mode_is_allowed():
    x = x5(requires_grad=True)
    with torch.no_grad():
        abn(x)  # no graph: overwriting a leaf is the caller's choice


@pytest.mark.parametrize("fn", [EF.inplace_abn, EF.inplace_ain])
def test_nan_and_inf_propagate_to_their_group_only(fn):
    x = x5(2, 3, 4, 5, 6)
    x[0, 1, 2, 3, 4] = float("nan")
    x[1, 2, 0, 0, 0] = float("inf")
    ref_ok = x.clone()
    y = fn(x, None, None, None, None, True)
    if fn is EF.inplace_abn:  # statistics per channel: the whole channel is poisoned
        assert torch.isnan(y[:, 1]).all()
        assert not torch.isfinite(y[:, 2]).all()
        assert torch.isfinite(y[:, 0]).all()
        clean = ref_ok[:, :1].clone()
        torch.testing.assert_close(y[:, :1], EF.inplace_abn(clean, None, None, training=True))
    else:  # per sample and channel
        assert torch.isnan(y[0, 1]).all()
        assert not torch.isfinite(y[1, 2]).all()
        mask = torch.ones(2, 3, dtype=torch.bool)
        mask[0, 1] = mask[1, 2] = False
        assert torch.isfinite(y[mask]).all()


DIRECT_CALLS = r'''
import torch, effseg
E = torch.ops.effseg
x = torch.randn(2, 3, 4, 5, 6)
w = torch.ones(3); v = torch.ones(3); m = torch.zeros(3)
cases = {
    "stats int": lambda: E.norm_stats(torch.ones(2, 3, 4, dtype=torch.int32), False),
    "stats 1d": lambda: E.norm_stats(torch.randn(7), False),
    "stats strided": lambda: E.norm_stats(x.transpose(2, 3), False),
    "stats one value": lambda: E.norm_stats(torch.randn(2, 3, 1), True),
    "fwd mean shape": lambda: E.norm_act_forward_(x.clone(), torch.zeros(4), v, w, w, 1e-5, "elu", 1.0),
    "fwd var per sample": lambda: E.norm_act_forward_(x.clone(), m, torch.ones(5, 3), w, w, 1e-5, "elu", 1.0),
    "fwd weight shape": lambda: E.norm_act_forward_(x.clone(), m, v, torch.ones(2), None, 1e-5, "elu", 1.0),
    "fwd weight device": lambda: E.norm_act_forward_(x.clone(), m, v, torch.ones(3, device="meta"), None, 1e-5, "elu", 1.0),
    "fwd relu": lambda: E.norm_act_forward_(x.clone(), m, v, w, w, 1e-5, "relu", 0.0),
    "fwd slope": lambda: E.norm_act_forward_(x.clone(), m, v, w, w, 1e-5, "leaky_relu", -0.1),
    "fwd empty": lambda: E.norm_act_forward_(torch.randn(0, 3, 4), m, v, w, w, 1e-5, "elu", 1.0),
    "red dy shape": lambda: E.norm_act_backward_reduce(x, torch.randn(2, 3, 4, 5), w, w, False, "elu", 1.0),
    "red dy dtype": lambda: E.norm_act_backward_reduce(x, x.double(), w, w, False, "elu", 1.0),
    "red dy layout": lambda: E.norm_act_backward_reduce(x, x.contiguous(memory_format=torch.channels_last_3d), w, w, False, "elu", 1.0),
    "in half sums": lambda: E.norm_act_backward_input(x, x, v, w, w, m, None, None, 1e-5, "elu", 1.0),
    "in count": lambda: E.norm_act_backward_input(x, x, v, w, w, m, m, 0, 1e-5, "elu", 1.0),
    "in sums shape": lambda: E.norm_act_backward_input(x, x, v, w, w, torch.zeros(2, 3), torch.zeros(2, 3), None, 1e-5, "elu", 1.0),
    "in_ layout": lambda: E.norm_act_backward_input_(x, x.transpose(2, 3), v, w, w, None, None, None, 1e-5, "elu", 1.0),
}
for name, call in cases.items():
    try:
        call()
    except (ValueError, TypeError, RuntimeError) as e:
        assert "effseg" in str(e) or "expected" in str(e), (name, str(e))
        print("raised", name, type(e).__name__)
    else:
        raise SystemExit(f"no error for {name}")
print("ALL RAISED", len(cases))
'''


@needs_extension
def test_direct_op_calls_with_bad_arguments_raise_and_never_crash():
    # In a subprocess, so that a crash would fail this test instead of killing pytest.
    proc = run_python(DIRECT_CALLS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL RAISED 18" in proc.stdout, proc.stdout + proc.stderr


FALLBACK = r'''
import warnings
import torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import effseg
    from effseg.nn import InPlaceABN
    assert not effseg.HAVE_EXTENSION
    m = InPlaceABN(3, activation="elu").double()
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    for _ in range(2):
        leaf = x.clone().requires_grad_()
        y = m(leaf.clone())
        y.sum().backward()
bn = torch.nn.BatchNorm3d(3).double()
leaf2 = x.clone().requires_grad_()
ref = torch.nn.functional.elu(bn(leaf2))
ref.sum().backward()
bn(x)
torch.testing.assert_close(y, ref)
torch.testing.assert_close(leaf.grad, leaf2.grad)
torch.testing.assert_close(m.running_mean, bn.running_mean)
msgs = [str(w.message) for w in caught if "reference" in str(w.message)]
assert len(msgs) == 1, msgs
print("FALLBACK OK", msgs[0])
'''


def test_without_extension_falls_back_to_reference_with_one_warning():
    proc = run_python(FALLBACK, env={"EFFSEG_NO_EXTENSION": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FALLBACK OK" in proc.stdout and "EFFSEG_NO_EXTENSION" in proc.stdout
