"""Functional in-place activated normalization.

`inplace_abn` (batch statistics per channel), `inplace_ain` (statistics per sample and
channel) and `inplace_agn` (statistics per sample and group of channels) overwrite their input
with act(weight * (x - mean) / sqrt(var + eps) + bias) and return it. For backward they keep
only that output, the per-group variance and weight/bias (and PReLU's slope): the activation and
the affine map are inverted to recover the normalized input. This halves the activation memory
of a Conv -> Norm -> Act unit compared with stock layers.

Activations: "leaky_relu" (slope > 0), "elu" (alpha > 0), "identity", and "prelu", whose
`activation_param` is its learnable slope tensor, shape (1,) or (C,) like `nn.PReLU.weight`, every
value > 0; its gradient comes out of the backward reduction.

What they refuse, with a ValueError or TypeError naming the argument:
- `activation="relu"`: ReLU is not invertible; use "leaky_relu" or a recomputing block;
- a PReLU slope <= 0 (not invertible), or one that is not a (1,) or (C,) floating tensor;
- group norm: channels not divisible by `num_groups`; one value per sample and group;
- an input that is not (N, C, *), not floating point, empty, or neither contiguous nor
  channels-last (an in-place op cannot silently work on a copy);
- parameters or statistics whose shape, dtype or device do not match the input;
- one value per channel (batch) or per sample and channel (instance) with batch statistics;
- a leaf tensor that requires grad (it would be overwritten).

|weight| below 1e-4 is replaced by 1e-4 with the same sign (1e-4 for 0), in forward and backward
alike, since backward divides by it; gradients still flow to the stored weight.
NaN and Inf in the input propagate to the output of their group; they are never hidden.
"""
from __future__ import annotations

import torch

from .ops import norm_act
from .ops.group_norm_act import group_norm_act
from .ops.sync import resolve as _resolve_sync

ACTIVATIONS = ("leaky_relu", "elu", "identity", "prelu")
# prelu: the initial slope of a module's learnable slope, as nn.PReLU's `init`.
DEFAULT_PARAM = {"leaky_relu": 0.01, "elu": 1.0, "identity": 0.0, "prelu": 0.25}


def resolve_activation(activation: str, activation_param: float | None) -> tuple[str, float]:
    """Checks an activation name and its parameter; None takes the activation's usual default
    (slope 0.01 for leaky_relu, alpha 1.0 for elu, initial slope 0.25 for prelu)."""
    if not isinstance(activation, str):
        raise TypeError(f"effseg: activation must be a string, got {type(activation).__name__}")
    if activation == "relu":
        raise ValueError(
            "effseg: activation 'relu' is not invertible, so an in-place normalization could not "
            "recover its input in backward. Use activation='leaky_relu' (e.g. slope 0.01, as "
            "nnU-Net does), or a recomputing block (effseg.nn.RecomputeBlock3d), which supports "
            "exact ReLU."
        )
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"effseg: unknown activation {activation!r}; expected one of {ACTIVATIONS}"
        )
    param = DEFAULT_PARAM[activation] if activation_param is None else float(activation_param)
    if activation == "leaky_relu" and not param > 0:
        raise ValueError(
            f"effseg: leaky_relu needs a slope > 0 to be invertible, got {param}; a slope of 0 "
            "is ReLU (see activation='relu')"
        )
    if activation == "elu" and not param > 0:
        raise ValueError(f"effseg: elu needs alpha > 0 to be invertible, got {param}")
    if activation == "prelu" and not param > 0:
        raise ValueError(f"effseg: prelu needs a slope > 0 to be invertible, got {param}")
    return activation, param


def check_slope(slope, x: torch.Tensor) -> torch.Tensor:
    """PReLU's slope checked against the input x; returned as (C,) (a (1,) slope expanded, so
    that its gradient is the sum over the channels)."""
    if not isinstance(slope, torch.Tensor):
        raise TypeError("effseg: activation 'prelu' takes its slope tensor as activation_param "
                        f"(shape (1,) or (C,), like nn.PReLU.weight), got {type(slope).__name__}")
    _check_tensor("PReLU slope (activation_param)", slope, x, ((1,), (x.shape[1],)))
    # Reading the values synchronizes with a GPU once per call; a traced graph cannot branch on
    # them, so under torch.compile the kernels' own check (CPU) or the eager run is the guard.
    if not torch.compiler.is_compiling() and not bool((slope.detach() > 0).all()):
        raise ValueError(
            f"effseg: prelu needs every slope > 0 to be invertible (backward recovers the input "
            f"from the output), got min {slope.detach().min().item():.4g}; a slope that training "
            "drives to 0 or below cannot be fused in place")
    return slope.expand(x.shape[1])


def _check_tensor(name: str, t, x: torch.Tensor, shapes: tuple[tuple[int, ...], ...]) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"effseg: {name} must be a tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"effseg: {name} must be floating point, got {t.dtype}")
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(
            f"effseg: {name} must have shape {want} to match the input's {x.shape[1]} channels, "
            f"got {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise ValueError(f"effseg: {name} is on {t.device} but the input is on {x.device}")


def check_input(x, name: str = "input") -> None:
    """The checks every in-place norm-act op applies to its input tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"effseg: {name} must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"effseg: {name} must have shape (N, C, *), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"effseg: {name} must be float64, float32, float16 or bfloat16, got {x.dtype}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"effseg: {name} is an empty batch (shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"effseg: {name} has no elements (shape {tuple(x.shape)})")
    channels_last = (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)) or (
        x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    if not (x.is_contiguous() or channels_last):
        raise ValueError(
            f"effseg: {name} must be contiguous or channels-last (strides {x.stride()}); an "
            "in-place op cannot work on a copy. Call .contiguous() first."
        )
    if x.requires_grad and x.is_leaf and torch.is_grad_enabled():
        raise RuntimeError(
            f"effseg: {name} is a leaf tensor that requires grad; the in-place op would "
            "overwrite it. Pass the output of another layer, or input.clone()."
        )


def _activation_args(x, activation, activation_param):
    """(activation, scalar parameter, slope tensor or None), checked."""
    if activation == "prelu":
        return "prelu", 0.0, check_slope(activation_param, x)
    return (*resolve_activation(activation, activation_param), None)


def _norm_act(x, running_mean, running_var, weight, bias, use_batch_stats, per_sample, momentum,
              eps, activation, activation_param, sync=None):
    check_input(x)
    activation, activation_param, slope = _activation_args(x, activation, activation_param)
    C = x.shape[1]
    _check_tensor("weight", weight, x, ((C,),))
    _check_tensor("bias", bias, x, ((C,),))
    _check_tensor("running_mean", running_mean, x, ((C,),))
    _check_tensor("running_var", running_var, x, ((C,),))
    if (running_mean is None) != (running_var is None):
        raise ValueError("effseg: running_mean and running_var must be given together")
    if not use_batch_stats and running_mean is None:
        raise ValueError(
            "effseg: running_mean and running_var are required when batch statistics are not "
            "used (eval mode)"
        )
    if use_batch_stats:
        count = x.numel() // C // (x.shape[0] if per_sample else 1)
        if count <= 1:
            what = "sample and channel" if per_sample else "channel"
            raise ValueError(
                f"effseg: expected more than 1 value per {what} to compute statistics, got "
                f"input of shape {tuple(x.shape)}"
            )
    if momentum is None or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"effseg: momentum must be a number in [0, 1], got {momentum}")
    if not float(eps) > 0:
        raise ValueError(f"effseg: eps must be > 0, got {eps}")
    return norm_act(x, weight, bias, running_mean, running_var, bool(use_batch_stats),
                    per_sample, float(momentum), float(eps), activation, activation_param,
                    sync if use_batch_stats else None, slope)


def norm_act_step(input: torch.Tensor, step, activation: str,
                  activation_param: float | None) -> torch.Tensor:
    """One forward call of a norm module as described by its `NormStep` (effseg.nn)."""
    return _norm_act(input, step.running_mean, step.running_var, step.weight, step.bias,
                     step.use_batch_stats, step.per_sample, step.momentum, step.eps, activation,
                     activation_param, step.sync)


def inplace_abn(input: torch.Tensor, running_mean: torch.Tensor | None,
                running_var: torch.Tensor | None, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, training: bool = False,
                momentum: float = 0.1, eps: float = 1e-5, activation: str = "leaky_relu",
                activation_param: float | None = None) -> torch.Tensor:
    """In-place activated batch norm; arguments as `torch.nn.functional.batch_norm`.

    With `training=True` the statistics are the batch's, per channel over (N, *), and the running
    statistics (when given) are updated with the unbiased variance; otherwise the running
    statistics are used. Returns `input`, overwritten.
    """
    return _norm_act(input, running_mean, running_var, weight, bias, training, False, momentum,
                     eps, activation, activation_param)


def inplace_abn_sync(input: torch.Tensor, running_mean: torch.Tensor | None,
                     running_var: torch.Tensor | None, weight: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, training: bool = False,
                     momentum: float = 0.1, eps: float = 1e-5, activation: str = "leaky_relu",
                     activation_param: float | None = None,
                     process_group=None) -> torch.Tensor:
    """`inplace_abn` whose training statistics and backward sums are combined over the ranks of
    `process_group` (None: the default group); see `effseg.nn.InPlaceABNSync`. Without an
    initialised torch.distributed it is `inplace_abn` (one warning)."""
    return _norm_act(input, running_mean, running_var, weight, bias, training, False, momentum,
                     eps, activation, activation_param, _resolve_sync(process_group, training))


def inplace_ain(input: torch.Tensor, running_mean: torch.Tensor | None = None,
                running_var: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, use_input_stats: bool = True,
                momentum: float = 0.1, eps: float = 1e-5, activation: str = "leaky_relu",
                activation_param: float | None = None) -> torch.Tensor:
    """In-place activated instance norm; arguments as `torch.nn.functional.instance_norm`.

    With `use_input_stats=True` the statistics are per sample and channel over the spatial
    dimensions, and the running statistics (when given) are updated with their mean over the
    batch; otherwise the running statistics are used. Returns `input`, overwritten.
    """
    return _norm_act(input, running_mean, running_var, weight, bias, use_input_stats, True,
                     momentum, eps, activation, activation_param)


def inplace_agn(input: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, eps: float = 1e-5,
                activation: str = "leaky_relu",
                activation_param: float | torch.Tensor | None = None) -> torch.Tensor:
    """In-place activated group norm; arguments as `torch.nn.functional.group_norm`.

    Statistics per sample and group of C / num_groups consecutive channels, in training and
    eval alike (group norm has no running statistics); weight and bias per channel. Returns
    `input`, overwritten.
    """
    check_input(input)
    C = input.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"effseg: num_groups must be a positive int, got {num_groups!r}")
    if C % num_groups:
        raise ValueError(f"effseg: the input's {C} channels are not divisible by num_groups "
                         f"({num_groups})")
    activation, activation_param, slope = _activation_args(input, activation, activation_param)
    _check_tensor("weight", weight, input, ((C,),))
    _check_tensor("bias", bias, input, ((C,),))
    if input.numel() // (input.shape[0] * num_groups) <= 1:
        raise ValueError(
            f"effseg: expected more than 1 value per sample and group to compute statistics, got "
            f"input of shape {tuple(input.shape)} with {num_groups} groups")
    if not float(eps) > 0:
        raise ValueError(f"effseg: eps must be > 0, got {eps}")
    return group_norm_act(input, num_groups, weight, bias, float(eps), activation,
                          activation_param, slope)
