"""Loading of the compiled ops and the choice, per call, between them and the reference.

`effseg._C` registers the `torch.ops.effseg.*` ops (schemas in csrc/registry.cpp). When it cannot
be loaded (not built, or built against another torch), or when it has no kernel for a device (a
CPU-only build given CUDA tensors), effseg runs the pure-PyTorch reference of the op instead and
says so once.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from . import reference

_LOAD_ERROR: str | None = None


def _torch_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


try:
    from effseg import _build_config as BUILD
except ImportError:  # a source tree that was never built
    BUILD = None

if os.environ.get("EFFSEG_NO_EXTENSION", "0") == "1":
    _LOAD_ERROR = "EFFSEG_NO_EXTENSION=1 is set"
elif BUILD is not None and _torch_minor(BUILD.TORCH_VERSION) != _torch_minor(torch.__version__):
    _LOAD_ERROR = (
        f"effseg._C was built against torch {BUILD.TORCH_VERSION} but torch {torch.__version__} "
        "is running; rebuild effseg (pip install --no-build-isolation -e .) or install the wheel "
        "built for this torch"
    )
else:
    try:
        from effseg import _C  # noqa: F401  (importing registers the ops)
    except ImportError as exc:
        _LOAD_ERROR = f"effseg._C could not be loaded ({exc})"

HAVE_EXTENSION = _LOAD_ERROR is None

OP_NAMES = (
    "norm_stats",
    "norm_act_forward_",
    "norm_act_backward_reduce",
    "norm_act_backward_input",
    "norm_act_backward_input_",
    "dice_ce_forward",
    "dice_ce_backward",
)

_warned: set[str] = set()


def load_error() -> str | None:
    """Why the compiled extension is not in use, or None when it is."""
    return _LOAD_ERROR


def has_kernel(name: str, device_type: str) -> bool:
    """Whether `torch.ops.effseg.<name>` has a compiled kernel for `device_type` ('cpu', 'cuda')."""
    if not HAVE_EXTENSION:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"effseg::{name}", key
    )


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"effseg: {reason}; using the pure-PyTorch reference ops instead (same results, "
            "more memory and time).",
            RuntimeWarning,
            stacklevel=4,
        )


# Which implementation serves each (op, device type), decided once at import so that op() is a
# plain dict lookup that torch.compile traces without a graph break.
_COMPILED: dict[tuple[str, str], Callable] = {
    (name, dev): getattr(torch.ops.effseg, name)
    for name in OP_NAMES for dev in ("cpu", "cuda") if has_kernel(name, dev)
}


def op(name: str, device: torch.device) -> Callable:
    """The implementation of op `name` for tensors on `device`."""
    impl = _COMPILED.get((name, device.type))
    if impl is None:
        _warn_once(_LOAD_ERROR or f"effseg._C has no {device.type} kernels")
        impl = getattr(reference, name)
    return impl


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _group_shape(t: torch.Tensor, per_sample: bool) -> tuple[int, ...]:
    return (t.shape[0], t.shape[1]) if per_sample else (t.shape[1],)


def _check_devices(first: torch.Tensor, **others) -> None:
    """Tensors on different devices dispatch to the highest-priority device's kernel, which can
    be this fake one (a 'meta' weight beside a CPU input): refuse instead of doing nothing."""
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != first.device:
            raise ValueError(f"effseg: {name} is on {t.device} but the input is on {first.device}")


if HAVE_EXTENSION:
    # Fake kernels: shapes and dtypes only, for torch.compile, export and opcheck.
    @torch.library.register_fake("effseg::norm_stats")
    def _norm_stats_fake(input, per_sample):
        shape = _group_shape(input, per_sample)
        acc = _acc_dtype(input)
        return input.new_empty(shape, dtype=acc), input.new_empty(shape, dtype=acc)

    @torch.library.register_fake("effseg::norm_act_forward_")
    def _forward_fake(input, mean, var, weight, bias, eps, activation, activation_param):
        _check_devices(input, mean=mean, var=var, weight=weight, bias=bias)
        return None

    @torch.library.register_fake("effseg::norm_act_backward_reduce")
    def _backward_reduce_fake(output, grad_output, weight, bias, per_sample, activation,
                              activation_param):
        _check_devices(output, grad_output=grad_output, weight=weight, bias=bias)
        shape = _group_shape(output, per_sample)
        acc = _acc_dtype(output)
        return output.new_empty(shape, dtype=acc), output.new_empty(shape, dtype=acc)

    @torch.library.register_fake("effseg::norm_act_backward_input")
    def _backward_input_fake(output, grad_output, var, weight, bias, sum_dz, sum_dz_xhat, count,
                             eps, activation, activation_param):
        _check_devices(output, grad_output=grad_output, var=var, weight=weight, bias=bias,
                       sum_dz=sum_dz, sum_dz_xhat=sum_dz_xhat)
        return torch.empty_like(output)

    @torch.library.register_fake("effseg::norm_act_backward_input_")
    def _backward_input_inplace_fake(output, grad_output, var, weight, bias, sum_dz, sum_dz_xhat,
                                     count, eps, activation, activation_param):
        _check_devices(output, grad_output=grad_output, var=var, weight=weight, bias=bias,
                       sum_dz=sum_dz, sum_dz_xhat=sum_dz_xhat)
        return None

    @torch.library.register_fake("effseg::dice_ce_forward")
    def _dice_ce_forward_fake(logits, labels, weight, ignore_index):
        _check_devices(logits, labels=labels, weight=weight)
        acc = _acc_dtype(logits)
        return (logits.new_empty((logits.shape[0], logits.shape[1], 3), dtype=acc),
                logits.new_empty((2,), dtype=acc))

    @torch.library.register_fake("effseg::dice_ce_backward")
    def _dice_ce_backward_fake(grad, logits, labels, weight, ignore_index, coef_dice, coef_ce):
        _check_devices(logits, grad=grad, labels=labels, weight=weight, coef_dice=coef_dice,
                       coef_ce=coef_ce)
        return logits.new_empty(logits.shape)
