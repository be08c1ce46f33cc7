"""Device and mixed-precision defaults shared by `train` and `predict`.

`--amp` names: "bf16" and "fp16" run the network under `torch.autocast` in that dtype ("fp16"
training adds a gradient scaler), "off" runs float32. The default is bf16 on GPUs that support it
(it keeps float32's range, so no scaler is needed) and float32 elsewhere, where a CPU run is a
check rather than a production run and should not trade accuracy for speed. The default device
is the GPU when one is visible.
"""
from __future__ import annotations

import torch

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16,
                                             "off": None}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_amp(device: torch.device) -> str:
    """bf16 on GPUs that support it, off elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "off"


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an `--amp` name (None: no autocast)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"effseg: amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    return AMP_DTYPES[amp]
