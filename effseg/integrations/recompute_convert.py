"""Recomputing segments for an existing network: what `effseg.convert(model, recompute=True)`
adds to the norm + activation fusion.

The same torch.fx data-flow analysis that proves fusions safe cuts a traced forward into
segments. A value is a segment boundary (kept for backward) where it is read by more than one
node (an encoder output that feeds the next stage and a skip connection), unless the branches
of its readers meet again in one node before any boundary (a residual unit's input, read by
its main branch and its shortcut, stays inside the unit's segment); where it leaves the traced
forward; where it feeds an upsampling (transposed) convolution (where that convolution reads a
channel concatenation, the concatenation's parts are the boundaries instead, so that it runs on
them); and where a chain of convolutions has reached two of them (one conv block). Every other
value is read inside exactly one segment: the nodes between boundaries, with one output.

The model's last segment runs plainly: its backward is the first, right after the loss's, so
recomputing it would bring back at once what a plain run keeps until then (the same tensor peak,
one segment's forward less; `recompute="auto"` decides by measurement instead).

With `example_input`, a cost policy (`plain_where_costly`) leaves plain the segments whose
recomputation costs the most for the memory it saves: one forward on the example
(`measure_segments`) gives each segment's convolution multiply-adds and the bytes it keeps for
backward besides its inputs when it runs plainly; the segments at the top of the ranking by
multiply-adds per byte stay plain as long as their bytes together are at most `PLAIN_FRACTION`
(3%) of the bytes the forward keeps without recomputation. On U-Nets these are the deep levels:
wide convolutions over few voxels (MONAI UNet at 64^3: its three deepest encoder levels, 24% of
the recomputation's multiply-adds for 2.5% of the bytes). Without an example it does not run:
the traced graph has no shapes, and deciding at the first training forward would leave the
report that convert returns wrong.

A segment worth recomputing (it holds a norm or two convolutions) runs
(`effseg.integrations.recompute_program`) through
`effseg.checkpoint` in training: its forward keeps only its inputs (boundary values, which are
kept anyway as some segment's output or the network input) and the O(C) batch statistics of its
norms. In backward torch's non-reentrant checkpoint recomputes it and hands each recomputed
tensor to autograd once, freeing it as soon as its backward has run; effseg norms and the stock
norms in the segment replay the recorded statistics (`effseg.ops.replay`: no second reduction,
running statistics updated once, exact). Stock batch and instance norms that could not be fused
run as `effseg.ops.replay_norm` inside segments (out of place: residual additions and shared
activations may follow them), so ReLU and residual blocks are recomputed like the rest.
Where a segment computes `conv(cat(a, b, ...))` (channel dimension, one group) the convolution
runs on each part with its slice of the weight and the results are added: the concatenated
tensor never exists, in forward or in the recomputation. A part that is an upsampling of a
coarser value is computed when its convolution runs and again in that convolution's backward,
which then hands the upsampling's graph to its own backward: the convolution is not run again.
A convolution whose weight is larger than its input (deep levels) adds its weight gradient into
`.grad` a slice at a time where that is safe (`effseg.ops.grad_into`): from the second step on
no weight-sized gradient exists besides `.grad`.

What it refuses, per segment, with the reason in the report (the segment then runs stock):
modules with hooks (they would run twice), SyncBatchNorm (its reduction spans processes), a
value the segment keeps that is modified in place anywhere in the traced forward (the
recomputation would read the modified tensor). A kept value changed in place where the trace
cannot see it (by the caller of a traced child of an untraceable forward) makes backward raise
autograd's error: torch's non-reentrant checkpoint saves a segment's inputs with their version
counters. A forward
that cannot be traced keeps its own code and is listed with the reason; its children are
analysed one by one. A module whose
forward is already replaced on the instance, or takes *args/**kwargs, is left alone.

The converted forward is used in training mode with gradients enabled, when every module whose
code was traced is in training mode (the trace followed the training branches); otherwise the
module's own forward runs. Module paths, parameters and buffers do not change, so state dicts
load both ways.
"""
from __future__ import annotations

import copy
import inspect
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.meta_tracer import MetaProxy, MetaTracer, proxys_to_metas
from torch.fx.node import map_aggregate
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.modules.batchnorm import _NormBase
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from .convert import (_BATCH, _INSTANCE, _Proxy, _Tracer, _describe, _has_hooks, _modified_in_place,
                      Skipped)
from ..nn.norm_act import InPlaceABNSync, _InPlaceNormAct
from .recompute_program import (_CONV_T, _RUNNING, _WATCHERS, RecomputedForward, _Program,
                                _shapes, _Slot, _Step)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Convolutions a segment holds before the next one starts a new segment (one conv block).
CONVS_PER_SEGMENT = 2


@dataclass
class Segment:
    """A recomputed segment of the forward of `path` ('' for the model).

    `modules`: the module calls inside it, in order; `keeps`: what its forward keeps for
    backward besides parameters (its inputs, and the statistics of its norms); `replayed`: the
    norms whose batch statistics the recomputation replays; `concat_free`: convolutions over a
    concatenation that run on its parts instead."""

    path: str
    output: str
    modules: list[str]
    keeps: list[str]
    replayed: list[str] = field(default_factory=list)
    concat_free: list[str] = field(default_factory=list)
    # whether it is recomputed, and why not. Measured on the example input (`measure_segments`,
    # recompute="auto" and the cost policy of recompute=True): the bytes its nodes keep for
    # backward when it is not recomputed, those of them that are not its inputs (which a
    # recomputed segment keeps as well: what running it plainly adds), and the multiply-adds of
    # its convolutions (what recomputing it costs)
    recomputed: bool = True
    why_plain: str = "within the budget"
    stock_saved_bytes: int | None = None
    extra_saved_bytes: int | None = None
    recompute_macs: int | None = None

    def __str__(self) -> str:
        extra = f"; concatenation-free: {', '.join(self.concat_free)}" if self.concat_free else ""
        if self.stock_saved_bytes is not None:
            extra += (f"; {self.stock_saved_bytes} bytes kept when not recomputed "
                      f"({self.extra_saved_bytes} besides its inputs), "
                      f"{self.recompute_macs} multiply-adds to recompute")
        what = "segment" if self.recomputed else f"segment, not recomputed ({self.why_plain})"
        return (f"{self.path or 'model'}: {what} -> {self.output} ({len(self.modules)} module "
                f"call(s)); keeps {', '.join(self.keeps)}; replays {len(self.replayed)} "
                f"norm(s){extra}")


# ------------------------------------------------------------------------------ the analysis

def _is_conv(m) -> bool:
    """A convolution that counts towards a conv block: a 1x1 one (a head, a projection) reads
    and writes about as little as a norm, so it stays in the segment before it."""
    return isinstance(m, _CONVS) and any(k != 1 for k in m.kernel_size)


_COMPUTE = ("call_module", "call_function", "call_method")


def _rejoined(v: fx.Node) -> set[fx.Node] | None:
    """Where every reader of `v` leads, through nodes read once each, to one node (a residual
    unit whose identity or shortcut branch and main branch meet again in an addition): the
    nodes between `v` and that node. None where the readers do not meet so."""
    if len(v.users) < 2:
        return None
    chains = []
    for n in v.users:
        chain = [n]
        while n.op in _COMPUTE and len(n.users) == 1 and next(iter(n.users)).op != "output":
            n = next(iter(n.users))
            chain.append(n)
        chains.append(chain)
    rest = [set(c) for c in chains[1:]]
    meet = next((n for n in chains[0] if n.op in _COMPUTE and all(n in r for r in rest)), None)
    if meet is None:
        return None
    between = {n for c in chains for n in c[:c.index(meet)]}
    return between if all(n.op in _COMPUTE for n in between) else None


def _cut_values(graph: fx.Graph, modules: dict[str, nn.Module],
                inner: dict[fx.Node, set[fx.Node]]) -> set[fx.Node]:
    """The boundaries (module docstring), where a value in `inner` (read twice, but only on
    branches that meet again) is not one by being read twice."""
    cut: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op not in _COMPUTE:
            continue
        if (len(n.users) != 1 and n not in inner) or any(u.op == "output" for u in n.users):
            cut.add(n)
    convs: dict[fx.Node, int] = {}

    def count(n, m=None):
        return int(_is_conv(m)) + sum(convs[a] for a in n.all_input_nodes
                                      if a.op in _COMPUTE and a not in cut)
    for n in graph.nodes:
        if n.op not in _COMPUTE:
            continue
        m = modules.get(n.target) if n.op == "call_module" else None
        first = n.args[0] if n.args else None
        if isinstance(first, fx.Node) and first.op in _COMPUTE and first not in cut:
            if _is_conv(m) and convs.get(first, 0) >= CONVS_PER_SEGMENT:
                cut.add(first)
            elif isinstance(m, _CONV_T) and convs.get(first, 0) >= 1:
                parts = _cat_parts(first)
                if parts and _split_target(first, {n}, modules) is n:
                    # a transposed convolution over a concatenation: its segment starts at
                    # the parts, so that it runs on them and the concatenation never exists
                    cut.update(p for p in parts if p.op in _COMPUTE)
                    convs[first] = count(first)
                else:
                    cut.add(first)
        convs[n] = count(n, m)
    return cut


def _boundaries(graph: fx.Graph, modules: dict[str, nn.Module]) -> set[fx.Node]:
    inner = {v: b for v in graph.nodes if v.op in _COMPUTE
             for b in [_rejoined(v)] if b is not None}
    while True:
        cut = _cut_values(graph, modules, inner)
        # a value read on two branches stays inside a segment only if both branches do
        broken = [v for v, between in inner.items() if v in cut or between & cut]
        if not broken:
            return cut
        for v in broken:
            del inner[v]


def _value(n: fx.Node, modules, prefix: str) -> str:
    """A value named by the layer that computed it (not by an nn.Identity left by fusion)."""
    while n.op == "call_module" and type(modules[n.target]) is nn.Identity and n.args and (
            isinstance(n.args[0], fx.Node)):
        n = n.args[0]
    if n.op == "placeholder":
        return f"input '{n.target}'" + (f" of '{prefix.rstrip('.')}'" if prefix else "")
    return f"the output of {_describe(n, modules, prefix)}"


def _members(out: fx.Node, cut: set[fx.Node]) -> list[fx.Node]:
    seen, todo = {out}, [out]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a.op in ("call_module", "call_function", "call_method") and a not in cut and (
                    a not in seen):
                seen.add(a)
                todo.append(a)
    return [n for n in out.graph.nodes if n in seen]


def _cat_parts(n: fx.Node):
    """The parts of a channel concatenation `n` (a list of nodes), or None."""
    if not (n.op == "call_function" and n.target is torch.cat):
        return None
    parts = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    if dim != 1 or not isinstance(parts, (list, tuple)) or len(parts) < 2 or not all(
            isinstance(p, fx.Node) for p in parts) or len(n.kwargs) > (0 if len(n.args) > 1
                                                                       else 1):
        return None
    return list(parts)


def _split_target(n: fx.Node, members: set, modules) -> fx.Node | None:
    """The convolution over the concatenation `n` that can run on its parts, if any."""
    if len(n.users) != 1:
        return None
    (conv,) = n.users
    m = modules.get(conv.target) if conv.op == "call_module" else None
    if conv not in members or not isinstance(m, _CONVS + _CONV_T) or m.groups != 1 or (
            m.padding_mode != "zeros" or _has_hooks(m) or conv.args != (n,) or conv.kwargs):
        return None
    return conv


_UPSAMPLING = _CONV_T + (nn.Upsample,)


def _lazy(part: fx.Node, members: set, modules) -> tuple[list[fx.Node]] | None:
    """The chain of nodes that computes a part of a concatenation from an upsampling (a
    transposed convolution or nn.Upsample, then e.g. padding), each read by the next alone, for
    `_split_conv` to recompute lazily; None where there is none."""
    chain, n, upsampled = [], part, False
    while n in members and len(n.users) == 1 and n.op in ("call_module", "call_function",
                                                          "call_method"):
        m = modules.get(n.target) if n.op == "call_module" else None
        if m is not None and (isinstance(m, _NormBase) or _has_hooks(m)):
            break
        chain.insert(0, n)
        upsampled = upsampled or isinstance(m, _UPSAMPLING)
        inner = [a for a in n.all_input_nodes if a.op != "get_attr"]
        if len(inner) != 1:
            break
        n = inner[0]
    while chain and not (chain[0].op == "call_module" and isinstance(
            modules[chain[0].target], _UPSAMPLING)):
        chain.pop(0)  # the chain starts at the upsampling: what is before it is kept anyway
    return (chain,) if upsampled and chain else None


@dataclass
class _Plan:
    # per segment: its nodes (the output last), its report entry, the convolutions that run on
    # the parts of a concatenation (conv node -> parts: a node, or (a lazy chain,)), and the
    # nodes those replace (the concatenations and the lazy chains)
    segments: list[tuple[list[fx.Node], Segment, dict[fx.Node, list], set[fx.Node]]]
    refused: list[Skipped]


def _refusal(nodes: list[fx.Node], inputs: list[fx.Node], modules, prefix: str) -> str | None:
    for n in nodes:
        if n.op != "call_module":
            continue
        m = modules[n.target]
        if _has_hooks(m):
            return f"{prefix}{n.target} has hooks, which the recomputation would run again"
        if isinstance(m, (nn.SyncBatchNorm, InPlaceABNSync)):
            return (f"{prefix}{n.target} ({type(m).__name__}) reduces across processes; "
                    "recomputing it is not supported")
    for a in inputs:
        writer = _modified_in_place(a, modules, caller_unknown=False)
        if writer is not None:
            where = "returned to a caller that cannot be traced" if writer.op == "output" else (
                f"modified in place by {_describe(writer, modules, prefix)}")
            return (f"it keeps {_value(a, modules, prefix)}, which is {where}: the "
                    "recomputation would read the modified tensor")
    return None


def _plan(graph: fx.Graph, modules: dict[str, nn.Module], prefix: str) -> _Plan:
    cut = _boundaries(graph, modules)
    plan = _Plan([], [])
    for out in graph.nodes:
        if out not in cut:
            continue
        nodes = _members(out, cut)
        mods = [modules[n.target] for n in nodes if n.op == "call_module"]
        norms = [m for m in mods if isinstance(m, _BATCH + _INSTANCE + (_InPlaceNormAct,
                                                                        nn.SyncBatchNorm))]
        if not norms and sum(isinstance(m, _CONVS + _CONV_T) for m in mods) < 2:
            continue  # nothing inside it keeps more than its input would
        members = set(nodes)
        inputs = [a for a in dict.fromkeys(x for n in nodes for x in n.all_input_nodes)
                  if a not in members and a.op != "get_attr"]
        name = _value(out, modules, prefix)
        reason = _refusal(nodes, inputs, modules, prefix)
        if reason is not None:
            plan.refused.append(Skipped(f"{prefix.rstrip('.') or 'model'}: segment -> {name}",
                                        reason))
            continue
        splits = {}
        for n in nodes:
            parts = _cat_parts(n)
            conv = _split_target(n, members, modules) if parts else None
            if conv is not None:
                splits[conv] = [_lazy(p, members, modules) or p for p in parts]
        skipped_cats = {p for conv in splits for p in conv.args} | {
            c for parts in splits.values() for p in parts if isinstance(p, tuple) for c in p[0]}
        replayed = [prefix + n.target for n in nodes if n.op == "call_module" and (
            isinstance(modules[n.target], _InPlaceNormAct) or (
                type(modules[n.target]) in _BATCH + _INSTANCE and len(n.args) == 1
                and not n.kwargs))]
        seg = Segment(prefix.rstrip("."), name,
                      [prefix + n.target for n in nodes if n.op == "call_module"],
                      [_value(a, modules, prefix) for a in inputs]
                      + [f"O(C) statistics of {len(replayed)} norm(s)"], replayed,
                      [prefix + c.target for c in splits])
        plan.segments.append((nodes, seg, splits, skipped_cats))
    return plan


# ------------------------------------------------------------------------------ compiling

def _compile(graph: fx.Graph, plan: _Plan, modules: dict[str, nn.Module],
             first_index: int) -> tuple[_Program, list[str]]:
    slots: dict[fx.Node, int] = {}
    for n in graph.nodes:
        slots[n] = len(slots)
    in_segment = {n: i for i, (nodes, *_r) in enumerate(plan.segments) for n in nodes}
    outputs = {nodes[-1]: i for i, (nodes, *_r) in enumerate(plan.segments)}

    def ref(a):
        return fx.node.map_arg(a, lambda n: _Slot(slots[n]))

    def step_of(n: fx.Node, splits: dict, in_seg: bool) -> _Step:
        if n.op == "call_module":
            m = modules[n.target]
            if n in splits:
                parts = [lazy(p[0]) if isinstance(p, tuple) else ref(p) for p in splits[n]]
                return _Step("split_conv", n.target, (parts,), {}, slots[n])
            if in_seg and type(m) in _BATCH + _INSTANCE and len(n.args) == 1 and not n.kwargs:
                return _Step("norm", n.target, ref(n.args), {}, slots[n])
            if type(m) in _CONVS + _CONV_T and len(n.args) == 1 and not n.kwargs:
                return _Step("conv", n.target, ref(n.args), {}, slots[n])
            return _Step("module", n.target, ref(n.args), ref(n.kwargs), slots[n])
        kind = {"call_function": "function", "call_method": "method", "get_attr": "attr"}[n.op]
        return _Step(kind, n.target, ref(n.args), ref(n.kwargs), slots[n])

    def lazy(chain: list[fx.Node]) -> tuple:
        inside = set(chain)
        ins = [a for a in dict.fromkeys(x for m in chain for x in m.all_input_nodes)
               if a not in inside and a.op != "get_attr"]
        steps = [step_of(m, {}, True) for m in chain]
        steps.append(_Step("output", None, _Slot(slots[chain[-1]]), {}, -1))
        return (_Program(with_frees(steps), len(slots), [slots[a] for a in ins]),
                [_Slot(slots[a]) for a in ins])

    def with_frees(steps: list[_Step]) -> list[_Step]:
        """Each step drops the values it reads last, so a value lives until its last use."""
        last: dict[int, int] = {}
        for i, s in enumerate(steps):
            for v in _slots_in((s.args, s.kwargs)):
                last[v] = i
        for i, s in enumerate(steps):
            s.free = tuple(v for v, j in last.items() if j == i)
        return steps

    top: list[_Step] = []
    names: list[str] = []
    inputs: list[int] = []
    for n in graph.nodes:
        if n.op == "placeholder":
            names.append(str(n.target))
            inputs.append(slots[n])
        elif n.op == "output":
            top.append(_Step("output", None, ref(n.args[0]), {}, -1))
        elif n in outputs:
            nodes, _seg, splits, dropped = plan.segments[outputs[n]]
            members = set(nodes)
            ins = [a for a in dict.fromkeys(x for m in nodes for x in m.all_input_nodes)
                   if a not in members and a.op != "get_attr"]
            inner = [step_of(m, splits, True) for m in nodes if m not in dropped]
            inner.append(_Step("output", None, _Slot(slots[n]), {}, -1))
            sub = _Program(with_frees(inner), len(slots), [slots[a] for a in ins],
                           index=first_index + outputs[n])
            top.append(_Step("segment", sub, tuple(_Slot(slots[a]) for a in ins), {}, slots[n]))
        elif n not in in_segment:
            top.append(step_of(n, {}, False))
    return _Program(with_frees(top), len(slots), inputs), names


def _slots_in(a) -> list[int]:
    found: list[int] = []
    map_aggregate(a, lambda v: found.append(v.i) if isinstance(v, _Slot) else v)
    return found


# ------------------------------------------------------------------------------ entry point

_TORCH_DIR = os.path.dirname(torch.__file__)


class _CheckedProxy(_Proxy):
    """Notes every `isinstance` test that a forward applies to a traced value. A Proxy is no
    torch.Tensor, so such a test answers what it never answers when the forward runs, and the
    trace may follow a branch the real forward never takes (a skip connection silently dropped
    from the program). Python's isinstance reads `__class__` when the type test fails; torch's
    own code (the tracer itself) is not the forward and is not noted."""

    @property
    def __class__(self):
        frame = sys._getframe(1)
        if not frame.f_code.co_filename.startswith(_TORCH_DIR):
            self.tracer.type_tests.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
        return type(self)


def _jit_isinstance(obj, target_type):
    """torch.jit.isinstance while tracing: a traced value is the tensor it stands for."""
    if isinstance(obj, fx.Proxy) and target_type is torch.Tensor:
        return True
    return _JIT_ISINSTANCE(obj, target_type)


_JIT_ISINSTANCE = torch.jit.isinstance


class _ProgramTracer(_Tracer):
    def __init__(self) -> None:
        super().__init__()
        self.type_tests: list[str] = []

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _CheckedProxy(node, self)

    def trace(self, root, concrete_args=None):
        torch.jit.isinstance = _jit_isinstance
        try:
            graph = super().trace(root, concrete_args)
        finally:
            torch.jit.isinstance = _JIT_ISINSTANCE
        if self.type_tests:
            raise TypeError(f"the forward tests the type of a traced value "
                            f"({self.type_tests[0]}), so the traced branch may not be the one "
                            "that runs")
        return graph


def _trace_train(module: nn.Module, prefix: str, graphs: list, failed: dict) -> None:
    try:
        graphs.append((prefix, _ProgramTracer().trace(copy.deepcopy(module).train())))
    except Exception as e:  # any error: this forward's data flow is unknown
        failed[prefix.rstrip(".")] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        for name, child in module.named_children():
            if next(child.children(), None) is not None:
                _trace_train(child, f"{prefix}{name}.", graphs, failed)


def _traced_modules(graph: fx.Graph) -> list[str]:
    found: dict[str, None] = {}
    for n in graph.nodes:
        for path, _cls in n.meta.get("nn_module_stack", {}).values():
            found[path] = None
    return [p for p in found if p]


class _CheckedMetaProxy(MetaProxy):
    __class__ = _CheckedProxy.__dict__["__class__"]  # the same note of isinstance tests


class _ConcreteTracer(MetaTracer):
    """A trace that carries meta tensors of the example input's shapes, so that a forward
    branching on shapes (padding for odd sizes) is followed down the branch those shapes take.
    Norms get their input's shape without running (their running statistics are real tensors);
    a value whose shape could not be computed fails the trace."""

    allow_insert_stateless_mods = False

    def __init__(self) -> None:
        super().__init__()
        self.type_tests: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _InPlaceNormAct) or fx.Tracer.is_leaf_module(self, m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _CheckedMetaProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        if kind == "call_module" and isinstance(self.root.get_submodule(target), _NormBase):
            rv = fx.Tracer.create_proxy(self, kind, target, args, kwargs, name, type_expr,
                                        proxy_factory_fn)
            rv.install_tensor_meta(proxys_to_metas(args[0]))
            return rv
        return super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                    proxy_factory_fn)


def _trace_concrete(module: nn.Module, example: tuple) -> tuple[fx.Graph, tuple]:
    names = list(inspect.signature(type(module).forward).parameters)[1:]
    if len(example) > len(names):
        raise TypeError(f"example_input has {len(example)} values for {len(names)} arguments")
    metas = {n: t.to("meta") for n, t in zip(names, example) if isinstance(t, torch.Tensor)}
    tracer = _ConcreteTracer()
    torch.jit.isinstance = _jit_isinstance
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = tracer.trace(copy.deepcopy(module).train(), meta_args=metas,
                                 concrete_args={n: None for n in names[len(example):]})
    finally:
        torch.jit.isinstance = _JIT_ISINSTANCE
    lost = [str(w.message) for w in caught if "Could not compute metadata" in str(w.message)]
    if lost:
        raise RuntimeError(lost[0])
    if tracer.type_tests:
        raise TypeError(f"the forward tests the type of a traced value ({tracer.type_tests[0]})")
    return graph, _shapes(example)


def add_recompute(target: nn.Module, example_input=None) -> tuple[list[Segment],
                                                                  list[Skipped]]:
    """Replaces the forward of `target` (or of its traceable children) by recomputing segment
    programs, in place. Returns the segments and what was left stock, with the reason.
    `example_input` (a tensor or a tuple of the forward's arguments): where the model's own
    forward cannot be traced symbolically (shape-dependent Python), it is traced with these
    shapes, and its program runs for inputs of these shapes only."""
    graphs: list[tuple[str, fx.Graph, tuple | None]] = []
    failed: dict[str, str] = {}
    symbolic: list = []
    _trace_train(target, "", symbolic, failed)
    graphs += [(prefix, graph, None) for prefix, graph in symbolic]
    refused = []
    if "" in failed and example_input is not None:
        example = example_input if isinstance(example_input, tuple) else (example_input,)
        try:
            graphs.append(("", *_trace_concrete(target, example)))
        except Exception as e:  # any error: the concrete trace adds nothing
            refused.append(Skipped("model", "its forward cannot be traced with the shapes of "
                                   f"example_input either ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:160]})"))
    refused += [Skipped(path or "model", f"its forward cannot be traced by torch.fx ({why}); "
                        + ("traced with the shapes of example_input, its program runs for "
                           "those shapes; " if not path and graphs and graphs[-1][0] == ""
                           and graphs[-1][2] is not None else "")
                        + "its children are converted one by one")
                for path, why in failed.items()]
    segments: list[Segment] = []
    for prefix, graph, shapes in graphs:
        owner = target.get_submodule(prefix.rstrip(".")) if prefix else target
        where = prefix.rstrip(".") or "model"
        if "forward" in owner.__dict__:
            refused.append(Skipped(where, "its forward is already replaced on the instance"))
            continue
        params = list(inspect.signature(type(owner).forward).parameters.values())[1:]
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            refused.append(Skipped(where, "its forward takes *args or **kwargs, which the "
                                   "traced program cannot bind"))
            continue
        modules = dict(owner.named_modules())
        plan = _plan(graph, modules, prefix)
        refused += plan.refused
        if not plan.segments:
            continue
        program, names = _compile(graph, plan, modules, len(segments))
        owner.forward = RecomputedForward(owner, program, names, _traced_modules(graph),
                                          shapes)
        segments += [seg for _n, seg, *_r in plan.segments]
        if not prefix:
            # The model's last segment: its backward is the first, right after the loss's, so
            # its recomputation would bring back at once what a plain run keeps until then
            # (the same tensor peak, measured): it runs plainly, one segment's forward less.
            last = [st.target for st in program.steps if st.kind == "segment"][-1]
            last.recompute = False
            segments[last.index].recomputed = False
            segments[last.index].why_plain = ("the model's last: its backward comes first, so "
                                              "recomputing it would keep no less")
    return segments, refused


def _segment_programs(model: nn.Module) -> dict[int, _Program]:
    found = {}
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, RecomputedForward):
            found.update({s.target.index: s.target for s in fwd.program.steps
                          if s.kind == "segment"})
    return found


def _loss(out) -> torch.Tensor:
    outs = out if isinstance(out, (list, tuple)) else [out]
    return sum(o.float().square().mean() for o in outs)


class _ConvMacs(TorchDispatchMode):
    """Adds the multiply-adds of every convolution (aten.convolution, its transposed form
    included; torch's own shape formula) to the innermost segment running plainly."""

    def __init__(self, macs: dict[int, int]) -> None:
        super().__init__()
        self.macs = macs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _RUNNING and func.overloadpacket is torch.ops.aten.convolution:
            flops = flop_registry[torch.ops.aten.convolution](*args, **(kwargs or {}),
                                                               out_val=out)
            self.macs[_RUNNING[-1]] = self.macs.get(_RUNNING[-1], 0) + flops // 2
        return out


def _example_tuple(example_input) -> tuple:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def measure_segments(probe: nn.Module, segments: list[Segment], example_input) -> int:
    """Runs one training-mode forward of `probe` (a copy of the converted model: its running
    statistics move) on `example_input` with every segment plain, and sets on each segment of
    `segments` what it measured: `stock_saved_bytes`, the bytes of the storages its nodes save
    for backward (each storage once; parameters and buffers not counted), `extra_saved_bytes`,
    those of them that are not storages of its inputs, and `recompute_macs`, the multiply-adds
    of its convolutions. Returns the bytes the whole forward saves for backward (the network's
    activation bytes without recomputation; each storage once, parameters and buffers not
    counted). Nothing saved is kept (the pack hook keeps only a note), so the probe needs the
    memory of an inference forward, not of a stock training step; the random number generators
    are restored afterwards (dropout draws in the probe do not move the caller's stream). A
    segment that did not run (the program of a child that its parent's program inlines) gets
    zeros."""
    example = _example_tuple(example_input)
    programs = _segment_programs(probe)
    for prog in programs.values():
        prog.recompute = False
    fixed = {t.untyped_storage()._cdata for t in (*probe.parameters(), *probe.buffers())}
    # a storage's id: its address may be reused once it is freed (nothing here keeps it)
    ids: dict[int, tuple[StorageWeakRef, int]] = {}
    sizes: dict[int, int] = {}  # id -> bytes

    def uid(t: torch.Tensor) -> int:
        st = t.untyped_storage()
        known = ids.get(st._cdata)
        if known is None or known[0].expired():
            known = ids[st._cdata] = (StorageWeakRef(st), len(sizes))
        sizes[known[1]] = st.nbytes()
        return known[1]

    saved_by: dict[int, set[int]] = {i: set() for i in programs}
    inputs_of: dict[int, set[int]] = {i: set() for i in programs}
    everything: set[int] = set()

    def pack(t: torch.Tensor):
        if t.untyped_storage()._cdata not in fixed:
            u = uid(t)
            everything.add(u)
            if _RUNNING:
                saved_by[_RUNNING[-1]].add(u)
        return None  # nothing kept: there is no backward

    def watch(index: int, args) -> None:
        inputs_of[index].update(uid(t) for t in tree_flatten(args)[0]
                                if isinstance(t, torch.Tensor))

    macs: dict[int, int] = {}
    devices = sorted({t.device for t in example if isinstance(t, torch.Tensor)
                      and t.device.type != "cpu"}, key=str)
    _WATCHERS.append(watch)
    try:
        with torch.random.fork_rng(devices=devices, device_type=devices[0].type if devices
                                   else "cuda"), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None), _ConvMacs(macs):
            out = probe(*example)
        del out
    finally:
        _WATCHERS.remove(watch)
    for i, seg in enumerate(segments):
        mine = saved_by.get(i, set())
        seg.stock_saved_bytes = sum(sizes[u] for u in mine)
        seg.extra_saved_bytes = sum(sizes[u] for u in mine - inputs_of.get(i, set()))
        seg.recompute_macs = macs.get(i, 0)
    return sum(sizes[u] for u in everything)


# recompute=True with example_input: the segments left plain may keep, together, at most this
# fraction of the bytes the forward saves for backward without recomputation (`plain_where_costly`)
PLAIN_FRACTION = 0.03


def plain_where_costly(target: nn.Module, segments: list[Segment], example_input,
                       fraction: float = PLAIN_FRACTION) -> tuple[list[Skipped], str]:
    """The cost policy of recompute=True: leaves plain the segments whose recomputation costs
    the most computation for the memory it saves. On a copy of `target`, `measure_segments`
    measures each segment's convolution multiply-adds (its recomputation's cost) and the bytes it
    keeps for backward besides its inputs when it runs plainly (what recomputing it saves). The
    recomputed segments are ranked by multiply-adds per byte, and the longest run from the top of
    that ranking whose bytes together are at most `fraction` of the bytes the whole forward saves
    for backward without recomputation is left plain: a bounded memory price, spent where it buys
    the most time. On U-Nets these are the deep levels: wide convolutions (large weights, many
    multiply-adds per voxel) over few voxels. The tensor peak of a training step can grow by at
    most those bytes. Segments that did not run on the example (children whose parent's program
    inlines them) are left as they are.

    Returns the report entries for the segments left plain and a line describing the outcome."""
    probe = copy.deepcopy(target).train()
    total = measure_segments(probe, segments, example_input)
    del probe

    def cost(i: int) -> float:
        return segments[i].recompute_macs / max(segments[i].extra_saved_bytes, 1)
    ranked = sorted((i for i, seg in enumerate(segments) if seg.recomputed and
                     seg.recompute_macs), key=lambda i: (-cost(i), i))
    limit = fraction * total
    chosen, kept = [], 0
    for i in ranked:
        if kept + segments[i].extra_saved_bytes > limit:
            break
        chosen.append(i)
        kept += segments[i].extra_saved_bytes
    programs = _segment_programs(target)
    entries = []
    all_macs = sum(seg.recompute_macs for seg in segments if seg.recomputed)
    for rank, i in enumerate(chosen, 1):
        seg = segments[i]
        programs[i].recompute = seg.recomputed = False
        seg.why_plain = (f"cost policy: {seg.recompute_macs / 1e6:.0f}M multiply-adds to "
                         f"recompute for {seg.extra_saved_bytes} bytes kept, "
                         f"{cost(i):.0f} per byte, rank {rank} of {len(ranked)}")
        entries.append(Skipped(f"{seg.path or 'model'}: segment -> {seg.output}",
                               seg.why_plain))
    saved_macs = sum(segments[i].recompute_macs for i in chosen)
    line = (f"cost policy (fraction {fraction:g}): {len(chosen)} of {len(ranked)} recomputed "
            f"segment(s) left plain, keeping {kept} bytes ({kept / max(total, 1):.2%} of the "
            f"{total} bytes the forward keeps without recomputation) and saving "
            f"{saved_macs / max(all_macs, 1):.1%} of the recomputation's multiply-adds")
    return entries, line


def choose(target: nn.Module, segments: list[Segment], budget: int,
           example_input) -> list[Skipped]:
    """recompute="auto": recomputes as few segments as keep the tensor peak of a training step
    on `example_input` (forward, mean-square loss, backward; measured with
    effseg.memory.peak_allocated on a copy, gradients already allocated) within `budget` bytes.
    The segments that keep the fewest bytes when not recomputed (`measure_segments`) are the
    first left plain (they are deep and coarse: most computation for the least memory). Returns
    the report entries for the segments left plain, and one for a budget that cannot be met."""
    from ..memory import peak_allocated
    example = _example_tuple(example_input)
    probe = copy.deepcopy(target).train()
    programs = _segment_programs(probe)

    def set_plain(plain: set[int]) -> None:
        for i, prog in programs.items():
            prog.recompute = i not in plain

    def peak() -> int:
        def step():
            _loss(probe(*example)).backward()
        step()  # gradients allocated, as in training
        return peak_allocated(step)

    measure_segments(probe, segments, example)
    order = sorted(programs, key=lambda i: segments[i].stock_saved_bytes)
    lo, hi = 0, len(order)  # the most segments left plain whose peak fits: in [lo, hi]
    set_plain(set())
    every = peak()
    if every > budget:
        for i, prog in _segment_programs(target).items():
            prog.recompute = segments[i].recomputed = True
        return [Skipped("model", f"budget {budget} bytes not met: the training step's tensor "
                        f"peak is {every} bytes with every segment recomputed")]
    set_plain(set(order))
    if peak() <= budget:
        lo = hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        set_plain(set(order[:mid]))
        if peak() <= budget:
            lo = mid
        else:
            hi = mid - 1
    plain = set(order[:lo])
    for i, prog in _segment_programs(target).items():
        prog.recompute = i not in plain
        segments[i].recomputed = i not in plain
        segments[i].why_plain = "within the budget"
    return [Skipped(f"{segments[i].path or 'model'}: segment -> {segments[i].output}",
                    f"within the budget without recomputing it (keeps "
                    f"{segments[i].stock_saved_bytes} bytes for backward)") for i in order[:lo]]


__all__ = ["PLAIN_FRACTION", "Segment", "RecomputedForward", "add_recompute", "choose",
           "measure_segments", "plain_where_costly"]
