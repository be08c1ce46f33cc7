"""In-place activated normalization modules.

`InPlaceABN` replaces `nn.BatchNorm{1,2,3}d` followed by LeakyReLU/ELU/identity, and
`InPlaceAIN` replaces `nn.InstanceNorm{1,2,3}d` followed by one of them. Their parameters and
buffers have exactly the names, shapes and meaning of the stock norms, so state dicts load both
ways. The forward overwrites its input; for backward only the output (in the input's storage),
O(C) statistics and weight/bias are kept. See `effseg.functional` for what they refuse.
"""
from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _NormBase

from .. import functional as F


class _InPlaceNormAct(_NormBase):
    def __init__(self, num_features: int, eps: float, momentum: float | None, affine: bool,
                 track_running_stats: bool, activation: str, activation_param: float | None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation, self.activation_param = F.resolve_activation(activation,
                                                                      activation_param)

    def _momentum_factor(self) -> float:
        """Exponential-average factor for this step; momentum=None is a cumulative average."""
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, activation={self.activation}, "
                f"activation_param={self.activation_param}")


class InPlaceABN(_InPlaceNormAct):
    """In-place activated batch norm: act(BatchNorm(x)) written into x.

    Args as `nn.BatchNorm3d`, plus `activation` ("leaky_relu", "elu" or "identity"; "relu" is
    refused because it cannot be inverted) and `activation_param` (the leaky slope or the ELU
    alpha; None: 0.01 and 1.0). Any input shape (N, C, *), contiguous or channels-last;
    float32/float64/float16/bfloat16.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation,
                         activation_param, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        factor = self._momentum_factor()
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return F.inplace_abn(input, self.running_mean if track else None,
                             self.running_var if track else None, self.weight, self.bias,
                             use_batch_stats, factor, self.eps, self.activation,
                             self.activation_param)


class InPlaceAIN(_InPlaceNormAct):
    """In-place activated instance norm: act(InstanceNorm(x)) written into x.

    Args as `nn.InstanceNorm3d` (but `affine=True` by default, as nnU-Net uses it), plus
    `activation` and `activation_param` as in `InPlaceABN`. Statistics are per sample and
    channel; with `track_running_stats=True` the running statistics are their batch mean and eval
    mode uses them, as in torch.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = False,
                 activation: str = "leaky_relu", activation_param: float | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation,
                         activation_param, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        factor = self._momentum_factor()
        use_input_stats = self.training or not self.track_running_stats
        return F.inplace_ain(input, self.running_mean, self.running_var, self.weight, self.bias,
                             use_input_stats, factor, self.eps, self.activation,
                             self.activation_param)
