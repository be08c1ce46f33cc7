"""effseg norms in MONAI's `Norm` factory.

`register()` adds three entries to `monai.networks.layers.factories.Norm`:
- "effseg_batch": `InPlaceABN` with `activation="identity"`, defaults as `nn.BatchNorm{1,2,3}d`;
- "effseg_instance": `InPlaceAIN` with `activation="identity"`, defaults as
  `nn.InstanceNorm{1,2,3}d` (affine=False, track_running_stats=False), as MONAI's "instance";
- "effseg_group": `InPlaceAGN` with `activation="identity"`, arguments as MONAI's "group"
  (`("effseg_group", {"num_groups": 8})`; the channels come from the block).
The same class serves every spatial dimension. Their state dicts equal those of MONAI's "batch" /
"instance" / "group" norms, so weights load both ways. MONAI's activation factory needs no entry:
`convert` fuses its stock "leakyrelu", "elu" and "prelu" (MONAI's default) modules.

So `UNet(..., norm="effseg_batch")` builds with in-place norms. MONAI's blocks still apply their
own activation module after the norm, so that entry alone does not fuse the activation: the norm
keeps its output (in the convolution's storage) and the activation keeps its input, the same
tensor, which saves one of the three tensors a stock conv -> norm -> LeakyReLU keeps. Then
`effseg.convert(model)` fuses each norm with the LeakyReLU / ELU after it where the data flow
allows (see `effseg.convert`), which saves the second. An in-place activation module
(`inplace=True`) directly after such a norm overwrites what the norm keeps for backward, and
autograd raises an error in backward: use an out-of-place activation, or convert the model.

MONAI is optional: importing effseg does not import it; `register()` raises an ImportError
saying how to install it.
"""
from __future__ import annotations

from functools import partial

from ..nn.norm_act import InPlaceABN, InPlaceAGN, InPlaceAIN

ENTRIES = {
    "effseg_batch": partial(InPlaceABN, activation="identity"),
    "effseg_instance": partial(InPlaceAIN, activation="identity", affine=False,
                               track_running_stats=False),
    "effseg_group": partial(InPlaceAGN, activation="identity"),
}


def _factory(name: str, constructor: partial):
    def factory(dim: int = 3) -> partial:
        if dim not in (1, 2, 3):
            raise ValueError(f"effseg: Norm[{name!r}] supports spatial dims 1, 2 and 3, got "
                             f"{dim!r}")
        return constructor
    factory.__doc__ = (f"effseg {constructor.func.__name__} (activation='identity') for 1-3 "
                       "spatial dims; the in-place drop-in for MONAI's "
                       f"{name.split('_')[1]!r} norm.")
    return factory


def register() -> tuple[str, ...]:
    """Adds the effseg entries to MONAI's Norm factory (again: no change) and returns their
    names."""
    try:
        from monai.networks.layers.factories import Norm
    except ImportError as e:
        raise ImportError(
            "effseg.monai.register() needs MONAI, which is not installed: pip install monai "
            "(or pip install 'effseg[monai]')") from e
    for name, constructor in ENTRIES.items():
        if name.upper() not in Norm.names:
            Norm.add_factory_callable(name, _factory(name, constructor))
    return tuple(ENTRIES)


__all__ = ["ENTRIES", "register"]
