"""The recomputing block as one autograd Function.

Forward runs Conv3d -> norm-act twice (optionally plus a residual) without autograd and keeps
only the block input, the per-unit batch statistics (O(C)) and the parameters. Backward
recomputes the inside by replaying those statistics (no second reduction, the same
normalization bit for bit, running statistics untouched), then backpropagates by hand:
convolutions through ATen (`convolution_backward`: cuDNN on GPUs), norm-act through effseg's
kernels. Because the pre-activation is recomputed, exact ReLU works here: the norm runs with the
identity and ReLU is applied on top, its mask taken from the recomputed pre-activation.

Mixed precision: under autocast the convolutions run in the autocast dtype, in forward and in
the recomputation alike; gradients come back in each input's own dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._library import op
from .norm_act import batch_stats
from .sync import SyncGroup, input_grad_sums


@dataclass
class Unit:
    """One Conv3d -> norm -> activation unit, as the Function sees it."""

    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    dilation: tuple[int, int, int]
    groups: int
    per_sample: bool
    use_batch_stats: bool
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    momentum: float
    eps: float
    activation: str  # "relu" runs the norm with the identity and ReLU after it
    activation_param: float
    sync: SyncGroup | None = None  # batch statistics and backward sums over a process group

    @property
    def fused_activation(self) -> tuple[str, float]:
        return ("identity", 0.0) if self.activation == "relu" else (self.activation,
                                                                    self.activation_param)


@dataclass
class BlockSpec:
    units: tuple[Unit, Unit]
    residual: bool
    skip_stride: tuple[int, int, int]
    compute_dtype: torch.dtype
    # Keep the block output (the second unit's output) for backward, so that only the first
    # unit is recomputed. Only where the output is that unit's output (no residual) and it
    # determines the pre-activation (not ReLU).
    keep_output: bool = False
    # Backward holds at most two tensors of the block's output size besides the incoming
    # gradient, at the price of computing the first unit three times instead of once (see
    # `_lean_backward`): where that unit is cheap (few input channels) and the block sits at the
    # step's memory peak (full resolution). Only without a kept output, residual or ReLU.
    lean: bool = False
    # The incoming gradient is a fresh tensor that nothing else reads (the network makes sure:
    # FullVolumeFCN's first block), so a lean backward writes its gradients into it and holds
    # one tensor of the output's size besides it, computing the second unit's pre-activation a
    # slab at a time (`_second_unit_in_slabs`).
    owns_grad: bool = False

    @property
    def keeps_output(self) -> bool:
        return self.keep_output and not self.residual and self.units[1].activation != "relu"

    @property
    def is_lean(self) -> bool:
        return (self.lean and not self.keeps_output and not self.residual
                and all(u.activation != "relu" for u in self.units))


def _layout(t: torch.Tensor) -> torch.memory_format:
    """The memory format of a 5-D tensor: channels-last where it is channels-last and not
    contiguous; with one channel (both formats can hold at once) the channel stride tells them
    apart, 1 in channels-last (as `torch.Tensor.contiguous(memory_format=...)` leaves it)."""
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and (
            not t.is_contiguous() or (t.stride(1) == 1 and t[0, 0].numel() > 1)):
        return torch.channels_last_3d
    return torch.contiguous_format


def canonical(t: torch.Tensor) -> torch.Tensor:
    """`t` (a view of the same memory) with the strides its layout gives a dense tensor of its
    shape. A dense tensor's size-1 axes may carry any stride (a sample of a batch keeps the
    batch's sample stride), and ATen's layout guess (`suggest_memory_format`) then takes a
    channels-last tensor for a contiguous one: its convolutions would return (and oneDNN
    compute) the other layout."""
    if t.dim() != 5:
        return t
    fmt = _layout(t)
    if fmt == torch.contiguous_format and not t.is_contiguous():
        return t
    strides = dense_strides(t.shape, fmt)
    return t if t.stride() == strides else t.as_strided(t.shape, strides)


def dense_strides(shape, fmt: torch.memory_format) -> tuple:
    """The strides of a dense 5-D tensor of `shape` in layout `fmt`."""
    _, C, D, H, W = shape
    if fmt == torch.channels_last_3d:
        return (D * H * W * C, 1, H * W * C, W * C, C)
    return (C * D * H * W, D * H * W, H * W, W, 1)


def _conv(x, w, u: Unit):
    """The unit's convolution (no bias, weight in x's dtype) in x's layout, outside autograd
    on oneDNN wherever `slabs.runs_on_onednn` says so."""
    from .slabs import onednn_conv, runs_on_onednn
    x = canonical(x)
    if (x.device.type == "cpu" and x.dim() == 5 and not torch.is_grad_enabled()
            and runs_on_onednn(conv_backend(tuple(x.shape), x, tuple(w.shape), u.stride,
                                            u.padding, dilation=u.dilation, groups=u.groups),
                               x)):
        z = onednn_conv(x, w, u.stride, u.padding, u.dilation, u.groups)
    else:
        z = torch.nn.functional.conv3d(x, w, None, u.stride, u.padding, u.dilation, u.groups)
    return z.contiguous(memory_format=_layout(x))


def _norm_act_(z, u: Unit, stats, gamma, beta):
    """Normalizes z in place with `stats`; returns (pre-activation holder, unit output)."""
    act, param = u.fused_activation
    op("norm_act_forward_", z.device)(z, stats[0], stats[1], gamma, beta, u.eps, act, param)
    if u.activation == "relu":
        return z, torch.relu(z)
    return z, z


def _unit_stats(z, u: Unit):
    if not u.use_batch_stats:
        return u.running_mean, u.running_var
    return batch_stats(z, u.per_sample, u.sync, u.running_mean, u.running_var, u.momentum)


def block_forward(x, spec: BlockSpec, w1, g1, b1, w2, g2, b2, w_skip, stats=None, units=2):
    """The block's forward without autograd. With `stats` (recompute) the given statistics are
    replayed; otherwise they are computed (and running statistics updated). Returns the output,
    the statistics, and each unit's (pre-activation, output) pair. `units=1` stops after the
    first unit (recompute with a kept output)."""
    cd = spec.compute_dtype
    h = x.to(cd)
    units_out, used = [], []
    params = list(zip(spec.units, (w1, w2), (g1, g2), (b1, b2)))[:units]
    for i, (u, w, g, b) in enumerate(params):
        z = _conv(h, w.to(cd), u)
        st = stats[i] if stats is not None else _unit_stats(z, u)
        pre, h = _norm_act_(z, u, st, g, b)
        units_out.append((pre, h))
        used.append(st)
    out = h
    if spec.residual:
        xs = x.to(cd)
        skip = xs if w_skip is None else torch.nn.functional.conv3d(
            xs, w_skip.to(cd), None, spec.skip_stride)
        out = h + skip
    return out, used, units_out


def _conv_backward(grad, inp, w, u_stride, u_padding, u_dilation, groups, need_input,
                   need_weight=True):
    return torch.ops.aten.convolution_backward(
        canonical(grad), canonical(inp), w, None, list(u_stride), list(u_padding),
        list(u_dilation), False, [0, 0, 0], groups, [need_input, need_weight, False])[:2]


def shape_only(t: torch.Tensor) -> torch.Tensor:
    """A tensor with `t`'s shape, dtype and device and no memory (every stride 0): the input
    argument of a convolution backward that computes only the input gradient, which reads the
    input's shape but not its values. ATen picks the backend from the same shapes."""
    return t.new_empty(()).expand(t.shape)


def conv_input_grad(dz: torch.Tensor, x_shape, w: torch.Tensor, stride, padding, dilation,
                    groups: int) -> torch.Tensor:
    """dL/dx of a convolution from its output gradient `dz` and the input's shape alone. Where
    effseg runs the convolution on oneDNN (`slabs.runs_on_onednn`; a CPU, 5-D, outside
    autograd), the transposed
    convolution is called on oneDNN directly: ATen's convolution_backward would first make a
    dense copy of the memoryless stand-in it is handed for the input (`shape_only`), a tensor of
    the input's size that no tensor count sees. Elsewhere convolution_backward with the
    stand-in."""
    from .slabs import onednn_conv_transpose, runs_on_onednn
    x_shape = tuple(x_shape)
    if (dz.device.type == "cpu" and dz.dim() == 5 and dz.dtype == w.dtype
            and not torch.is_grad_enabled() and dz.is_contiguous(memory_format=_layout(dz))
            and runs_on_onednn(conv_backend(x_shape, dz, tuple(w.shape), stride, padding,
                                            dilation=dilation, groups=groups), dz)):
        k = w.shape[2:]
        extra = [n - ((m - 1) * s - 2 * p + d * (kk - 1) + 1) for n, m, s, p, d, kk in
                 zip(x_shape[2:], dz.shape[2:], stride, padding, dilation, k)]
        if all(0 <= e < max(s, d) for e, s, d in zip(extra, stride, dilation)):
            return onednn_conv_transpose(canonical(dz), w, None, stride, padding, extra,
                                         dilation, groups)
    return _conv_backward(dz, dz.new_empty(()).expand(x_shape), w, stride, padding, dilation,
                          groups, True, False)[0]


def add_conv_input_grad_(dst: torch.Tensor, dz: torch.Tensor, w: torch.Tensor, stride,
                         padding, parts: int = 8) -> None:
    """dst += dL/dx of an undilated, ungrouped convolution (weight w) of an input of dst's
    shape, from its output gradient dz: the transposed convolution computed a slab of dz's rows
    at a time and each slab's output rows added where they belong (neighbouring slabs' rows
    overlap by the kernel minus the stride, and the overlaps add up), so that no tensor of
    dst's size is made. On oneDNN where `runs_on_onednn` says so, else on ATen's choice."""
    from .slabs import onednn_conv_transpose, runs_on_onednn
    s, p, k = stride[0], padding[0], w.shape[2]
    D, L = dst.shape[2], dz.shape[2]
    extra = [0] + [n - ((m - 1) * st - 2 * pd + kk) for n, m, st, pd, kk in
                   zip(dst.shape[3:], dz.shape[3:], stride[1:], padding[1:], w.shape[3:])]
    onednn = runs_on_onednn(conv_backend(tuple(dst.shape), dz, tuple(w.shape), stride, padding),
                            dz) and not torch.is_grad_enabled()
    slab_padding = (0,) + tuple(padding[1:])
    step = -(-L // parts)
    for a in range(0, L, step):
        b = min(a + step, L)
        sub = canonical(dz[:, :, a:b])
        if onednn:
            part = onednn_conv_transpose(sub, w, None, stride, slab_padding, extra, (1, 1, 1), 1)
        else:
            part = torch.nn.functional.conv_transpose3d(sub, w, None, tuple(stride),
                                                        slab_padding, tuple(extra))
        # local row t is global row t + s * a - p
        lo = s * a - p
        t0, t1 = max(0, -lo), min(part.shape[2], D - lo)
        dst[:, :, lo + t0:lo + t1] += part[:, :, t0:t1]
        del sub, part


def conv_backend(x_shape, like: torch.Tensor, w_shape, stride, padding, transposed=False,
                 dilation=None, output_padding=None, groups=1):
    """The backend ATen picks for a convolution of an input of `x_shape` (dtype and device of
    `like`) with a weight of `w_shape` (asked with memoryless stand-ins), as its enum's integer
    value (some values have no Python name, and unnamed values compare by identity)."""
    def stand_in(shape):
        return like.new_empty(()).expand(tuple(shape))
    nd = len(stride)
    return int(torch._C._select_conv_backend(
        stand_in(x_shape), stand_in(w_shape), None, list(stride), list(padding),
        list(dilation or [1] * nd), transposed, list(output_padding or [0] * nd), groups, None))


def blocks_of(t: torch.Tensor, parts: int = 4):
    """Blocks (n0, n1, c0, c1, d0, d1) of about 1/`parts` of `t` each (or one sample, if that
    is less) that are dense slices of `t`: of a contiguous `t`, channel ranges of one sample
    (all rows); of a channels-last 5-D `t`, ranges of rows (the first spatial axis) of one
    sample (all channels). None where `t` is neither, or has too few channels (rows) to split."""
    N, C = t.shape[:2]
    per_sample = -(-parts // N)
    if t.is_contiguous():
        if per_sample > C:
            return None
        edges = [C * i // per_sample for i in range(per_sample + 1)]
        D = t.shape[2] if t.dim() > 2 else 1
        return [(n, n + 1, c0, c1, 0, D) for n in range(N) for c0, c1 in zip(edges, edges[1:])]
    if _layout(t) != torch.channels_last_3d or per_sample > t.shape[2]:
        return None
    D = t.shape[2]
    edges = [D * i // per_sample for i in range(per_sample + 1)]
    return [(n, n + 1, 0, C, d0, d1) for n in range(N) for d0, d1 in zip(edges, edges[1:])]


def norm_act_backward_into(pre, dy_block, u: Unit, stats, gamma, beta, blocks):
    """The norm-act backward of one unit written into `pre`'s storage (the pre-activation's
    holder, which the caller no longer needs), one block at a time (`blocks_of`):
    `dy_block(n0, n1, c0, c1, d0, d1)` gives a fresh dL/dy of a block, in `pre`'s layout, so
    that no tensor of `pre`'s full size exists beside it. Where a block holds every value its
    statistics were taken over (all rows, and all samples of its channels or per-sample
    statistics) and nothing is synchronized, each block is done in one pass;
    otherwise the sums of all blocks come first and `dy_block` is called again for the input
    gradient. Returns (dgamma, dbeta) like `_norm_act_backward`."""
    act, param = u.fused_activation
    per_group = stats[1].dim() == 2
    N, C = pre.shape[:2]
    D = pre.shape[2]
    one_pass = u.sync is None and all((per_group or (b[0] == 0 and b[1] == N))
                                      and b[4] == 0 and b[5] == D for b in blocks)
    fmt = _layout(pre)

    def index(n0, n1, c0, c1):
        return (slice(n0, n1), slice(c0, c1)) if per_group else (slice(c0, c1),)

    def part(t, c0, c1):
        return None if t is None else t[c0:c1]

    def block_grad(sub, b):
        # Both dense in pre's layout; the strides of their size-1 axes differ (a block of `pre`
        # keeps the sample stride of the whole), which the kernels' layout check would refuse.
        return dy_block(*b).contiguous(memory_format=fmt).as_strided(sub.shape, sub.stride())

    def reduce(sub, dy, c0, c1):
        return op("norm_act_backward_reduce", pre.device)(
            sub, dy, part(gamma, c0, c1), part(beta, c0, c1), per_group, act, param)

    def input_grad(sub, dy, i, c0, c1, sums, count):
        op("norm_act_backward_input_", pre.device)(
            sub, dy, stats[1][i], part(gamma, c0, c1), part(beta, c0, c1),
            None if sums[0] is None else sums[0][i], None if sums[1] is None else sums[1][i],
            count, u.eps, act, param)
        sub.copy_(dy)

    totals = None
    for b in blocks:
        n0, n1, c0, c1, d0, d1 = b
        sub, i = pre[n0:n1, c0:c1, d0:d1], index(n0, n1, c0, c1)
        dy = block_grad(sub, b)
        sums = reduce(sub, dy, c0, c1)
        if totals is None:
            totals = [sums[0].new_zeros(stats[1].shape), sums[1].new_zeros(stats[1].shape)]
        for total, value in zip(totals, sums):
            total[i] += value
        if one_pass:
            local = (totals[0], totals[1]) if u.use_batch_stats else (None, None)
            input_grad(sub, dy, i, c0, c1, local, None)
        del dy
    s_dz, s_dzx = totals
    if not one_pass:
        sums = input_grad_sums(s_dz, s_dzx, pre, u.sync) if u.use_batch_stats else (None,) * 3
        count = sums[2]
        if count is None and u.use_batch_stats:
            # a block's own count would be that of its samples (rows) only
            count = pre[0, 0].numel() if per_group else pre.numel() // C
        for b in blocks:
            n0, n1, c0, c1, d0, d1 = b
            sub = pre[n0:n1, c0:c1, d0:d1]
            input_grad(sub, block_grad(sub, b), index(n0, n1, c0, c1), c0, c1, sums, count)
    if per_group:
        s_dz, s_dzx = s_dz.sum(0), s_dzx.sum(0)
    return s_dzx, s_dz


def _saved_tensor_hooks():
    """The innermost active `torch.autograd.graph.saved_tensors_hooks` (pack, unpack), or None."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def keep_output(ctx, out: torch.Tensor) -> None:
    """Keeps a block's output for its backward outside `save_for_backward`, so that backward can
    let it go as soon as it is done with it (`take_output`) instead of autograd holding it until
    the whole backward returns. Kept as a detached alias (no reference cycle), packed with the
    active saved-tensor hooks as `save_for_backward` would pack it (so that `effseg.memory`'s
    counters and offloading hooks see it)."""
    hooks = _saved_tensor_hooks()
    alias = out.detach()
    ctx.kept = (None, alias) if hooks is None else (hooks[1], hooks[0](alias))
    ctx.kept_at = (out.untyped_storage().data_ptr(), out._version)


def take_output(ctx) -> torch.Tensor | None:
    """The output `keep_output` kept, now owned by the caller (None if none was kept, or if an
    earlier backward took it: with retain_graph the block then recomputes it). Raises if it was
    modified in place after forward, as autograd does for saved tensors."""
    kept = getattr(ctx, "kept", None)
    ctx.kept = None
    if kept is None:
        return None
    unpack, packed = kept
    out = packed if unpack is None else unpack(packed)
    ptr, version = ctx.kept_at
    if out.untyped_storage().data_ptr() == ptr and out._version != version:
        raise RuntimeError("effseg: the output of a recomputing block, which its backward "
                           "reads, was modified by an in-place operation after forward; clone "
                           "it before modifying it")
    return out


def converted(ws, cd):
    """The weights in the compute dtype (None stays None), converted once per pass (forward,
    backward) rather than once per convolution call. Functions save the weights themselves, not
    these copies: under autocast the copies of every level's weights would otherwise be held
    from forward to backward, at the step's memory peak (no copy at all without autocast)."""
    return tuple(None if w is None else w.to(cd) for w in ws)


def _norm_act_backward(pre, dy, u: Unit, stats, gamma, beta, owned: bool):
    """dL/dz of one unit from dL/dy. `owned`: dy is ours to overwrite."""
    if u.activation == "relu":
        dy = torch.ops.aten.threshold_backward(dy, pre, 0)
        owned = True
    act, param = u.fused_activation
    dy = dy.to(pre.dtype).contiguous(memory_format=_layout(pre))
    per_group = stats[1].dim() == 2
    s_dz, s_dzx = op("norm_act_backward_reduce", pre.device)(pre, dy, gamma, beta, per_group,
                                                             act, param)
    sums = input_grad_sums(s_dz, s_dzx, pre, u.sync) if u.use_batch_stats else (None,) * 3
    var = stats[1]
    if owned:
        op("norm_act_backward_input_", pre.device)(pre, dy, var, gamma, beta, *sums, u.eps,
                                                   act, param)
        dz = dy
    else:
        dz = op("norm_act_backward_input", pre.device)(pre, dy, var, gamma, beta, *sums,
                                                       u.eps, act, param)
    if per_group:
        s_dz, s_dzx = s_dz.sum(0), s_dzx.sum(0)
    return dz, s_dzx, s_dz


def second_conv_backward(held: list, w2, u2: Unit, owned: bool):
    """(dy1, dw2) of the second convolution from `held` = [dz2, y1], which it empties: the
    weight gradient first, then y1 is let go, and the input gradient is written over dz2 slab
    by slab where dz2 is ours (`owned`) and `input_grad_into_` takes the convolution (not small
    on a CPU, see `slab_rows`), so that dz2, dy1 and y1 need not coexist; else computed
    whole."""
    from .folded_up import input_grad_into_
    from .slabs import same_rows
    dz2, y1 = held
    held.clear()
    args = (u2.stride, u2.padding, u2.dilation, u2.groups)
    dw2 = _conv_backward(dz2, y1, w2, *args, False)[1]
    y1_shape = tuple(y1.shape)
    del y1
    if owned and same_rows(tuple(w2.shape), *args) and input_grad_into_(dz2, w2, u2.padding):
        return dz2, dw2
    return conv_input_grad(dz2, y1_shape, w2, *args), dw2


def _rows_apply(spec: BlockSpec, w1_shape, w2_shape) -> bool:
    """Whether `_block_rows` can recompute the block's units in rows: no residual, and both
    convolutions ones `conv_rows` computes."""
    from .slabs import same_rows
    u1, u2 = spec.units
    return (not spec.residual
            and same_rows(tuple(w1_shape), u1.stride, u1.padding, u1.dilation, u1.groups)
            and same_rows(tuple(w2_shape), u2.stride, u2.padding, u2.dilation, u2.groups))


def _block_rows(x, spec: BlockSpec, w1, g1, b1, w2, g2, b2, stats, normalize: bool):
    """(first, rows): first(d0, d1) gives rows [d0, d1) of the block's first unit's output and
    rows(d0, d1) those of its second unit, both computed from x (the block's input; the second
    from the first unit's rows around it that its convolution reads), weights in the compute
    dtype, statistics replayed, dense in x's layout: z2's rows, or with `normalize` the block's
    output rows. None where `_rows_apply` says no."""
    from .slabs import conv_rows, slab_conv
    if not _rows_apply(spec, w1.shape, w2.shape):
        return None
    u1, u2 = spec.units
    xc = canonical(x.to(spec.compute_dtype))
    fmt = _layout(xc)
    D = x.shape[2]
    conv1 = slab_conv(conv_backend(tuple(xc.shape), xc, tuple(w1.shape), (1, 1, 1), u1.padding))
    y1_shape = (x.shape[0], w1.shape[0]) + tuple(x.shape[2:])
    conv2 = slab_conv(conv_backend(y1_shape, xc, tuple(w2.shape), (1, 1, 1), u2.padding))
    p2 = u2.padding[0]

    def first(d0, d1):
        y1 = conv_rows(conv1, xc, 0, D, d0, d1, w1, u1.padding).contiguous(memory_format=fmt)
        _norm_act_(y1, u1, stats[0], g1, b1)
        return y1

    def rows(d0, d1):
        a = max(d0 - p2, 0)
        y1 = first(a, min(d1 + p2, D))
        z = conv_rows(conv2, y1, a, D, d0, d1, w2, u2.padding)
        del y1
        if normalize:
            z = z.contiguous(memory_format=fmt)
            _norm_act_(z, u2, stats[1], g2, b2)
        return z
    return first, rows


def _second_unit_in_slabs(x, spec: BlockSpec, w1, g1, b1, w2, stats, parts: int = 8):
    """The second unit's convolution output z2, computed a slab of rows at a time from the first
    unit's output recomputed for each slab (`_block_rows`): the first unit's output never
    exists whole. None where a convolution is not one `conv_rows` computes or the volume is too
    thin for slabs."""
    D = x.shape[2]
    step = -(-D // parts)
    made = _block_rows(x, spec, w1, g1, b1, w2, None, None, stats, normalize=False)
    if step >= D or made is None:
        return None
    rows = made[1]
    z2 = None
    for d0 in range(0, D, step):
        d1 = min(d0 + step, D)
        part = rows(d0, d1)
        if z2 is None:
            z2 = torch.empty(part.shape[:2] + (D,) + part.shape[3:], dtype=part.dtype,
                             device=part.device, memory_format=_layout(canonical(x)))
        z2[:, :, d0:d1] = part
        del part
    return z2


def trades_time_for_memory(compute_dtype: torch.dtype, param_dtype: torch.dtype) -> bool:
    """Whether FullVolumeFCN's two finest blocks recompute more in slabs of rows to lower the
    step's peak (`RowsSource`, `_lean_backward_in_rows`): where the compute dtype is narrower
    than the parameters' (autocast). There the parameters' gradients, full width, weigh more
    against the finest level's tensors, and the peak is in those blocks' backward; in the
    parameters' own precision it is in the finest decoder level's, which these passes do not
    touch, so they would only cost time."""
    return torch.finfo(compute_dtype).bits < torch.finfo(param_dtype).bits


class RowsSource:
    """A lean block's output, recomputed a slab of rows at a time from the block's input, for
    the split block after it (`split_block(source=...)`), which then does not keep that output:
    FullVolumeFCN's finest skip is let go once the decoder level that reads it has run its
    backward, instead of living through the second level's backward beside its own gradient.
    The lean block's forward fills it (its input, parameters and batch statistics); `reader()`
    gives `rows(d0, d1)`. Costs a recomputation of the lean block (in slabs) per reading
    pass."""

    def __init__(self) -> None:
        self.args = None

    def fill(self, x, spec: BlockSpec, params, stats) -> None:
        if _rows_apply(spec, params[0].shape, params[3].shape):
            self.args = (x, spec, params, stats)
            self.version = x._version

    @property
    def ready(self) -> bool:
        return self.args is not None

    def reader(self):
        x, spec, (w1, g1, b1, w2, g2, b2), stats = self.args
        if x._version != self.version:
            raise RuntimeError("effseg: the input of a recomputing block, which the next "
                               "block's backward reads, was modified by an in-place operation "
                               "after forward")
        w1c, w2c = converted((w1, w2), spec.compute_dtype)
        return _block_rows(x, spec, w1c, g1, b1, w2c, g2, b2, stats, normalize=True)[1]


def strided_conv_slabs(rows, depth: int, w, u: Unit, out_depth: int, parts: int = 4):
    """(r0, r1, input) per slab of about out_depth / `parts` output rows of conv(input, w) with
    the unit's stride, padding and dilation 1 along the first spatial axis, where
    `rows(a, b)` gives the input's rows [a, b) of `depth`: each slab's input holds the rows its
    output rows read, zero-padded beyond the volume, so that conv(input, w) with padding
    (0, p_h, p_w) gives output rows [r0, r1)."""
    s, p, k = u.stride[0], u.padding[0], w.shape[2]
    step = -(-out_depth // parts)
    for r0 in range(0, out_depth, step):
        r1 = min(r0 + step, out_depth)
        lo, hi = s * r0 - p, s * (r1 - 1) - p + k
        a, b = max(lo, 0), min(hi, depth)
        sub = rows(a, b)
        if a - lo or hi - b:
            sub = torch.nn.functional.pad(sub, (0, 0, 0, 0, a - lo, hi - b))
        yield r0, r1, canonical(sub)


def weight_grad_from_rows(rows, x_shape, dz: torch.Tensor, w: torch.Tensor, u: Unit,
                          parts: int | None = None) -> torch.Tensor:
    """dL/dw of conv(x, w) (the unit's stride and padding, dilation 1) from its output gradient
    dz, summed over slabs of dz's rows (`weight_grad_parts` of them unless given), each with
    the rows of x it reads from `rows(a, b)` (x's shape `x_shape`): x is never whole."""
    parts = weight_grad_parts(x_shape, dz, w, u) if parts is None else parts
    slab_padding = (0,) + tuple(u.padding[1:])
    dw = None
    for r0, r1, sub in strided_conv_slabs(rows, x_shape[2], w, u, dz.shape[2], parts):
        part = _conv_backward(dz[:, :, r0:r1], sub.to(dz.dtype), w, u.stride, slab_padding,
                              u.dilation, u.groups, False)[1]
        dw = part if dw is None else dw.add_(part)
        del sub, part
    return dw


def weight_grad_parts(x_shape, dz1, w1, u1, most: int = 8) -> int:
    """Over how many slabs of the output gradient's rows (`strided_conv_slabs`) a convolution's
    weight gradient is summed: the most, up to `most`, whose slabs ATen still computes on the
    backend it picks for the whole (its rule sends thin slabs of a single sample to its slow
    kernel, with a hidden im2col buffer)."""
    whole = conv_backend(x_shape, dz1, tuple(w1.shape), u1.stride, u1.padding,
                         dilation=u1.dilation, groups=u1.groups)
    s, k, out = u1.stride[0], w1.shape[2], dz1.shape[2]
    for parts in range(min(most, out), 1, -1):
        rows = s * (-(-out // parts) - 1) + k
        slab = (x_shape[0], x_shape[1], rows) + tuple(x_shape[3:])
        if conv_backend(slab, dz1, tuple(w1.shape), u1.stride,
                        (0,) + tuple(u1.padding[1:]), dilation=u1.dilation,
                        groups=u1.groups) == whole:
            return parts
    return 1


def sole_tensor(t: torch.Tensor) -> bool:
    """Whether `t` is the only tensor on its storage (no view, no alias a caller or a saved
    tensor still holds), so that overwriting it cannot change what anyone else sees."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return False
    storage = t.untyped_storage()
    return count(storage._cdata) <= 2  # t's and the `storage` object's own reference


def norm_act_backward_over(pre, grad, u: Unit, stats, gamma, beta, parts: int = 4):
    """`_norm_act_backward` with dL/dz written into pre's storage where pre is ours alone
    (`sole_tensor`: a recomputed pre-activation, or a kept output that nobody holds any more),
    the incoming gradient copied a block at a time (`blocks_of`), so that besides pre and the
    gradient only a block exists; as `_norm_act_backward` (a new tensor) where pre is shared,
    not contiguous, has too few channels for blocks, or the activation is ReLU."""
    blocks = blocks_of(pre, parts) if (u.activation != "relu" and grad.shape == pre.shape
                                       and sole_tensor(pre)) else None
    if blocks is None:
        return _norm_act_backward(pre, grad, u, stats, gamma, beta, owned=False)

    def dy_block(n0, n1, c0, c1, d0, d1):
        return grad[n0:n1, c0:c1, d0:d1].to(pre.dtype, copy=True)
    dgamma, dbeta = norm_act_backward_into(pre, dy_block, u, stats, gamma, beta, blocks)
    return pre, dgamma, dbeta


def norm_act_backward_rows(grad, unit_rows, u: Unit, stats, gamma, beta, parts: int = 4):
    """dL/dz of one unit written over its output gradient `grad` (ours to overwrite), with the
    unit's output recomputed a slab of rows at a time by `unit_rows(d0, d1)` (dense; each slab
    of the gradient is read in its layout) and never whole: the per-group sums over every slab
    first, then each slab's input gradient, so each slab is computed twice. Returns (dgamma,
    dbeta) like `_norm_act_backward`."""
    act, param = u.fused_activation
    per_group = stats[1].dim() == 2
    D = grad.shape[2]
    step = -(-D // parts)
    spans = [(d0, min(d0 + step, D)) for d0 in range(0, D, step)]
    totals = None
    for d0, d1 in spans:
        y = canonical(unit_rows(d0, d1))
        dy = canonical(grad[:, :, d0:d1].contiguous(memory_format=_layout(y)))
        sums = op("norm_act_backward_reduce", grad.device)(y, dy, gamma, beta, per_group, act,
                                                          param)
        totals = list(sums) if totals is None else [t.add_(v) for t, v in zip(totals, sums)]
        del y, dy
    s_dz, s_dzx = totals
    if u.use_batch_stats:
        sums = input_grad_sums(s_dz, s_dzx, grad, u.sync)
        count = sums[2] if sums[2] is not None else (
            grad[0, 0].numel() if per_group else grad.numel() // grad.shape[1])
    else:
        sums, count = (None, None, None), None
    for d0, d1 in spans:
        y = canonical(unit_rows(d0, d1))
        view = grad[:, :, d0:d1]
        dy = canonical(view.contiguous(memory_format=_layout(y)))
        op("norm_act_backward_input_", grad.device)(y, dy, stats[1], gamma, beta, sums[0],
                                                    sums[1], count, u.eps, act, param)
        if dy.data_ptr() != view.data_ptr():
            view.copy_(dy)
        del y, dy
    if per_group:
        s_dz, s_dzx = s_dz.sum(0), s_dzx.sum(0)
    return s_dzx, s_dz


def _lean_backward_in_rows(ctx, x, grad, w1, g1, b1, w2, g2, b2, stats):
    """`_lean_backward` where the incoming gradient is ours to overwrite and both convolutions
    are ones `conv_rows` computes: every gradient is written into `grad`, and neither unit's
    output exists whole: each is recomputed from x a slab of rows at a time, as often as a pass
    needs it (`norm_act_backward_rows`: twice per norm; once more the first unit's for the
    second weight's gradient, summed over slabs). Only `grad` has the output's size. None
    where that does not apply."""
    from .folded_up import input_grad_into_
    spec = ctx.spec
    u1, u2 = spec.units
    made = _block_rows(x, spec, w1, g1, b1, w2, g2, b2, stats, normalize=True)
    if made is None:
        return None
    first, second = made
    g = grad
    dg2, db2 = norm_act_backward_rows(g, second, u2, stats[1], g2, b2)  # g: dL/dz2
    y1_shape = (x.shape[0], w1.shape[0]) + tuple(x.shape[2:])
    dw2 = weight_grad_from_rows(first, y1_shape, g, w2, u2)
    if not input_grad_into_(g, w2, u2.padding):  # g: dL/dy1
        g = conv_input_grad(g, y1_shape, w2, u2.stride, u2.padding, u2.dilation, u2.groups)
    dg1, db1 = norm_act_backward_rows(g, first, u1, stats[0], g1, b1)  # g: dL/dz1
    dx, dw1 = _conv_backward(g, x.to(spec.compute_dtype), w1, u1.stride, u1.padding,
                             u1.dilation, u1.groups, ctx.needs_input_grad[0])
    return dx, dw1, dg1, db1, dw2, dg2, db2


def _lean_backward(ctx, x, grad_out, w1, g1, b1, w2, g2, b2, stats):
    """The block's backward holding at most the incoming gradient and two tensors of the
    output's size: the first unit's output is computed three times (for the second unit, for
    the second convolution's weight gradient, for its own norm-act backward) and dropped in
    between, and the second convolution's two gradients are computed apart, so that its input
    and its input gradient never coexist. Where the incoming gradient is ours to overwrite
    (`BlockSpec.owns_grad`), the gradients are written into it and the second unit is computed
    in slabs: one tensor of the output's size besides it."""
    spec = ctx.spec
    cd = spec.compute_dtype
    u1, u2 = spec.units

    def first_unit():
        return block_forward(x, spec, w1, g1, b1, w2, g2, b2, None, stats=stats, units=1)[2][0][1]

    owned = spec.owns_grad and grad_out.dtype == cd
    if (owned and grad_out.is_contiguous(memory_format=_layout(grad_out))
            and trades_time_for_memory(cd, ctx.weight_dtypes[0])):
        done = _lean_backward_in_rows(ctx, x, grad_out, w1, g1, b1, w2, g2, b2, stats)
        if done is not None:
            return done
    z2 = _second_unit_in_slabs(x, spec, w1, g1, b1, w2, stats) if owned else None
    if z2 is None:
        y1 = first_unit()
        z2 = _conv(y1, w2, u2)
        del y1
    pre2 = _norm_act_(z2, u2, stats[1], g2, b2)[0]
    del z2
    dz2, dg2, db2 = _norm_act_backward(pre2, grad_out.to(cd), u2, stats[1], g2, b2,
                                       owned=owned)
    del pre2
    held = [dz2, first_unit()]
    del dz2
    dy1, dw2 = second_conv_backward(held, w2, u2, owned=True)
    y1 = first_unit()
    dz1, dg1, db1 = _norm_act_backward(y1, dy1, u1, stats[0], g1, b1, owned=True)
    del y1, dy1
    dx, dw1 = _conv_backward(dz1, x.to(cd), w1, u1.stride, u1.padding, u1.dilation, u1.groups,
                             ctx.needs_input_grad[0])
    return dx, dw1, dg1, db1, dw2, dg2, db2


def _with_converted(params, cd):
    """(w1, g1, b1, w2, g2, b2, w_skip) with the three weights converted to `cd`."""
    w1, g1, b1, w2, g2, b2, w_skip = params
    w1, w2, w_skip = converted((w1, w2, w_skip), cd)
    return w1, g1, b1, w2, g2, b2, w_skip


class RecomputeBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec: BlockSpec, w1, g1, b1, w2, g2, b2, w_skip, source=None):
        ctx.weight_dtypes = [None if w is None else w.dtype for w in (w1, w2, w_skip)]
        out, stats, _ = block_forward(x, spec, *_with_converted(
            (w1, g1, b1, w2, g2, b2, w_skip), spec.compute_dtype))
        (m1, v1), (m2, v2) = stats
        # Statistics are copied (O(C)) so that later updates of running buffers (eval-mode
        # units normalize with them) cannot change what backward replays.
        kept_stats = (m1.clone(), v1.clone(), m2.clone(), v2.clone())
        ctx.save_for_backward(x, w1, g1, b1, w2, g2, b2, w_skip, *kept_stats)
        if source is not None and spec.is_lean:
            # for the block after this one (`RowsSource`): the same input, parameters and
            # statistics this block's own backward replays
            source.fill(x.detach(), spec, (w1, g1, b1, w2, g2, b2),
                        (kept_stats[:2], kept_stats[2:]))
        if spec.keeps_output:
            keep_output(ctx, out)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *params, m1, v1, m2, v2 = ctx.saved_tensors
        spec = ctx.spec
        w1, g1, b1, w2, g2, b2, w_skip = _with_converted(params, spec.compute_dtype)
        del params
        kept = take_output(ctx)
        cd = spec.compute_dtype
        u1, u2 = spec.units
        dt1, dt2, _ = ctx.weight_dtypes
        if spec.is_lean:
            with torch.no_grad():
                dx, dw1, dg1, db1, dw2, dg2, db2 = _lean_backward(
                    ctx, x, grad_out, w1, g1, b1, w2, g2, b2, ((m1, v1), (m2, v2)))
            return (None if dx is None else dx.to(x.dtype), None, dw1.to(dt1),
                    None if g1 is None else dg1.to(g1.dtype),
                    None if b1 is None else db1.to(b1.dtype), dw2.to(dt2),
                    None if g2 is None else dg2.to(g2.dtype),
                    None if b2 is None else db2.to(b2.dtype), None, None)
        with torch.no_grad():
            _, _, recomputed = block_forward(x, spec, w1, g1, b1, w2, g2, b2, w_skip,
                                             stats=((m1, v1), (m2, v2)),
                                             units=1 if kept is not None else 2)
            pre1, y1 = recomputed[0]
            pre2 = kept if kept is not None else recomputed[1][0]
            del recomputed, kept
            dz2, dg2, db2 = _norm_act_backward(pre2, grad_out.to(cd), u2, (m2, v2), g2,
                                               b2, owned=False)
            del pre2
            held = [dz2, y1]
            del dz2, y1
            dy1, dw2 = second_conv_backward(held, w2, u2, owned=True)
            dz1, dg1, db1 = _norm_act_backward(pre1, dy1, u1, (m1, v1), g1, b1,
                                               owned=True)
            del pre1, dy1
            need_x = ctx.needs_input_grad[0]
            xc = x.to(cd)
            dx, dw1 = _conv_backward(dz1, xc, w1, u1.stride, u1.padding, u1.dilation,
                                     u1.groups, need_x)
            dw_skip = None
            if spec.residual:
                g = grad_out.to(cd)
                if w_skip is None:
                    dx_skip = g
                else:
                    dx_skip, dw_skip = _conv_backward(g, xc, w_skip, spec.skip_stride,
                                                      (0, 0, 0), (1, 1, 1), 1, need_x)
                    dw_skip = dw_skip.to(ctx.weight_dtypes[2])
                if need_x:
                    dx = dx + dx_skip
        return (None if dx is None else dx.to(x.dtype), None, dw1.to(dt1),
                None if g1 is None else dg1.to(g1.dtype), None if b1 is None else db1.to(b1.dtype),
                dw2.to(dt2), None if g2 is None else dg2.to(g2.dtype),
                None if b2 is None else db2.to(b2.dtype), dw_skip, None)
