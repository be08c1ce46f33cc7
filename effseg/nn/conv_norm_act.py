"""Conv3d -> in-place activated norm, the unit every effseg block is built from.

`norm` and `act` take MONAI-style specs: a name or a `(name, kwargs)` tuple.
- norm: "batch" (InPlaceABN), "sync_batch" (InPlaceABNSync: statistics over all ranks; kwarg
  `process_group`) or "instance" (InPlaceAIN); kwargs go to the norm (eps, momentum, affine,
  track_running_stats).
- act: "leaky_relu" (kwarg `negative_slope`), "elu" (`alpha`), "identity" (or None), "relu".
  ReLU is not invertible, so a ConvNormAct3d with act="relu" normalizes with identity and applies
  a separate ReLU, which keeps one more tensor for backward; inside a RecomputeBlock3d ReLU is
  exact and free.
"""
from __future__ import annotations

from typing import Any, Union

import torch
from torch import nn

from .norm_act import InPlaceABN, InPlaceABNSync, InPlaceAIN

Spec = Union[str, None, tuple[str, dict[str, Any]]]

_ACT_PARAM = {"leaky_relu": "negative_slope", "elu": "alpha"}
NORMS = {"batch": InPlaceABN, "sync_batch": InPlaceABNSync, "instance": InPlaceAIN}


def _split(spec: Spec, what: str) -> tuple[str, dict[str, Any]]:
    if spec is None:
        return "identity", {}
    if isinstance(spec, str):
        return spec.lower(), {}
    if (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str)
            and isinstance(spec[1], dict)):
        return spec[0].lower(), dict(spec[1])
    raise TypeError(f"effseg: {what} must be a name or a (name, kwargs) tuple, got {spec!r}")


def parse_act(act: Spec) -> tuple[str, float | None]:
    """(activation name, its parameter) from a MONAI-style spec; 'relu' is returned as is."""
    name, kwargs = _split(act, "act")
    if name not in ("leaky_relu", "elu", "identity", "relu"):
        raise ValueError(
            f"effseg: unknown act {name!r}; expected 'leaky_relu', 'elu', 'relu' or 'identity'")
    key = _ACT_PARAM.get(name)
    unknown = set(kwargs) - ({key} if key else set()) - {"inplace"}
    if unknown:
        raise ValueError(f"effseg: act {name!r} takes no argument(s) {sorted(unknown)}")
    return name, kwargs.get(key) if key else None


def parse_norm(norm: Spec) -> tuple[type, dict[str, Any]]:
    name, kwargs = _split(norm, "norm")
    if name not in NORMS:
        raise ValueError(f"effseg: unknown norm {name!r}; expected one of {sorted(NORMS)}")
    return NORMS[name], kwargs


class ConvNormAct3d(nn.Module):
    """Conv3d (no bias: the norm's beta replaces it) followed by an in-place activated norm.

    Keeps for backward the conv's input and the norm's output (the conv output's own storage).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, norm: Spec = "batch",
                 act: Spec = ("leaky_relu", {"negative_slope": 0.01}),
                 padding: int | None = None, dilation: int = 1, groups: int = 1) -> None:
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding,
                              dilation, groups, bias=False)
        self.act_name, param = parse_act(act)
        norm_cls, norm_kwargs = parse_norm(norm)
        fused = "identity" if self.act_name == "relu" else self.act_name
        self.norm = norm_cls(out_channels, activation=fused, activation_param=param,
                             **norm_kwargs)
        self.relu = nn.ReLU() if self.act_name == "relu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"effseg: ConvNormAct3d expects a 5-D input (N, C, D, H, W), got "
                             f"shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"effseg: ConvNormAct3d expects a floating-point input, got {x.dtype}")
        if x.shape[1] != self.conv.in_channels:
            raise ValueError(f"effseg: ConvNormAct3d expects {self.conv.in_channels} input "
                             f"channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        y = self.norm(self.conv(x))
        return self.relu(y) if self.relu is not None else y
