"""In-place activated normalization modules.

`InPlaceABN` replaces `nn.BatchNorm{1,2,3}d` followed by LeakyReLU/ELU/PReLU/identity,
`InPlaceABNSync` replaces `nn.SyncBatchNorm` followed by one of them (statistics over all ranks
of a process group), `InPlaceAIN` replaces `nn.InstanceNorm{1,2,3}d` and `InPlaceAGN`
`nn.GroupNorm` followed by one of them. Their parameters and buffers have exactly the names,
shapes and meaning of the stock norms, so state dicts load both ways; with
`activation="prelu"` the learnable slope is one more parameter, `slope` (shape (num_slopes,),
like `nn.PReLU.weight`), unless `effseg.convert` fused a stock PReLU, whose `weight` then stays
the slope, under its own key. The forward overwrites its input; for backward only the output
(in the input's storage), O(C) statistics and weight/bias (and the slope) are kept. See
`effseg.functional` for what they refuse.

Under `torch.export` (and so `torch.onnx.export(..., dynamo=True)`) the modules compute the
stock ops instead, out of place: `F.batch_norm` / `F.instance_norm` with the same statistics and
the same clamped weight, then the activation. The exported graph then holds only standard ATen
ops, which ONNX and other runtimes understand; eager mode (training, eval and inference) keeps
the in-place op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch.nn.modules.batchnorm import _NormBase

from .. import functional as F
from ..ops.reference import clamp_gamma
from ..ops import sync as _sync


class _Activation:
    """The fused activation of an in-place norm module; for "prelu", its learnable slope: the
    module's own `slope` parameter, or the `weight` of a stock nn.PReLU that `effseg.convert`
    fused into it (referenced, not registered, so that it keeps its state-dict key)."""

    def _init_activation(self, activation: str, activation_param: float | None, num_slopes: int,
                         num_features: int, device, dtype) -> None:
        self.activation, self.activation_param = F.resolve_activation(activation,
                                                                      activation_param)
        self._slope_source = None
        if self.activation != "prelu":
            return
        if num_slopes not in (1, num_features):
            raise ValueError(f"effseg: num_slopes must be 1 or num_features ({num_features}), "
                             f"got {num_slopes}")
        self.slope = torch.nn.Parameter(torch.full((num_slopes,), self.activation_param,
                                                   device=device, dtype=dtype))

    def fuse_prelu(self, prelu: torch.nn.PReLU) -> None:
        """Takes `prelu`'s weight as this module's slope, read at every call (so that loading a
        state dict into `prelu` or moving it changes what this module uses)."""
        self.activation, self.activation_param = "prelu", F.DEFAULT_PARAM["prelu"]
        self.slope = None
        object.__setattr__(self, "_slope_source", prelu)

    def _slope(self) -> torch.Tensor:
        src = self._slope_source
        return src.weight if src is not None else self.slope

    def _activation_arg(self):
        return self._slope() if self.activation == "prelu" else self.activation_param

    def _decomposed_activation(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation == "leaky_relu":
            return TF.leaky_relu(y, self.activation_param)
        if self.activation == "elu":
            return TF.elu(y, self.activation_param)
        if self.activation == "prelu":
            return TF.prelu(y, self._slope())
        return y

    def _activation_repr(self) -> str:
        if self.activation == "prelu":
            return f"activation=prelu, num_slopes={self._slope().numel()}"
        return f"activation={self.activation}, activation_param={self.activation_param}"


@dataclass
class NormStep:
    """What one forward call of a norm module does: which statistics it normalizes with, and
    which running statistics it updates with which factor."""

    per_sample: bool
    use_batch_stats: bool
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    momentum: float
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    # The process group whose ranks' batches are normalized together (None: this batch only).
    sync: _sync.SyncGroup | None = None


class _InPlaceNormAct(_Activation, _NormBase):
    per_sample = False

    def __init__(self, num_features: int, eps: float, momentum: float | None, affine: bool,
                 track_running_stats: bool, activation: str, activation_param: float | None,
                 num_slopes: int = 1, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self._init_activation(activation, activation_param, num_slopes, num_features, device,
                              dtype)

    def _momentum_factor(self) -> float:
        """Exponential-average factor for this step; momentum=None is a cumulative average."""
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum

    def _uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def step(self) -> NormStep:
        """The configuration of one forward call (counts the call in num_batches_tracked)."""
        factor = self._momentum_factor()
        batch = self._uses_batch_stats()
        # Running statistics are updated with batch statistics, and used without them.
        track = self.running_mean is not None and (not batch or self.track_running_stats)
        return NormStep(self.per_sample, batch, self.running_mean if track else None,
                        self.running_var if track else None, factor, self.eps, self.weight,
                        self.bias, self._sync_group(batch))

    def _sync_group(self, use_batch_stats: bool) -> _sync.SyncGroup | None:
        return None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        s = self.step()
        if torch.compiler.is_exporting():
            return self._decomposed(input, s)
        return F.norm_act_step(input, s, self.activation, self._activation_arg())

    def _decomposed(self, x: torch.Tensor, s: NormStep) -> torch.Tensor:
        """The same result from stock ops, out of place (what torch.export records)."""
        weight = None if s.weight is None else clamp_gamma(s.weight)
        if self.per_sample:
            y = TF.instance_norm(x, s.running_mean, s.running_var, weight, s.bias,
                                 s.use_batch_stats, s.momentum, s.eps)
        else:
            y = TF.batch_norm(x, s.running_mean, s.running_var, weight, s.bias,
                              s.use_batch_stats, s.momentum, s.eps)
        return self._decomposed_activation(y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._activation_repr()}"


class InPlaceABN(_InPlaceNormAct):
    """In-place activated batch norm: act(BatchNorm(x)) written into x.

    Args as `nn.BatchNorm3d`, plus `activation` ("leaky_relu", "elu", "prelu" or "identity";
    "relu" is refused because it cannot be inverted), `activation_param` (the leaky slope, the
    ELU alpha or PReLU's initial slope; None: 0.01, 1.0 and 0.25) and, for "prelu",
    `num_slopes` (1 or num_features, as nn.PReLU's num_parameters). Any input shape (N, C, *),
    contiguous or channels-last; float32/float64/float16/bfloat16.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float | None = None,
                 num_slopes: int = 1, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation,
                         activation_param, num_slopes, device, dtype)


class InPlaceAIN(_InPlaceNormAct):
    """In-place activated instance norm: act(InstanceNorm(x)) written into x.

    Args as `nn.InstanceNorm3d` (but `affine=True` by default, as nnU-Net uses it), plus
    `activation` and `activation_param` as in `InPlaceABN`. Statistics are per sample and
    channel; with `track_running_stats=True` the running statistics are their batch mean and eval
    mode uses them, as in torch.
    """

    per_sample = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = False,
                 activation: str = "leaky_relu", activation_param: float | None = None,
                 num_slopes: int = 1, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation,
                         activation_param, num_slopes, device, dtype)

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def _momentum_factor(self) -> float:
        # As nn.InstanceNorm: num_batches_tracked is never counted, and momentum=None leaves the
        # running statistics as they are (no cumulative average).
        return 0.0 if self.momentum is None else self.momentum


class InPlaceABNSync(InPlaceABN):
    """In-place activated batch norm whose training statistics are those of the global batch:
    the batches of all ranks of `process_group` (None: the default group), like
    `nn.SyncBatchNorm`.

    Per layer and step: one all-gather of 2C + 1 numbers in forward (uneven per-rank batch sizes
    are merged exactly), one all-reduce of 2C + 1 numbers in backward. The result equals
    `InPlaceABN` on the concatenated batch (outputs, running statistics, input gradients; the
    parameter gradients are this rank's share, summed across ranks by DDP's averaging as for
    every parameter). Eval mode is the local op (running statistics). Without an initialised
    torch.distributed it runs as `InPlaceABN` and warns once. All ranks must call it in the same
    order; a rank that dies makes the others fail with a RuntimeError within the process
    group's timeout.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float | None = None,
                 process_group=None, num_slopes: int = 1, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation,
                         activation_param, num_slopes, device, dtype)
        self.process_group = process_group

    def _sync_group(self, use_batch_stats: bool) -> _sync.SyncGroup | None:
        return _sync.resolve(self.process_group, use_batch_stats)


class InPlaceAGN(_Activation, torch.nn.Module):
    """In-place activated group norm: act(GroupNorm(x)) written into x.

    Args as `nn.GroupNorm` (`num_groups` groups of consecutive channels, statistics per sample
    and group in training and eval alike; weight and bias per channel, keys "weight" and
    "bias"), plus `activation`, `activation_param` and `num_slopes` as in `InPlaceABN`. Any input
    shape (N, C, *), contiguous or channels-last; float32/float64/float16/bfloat16.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, activation: str = "leaky_relu",
                 activation_param: float | None = None, num_slopes: int = 1, device=None,
                 dtype=None) -> None:
        super().__init__()
        if num_groups <= 0 or num_channels % num_groups:
            raise ValueError(f"effseg: num_channels ({num_channels}) must be divisible by "
                             f"num_groups ({num_groups})")
        self.num_groups, self.num_channels = num_groups, num_channels
        self.eps, self.affine = eps, affine
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = torch.nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._init_activation(activation, activation_param, num_slopes, num_channels, device,
                              dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            weight = None if self.weight is None else clamp_gamma(self.weight)
            return self._decomposed_activation(
                TF.group_norm(input, self.num_groups, weight, self.bias, self.eps))
        return F.inplace_agn(input, self.num_groups, self.weight, self.bias, self.eps,
                             self.activation, self._activation_arg())

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"{self._activation_repr()}")


class FusedPReLU(torch.nn.Module):
    """What an `nn.PReLU` becomes when `effseg.convert` fuses it into the norm before it: the
    identity in forward, holding the same `weight` parameter under the same state-dict key.
    The fused norm reads this module's weight as its slope at every call."""

    def __init__(self, prelu: torch.nn.PReLU) -> None:
        super().__init__()
        self.num_parameters = prelu.num_parameters
        self.weight = prelu.weight

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input

    def extra_repr(self) -> str:
        return f"num_parameters={self.num_parameters} (fused into the norm before it)"
