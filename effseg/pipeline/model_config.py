"""Named network configurations, and the network built from one stored as primitives.

A configuration is a plain dict (so a checkpoint loaded with `weights_only=True` can carry it):

    {"arch": "fcn" | "stock", "in_channels": 1, "out_channels": K,
     "channels": [16, 32, 64, 128], "strides": [1, 2, 2, 2], "norm": "instance",
     "deep_supervision": False}

(`deep_supervision` may be absent: False, as in configurations written before it existed.)

`arch` "fcn" is `FullVolumeFCN` (effseg's recomputing blocks), "stock" its `StockUNet3d` twin of
the same topology and parameters, the baseline a memory comparison needs. Presets (`PRESETS`)
name widths and strides (`large` was called `default`, a name still read); `--channels`/`--strides` override them. Keep 16 channels or more at full
resolution: with 8, the few channels of the last layer are taken by the large classes, and a
class that looks like another (the left and the right lung) can stay unlearned. On the phantom
(lr 3e-3, 60 to 120 steps) one lung stayed at Dice 0 in 4 of 7 seeds with 8 channels and in none
of 12 with 16. `tiny` is for smoke tests only.

Instance norm is the default: a whole-volume batch is one or two volumes, and instance statistics
are the same in training and inference, where batch statistics would be replaced by running
estimates of very few samples.

Refused, as ValueError naming the field: an unknown arch, preset or norm, channels and strides of
different lengths, non-positive widths or strides, fewer than two levels, fewer than two classes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..models import FullVolumeFCN

PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "tiny": ((4, 8, 16), (1, 2, 2)),
    "small": ((16, 32, 64, 128), (1, 2, 2, 2)),
    "large": ((16, 32, 64, 128, 160), (1, 2, 2, 2, 2)),
}
# Old names, still read (runs stored them): "default" was never the default preset.
PRESET_ALIASES = {"default": "large"}
ARCHS = ("fcn", "stock")
NORMS = ("instance", "batch")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _checked_strides(strides) -> list:
    """Per-level strides: an int, or a [d, h, w] list of ints (the form JSON keeps)."""
    if not isinstance(strides, (list, tuple)) or not strides:
        raise ValueError(f"effseg: model strides must be a non-empty list, got {strides!r}")
    out = []
    for s in strides:
        if isinstance(s, (list, tuple)) and len(s) == 3 and all(map(_is_positive_int, s)):
            out.append(list(s))
        elif _is_positive_int(s):
            out.append(s)
        else:
            raise ValueError(f"effseg: a stride must be a positive int or 3 of them, got {s!r}")
    return out


def model_config(preset: str = "small", arch: str = "fcn", in_channels: int = 1,
                 out_channels: int = 2, channels: Sequence[int] | None = None,
                 strides: Sequence | None = None, norm: str = "instance",
                 deep_supervision: bool = False) -> dict:
    """A checked configuration from a preset name, with optional overrides."""
    preset = PRESET_ALIASES.get(preset, preset)
    if preset not in PRESETS:
        raise ValueError(f"effseg: unknown model preset {preset!r}; expected one of "
                         f"{sorted(PRESETS)}")
    preset_channels, preset_strides = PRESETS[preset]
    channels = list(channels) if channels is not None else list(preset_channels)
    if strides is None:
        # A custom depth keeps the preset's pattern: full resolution first, then halve.
        strides = [1] + [2] * (len(channels) - 1) if len(channels) != len(preset_strides) \
            else list(preset_strides)
    return checked_config({"arch": arch, "in_channels": in_channels,
                           "out_channels": out_channels, "channels": channels,
                           "strides": list(strides), "norm": norm,
                           "deep_supervision": deep_supervision})


def checked_config(config: Mapping) -> dict:
    """`config` with every field checked (it may come from a file)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"effseg: a model configuration must be a mapping, got {config!r}")
    missing = [k for k in ("arch", "in_channels", "out_channels", "channels", "strides", "norm")
               if k not in config]
    if missing:
        raise ValueError(f"effseg: model configuration lacks {missing}")
    if config["arch"] not in ARCHS:
        raise ValueError(f"effseg: model arch must be one of {ARCHS}, got {config['arch']!r}")
    if config["norm"] not in NORMS:
        raise ValueError(f"effseg: model norm must be one of {NORMS}, got {config['norm']!r}")
    in_channels, out_channels = config["in_channels"], config["out_channels"]
    if not _is_positive_int(in_channels):
        raise ValueError(f"effseg: in_channels must be a positive int, got {in_channels!r}")
    if not _is_positive_int(out_channels) or out_channels < 2:
        raise ValueError(f"effseg: out_channels (classes, background included) must be an int "
                         f">= 2, got {out_channels!r}")
    channels = config["channels"]
    if not isinstance(channels, (list, tuple)) or not all(map(_is_positive_int, channels)):
        raise ValueError(f"effseg: model channels must be a list of positive ints, got "
                         f"{channels!r}")
    channels = list(channels)
    strides = _checked_strides(config["strides"])
    if len(channels) < 2 or len(channels) != len(strides):
        raise ValueError(f"effseg: model needs >= 2 levels and one stride per level, got "
                         f"channels {channels} and strides {strides}")
    deep_supervision = config.get("deep_supervision", False)
    if not isinstance(deep_supervision, bool):
        raise ValueError(f"effseg: deep_supervision must be a bool, got {deep_supervision!r}")
    return {"arch": config["arch"], "in_channels": in_channels, "out_channels": out_channels,
            "channels": channels, "strides": strides, "norm": config["norm"],
            "deep_supervision": deep_supervision}


def build_model(config: Mapping) -> nn.Module:
    """The network a configuration describes, freshly initialized (torch's global RNG; the
    stock arch gets the initial weights of the FullVolumeFCN it twins)."""
    c = checked_config(config)
    strides = [tuple(s) if isinstance(s, list) else s for s in c["strides"]]
    fcn = FullVolumeFCN(3, c["in_channels"], c["out_channels"], tuple(c["channels"]), strides,
                        norm=c["norm"], deep_supervision=c["deep_supervision"])
    # The stock twin starts from the very weights the FullVolumeFCN of the same seed would:
    # two runs that differ only in --arch then differ only in their layers' arithmetic.
    return fcn if c["arch"] == "fcn" else fcn.to_stock()


def describe(config: Mapping) -> str:
    """One line naming the network, e.g. for the start of a training log."""
    name = "FullVolumeFCN" if config["arch"] == "fcn" else "StockUNet3d"
    return (f"{name}(channels={tuple(config['channels'])}, strides={tuple(config['strides'])}, "
            f"norm={config['norm']}, classes={config['out_channels']}"
            f"{', deep supervision' if config.get('deep_supervision') else ''})")
