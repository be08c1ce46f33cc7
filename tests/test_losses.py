"""The fused softmax + cross-entropy + soft-Dice loss (effseg.losses) against the unfused stock
loss (F.softmax, F.one_hot, F.cross_entropy) in float64, its ops against their references,
gradcheck, opcheck, low precision, saved-for-backward memory and bad inputs."""

import pytest
import torch

import effseg

from conftest import child_env, device_params, needs_extension, run_python
from effseg.losses import DeepSupervisionLoss, DiceCELoss, dice_ce_loss, dice_ce_reference
from effseg.memory import count_saved, saved_bytes
from effseg.models import FullVolumeFCN
from effseg.ops import op, reference

SHAPES = [
    (1, 2, 9, 11),        # 2D, N=1, K=2, odd
    (2, 7, 5, 6, 7),      # 3D, K=7
    (3, 2, 4, 1, 3),      # 3D with a unit dimension
    (1, 7, 13, 17),       # 2D, N=1, K=7, prime sizes
    (2, 3, 29),           # 1D
    (2, 40, 3, 4, 5),     # more classes than one CUDA class chunk (16)
]
OPTIONS = [
    dict(include_background=ib, weighted=w, ignore=ig, batch_dice=bd)
    for ib in (True, False) for w in (False, True) for ig in (False, True)
    for bd in (False, True)
]


def make_case(shape, device, dtype=torch.float64, ignore=False, label_dtype=torch.int64,
              ignore_index=-100):
    N, K = shape[:2]
    logits = (torch.randn(shape, dtype=torch.float64) * 3).to(device, dtype)
    labels = torch.randint(0, K, (N,) + tuple(shape[2:]))
    if ignore:
        labels[torch.rand(labels.shape) < 0.2] = ignore_index
    return logits, labels.to(device, label_dtype)


def fused_and_reference(logits, labels, **kw):
    """Loss and logits gradient of the fused loss and of the float64 stock loss."""
    x = logits.detach().clone().requires_grad_()
    loss = dice_ce_loss(x, labels, **kw)
    loss.backward()
    xr = logits.detach().double().requires_grad_()
    w = kw.pop("weight", None)
    ref = dice_ce_reference(xr, labels, None if w is None else w.double(), **kw)
    ref.backward()
    return loss, x.grad, ref, xr.grad


def assert_close(actual, expected, tol, what):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(k for k, v in o.items() if v)
                         or "plain")
def test_matches_unfused_loss_float64(device, shape, opts):
    K = shape[1]
    logits, labels = make_case(shape, device, ignore=opts["ignore"])
    weight = (torch.rand(K, dtype=torch.float64) + 0.2).to(device) if opts["weighted"] else None
    loss, grad, ref, ref_grad = fused_and_reference(
        logits, labels, weight=weight, include_background=opts["include_background"],
        batch_dice=opts["batch_dice"])
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert_close(loss, ref, 1e-10, "loss")
    # Gradients are O(1 / voxels): compare them on their own scale.
    gscale = ref_grad.abs().max().item()
    assert gscale > 0
    assert_close(grad / gscale, ref_grad / gscale, 1e-10, "logits grad")
    if opts["ignore"]:
        ignored = (labels == -100).unsqueeze(1).expand_as(grad)
        assert ignored.any()
        assert torch.all(grad[ignored] == 0), "ignored voxels must get exactly zero gradient"


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("lambdas", [(0.3, 2.0), (1.0, 0.0), (0.0, 1.0)])
def test_lambdas_weight_the_terms(device, lambdas):
    logits, labels = make_case((2, 4, 6, 5, 7), device, ignore=True)
    loss, grad, ref, ref_grad = fused_and_reference(logits, labels, lambda_ce=lambdas[0],
                                                    lambda_dice=lambdas[1])
    assert_close(loss, ref, 1e-10, "loss")
    gscale = ref_grad.abs().max().item()
    assert_close(grad / gscale, ref_grad / gscale, 1e-10, "logits grad")


@pytest.mark.parametrize("device", device_params())
def test_large_volume_many_tiles_and_blocks(device):
    # Many CPU tiles and CUDA blocks per sample, and tails that are not a multiple of either.
    logits, labels = make_case((2, 3, 41, 43, 47), device, ignore=True)
    loss, grad, ref, ref_grad = fused_and_reference(logits, labels, include_background=False)
    assert_close(loss, ref, 1e-10, "loss")
    gscale = ref_grad.abs().max().item()
    assert_close(grad / gscale, ref_grad / gscale, 1e-10, "logits grad")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("ignore_index", [-100, 0, 2])
def test_ops_match_reference_ops(device, label_dtype, ignore_index):
    if label_dtype == torch.uint8 and ignore_index < 0:
        ignore_index = 255  # -100 is no uint8 label: a common choice of ignore label instead
    logits, labels = make_case((2, 5, 6, 7, 8), device, ignore=True, label_dtype=label_dtype,
                               ignore_index=ignore_index)
    weight = torch.rand(5, dtype=torch.float64, device=device) + 0.5
    for w in (None, weight):
        stats, ce = op("dice_ce_forward", logits.device)(logits, labels, w, ignore_index)
        rstats, rce = reference.dice_ce_forward(logits, labels, w, ignore_index)
        assert stats.shape == (2, 5, 3) and ce.shape == (2,)
        assert_close(stats, rstats, 1e-12, "stats")
        assert_close(ce, rce, 1e-12, "ce")
        grad = torch.tensor(0.7, dtype=torch.float64, device=device)
        coef_dice = torch.randn(2, 5, 2, dtype=torch.float64, device=device)
        coef_ce = torch.tensor(0.3, dtype=torch.float64, device=device)
        dz = op("dice_ce_backward", logits.device)(grad, logits, labels, w, ignore_index,
                                                   coef_dice, coef_ce)
        rdz = reference.dice_ce_backward(grad, logits, labels, w, ignore_index, coef_dice,
                                         coef_ce)
        assert dz.shape == logits.shape and dz.is_contiguous()
        assert_close(dz, rdz, 1e-12, "grad logits")
    # The ignored class (when ignore_index is a class) has no voxels: G = I = 0.
    if 0 <= ignore_index < 5:
        assert torch.all(stats[:, ignore_index, 0] == 0)
        assert torch.all(stats[:, ignore_index, 2] == 0)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("include_background", [False, True])
def test_gradcheck(device, batch_dice, include_background):
    logits, labels = make_case((2, 3, 3, 4), device, ignore=True)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, device=device)
    x = logits.requires_grad_()

    def f(x):
        return dice_ce_loss(x, labels, weight, batch_dice=batch_dice,
                            include_background=include_background, smooth=0.1)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def _op_samples(device):
    samples = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for label_dtype in (torch.int64, torch.int32, torch.uint8):
            logits, labels = make_case((2, 4, 5, 6, 3), device, dtype=dtype, ignore=True,
                                       label_dtype=label_dtype, ignore_index=3)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            weight = torch.rand(4, dtype=acc, device=device) + 0.5
            for w in (None, weight):
                samples += [
                    ("dice_ce_forward", (logits, labels, w, 3)),
                    ("dice_ce_backward", (torch.tensor(1.5, dtype=acc, device=device), logits,
                                          labels, w, 3,
                                          torch.randn(2, 4, 2, dtype=acc, device=device),
                                          torch.tensor(0.25, dtype=acc, device=device))),
                ]
    # Layouts: read in place (channels-last, and a class slice's), or copied once (a crop).
    logits, labels = make_case((2, 4, 5, 6, 3), device, ignore=True, ignore_index=3)
    g, cd, cc = (torch.tensor(1.5, dtype=torch.float64, device=device),
                 torch.randn(2, 4, 2, dtype=torch.float64, device=device),
                 torch.tensor(0.25, dtype=torch.float64, device=device))
    for x in (logits.contiguous(memory_format=torch.channels_last_3d),
              make_case((2, 4, 7, 6, 3), device)[0][:, :, 1:6]):
        samples += [("dice_ce_forward", (x, labels, None, 3)),
                    ("dice_ce_backward", (g, x, labels, None, 3, cd, cc))]
    return samples


@needs_extension
@pytest.mark.parametrize("device", device_params())
def test_opcheck_dice_ce_ops(device):
    seen = set()
    for name, args in _op_samples(device):
        torch.library.opcheck(getattr(torch.ops.effseg, name).default, args)
        seen.add(name)
    assert seen == {"dice_ce_forward", "dice_ce_backward"}


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2),
                                       (torch.bfloat16, 2e-2)])
def test_low_precision_against_float64(device, dtype, tol):
    logits, labels = make_case((2, 6, 7, 8, 9), device, dtype=dtype, ignore=True)
    weight = torch.rand(6, dtype=torch.float32, device=device) + 0.5
    loss, grad, ref, ref_grad = fused_and_reference(logits, labels, weight=weight,
                                                    include_background=False)
    # Accumulated in float32 whatever the logits' dtype; the gradient is stored in it.
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(loss, ref, tol, "loss")
    gscale = ref_grad.abs().max().item()
    assert_close(grad.double() / gscale, ref_grad / gscale, tol, "logits grad")


def _layouts(shape, device, dtype):
    """The same logits values in several layouts: (name, tensor, read in place by the kernels)."""
    N, K, D, H, W = shape
    base, _ = make_case(shape, device, dtype=dtype)
    big = torch.zeros((N, K + 2, D + 3, H, W + 1), dtype=dtype, device=device)
    big[:, 1:K + 1, 2:D + 2, :, :W] = base
    perm = base.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)
    return [
        ("contiguous", base, True),
        ("channels-last", base.contiguous(memory_format=torch.channels_last_3d), True),
        ("crop (the FCN's padded output)", big[:, 1:K + 1, 2:D + 2, :, :W], False),
        ("permuted spatial axes", perm, False),
    ]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5),
                                       (torch.float16, 1e-2), (torch.bfloat16, 2e-2)])
def test_any_layout_matches_float64_reference(device, dtype, tol):
    """Non-contiguous and channels-last logits give the contiguous logits' loss and gradient (the
    float64 reference's), the gradient in the logits' own layout where it is read in place."""
    shape = (2, 5, 6, 7, 9)
    labels = make_case(shape, device, ignore=True)[1]
    weight = torch.rand(5, dtype=torch.float64, device=device) + 0.5
    for name, logits, in_place in _layouts(shape, device, dtype):
        loss, grad, ref, ref_grad = fused_and_reference(
            logits, labels, weight=weight.to(torch.float64 if dtype == torch.float64
                                             else torch.float32), include_background=False)
        assert_close(loss, ref, tol, f"{name} loss")
        gscale = ref_grad.abs().max().item()
        assert_close(grad.double() / gscale, ref_grad / gscale, tol, f"{name} logits grad")
        if in_place:
            assert grad.stride() == logits.stride(), name
        if dtype == torch.float32 and effseg.HAVE_EXTENSION:
            assert _copies(logits, labels) == (0 if in_place else 1), name


def _copies(logits, labels):
    """How many times the dice_ce ops copy the logits (aten::clone calls, as the profiler sees
    them inside the ops) in one forward and one backward."""
    from torch.profiler import ProfilerActivity, profile
    z = logits.detach()
    K = z.shape[1]
    acc = torch.float32
    args = (torch.tensor(1.0, dtype=acc, device=z.device), z, labels, None, -100,
            torch.randn(z.shape[0], K, 2, dtype=acc, device=z.device),
            torch.tensor(0.5, dtype=acc, device=z.device))
    counts = []
    for call in (lambda: op("dice_ce_forward", z.device)(z, labels, None, -100),
                 lambda: op("dice_ce_backward", z.device)(*args)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        counts.append(sum(e.name == "aten::clone" for e in prof.events()))
    assert counts[0] == counts[1], counts
    return counts[0]


@pytest.mark.parametrize("weighted", [False, True])
def test_saves_only_logits_and_labels(weighted):
    N, K = 2, 5
    logits = torch.randn(N, K, 12, 13, 14, requires_grad=True)
    labels = torch.randint(0, K, (N, 12, 13, 14))
    weight = torch.rand(K) + 0.5 if weighted else None
    inputs = logits.nbytes + labels.nbytes
    with count_saved() as fused:
        loss = dice_ce_loss(logits, labels, weight)
    # logits, labels, weight, coef_dice (N, K, 2) and coef_ce: nothing else of voxel size
    assert fused.storages == (5 if weighted else 4)
    small = N * K * 2 * 4 + 4 + (K * 4 if weighted else 0)
    assert fused.bytes == inputs + small, (fused.bytes, inputs, small)
    loss.backward()
    assert logits.grad.shape == logits.shape
    stock = saved_bytes(lambda: dice_ce_reference(logits, labels, weight))
    # The stock loss keeps probabilities, log-probabilities and one-hot targets besides.
    assert stock >= fused.bytes + 2 * logits.nbytes, (stock, fused.bytes)


@needs_extension
def test_cpu_results_do_not_depend_on_thread_count():
    logits, labels = make_case((2, 6, 30, 31, 32), "cpu", dtype=torch.float32, ignore=True)
    grad = torch.tensor(1.0)
    coef_dice = torch.randn(2, 6, 2)
    coef_ce = torch.tensor(0.5)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            E = torch.ops.effseg
            results.append(E.dice_ce_forward(logits, labels, None, -100) + (
                E.dice_ce_backward(grad, logits, labels, None, -100, coef_dice, coef_ce),))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", device_params())
def test_nan_propagates_unless_the_voxel_is_ignored(device):
    logits, labels = make_case((2, 3, 5, 6), device)
    bad = logits.clone()
    bad[1, 2, 3, 4] = float("nan")
    x = bad.clone().requires_grad_()
    loss = dice_ce_loss(x, labels)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(x.grad).any()
    # The same voxel ignored: it takes no part, whatever its logits.
    labels[1, 3, 4] = -100
    x = bad.clone().requires_grad_()
    loss = dice_ce_loss(x, labels)
    loss.backward()
    clean = logits.clone().requires_grad_()
    expected = dice_ce_loss(clean, labels)
    expected.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, clean.grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize("device", device_params())
def test_all_voxels_ignored(device):
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device)
    labels = torch.full((2, 4, 5), -100, device=device)
    # CE over no voxels is 0/0, as in torch; a Dice-only loss leaves CE out and is 0 (dice = 1).
    assert torch.isnan(dice_ce_loss(logits, labels))
    assert torch.isnan(torch.nn.functional.cross_entropy(logits, labels))
    x = logits.clone().requires_grad_()
    loss = dice_ce_loss(x, labels, lambda_ce=0.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(x.grad == 0)


def test_module_holds_weight_as_buffer_and_matches_function():
    weight = torch.tensor([0.2, 1.0, 3.0])
    loss_fn = DiceCELoss(include_background=False, weight=weight, batch_dice=True,
                         lambda_ce=0.5, smooth=1e-3)
    assert "weight" in dict(loss_fn.named_buffers())
    assert "batch_dice=True" in repr(loss_fn) and "lambda_ce=0.5" in repr(loss_fn)
    loss_fn = loss_fn.double()
    assert loss_fn.weight.dtype == torch.float64
    logits, labels = make_case((2, 3, 4, 5, 6), "cpu", ignore=True)
    expected = dice_ce_reference(logits, labels, weight.double(), include_background=False,
                                 batch_dice=True, lambda_ce=0.5, smooth=1e-3)
    torch.testing.assert_close(loss_fn(logits, labels), expected)


def test_default_module_matches_stock_cross_entropy_plus_dice():
    # Defaults: all classes, no weights, ignore_index -100, smooth 1e-5, one dice per sample.
    logits, labels = make_case((2, 4, 5, 6, 7), "cpu")
    p = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).double()
    dice = (2 * (p * onehot).sum((2, 3, 4)) + 1e-5) / (p.sum((2, 3, 4)) + onehot.sum((2, 3, 4))
                                                       + 1e-5)
    expected = torch.nn.functional.cross_entropy(logits, labels) + 1 - dice.mean()
    torch.testing.assert_close(DiceCELoss()(logits, labels), expected)


def _x(*shape, **kw):
    return torch.randn(*(shape or (2, 3, 4, 5)), **kw)


def _y(*shape, high=3, dtype=torch.int64):
    return torch.randint(0, high, shape or (2, 4, 5)).to(dtype)


@pytest.mark.parametrize("make,exc,words", [
    (lambda: dice_ce_loss(_x(), _y(2, 4, 6)), ValueError, "labels must have shape (2, 4, 5)"),
    (lambda: dice_ce_loss(_x(), _y(2, 3, 4, 5)), ValueError, "labels must have shape"),
    (lambda: dice_ce_loss(_x(), _y().float()), TypeError, "integer class indices"),
    (lambda: dice_ce_loss(_x(), _y(dtype=torch.int16)), TypeError, "integer class indices"),
    (lambda: dice_ce_loss(_x(), _y() + 1), ValueError, "[0, 3)"),
    (lambda: dice_ce_loss(_x(), _y() - 1), ValueError, "e.g. -1"),
    (lambda: dice_ce_loss(_x(), _y(high=200, dtype=torch.uint8) + 56), ValueError,
     "ignore_index (-100)"),
    (lambda: dice_ce_loss(_x(2, 1, 4, 5), _y(high=1)), ValueError, "K >= 2"),
    (lambda: dice_ce_loss(_x(), _y(), weight=torch.ones(4)), ValueError, "weight must have"),
    (lambda: dice_ce_loss(_x(), _y(), weight=torch.ones(3, dtype=torch.int64)), TypeError,
     "weight"),
    (lambda: dice_ce_loss(_x(), _y(), weight=torch.ones(3, device="meta")), ValueError, "meta"),
    (lambda: dice_ce_loss(_x(), _y().to("meta")), ValueError, "meta"),
    (lambda: dice_ce_loss(_y(2, 3, 4), _y()), TypeError, "float"),
    (lambda: dice_ce_loss(_x(5), _y()), ValueError, "(N, K, *spatial)"),
    (lambda: dice_ce_loss(_x(2, 3, 0), _y(2, 0)), ValueError, "empty"),
    (lambda: dice_ce_loss(_x(), _y(), smooth=-1.0), ValueError, "smooth"),
    (lambda: dice_ce_loss(_x(), _y(), lambda_dice=float("nan")), ValueError, "lambda_dice"),
    (lambda: dice_ce_loss(_x(), _y(), ignore_index=1.5), TypeError, "ignore_index"),
    (lambda: dice_ce_loss(_x(), [0, 1]), TypeError, "labels must be a tensor"),
    (lambda: DiceCELoss(weight=torch.ones(3, dtype=torch.int64)), TypeError, "weight"),
])
def test_bad_input_raises_clear_error(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    assert words in str(info.value), str(info.value)


def test_uint8_labels_are_never_taken_for_a_wrapped_ignore_index():
    # -100 wraps to 156 in uint8: a label 156 is out of range, not ignored.
    labels = _y(dtype=torch.uint8)
    labels[0, 0, 0] = 156
    with pytest.raises(ValueError, match="e.g. 156"):
        dice_ce_loss(_x(), labels)


DIRECT_CALLS = r'''
import torch, effseg
E = torch.ops.effseg
x = torch.randn(2, 3, 4, 5, 6)
y = torch.randint(0, 3, (2, 4, 5, 6))
g = torch.tensor(1.0); cd = torch.zeros(2, 3, 2); cc = torch.tensor(1.0)
zeros = lambda *shape: torch.zeros(shape, dtype=torch.long)
cl = x.contiguous(memory_format=torch.channels_last_3d)
cases = {
    "fwd int logits": lambda: E.dice_ce_forward(torch.ones(2, 3, 4, 5, 6, dtype=torch.long), y,
                                                None, -100),
    "fwd 1d": lambda: E.dice_ce_forward(torch.randn(7), zeros(7), None, -100),
    "fwd K=1": lambda: E.dice_ce_forward(torch.randn(2, 1, 4), zeros(2, 4), None, -100),
    "fwd empty": lambda: E.dice_ce_forward(torch.randn(0, 3, 4), zeros(0, 4), None, -100),
    "fwd float labels": lambda: E.dice_ce_forward(x, y.float(), None, -100),
    "fwd label shape": lambda: E.dice_ce_forward(x, y[:, :3], None, -100),
    "fwd label too big": lambda: E.dice_ce_forward(x, y + 3, None, -100),
    "fwd label negative": lambda: E.dice_ce_forward(x, y - 1000, None, -100),
    "fwd label huge": lambda: E.dice_ce_forward(x, y + 2**40, None, -100),
    "fwd weight shape": lambda: E.dice_ce_forward(x, y, torch.ones(4), -100),
    "fwd weight int": lambda: E.dice_ce_forward(x, y, torch.ones(3, dtype=torch.int32), -100),
    "fwd weight device": lambda: E.dice_ce_forward(x, y, torch.ones(3, device="meta"), -100),
    "bwd grad shape": lambda: E.dice_ce_backward(torch.ones(2), x, y, None, -100, cd, cc),
    "bwd coef shape": lambda: E.dice_ce_backward(g, x, y, None, -100, torch.zeros(2, 3), cc),
    "bwd coef_ce shape": lambda: E.dice_ce_backward(g, x, y, None, -100, cd, torch.ones(3)),
    "bwd coef int": lambda: E.dice_ce_backward(g, x, y, None, -100, cd.long(), cc),
    "bwd strided label shape": lambda: E.dice_ce_backward(g, x.transpose(2, 3), y, None, -100,
                                                          cd, cc),
    "fwd channels-last label shape": lambda: E.dice_ce_forward(cl, y[:, :, :3], None, -100),
}
for name, call in cases.items():
    try:
        call()
    except (ValueError, TypeError, RuntimeError) as e:
        assert "effseg" in str(e) or "expected" in str(e), (name, str(e))
        print("raised", name, type(e).__name__)
    else:
        raise SystemExit(f"no error for {name}")
# Backward trusts the labels forward checked, but a bad one only zeroes its voxel's gradient.
bad = y.clone(); bad[0, 0, 0, 0] = 2**40; bad[1, 1, 1, 1] = -7
dz = E.dice_ce_backward(g, x, bad, None, -100, torch.randn(2, 3, 2), cc)
assert torch.all(dz[0, :, 0, 0, 0] == 0) and torch.all(dz[1, :, 1, 1, 1] == 0)
assert torch.isfinite(dz).all()
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
    from effseg.losses import DiceCELoss, dice_ce_reference
    assert not effseg.HAVE_EXTENSION
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 5, 6, 7))
    y[0, 0] = -100
    for _ in range(2):
        leaf = x.clone().requires_grad_()
        loss = DiceCELoss(include_background=False)(leaf, y)
        loss.backward()
ref_leaf = x.clone().requires_grad_()
ref = dice_ce_reference(ref_leaf, y, include_background=False)
ref.backward()
torch.testing.assert_close(loss, ref)
torch.testing.assert_close(leaf.grad, ref_leaf.grad)
msgs = [str(w.message) for w in caught if "reference" in str(w.message)]
assert len(msgs) == 1, msgs
print("FALLBACK OK")
'''


def test_without_extension_falls_back_to_reference_ops():
    proc = run_python(FALLBACK, env={"EFFSEG_NO_EXTENSION": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FALLBACK OK" in proc.stdout


# ---------------------------------------------------------------- deep supervision

def test_deep_supervision_loss_weights_each_output_on_labels_at_its_grid():
    torch.manual_seed(0)
    model = FullVolumeFCN(out_channels=3, channels=(4, 8, 8, 8), strides=(1, 2, (1, 2, 2), 2),
                          deep_supervision=True).double()
    x = torch.randn(2, 1, 13, 11, 10, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 13, 11, 10))
    labels[:, :2] = 255
    outs = model(x)
    strides = model.output_strides()
    assert strides == [(1, 1, 1), (2, 2, 2), (2, 4, 4)]
    # Each output has the shape of the labels sampled at its stride.
    for out, (a, b, c) in zip(outs, strides):
        assert out.shape[2:] == labels[:, ::a, ::b, ::c].shape[1:]
    base = DiceCELoss(include_background=False, ignore_index=255)
    loss = DeepSupervisionLoss(base, strides)(outs, labels)
    expected = sum(w * dice_ce_reference(o.contiguous(), labels[:, ::a, ::b, ::c],
                                         include_background=False, ignore_index=255)
                   for o, (a, b, c), w in zip(outs, strides, (4 / 7, 2 / 7, 1 / 7)))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in model.ds_heads)
    # A plain tensor (eval mode, or no deep supervision) is the base loss.
    model.eval()
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(DeepSupervisionLoss(base, strides)(out, labels),
                                   base(out.contiguous(), labels))
    # Zero weights leave an output out.
    only_first = DeepSupervisionLoss(base, strides, weights=[1, 0, 0])
    model.train()
    outs = model(x)
    torch.testing.assert_close(only_first(outs, labels), base(outs[0].contiguous(), labels))


def test_deep_supervision_loss_refuses_bad_settings():
    base = DiceCELoss()
    with pytest.raises(ValueError, match="strides"):
        DeepSupervisionLoss(base, [])
    with pytest.raises(ValueError, match="strides"):
        DeepSupervisionLoss(base, [(1, 1)])
    with pytest.raises(ValueError, match="weights"):
        DeepSupervisionLoss(base, [(1, 1, 1), (2, 2, 2)], weights=[1])
    with pytest.raises(ValueError, match="weights"):
        DeepSupervisionLoss(base, [(1, 1, 1)], weights=[0])
    with pytest.raises(ValueError, match="outputs"):
        DeepSupervisionLoss(base, [(1, 1, 1), (2, 2, 2)])(
            [torch.zeros(1, 2, 2, 2, 2)], torch.zeros(1, 2, 2, 2, dtype=torch.long))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@needs_extension
def test_cuda_loss_never_synchronizes_and_checks_labels_on_the_device():
    """Forward and backward on a GPU without one host synchronization (so the loss can be
    captured in a CUDA graph); bad labels still fail, with a device-side assertion raised at the
    next synchronizing call (in a subprocess: it ends the process's use of the GPU)."""
    logits, labels = make_case((2, 5, 8, 8, 8), "cuda", dtype=torch.float32, ignore=True)
    x = logits.clone().requires_grad_()
    weight = torch.rand(5, device="cuda") + 0.5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a synchronizing call raises
    try:
        loss = dice_ce_loss(x, labels, weight=weight)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    xr = logits.double().requires_grad_()
    ref = dice_ce_reference(xr, labels, weight.double())
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    bad = run_python(
        "import torch\nfrom effseg.losses import dice_ce_loss\n"
        "x = torch.randn(2, 3, 4, 5, device='cuda')\n"
        "y = torch.randint(0, 3, (2, 4, 5), device='cuda')\ny[1, 2, 3] = 7\n"
        "loss = dice_ce_loss(x, y)\ntorch.cuda.synchronize()\nprint('no error')\n",
        env=child_env())
    assert bad.returncode != 0 and "no error" not in bad.stdout, bad.stdout + bad.stderr
    assert "device-side assert" in bad.stderr, bad.stderr[-2000:]
