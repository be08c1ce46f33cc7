"""StockUNet3d: the baseline every effseg memory ratio is measured against.

The topology of FullVolumeFCN built only from stock layers (`nn.Conv3d`, `nn.BatchNorm3d` or
`nn.InstanceNorm3d`, `nn.LeakyReLU`/`nn.ELU`/`nn.ReLU`, `nn.ConvTranspose3d`, `torch.cat`), no
recompute: what a user would write. Module names mirror FullVolumeFCN's, so
`FullVolumeFCN.to_stock()` maps weights one to one (the decoder's split skip/up convs become one
conv over the concatenation). `StockUNet3d.classic()` is the nnU-Net-like reference
configuration for parameter counts (widths 32, 64, 128, 256, 320, two convs per level).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn.conv_norm_act import Spec, parse_act
from ._unet import UNetBase

CLASSIC_CHANNELS = (32, 64, 128, 256, 320)
CLASSIC_STRIDES = (1, 2, 2, 2, 2)


def _norm(norm: Spec, channels: int) -> nn.Module:
    name, kwargs = (norm, {}) if isinstance(norm, str) else (norm[0], dict(norm[1]))
    kwargs.pop("activation", None)
    if name == "batch":
        return nn.BatchNorm3d(channels, **kwargs)
    if name == "sync_batch":
        return nn.SyncBatchNorm(channels, **kwargs)
    if name == "instance":
        kwargs.setdefault("affine", True)
        return nn.InstanceNorm3d(channels, **kwargs)
    raise ValueError(f"effseg: unknown norm {name!r}")


def _act(act: Spec) -> nn.Module:
    name, param = parse_act(act)
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01 if param is None else param)
    if name == "elu":
        return nn.ELU(1.0 if param is None else param)
    return nn.ReLU() if name == "relu" else nn.Identity()


class StockConvNormAct(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride, norm, act):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2,
                              bias=False)
        self.norm = _norm(norm, cout)
        self.act = _act(act)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class StockBlock(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride, norm, act):
        super().__init__()
        self.unit1 = StockConvNormAct(cin, cout, kernel_size, stride, norm, act)
        self.unit2 = StockConvNormAct(cout, cout, kernel_size, 1, norm, act)

    def forward(self, x):
        return self.unit2(self.unit1(x))


class StockDecoder(nn.Module):
    def __init__(self, low, skip, cout, up_stride, kernel_size, norm, act):
        super().__init__()
        self.up = nn.ConvTranspose3d(low, cout, up_stride, up_stride, bias=False)
        self.conv = nn.Conv3d(skip + cout, cout, kernel_size, padding=(kernel_size - 1) // 2,
                              bias=False)
        self.norm1 = _norm(norm, cout)
        self.act1 = _act(act)
        self.unit2 = StockConvNormAct(cout, cout, kernel_size, 1, norm, act)

    def forward(self, low, skip):
        h = self.conv(torch.cat([skip, self.up(low)], dim=1))
        return self.unit2(self.act1(self.norm1(h)))


class StockUNet3d(UNetBase):
    """Args as FullVolumeFCN (no `recompute`)."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                 channels: Sequence[int] = CLASSIC_CHANNELS,
                 strides: Sequence = CLASSIC_STRIDES, kernel_size: int = 3,
                 norm: Spec = "batch", act: Spec = ("leaky_relu", {"negative_slope": 0.01}),
                 deep_supervision: bool = False) -> None:
        super().__init__("StockUNet3d", spatial_dims, in_channels, out_channels, channels,
                         strides, deep_supervision)
        self._build(
            lambda ci, co, s, i: StockBlock(ci, co, kernel_size, s, norm, act),
            lambda low, skip, co, s, i: StockDecoder(low, skip, co, s, kernel_size, norm, act))

    @classmethod
    def classic(cls, in_channels: int = 1, out_channels: int = 2, norm: Spec = "instance",
                **kwargs) -> "StockUNet3d":
        """The nnU-Net-like reference: widths 32, 64, 128, 256, 320, two convs per level."""
        return cls(3, in_channels, out_channels, CLASSIC_CHANNELS, CLASSIC_STRIDES, norm=norm,
                   **kwargs)

    @classmethod
    def _like(cls, fcn) -> "StockUNet3d":
        enc = fcn.encoder[0]
        norm_name = "instance" if enc.unit1.norm.per_sample else "batch"
        norm_kwargs = {"eps": enc.unit1.norm.eps, "momentum": enc.unit1.norm.momentum,
                       "affine": enc.unit1.norm.affine,
                       "track_running_stats": enc.unit1.norm.track_running_stats}
        act_name = enc.unit1.act_name
        key = {"leaky_relu": "negative_slope", "elu": "alpha"}.get(act_name)
        act = (act_name, {key: enc.unit1.norm.activation_param} if key else {})
        return cls(3, fcn.in_channels, fcn.out_channels, fcn.channels, fcn.strides,
                   enc.unit1.conv.kernel_size[0], (norm_name, norm_kwargs), act,
                   fcn.deep_supervision)
