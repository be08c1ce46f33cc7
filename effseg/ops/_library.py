"""Loading of the compiled ops and the choice, per call, between them and the reference.

`effseg._C` registers the `torch.ops.effseg.*` ops (schemas in csrc/registry.cpp). When it cannot
be loaded (not built; built against another torch minor version or another CUDA, which is
refused before loading; or failing to load, e.g. with an undefined symbol), or when it has no
kernel for a device (a CPU-only build given CUDA tensors), effseg runs the pure-PyTorch reference
of the op instead and says so once. `python -m effseg info` shows why.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from . import reference


def _torch_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _flavour(cuda: str | None) -> str:
    return f"CUDA {cuda}" if cuda else "CPU-only"


def _fix(running_torch: str, running_cuda: str | None) -> str:
    tag = ("cu" + running_cuda.replace(".", "") if running_cuda else "cpu") + "torch" + \
        _torch_minor(running_torch)
    return ("rebuild effseg against the running torch (pip install --no-build-isolation -e . in a "
            f"checkout, or scripts/build_wheels.sh) or install the effseg wheel built for it "
            f"(version ending in +{tag})")


def build_mismatch(built_torch: str, built_cuda: str | None, running_torch: str,
                   running_cuda: str | None) -> str | None:
    """Why an effseg._C compiled against torch `built_torch` whose CUDA was `built_cuda` (None: a
    CPU build of torch) must not be loaded under torch `running_torch` with CUDA `running_cuda`,
    or None when it may. torch's C++ ABI changes between minor versions; the extension links the
    CUDA runtime and the CUDA libraries of the torch it was compiled against (a CPU build of
    torch has none, and a CPU-torch build lacks what a CUDA torch's headers declare)."""
    if _torch_minor(built_torch) != _torch_minor(running_torch):
        return (f"effseg._C was built against torch {built_torch} but torch {running_torch} is "
                f"running; {_fix(running_torch, running_cuda)}")
    if built_cuda != running_cuda:
        return (f"effseg._C was built against a {_flavour(built_cuda)} build of torch "
                f"({built_torch}) but the running torch {running_torch} is a "
                f"{_flavour(running_cuda)} build; {_fix(running_torch, running_cuda)}")
    return None


def _explain_import_error(exc: ImportError) -> str:
    text = str(exc)
    built = f"torch {BUILD.TORCH_VERSION}" if BUILD is not None else "another torch"
    if "undefined symbol" in text:
        # A library whose symbols differ from the headers it was compiled with: another torch
        # (or a torch of the same version built differently) than the one running.
        return (f"effseg._C does not fit the running torch {torch.__version__}: it was built "
                f"against {built} ({text}); {_fix(torch.__version__, torch.version.cuda)}")
    if isinstance(exc, ModuleNotFoundError) and exc.name == "effseg._C":
        return ("effseg._C is not built (pip install --no-build-isolation -e . in a checkout, or "
                "install an effseg wheel)")
    return f"effseg._C could not be loaded ({text})"


try:
    from effseg import _build_config as BUILD
except ImportError:  # a source tree that was never built
    BUILD = None


def _load_extension() -> str | None:
    """Loads effseg._C (registering its ops); returns why it was not loaded, or None."""
    if os.environ.get("EFFSEG_NO_EXTENSION", "0") == "1":
        return "EFFSEG_NO_EXTENSION=1 is set"
    if BUILD is not None:
        # Build records written before TORCH_CUDA_VERSION existed came from CUDA builds only.
        built_cuda = getattr(BUILD, "TORCH_CUDA_VERSION", BUILD.CUDA_VERSION)
        mismatch = build_mismatch(BUILD.TORCH_VERSION, built_cuda, torch.__version__,
                                  torch.version.cuda)
        if mismatch is not None:
            return mismatch
    try:
        from effseg import _C  # noqa: F401  (importing registers the ops)
    except ImportError as exc:
        return _explain_import_error(exc)
    return None


_LOAD_ERROR: str | None = _load_extension()
HAVE_EXTENSION = _LOAD_ERROR is None

OP_NAMES = (
    "norm_stats",
    "norm_act_forward_",
    "norm_act_backward_reduce",
    "norm_act_backward_input",
    "norm_act_backward_input_",
    "norm_act_forward_prelu_",
    "norm_act_backward_reduce_prelu",
    "norm_act_backward_input_prelu",
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


def _dice_ce_reads_in_place(x: torch.Tensor) -> bool:
    """dice_ce_ops.h's `flattens`: no element twice and no gap, and spatial axes that flatten to
    one strided axis (contiguous and channels-last logits)."""
    expected = 1
    for size, stride in sorted((v for v in zip(x.shape, x.stride()) if v[0] != 1),
                               key=lambda v: v[1]):
        if stride != expected:
            return False
        expected *= size
    spatial = [(n, st) for n, st in zip(x.shape[2:], x.stride()[2:]) if n != 1]
    return all(outer[1] == inner[1] * inner[0] for outer, inner in zip(spatial, spatial[1:]))


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

    @torch.library.register_fake("effseg::norm_act_forward_prelu_")
    def _forward_prelu_fake(input, mean, var, weight, bias, eps, slope):
        _check_devices(input, mean=mean, var=var, weight=weight, bias=bias, slope=slope)
        return None

    @torch.library.register_fake("effseg::norm_act_backward_reduce_prelu")
    def _backward_reduce_prelu_fake(output, grad_output, weight, bias, slope, per_sample):
        _check_devices(output, grad_output=grad_output, weight=weight, bias=bias, slope=slope)
        shape = _group_shape(output, per_sample)
        acc = _acc_dtype(output)
        return tuple(output.new_empty(shape, dtype=acc) for _ in range(3))

    @torch.library.register_fake("effseg::norm_act_backward_input_prelu")
    def _backward_input_prelu_fake(output, grad_output, var, weight, bias, slope, sum_dz,
                                   sum_dz_xhat, count, eps):
        _check_devices(output, grad_output=grad_output, var=var, weight=weight, bias=bias,
                       slope=slope, sum_dz=sum_dz, sum_dz_xhat=sum_dz_xhat)
        return torch.empty_like(output)

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
        # The kernel's gradient has the logits' layout where it reads them in place
        # (dice_ce_ops.h: dense, spatial axes flattening to one), else the contiguous copy's.
        return logits.new_empty_strided(logits.shape, logits.stride()) if _dice_ce_reads_in_place(
            logits) else logits.new_empty(logits.shape)
