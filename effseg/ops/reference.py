"""Pure-PyTorch reference of every effseg op: the same signatures and results as
`torch.ops.effseg.*`, computed with ATen ops in the accumulation type (float64 for float64
inputs, float32 otherwise).

It is the test oracle for the kernels' algorithm and the fallback when the compiled extension is
missing. It allocates full-size temporaries, so it does not save the memory the kernels save.
"""
from __future__ import annotations


import torch

GAMMA_MIN = 1e-4  # csrc/norm_act/norm_act_math.h: kGammaMin


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(C,) or (N, C) per-group values shaped to broadcast against x of shape (N, C, *)."""
    shape = (1, -1) if v.dim() == 1 else tuple(v.shape)
    return v.reshape(shape + (1,) * (x.dim() - 2))


def _channel(t: torch.Tensor | None, x: torch.Tensor, fill: float) -> torch.Tensor:
    if t is None:
        return torch.full((x.shape[1],), fill, dtype=_acc(x), device=x.device)
    return t.to(_acc(x))


def clamp_gamma(w: torch.Tensor) -> torch.Tensor:
    lo = torch.full_like(w, GAMMA_MIN)
    return torch.where(w.abs() >= GAMMA_MIN, w, torch.where(w < 0, -lo, lo))


def _slope(param, z: torch.Tensor):
    """PReLU's (C,) slope, shaped to broadcast against z of shape (N, C, *)."""
    return param.to(z.dtype).reshape((1, -1) + (1,) * (z.dim() - 2))


def act_forward(z: torch.Tensor, activation: str, param) -> torch.Tensor:
    """`param`: the leaky slope or ELU alpha; for "prelu" the (C,) slope tensor."""
    if activation == "prelu":
        return torch.where(z > 0, z, z * _slope(param, z))
    if activation == "identity":
        return z
    if activation == "leaky_relu":
        return torch.where(z > 0, z, z * param)
    if activation == "elu":
        return torch.where(z > 0, z, param * torch.expm1(z))
    raise ValueError(f"effseg: unknown activation {activation!r}")


def act_inverse(y: torch.Tensor, activation: str, param) -> torch.Tensor:
    if activation == "prelu":
        return torch.where(y > 0, y, y / _slope(param, y))
    if activation == "identity":
        return y
    if activation == "leaky_relu":
        return torch.where(y > 0, y, y / param)
    if activation == "elu":
        floor = -1.0 + torch.finfo(y.dtype).eps
        return torch.where(y > 0, y, torch.log1p(torch.clamp(y / param, min=floor)))
    raise ValueError(f"effseg: unknown activation {activation!r}")


def act_derivative(y: torch.Tensor, activation: str, param) -> torch.Tensor:
    if activation == "prelu":
        return torch.where(y > 0, torch.ones_like(y), _slope(param, y).expand_as(y))
    if activation == "identity":
        return torch.ones_like(y)
    if activation == "leaky_relu":
        return torch.where(y > 0, torch.ones_like(y), torch.full_like(y, param))
    if activation == "elu":
        return torch.where(y > 0, torch.ones_like(y), y + param)
    raise ValueError(f"effseg: unknown activation {activation!r}")


def _reduce_dims(x: torch.Tensor, per_sample: bool) -> list[int]:
    return list(range(2, x.dim())) if per_sample else [0] + list(range(2, x.dim()))


def norm_stats(input: torch.Tensor, per_sample: bool):
    var, mean = torch.var_mean(input.to(_acc(input)), dim=_reduce_dims(input, per_sample),
                               correction=0)
    return mean, var


def norm_act_forward_(input, mean, var, weight, bias, eps, activation, activation_param):
    x = input.to(_acc(input))
    gamma = _bcast(clamp_gamma(_channel(weight, input, 1.0)), x)
    beta = _bcast(_channel(bias, input, 0.0), x)
    z = (x - _bcast(mean.to(x.dtype), x)) * torch.rsqrt(_bcast(var.to(x.dtype), x) + eps)
    input.copy_(act_forward(z * gamma + beta, activation, activation_param))


def _dz_xhat(output, grad_output, weight, bias, activation, activation_param):
    y = output.to(_acc(output))
    gamma = _bcast(clamp_gamma(_channel(weight, output, 1.0)), y)
    beta = _bcast(_channel(bias, output, 0.0), y)
    dz = grad_output.to(y.dtype) * act_derivative(y, activation, activation_param)
    xhat = (act_inverse(y, activation, activation_param) - beta) / gamma
    return dz, xhat, gamma


def norm_act_backward_reduce(output, grad_output, weight, bias, per_sample, activation,
                             activation_param):
    dz, xhat, _ = _dz_xhat(output, grad_output, weight, bias, activation, activation_param)
    dims = _reduce_dims(output, per_sample)
    return dz.sum(dims), (dz * xhat).sum(dims)


def norm_act_backward_input(output, grad_output, var, weight, bias, sum_dz, sum_dz_xhat, count,
                            eps, activation, activation_param):
    dz, xhat, gamma = _dz_xhat(output, grad_output, weight, bias, activation, activation_param)
    k1 = gamma * torch.rsqrt(_bcast(var.to(dz.dtype), dz) + eps)
    dx = k1 * dz
    if sum_dz is not None:
        if count is None:
            count = output.numel() // output.shape[1]
            if var.dim() == 2:
                count //= output.shape[0]
        dx = dx - k1 * (_bcast(sum_dz.to(dz.dtype), dz) + xhat * _bcast(
            sum_dz_xhat.to(dz.dtype), dz)) / count
    return dx.to(output.dtype)


def norm_act_backward_input_(output, grad_output, var, weight, bias, sum_dz, sum_dz_xhat, count,
                             eps, activation, activation_param):
    grad_output.copy_(norm_act_backward_input(output, grad_output, var, weight, bias, sum_dz,
                                              sum_dz_xhat, count, eps, activation,
                                              activation_param))


def _check_slope(slope: torch.Tensor) -> None:
    if not bool((slope > 0).all()):
        raise ValueError(f"effseg: prelu needs every slope > 0 to be invertible, got min "
                         f"{slope.min().item()}")


def norm_act_forward_prelu_(input, mean, var, weight, bias, eps, slope):
    _check_slope(slope)
    norm_act_forward_(input, mean, var, weight, bias, eps, "prelu", slope.to(_acc(input)))


def norm_act_backward_reduce_prelu(output, grad_output, weight, bias, slope, per_sample):
    _check_slope(slope)
    slope = slope.to(_acc(output))
    dz, xhat, _ = _dz_xhat(output, grad_output, weight, bias, "prelu", slope)
    y = output.to(_acc(output))
    dy_z = torch.where(y > 0, torch.zeros_like(y), grad_output.to(y.dtype) * y / _slope(slope, y))
    dims = _reduce_dims(output, per_sample)
    return dz.sum(dims), (dz * xhat).sum(dims), dy_z.sum(dims)


def norm_act_backward_input_prelu(output, grad_output, var, weight, bias, slope, sum_dz,
                                  sum_dz_xhat, count, eps):
    _check_slope(slope)
    return norm_act_backward_input(output, grad_output, var, weight, bias, sum_dz, sum_dz_xhat,
                                   count, eps, "prelu", slope.to(_acc(output)))




def _dice_ce_view(logits, labels, ignore_index):
    """Logits as (N, K, S) in the accumulation type, each voxel's class (0 where it is not a
    class), and masks of the voxels that count and of those whose label is invalid."""
    N, K = logits.shape[:2]
    z = logits.reshape(N, K, -1).to(_acc(logits))
    y = labels.reshape(N, -1).long()
    ignored = y == ignore_index
    valid = (y >= 0) & (y < K) & ~ignored
    return z, torch.where(valid, y, 0), valid, ~(valid | ignored)


def _class_weight(weight, z):
    if weight is None:
        return torch.ones(z.shape[1], dtype=z.dtype, device=z.device)
    return weight.to(z.dtype)


def dice_ce_forward(logits, labels, weight, ignore_index):
    z, cls, valid, invalid = _dice_ce_view(logits, labels, ignore_index)
    bad = int(invalid.sum())
    if bad:
        raise ValueError(
            f"effseg: labels: {bad} voxel(s) have a label outside [0, {z.shape[1]}) that is not "
            f"ignore_index ({ignore_index})"
        )
    p = torch.softmax(z, dim=1)
    onehot = (cls.unsqueeze(1) == torch.arange(z.shape[1], device=z.device).view(1, -1, 1)) & (
        valid.unsqueeze(1))
    zero = p.new_zeros(())
    stats = torch.stack([
        torch.where(onehot, p, zero).sum(2),
        torch.where(valid.unsqueeze(1), p, zero).sum(2),
        onehot.sum(2).to(p.dtype),
    ], dim=-1)
    w_y = torch.where(valid, _class_weight(weight, z)[cls], zero)
    nll = -torch.log_softmax(z, dim=1).gather(1, cls.unsqueeze(1)).squeeze(1)
    ce = torch.stack([torch.where(valid, w_y * nll, zero).sum(), w_y.sum()])
    return stats, ce


def dice_ce_backward(grad, logits, labels, weight, ignore_index, coef_dice, coef_ce):
    z, cls, valid, _ = _dice_ce_view(logits, labels, ignore_index)
    p = torch.softmax(z, dim=1)
    onehot = (cls.unsqueeze(1) == torch.arange(z.shape[1], device=z.device).view(1, -1, 1)) & (
        valid.unsqueeze(1))
    g = grad.to(z.dtype).reshape(())
    alpha, beta = coef_dice.to(z.dtype).unbind(-1)
    c = g * (beta.unsqueeze(-1) + onehot * alpha.unsqueeze(-1))
    cbar = (c * p).sum(1, keepdim=True)
    ce_w = g * coef_ce.to(z.dtype).reshape(()) * _class_weight(weight, z)[cls]
    dz = ce_w.unsqueeze(1) * (p - onehot.to(p.dtype)) + p * (c - cbar)
    dz = torch.where(valid.unsqueeze(1), dz, dz.new_zeros(()))
    return dz.to(logits.dtype).reshape(logits.shape)
