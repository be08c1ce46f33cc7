"""The program a forward converted by `effseg.convert(model, recompute=True)` runs.

A traced forward becomes a list of steps over numbered values, each value dropped after its last
use. A segment step runs its own program through `effseg.checkpoint` (only its inputs and O(C)
statistics kept; recomputed in backward with the statistics replayed), or plainly where
`recompute="auto"` or the cost policy of `recompute=True` chose so. Inside segments, stock batch
and instance norms replay their statistics out of place (`effseg.ops.replay_norm`), and a
convolution over a channel concatenation runs on the parts with its weight slices
(`_split_conv`); a convolution whose weight is larger than its input adds its weight gradient
into `.grad` a slice at a time (`effseg.ops.grad_into`). `RecomputedForward`, stored on the
module instance, runs the program in training with gradients and the module's own
forward otherwise. `effseg.integrations.recompute_convert` builds the programs.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.fx.node import map_aggregate

from ..checkpoint import checkpoint
from .convert import _INSTANCE
from ..ops import grad_into, replay
from ..ops.replay_norm import replayed_norm

_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class _Slot:
    """A value of the program, by its index in the environment."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i

    def __deepcopy__(self, memo):
        return self


@dataclass
class _Step:
    kind: str  # attr | module | function | method | norm | conv | split_conv | segment | output
    target: Any
    args: Any
    kwargs: Any
    out: int
    free: tuple[int, ...] = ()


@dataclass
class _Program:
    steps: list[_Step]
    size: int
    inputs: list[int]  # slots of the inputs, in order
    index: int = -1  # a segment's: its place in the report
    recompute: bool = True  # a segment's: run through the checkpoint, or plainly


def _load(env: list, a):
    return map_aggregate(a, lambda v: env[v.i] if isinstance(v, _Slot) else v)


# The largest tensor (elements) the latest forward of each converted root module produced: a
# weight gradient is sliced only down to about twice that (`grad_into.conv_grads`), since a
# transient of that size sets no peak where tensors of that size are kept for backward.
_LARGEST: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def _part_conv(root: nn.Module, conv: nn.Module, part: torch.Tensor, start: int,
               bias: bool) -> torch.Tensor:
    return grad_into.conv(conv, part, (start, part.shape[1]), bias, _LARGEST.get(root, 0))


def _conv(root: nn.Module, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A convolution step: where its weight is larger than its input (deep levels), its weight
    gradient goes into `.grad` a slice at a time (`effseg.ops.grad_into`); elsewhere the module
    runs as it is."""
    if conv.weight.numel() > x.numel() and grad_into.usable(conv, x):
        return grad_into.conv(conv, x, scale=_LARGEST.get(root, 0))
    return conv(x)


def _upsampled_part_conv(root: nn.Module, chain: "_Program", conv_path: str, start: int,
                         bias: bool, *inputs) -> tuple[torch.Tensor, int]:
    part = _run(chain, root, inputs)
    return _part_conv(root, root.get_submodule(conv_path), part, start, bias), part.shape[1]


def _chain_params(root: nn.Module, chain: "_Program") -> list[torch.Tensor]:
    found: dict[int, torch.Tensor] = {}
    for s in chain.steps:
        if s.kind in ("module", "conv", "norm"):
            found.update((id(p), p) for p in root.get_submodule(s.target).parameters())
        elif s.kind == "attr":
            value = _fetch(root, s.target)
            if isinstance(value, torch.Tensor):
                found[id(value)] = value
    return list(found.values())


class _Link:
    """What the two Functions of a lazily upsampled part share: the random state before the
    chain ran, which inputs require grad, and the chain recomputed with autograd by the
    convolution's backward for the chain's backward (its output's gradient edge, its leaves)."""

    __slots__ = ("root", "chain", "inputs", "needs", "rng", "graph")

    def recompute(self) -> torch.Tensor:
        """The part again, with autograd, under the random state of the forward."""
        cpu_state, device_states = self.rng
        devices = [d for d, _ in device_states]
        with torch.random.fork_rng(devices=devices, device_type=devices[0].type if devices
                                   else "cuda"), torch.enable_grad():
            torch.set_rng_state(cpu_state)
            for d, state in device_states:
                torch.get_device_module(d).set_rng_state(state, d)
            leaves = [t.detach().requires_grad_(need) for t, need in zip(self.inputs,
                                                                          self.needs)]
            part = _run(self.chain, self.root, leaves)
        self.graph = (get_gradient_edge(part) if part.requires_grad else None, leaves)
        return part


class _UpsampledPart(torch.autograd.Function):
    """The upsampled part of a concatenation: `chain(*inputs)`, keeping nothing for backward
    (the convolution's backward, `_PartConv`, computes it again and leaves the graph here)."""

    @staticmethod
    def forward(ctx, link: _Link, n_inputs: int, *tensors):
        inputs = tensors[:n_inputs]
        devices = sorted({t.device for t in inputs if t.device.type != "cpu"}, key=str)
        link.rng = (torch.get_rng_state(), [(d, torch.get_device_module(d).get_rng_state(d))
                                            for d in devices])
        link.needs = [t.requires_grad for t in inputs]
        ctx.link, ctx.params = link, tensors[n_inputs:]
        return _run(link.chain, link.root, inputs)

    @staticmethod
    def backward(ctx, dpart):
        edge, leaves = ctx.link.graph
        ctx.link.graph = None
        needs = ctx.needs_input_grad[2:]
        wanted = [t for t, need in zip(leaves + list(ctx.params), needs) if need]
        found = iter(torch.autograd.grad(edge, wanted, dpart, allow_unused=True)
                     if wanted and edge is not None else [None] * len(wanted))
        return (None, None, *(next(found) if need else None for need in needs))


class _PartConv(torch.autograd.Function):
    """The convolution of an upsampled part (from `_UpsampledPart`) with its weight slice,
    keeping the part's inputs instead of the part: backward computes the part again with
    autograd (`_Link.recompute`), the convolution's gradients by hand (its weight gradient into
    `.grad` where safe, `effseg.ops.grad_into`), and hands the part's graph to the chain's
    backward. The part lives only while a convolution needs it, in forward and backward alike,
    the output gradient is released before the chain's backward runs, and only the upsampling
    runs again, not the convolution."""

    @staticmethod
    def forward(ctx, link: _Link, spec, node, weight, bias, part, *inputs):
        ctx.link, ctx.spec, ctx.node, ctx.has_bias = link, spec, node, bias is not None
        ctx.save_for_backward(weight, *inputs)
        return grad_into.conv_forward(part, weight, bias, spec)

    @staticmethod
    def backward(ctx, g):
        weight, *inputs = ctx.saved_tensors
        link = ctx.link
        link.inputs = inputs
        part = link.recompute()
        link.inputs = None
        need_part = ctx.needs_input_grad[5]
        dpart, dw, db = grad_into.conv_grads(g, part.detach(), weight, ctx.spec, ctx.node,
                                             need_part, ctx.needs_input_grad[3],
                                             ctx.needs_input_grad[4] and ctx.has_bias)
        return (None, None, None, dw, db, dpart, *(None for _ in inputs))


def _lazy_part_conv(root: nn.Module, conv: nn.Module, conv_path: str, chain: "_Program",
                    inputs: list, start: int, bias: bool) -> tuple[torch.Tensor, int]:
    """The convolution of an upsampled part (`_split_conv`); under autocast, or where the
    convolution is not one `effseg.ops.grad_into` handles, through a nested checkpoint (the
    convolution then runs again in backward)."""
    tensors = all(isinstance(t, torch.Tensor) for t in inputs)
    if not tensors or not inputs or torch.is_autocast_enabled(inputs[0].device.type) or (
            conv.padding_mode != "zeros" or inputs[0].dtype != conv.weight.dtype):
        return checkpoint(_upsampled_part_conv, root, chain, conv_path, start, bias, *inputs)
    link = _Link()
    link.root, link.chain, link.graph = root, chain, None
    part = _UpsampledPart.apply(link, len(inputs), *inputs, *_chain_params(root, chain))
    spec = grad_into.ConvSpec.of(conv, (start, part.shape[1]), _LARGEST.get(root, 0))
    return _PartConv.apply(link, spec, grad_into.accumulate_node(conv.weight), conv.weight,
                           conv.bias if bias else None, part, *inputs), part.shape[1]


def _split_conv(root: nn.Module, conv_path: str, parts: list) -> torch.Tensor:
    """conv(cat(parts, 1)) as the sum of the convolutions of the parts with their weight
    slices: the concatenation never exists. A part given as (chain program, its inputs) is an
    upsampling (and what follows it up to the concatenation) computed lazily
    (`_lazy_part_conv`): it lives only while its convolution runs, in forward and in backward
    alike (one transposed convolution again; a full-resolution tensor less at the peak of the
    segment's backward)."""
    conv = root.get_submodule(conv_path)
    out, start = None, 0
    for i, part in enumerate(parts):
        if isinstance(part, tuple):
            chain, inputs = part
            y, c = _lazy_part_conv(root, conv, conv_path, chain, inputs, start, i == 0)
        else:
            c = part.shape[1]
            y = _part_conv(root, conv, part, start, i == 0)
        out = y if out is None else out.add_(y)
        start += c
    if start != conv.in_channels:
        raise RuntimeError(f"effseg: the parts of a concatenation have {start} channels, but "
                           f"the convolution that read it has {conv.in_channels} input channels")
    return out


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A stock batch or instance norm call inside a segment: statistics replayed (see
    effseg.ops.replay_norm) where it normalizes with batch statistics, as the module itself
    would otherwise (running statistics and num_batches_tracked as the stock module does)."""
    instance = isinstance(module, _INSTANCE)
    if instance:
        batch = module.training or not module.track_running_stats
        if not batch or x.dim() != module._get_no_batch_dim() + 1 or (
                torch.is_autocast_enabled(x.device.type)):
            return module(x)
        momentum = module.momentum if module.momentum is not None else 0.0
        return replayed_norm(x, module.weight, module.bias, module.running_mean,
                             module.running_var, True, momentum, module.eps)
    batch = module.training or module.running_mean is None
    if not batch or torch.is_autocast_enabled(x.device.type):
        return module(x)
    module._check_input_dim(x)
    momentum = 0.0 if module.momentum is None else module.momentum
    track = module.training and module.track_running_stats
    tape = replay.current()
    if track and module.num_batches_tracked is not None and not (tape and tape.replaying):
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            momentum = 1.0 / float(module.num_batches_tracked)
    return replayed_norm(x, module.weight, module.bias,
                         module.running_mean if track else None,
                         module.running_var if track else None, False, momentum, module.eps)


def _run(program: _Program, module: nn.Module, inputs) -> Any:
    env: list = [None] * program.size
    for slot, value in zip(program.inputs, inputs):
        env[slot] = value
    for s in program.steps:
        kind = s.kind
        if kind == "output":
            return _load(env, s.args)
        args, kwargs = _load(env, s.args), _load(env, s.kwargs)
        if kind == "module":
            value = module.get_submodule(s.target)(*args, **kwargs)
        elif kind == "function":
            value = s.target(*args, **kwargs)
        elif kind == "method":
            value = getattr(args[0], s.target)(*args[1:], **kwargs)
        elif kind == "attr":
            value = _fetch(module, s.target)
        elif kind == "norm":
            value = _norm(module.get_submodule(s.target), *args)
        elif kind == "conv":
            value = _conv(module, module.get_submodule(s.target), *args)
        elif kind == "split_conv":
            value = _split_conv(module, s.target, *args)
        elif s.target.recompute:  # segment
            value = checkpoint(_run_segment, module, s.target, *args)
        else:
            _RUNNING.append(s.target.index)
            for watch in _WATCHERS:
                watch(s.target.index, args)
            try:
                value = _run(s.target, module, args)
            finally:
                _RUNNING.pop()
        env[s.out] = value
        if isinstance(value, torch.Tensor) and value.numel() > _LARGEST.get(module, 0):
            _LARGEST[module] = value.numel()
        for i in s.free:
            env[i] = None
    raise RuntimeError("effseg: a recomputing program has no output")


# The segments running without recomputation, innermost last (the measurement of
# `recompute_convert.measure_segments` attributes saved bytes and multiply-adds to them), and
# the callables told of each such segment's start with its inputs (the same measurement).
_RUNNING: list[int] = []
_WATCHERS: list = []


def _run_segment(module, program, *inputs):
    return _run(program, module, inputs)


def _fetch(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class RecomputedForward:
    """The forward of a converted module (stored on the instance, so the class, the module paths
    and the state dict stay as they were): the segment program in training with gradients,
    the module's own forward otherwise."""

    def __init__(self, owner: nn.Module, program: _Program, names: list[str],
                 traced: list[str], shapes: tuple | None = None) -> None:
        self.owner = owner
        self.program = program
        self.names = names  # the forward's parameter per program input
        self.traced = traced  # modules whose forward code the program inlines
        # A program traced with concrete shapes (example_input) holds for those shapes only.
        self.shapes = shapes
        self.signature = inspect.signature(type(owner).forward)

    def active(self) -> bool:
        m = self.owner
        return (m.training and torch.is_grad_enabled() and not torch.compiler.is_exporting()
                and all(m.get_submodule(p).training for p in self.traced))

    def __call__(self, *args, **kwargs):
        m = self.owner
        if self.active():
            bound = self.signature.bind(m, *args, **kwargs)
            bound.apply_defaults()
            inputs = [bound.arguments[n] for n in self.names]
            if self.shapes is None or self.shapes == _shapes(inputs):
                _LARGEST[m] = 0  # this pass's largest tensor, as `_run` meets it
                return _run(self.program, m, inputs)
        return type(m).forward(m, *args, **kwargs)


def _shapes(inputs) -> tuple:
    return tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in inputs)

__all__ = ["RecomputedForward"]
