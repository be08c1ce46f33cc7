"""Converting an existing network's norm + activation pairs to effseg's fused in-place modules.

`convert(model)` replaces `nn.BatchNorm{1,2,3}d` / `nn.InstanceNorm{1,2,3}d` / `nn.GroupNorm`
followed by `nn.LeakyReLU` (slope > 0), `nn.ELU` (alpha > 0), `nn.PReLU` (every slope > 0 at
conversion) or `nn.Identity` with `InPlaceABN` / `InPlaceAIN` / `InPlaceAGN` carrying that
activation, and the activation module with `nn.Identity` (a PReLU with `FusedPReLU`, the identity
that keeps the slope parameter under its own key; the fused norm reads it from there). An effseg
norm with the identity activation (what `effseg.monai.register()` puts into MONAI blocks) absorbs
the activation that follows it the same way. Parameters and buffers are moved over as they are
(the same tensors: weights, running statistics, num_batches_tracked; eps, momentum, affine and
track_running_stats are copied), so outputs, gradients, running statistics and state-dict keys
stay those of the stock model.

What it guarantees. The fused module overwrites its input and keeps its output for backward, so
a pair is fused only where the data flow proves that both are harmless. The data flow comes from
`torch.fx` symbolic tracing of deep copies of the model in training and in eval mode
(nn.Sequential, MONAI's ADN and custom forwards alike; a forward that cannot be traced is
skipped and its children are traced one by one). A norm is fused only if, at every place it is
called:
- its input is the output of a convolution (Conv/ConvTranspose 1-3d) or a Linear layer that
  nothing else reads (those layers do not need their output for backward), so overwriting it
  is invisible;
- its output goes only to the activation, possibly through Dropout with p=0 (dropout with p > 0
  between the two changes what the activation sees in training);
- the activation's output (and any view of it) is never modified in place afterwards within the
  traced forward (the fused module needs it for backward), nor returned to a forward that
  could not be traced;
- the activation module is called nowhere else where it cannot be fused, since it becomes
  nn.Identity;
- the norm, the activation and the producing layer have no hooks.
Everything else stays stock and is listed in the report's `skipped`, with the reason (every
normalization module convert meets is in the report, replaced or skipped): ReLU (not
invertible), PReLU with a slope <= 0, other activations, a norm not followed by an activation (an
in-place norm alone keeps its output where the stock one keeps its input: nothing to gain),
norm inputs that are also read elsewhere (a residual branch) or come from outside what could be
traced, SyncBatchNorm and subclasses with their own forward. A fused PReLU whose slope training
later drives to 0 or below makes the fused norm raise a ValueError (the activation would no
longer be invertible). Tensors the converted model
returns must not be modified in place by the caller before backward (autograd then raises an
error; it never computes a wrong gradient silently).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from ..functional import resolve_activation
from ..nn.norm_act import FusedPReLU, InPlaceABN, InPlaceAGN, InPlaceAIN, _InPlaceNormAct
from ..nn.sync import convert_sync

_BATCH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_STOCK = _BATCH + _INSTANCE + (nn.GroupNorm,)
_EFFSEG = (_InPlaceNormAct, InPlaceAGN)
# Layers whose backward does not read their output, so the output may be overwritten.
_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
              nn.ConvTranspose3d, nn.Linear)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
# Calls whose result may share storage with their first argument.
_ALIASING = {"getitem", "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten",
             "narrow", "select", "split", "chunk", "unbind", "transpose", "permute", "movedim",
             "squeeze", "unsqueeze", "expand", "expand_as", "contiguous", "as_strided", "t",
             "detach", "to", "type_as", "float", "double", "half", "bfloat16"}
_ALIASING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten) + _DROPOUTS
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.imatmul, operator.setitem}


@dataclass
class Replaced:
    """A norm that became a fused module; `activation` is the path of the activation module
    that became nn.Identity (None when the norm was followed by nn.Identity itself)."""

    path: str
    became: str
    activation: str | None


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class ConversionReport:
    replaced: list[Replaced] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    # recompute=True: the recomputing segments (effseg.integrations.recompute_convert.Segment) and the parts
    # of the forward left stock, with the reason
    segments: list = field(default_factory=list)
    not_recomputed: list[Skipped] = field(default_factory=list)
    # recompute=True: what the cost policy (recompute_convert.plain_where_costly) did, or why it
    # did not run
    policy: str = ""

    def reason(self, path: str) -> str | None:
        """Why the norm at `path` was left stock (None if it was replaced or is unknown)."""
        return next((s.reason for s in self.skipped if s.path == path), None)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} norm(s), skipped {len(self.skipped)}"]
        lines += [f"  {r.path}: {r.became}" + (f" (+ {r.activation} -> Identity)"
                                                if r.activation else "")
                  for r in self.replaced]
        lines += [f"  {s.path}: left stock: {s.reason}" for s in self.skipped]
        if self.segments or self.not_recomputed:
            lines.append(f"recomputing {len(self.segments)} segment(s), "
                         f"{len(self.not_recomputed)} left stock")
            lines += [f"  {seg}" for seg in self.segments]
            lines += [f"  {s.path}: not recomputed: {s.reason}" for s in self.not_recomputed]
        if self.policy:
            lines.append(f"  {self.policy}")
        return "\n".join(lines)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, _STOCK + (nn.SyncBatchNorm,) + _EFFSEG)


_OTHER_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                nn.LocalResponseNorm, nn.CrossMapLRN2d) + (
                    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _other_norm(m: nn.Module) -> bool:
    """A normalization layer convert has no fused module for: torch's other norms, and leaf
    modules of other libraries named like one (MONAI's, apex's)."""
    return not _is_norm(m) and (isinstance(m, _OTHER_NORMS) or (
        "Norm" in type(m).__name__ and next(m.children(), None) is None))


class _Proxy(fx.Proxy):
    """Records `a += b` as operator.iadd (fx's Proxy records it as an out-of-place add): the
    graph is only analysed, never run, and an in-place update is what the analysis looks for."""


def _record_inplace(fn):
    def method(self, other):
        return self.tracer.create_proxy("call_function", fn, (self, other), {})
    return method


for _op in _INPLACE_OPERATORS - {operator.setitem}:
    setattr(_Proxy, f"__{_op.__name__}__", _record_inplace(_op))


class _Tracer(fx.Tracer):
    """torch.nn layers (the default) and effseg's norms are leaves; everything else is inlined,
    so the graph shows how every norm's input and output are used."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _EFFSEG) or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


def _trace(module: nn.Module, prefix: str, graphs: list, failed: dict) -> None:
    try:
        graphs.append((prefix, module, _Tracer().trace(module)))
    except Exception as e:  # any error: this forward's data flow is unknown
        failed[prefix.rstrip(".")] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        for name, child in module.named_children():
            if not _is_norm(child) and next(child.children(), None) is not None:
                _trace(child, f"{prefix}{name}.", graphs, failed)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _describe(node: fx.Node, modules: dict[str, nn.Module], prefix: str) -> str:
    if node.op == "call_module":
        return f"{prefix}{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "placeholder":
        return f"the input of '{prefix.rstrip('.') or 'the model'}'"
    if node.op == "output":
        return f"the output of '{prefix.rstrip('.') or 'the model'}'"
    return f"{getattr(node.target, '__name__', node.target)}()"


def _name(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target)).strip("_") if (
        node.op in ("call_function", "call_method")) else ""


def _modified_in_place(node: fx.Node, modules: dict[str, nn.Module],
                       caller_unknown: bool) -> fx.Node | None:
    """A user that modifies `node`'s tensor (or a view of it) in place, if any; with
    `caller_unknown`, the graph's output counts as one (an untraceable caller receives it)."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u.op == "call_module":
                m = modules[u.target]
                if getattr(m, "inplace", False) and u.args and u.args[0] is n:
                    return u
                if isinstance(m, _ALIASING_MODULES):
                    todo.append(u)
                continue
            if u.op == "output" and caller_unknown:
                return u
            if u.op not in ("call_function", "call_method"):
                continue
            target = getattr(u.target, "__name__", str(u.target))
            first = u.args[0] if u.args else None
            if first is n and (u.target in _INPLACE_OPERATORS or (
                    target.endswith("_") and not target.startswith("_"))):
                return u
            if first is n and _name(u) in _ALIASING:
                todo.append(u)
    return None


@dataclass
class _Site:
    """One call of a norm, as the traced graph shows it."""

    activation_path: str | None = None  # None: the norm is followed by nn.Identity
    activation: tuple[str, float | None] | None = None
    reason: str | None = None


def _is_activation(m: nn.Module) -> bool:
    return type(m) is nn.Identity or isinstance(m, _DROPOUTS) or (
        type(m).__module__ == nn.modules.activation.__name__)


def _activation(m: nn.Module, norm: nn.Module) -> tuple[tuple[str, float | None] | None,
                                                         str | None]:
    """(effseg activation, None) for a fusable activation module after `norm`, else
    (None, reason)."""
    if type(m) is nn.Identity:
        return ("identity", None), None
    if type(m) is nn.LeakyReLU:
        if not m.negative_slope > 0:
            return None, (f"LeakyReLU with slope {m.negative_slope} is not invertible (the fused "
                          "op needs a slope > 0)")
        return ("leaky_relu", float(m.negative_slope)), None
    if type(m) is nn.ELU:
        if not m.alpha > 0:
            return None, f"ELU with alpha {m.alpha} is not invertible (needs alpha > 0)"
        return ("elu", float(m.alpha)), None
    if isinstance(m, (nn.ReLU, nn.ReLU6)):
        return None, (f"followed by {type(m).__name__}, which is not invertible: the in-place "
                      "op could not recover its input in backward (use LeakyReLU to fuse, or "
                      "effseg.nn.RecomputeBlock3d for exact ReLU)")
    if type(m) is nn.PReLU:
        channels = norm.num_channels if isinstance(norm, (nn.GroupNorm, InPlaceAGN)) else (
            norm.num_features)
        if m.num_parameters not in (1, channels):
            return None, (f"PReLU with {m.num_parameters} slopes after a norm of {channels} "
                          "channels")
        if not bool((m.weight.detach() > 0).all()):
            return None, (f"PReLU with a slope <= 0 (min {m.weight.detach().min().item():.4g}) "
                          "is not invertible (the fused op needs every slope > 0)")
        return ("prelu", None), None
    return None, (f"followed by {type(m).__name__}, not by an activation the fused op has "
                  "(LeakyReLU, ELU, PReLU, Identity)")


def _site(norm_node: fx.Node, modules: dict[str, nn.Module], prefix: str,
          stock_norm: bool) -> _Site:
    norm = modules[norm_node.target]
    if _has_hooks(norm):
        return _Site(reason="has hooks, which the replacement would lose")
    if len(norm_node.args) != 1 or norm_node.kwargs:
        return _Site(reason="is called with more than one argument")
    src = norm_node.args[0]
    if stock_norm:
        if not isinstance(src, fx.Node) or src.op != "call_module" or not isinstance(
                modules[src.target], _PRODUCERS):
            what = _describe(src, modules, prefix) if isinstance(src, fx.Node) else repr(src)
            return _Site(reason=(f"its input comes from {what}, not from a convolution or linear "
                                 "layer: the in-place norm overwrites its input, which may be "
                                 "read elsewhere (e.g. by a residual branch)"))
        if len(src.users) > 1:
            others = ", ".join(_describe(u, modules, prefix) for u in src.users
                               if u is not norm_node)
            return _Site(reason=(f"its input, the output of {prefix}{src.target}, is also read "
                                 f"by {others}: the in-place norm would overwrite it"))
        if _has_hooks(modules[src.target]):
            return _Site(reason=(f"the layer producing its input ({prefix}{src.target}) has "
                                 "hooks, which could keep the tensor the fused op overwrites"))
    cur = norm_node
    while True:
        if len(cur.users) != 1:
            users = ", ".join(_describe(u, modules, prefix) for u in cur.users) or "nothing"
            return _Site(reason=(f"the normalized value (before the activation) is read by "
                                 f"{users}, so it cannot be replaced by the activation's output"))
        (nxt,) = cur.users
        if nxt.op != "call_module" or not _is_activation(modules[nxt.target]):
            why = (": an in-place norm alone keeps its output for backward where the stock norm "
                   "keeps its input, so nothing would be saved") if stock_norm else ""
            return _Site(reason=(f"followed by {_describe(nxt, modules, prefix)}, not by an "
                                 f"activation module{why}"))
        m = modules[nxt.target]
        if isinstance(m, _DROPOUTS) and not _has_hooks(m) and nxt.args[0] is cur:
            if m.p != 0:
                return _Site(reason=(f"dropout (p={m.p}) at {prefix}{nxt.target} between the "
                                     "norm and the activation: act(dropout(norm(x))) is not "
                                     "act(norm(x))"))
            cur = nxt
            continue
        break
    act, reason = _activation(m, norm)
    if act is None:
        return _Site(reason=reason)
    if _has_hooks(m):
        return _Site(reason=f"the activation {prefix}{nxt.target} has hooks")
    if nxt.args[0] is not cur or len(nxt.args) != 1 or nxt.kwargs:
        return _Site(reason=f"the activation {prefix}{nxt.target} is called with other arguments")
    writer = _modified_in_place(nxt, modules, caller_unknown=prefix != "")
    if writer is not None and writer.op == "output":
        return _Site(reason=(f"the activation's output is returned to the forward of "
                             f"'{prefix.rpartition('.')[0].rpartition('.')[0] or 'the model'}', "
                             "which cannot be traced and might modify it in place; the fused "
                             "norm keeps that output for backward"))
    if writer is not None:
        return _Site(reason=(f"the activation's output is modified in place by "
                             f"{_describe(writer, modules, prefix)}; the fused norm keeps that "
                             "output for backward"))
    return _Site(None if type(m) is nn.Identity else prefix + nxt.target, act)


def _fused(norm: nn.Module, activation: str, param: float | None) -> nn.Module:
    """The effseg module for `norm` + activation, holding the norm's own tensors."""
    if isinstance(norm, nn.GroupNorm):
        new = InPlaceAGN(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine,
                         activation=activation, activation_param=param, device="meta")
        for name in ("weight", "bias"):
            setattr(new, name, getattr(norm, name))
        new.train(norm.training)
        return new
    cls = InPlaceAIN if isinstance(norm, _INSTANCE) else InPlaceABN
    new = cls(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
              track_running_stats=norm.track_running_stats, activation=activation,
              activation_param=param, device="meta")
    for name in ("weight", "bias"):
        setattr(new, name, getattr(norm, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = norm._buffers.get(name)
    new.train(norm.training)
    return new


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _plan(graphs: list, failed: dict[str, str], norms: dict[str, nn.Module],
          paths: dict[int, list[str]], target: nn.Module) -> dict[str, _Site | str]:
    """For every norm path: the site to fuse it at, or the reason it stays stock."""
    sites: dict[str, list[_Site]] = {p: [] for p in norms}
    calls: dict[str, list[str | None]] = {}  # module path -> per call: the norm fused into it
    for prefix, root, graph in graphs:
        modules = dict(root.named_modules())
        fused_into: dict[str, list[str]] = {}
        for node in graph.nodes:
            path = prefix + str(node.target)
            if node.op == "call_module" and path in sites:
                m = modules[node.target]
                site = _site(node, modules, prefix, not isinstance(m, _EFFSEG))
                sites[path].append(site)
                if site.activation_path is not None:
                    fused_into.setdefault(site.activation_path, []).append(path)
        for node in graph.nodes:
            if node.op == "call_module":
                path = prefix + node.target
                pending = fused_into.get(path)
                calls.setdefault(path, []).append(pending.pop(0) if pending else None)

    plan: dict[str, _Site | str] = {}
    for path, norm in norms.items():
        hidden = [q.rpartition(".")[0] for q in paths[id(norm)] if q.rpartition(".")[0] in failed]
        if isinstance(norm, nn.SyncBatchNorm):
            plan[path] = ("SyncBatchNorm is not converted: its statistics span processes, "
                          "which the fused module computes only in its Sync variant")
        elif not isinstance(norm, _EFFSEG) and type(norm) not in _STOCK:
            plan[path] = (f"{type(norm).__name__} is a subclass of a stock norm, possibly with "
                          "its own forward")
        elif hidden:
            plan[path] = (f"the forward of '{hidden[0] or 'the model'}' cannot be traced by "
                          f"torch.fx ({failed[hidden[0]]}), so how the norm's input and output "
                          "are used is unknown")
        elif not sites[path]:
            plan[path] = "not called in the traced forward"
        else:
            reasons = [s.reason for s in sites[path] if s.reason]
            if reasons:
                plan[path] = reasons[0]
            elif len({(s.activation_path, s.activation) for s in sites[path]}) > 1:
                plan[path] = "called at several places with different activations after it"
            else:
                plan[path] = sites[path][0]
    # An activation becomes nn.Identity, so each of its calls must have a norm fused into it.
    # Blocking a fusion removes no call of any other activation, so one pass settles it.
    for path, site in list(plan.items()):
        if not isinstance(site, _Site) or site.activation_path is None:
            continue
        act = site.activation_path
        act_module = target.get_submodule(act)
        hidden = [q.rpartition(".")[0] for q in paths[id(act_module)]
                  if q.rpartition(".")[0] in failed]
        if any(c is None or not isinstance(plan.get(c), _Site) for c in calls[act]):
            plan[path] = (f"the activation {act} is also applied where no norm is fused into "
                          "it, so it cannot become nn.Identity")
        elif hidden:
            plan[path] = (f"the activation {act} may also be called by the forward of "
                          f"'{hidden[0] or 'the model'}', which cannot be traced")
    return plan


def convert(model: nn.Module, inplace: bool = False, recompute: bool | str = False,
            example_input=None, budget: int | None = None, sync: bool = False,
            process_group=None, plain_fraction: float | None = None
            ) -> tuple[nn.Module, ConversionReport]:
    """Fuses norm + activation pairs of `model` into effseg's in-place modules.

    With `recompute=True` it also cuts the training forward into recomputing segments that keep
    only their inputs and O(C) statistics (effseg.integrations.recompute_convert); the report's `segments`
    lists them and `not_recomputed` what stays stock, with the reason. `example_input` (a
    tensor or a tuple of the forward's arguments) lets a forward that branches on shapes be
    traced with those shapes; its program then runs for inputs of those shapes only.
    `recompute="auto"` (with `budget` bytes and `example_input`) recomputes only as many
    segments as keep the tensor peak of a training step on the example within the budget, as
    measured (effseg.integrations.recompute_convert.choose).

    With `recompute=True` and `example_input`, a cost policy (recompute_convert.
    plain_where_costly) leaves plain the segments whose recomputation costs the most convolution
    multiply-adds per byte it saves, as long as the bytes they keep stay within `plain_fraction`
    (default 0.03, `recompute_convert.PLAIN_FRACTION`) of the bytes the forward saves for
    backward without recomputation, all measured by one forward on the example (it needs the
    memory of an inference forward; the random number generators are restored): on U-Nets the
    deep, wide, coarse levels, whose recomputation costs much time and saves little memory.
    Without `example_input` it does not run (segment sizes cannot be known from the traced graph
    alone; deciding at the first training forward instead would leave the report returned here
    wrong) and every segment but the model's last is recomputed; `plain_fraction=0` recomputes
    them all with an example too. The report's `not_recomputed` lists each segment it left
    plain with its multiply-adds, bytes and rank, and `policy` says what it did or why it did
    not run.

    Returns `(converted model, report)`. With `inplace=False` (default) `model` is left as it is
    and a deep copy is converted; with `inplace=True` `model` itself is changed (its parameters
    and buffers are the same tensors afterwards, so an optimizer built before stays valid). With
    `sync=True` the batch norms are then synchronized over `process_group` (None: the default
    group) by `effseg.nn.convert_sync`: fused ones become `InPlaceABNSync`, the others
    `nn.SyncBatchNorm`. See the module docstring for when a pair is fused and what is left
    stock.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"effseg.convert: expected an nn.Module, got {type(model).__name__}")
    for name, value in (("inplace", inplace), ("sync", sync)):
        if not isinstance(value, bool):
            raise TypeError(f"effseg.convert: {name} must be a bool, got "
                            f"{type(value).__name__}")
    if not (isinstance(recompute, bool) or recompute == "auto"):
        raise TypeError(f"effseg.convert: recompute must be True, False or 'auto', got "
                        f"{recompute!r}")
    if recompute == "auto" and (example_input is None or isinstance(budget, bool)
                                or not isinstance(budget, int) or budget <= 0):
        raise ValueError("effseg.convert: recompute='auto' needs budget= (a positive number of "
                         f"bytes, got {budget!r}) and example_input= (got "
                         f"{type(example_input).__name__})")
    if budget is not None and recompute != "auto":
        raise ValueError("effseg.convert: budget= is used only with recompute='auto'")
    if plain_fraction is not None:
        if recompute is not True:
            raise ValueError("effseg.convert: plain_fraction= is used only with recompute=True")
        if isinstance(plain_fraction, bool) or not isinstance(plain_fraction, (int, float)) or (
                not 0 <= plain_fraction < 1):
            raise ValueError("effseg.convert: plain_fraction must be a number in [0, 1), got "
                             f"{plain_fraction!r}")
        if plain_fraction > 0 and example_input is None:
            raise ValueError("effseg.convert: plain_fraction > 0 needs example_input= (the cost "
                             "policy measures the segments on it)")
    if sync and recompute:
        raise ValueError("effseg.convert: sync=True and recompute together are not supported "
                         "yet (recomputed segments replay local statistics only)")
    target = model if inplace else copy.deepcopy(model)
    # Tracing runs the forwards' Python code, which may store proxies on the modules: trace
    # copies. Forwards may branch on self.training: a pair must be safe in both modes.
    graphs: list[tuple[str, nn.Module, fx.Graph]] = []
    failed: dict[str, str] = {}
    for training in (True, False):
        _trace(copy.deepcopy(target).train(training), "", graphs, failed)

    paths: dict[int, list[str]] = {}
    for path, m in target.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    # Stock norms, and effseg norms without an activation (which can take one in).
    norms = {p: m for p, m in target.named_modules() if _is_norm(m) and not (
        isinstance(m, _EFFSEG) and m.activation != "identity")}
    plan = _plan(graphs, failed, norms, paths, target)

    report = ConversionReport()
    before = dict(target.named_modules())
    identities: dict[str, nn.Module] = {}
    for path, norm in norms.items():
        site = plan[path]
        if not isinstance(site, _Site):
            report.skipped.append(Skipped(path, site))
            continue
        name, param = site.activation
        act = site.activation_path
        if act is not None and act not in identities:
            # A PReLU keeps its slope (and key) in the module that replaces it.
            identities[act] = FusedPReLU(before[act]) if name == "prelu" else nn.Identity()
            for p in paths[id(before[act])]:
                _set(target, p, identities[act])
        # The effseg module takes the activation as identity first: a PReLU's slope is not a
        # number but the parameter it then reads from the FusedPReLU.
        resolved = ("identity", None) if name == "prelu" else (name, param)
        if isinstance(norm, _EFFSEG):
            norm.activation, norm.activation_param = resolve_activation(*resolved)
            new = norm
        else:
            new = _fused(norm, *resolved)
            for p in paths[id(norm)]:
                _set(target, p, new)
        if name == "prelu":
            new.fuse_prelu(identities[act])
        report.replaced.append(Replaced(
            path, f"{type(new).__name__}({new._activation_repr()})", site.activation_path))
    for path, m in before.items():
        if _other_norm(m):
            report.skipped.append(Skipped(path, (
                f"{type(m).__name__} is not a norm effseg has a fused module for (BatchNorm, "
                "InstanceNorm and GroupNorm)")))
    if sync:
        target = convert_sync(target, process_group)
    if recompute:
        from .recompute_convert import PLAIN_FRACTION, add_recompute, choose, plain_where_costly
        report.segments, report.not_recomputed = add_recompute(target, example_input)
        if recompute == "auto" and report.segments:
            report.not_recomputed += choose(target, report.segments, budget, example_input)
        elif recompute is True and report.segments:
            fraction = PLAIN_FRACTION if plain_fraction is None else plain_fraction
            if fraction == 0:
                report.policy = "cost policy: not run (plain_fraction=0)"
            elif example_input is None:
                report.policy = ("cost policy: not run (no example_input to measure the "
                                 "segments on); every segment but the model's last recomputed")
            else:
                entries, report.policy = plain_where_costly(target, report.segments,
                                                            example_input, fraction)
                report.not_recomputed += entries
    return target, report


__all__ = ["ConversionReport", "Replaced", "Skipped", "convert"]
