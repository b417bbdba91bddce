"""rewrite_modules: module-level actions inside one block (attention, cross-attention, MLP).

The block runs as a copy of its captured graph (``torch.export``'s unflattened block, whose
sub-modules are ``call_module`` nodes). For each role the plan gives an action:

* ``COMPUTE``: the sub-module runs; its output (and, for a later ``PRUNE``, its token input) is
  also returned as a cache write when a later step reads it;
* ``REUSE``: the sub-module call is replaced by a cache read (an extra input of the block);
* ``WIDTH(w)``: an MLP sub-module is replaced by a copy at prefix width ``w``;
* ``SKIP``: the sub-module's output is replaced by zeros (its recorded shape, the dtype and
  device of its runtime input), so the block's residual add leaves the stream unchanged;
* ``PRUNE(r)``: the sub-module runs on the ``round(r N)`` tokens of its token input that moved
  most since the cache was written (``dit_opt.executor.token_scores``), and its output for
  them is scattered into its cached output (the entry ``REUSE`` reads);
* ``CFG(b)``: the sub-module, as captured at half the batch, runs on half ``1 - b`` of a
  classifier-free-guidance batch (the inputs whose recorded shape halves there sliced), and half
  ``b`` of its output is that half's plus the difference of the two halves of its cached output
  (``dit_opt.executor.cfg_merge_output``).

``PRUNE`` needs a sub-module that is token-wise in one input (:func:`module_token_input`), laid
out ``(batch, tokens, channels)`` with the model call's batch first: an MLP; a cross-attention,
whose queries come from the stream and whose keys and values come from other inputs (e.g. text
embeddings) that stay whole; or a self-attention with no input but the tokens, which then
attends among the kept tokens only (what a block-level ``PRUNE`` does too). A self-attention
that also takes rotary embeddings or a mask (they are indexed by token and would have to be
gathered in step), or a joint attention over two streams (Flux, SD3), cannot be pruned.

The rest of the block (norms, modulation, residual adds) always runs. Cache traffic stays
functional: reads are extra inputs of the block graph and of the step graph, writes extra
outputs. Graphs are specialised to the captured shapes (the runtime captures again for new
ones), so ``SKIP``'s zeros and ``PRUNE``'s token count are constants of the graph.
"""

from __future__ import annotations

import copy
import inspect
import operator
from typing import Any

import torch
import torch.fx
from torch import nn

from dit_opt.errors import DitOptError
from dit_opt.executor import (
    cfg_merge_output,
    combine,
    gather_tokens,
    scatter_tokens,
    token_layout,
    token_scores,
    topk_tokens,
)
from dit_opt.ir import BlockSpec, DiTGraph
from dit_opt.plan import Action, ActionKind
from dit_opt.synthetic import call_batch
from passes.infra import PassResult
from passes.rewrite_cache import history_kind
from passes.rewrite_cfg import half_of
from passes.step_graph import StepGraph, eliminate_dead_code, weights_key

__all__ = ["rewrite_modules", "module_key", "module_token_input", "output_kind"]


def module_key(block: str, module: str, index: int | None = None, kind: str = "out") -> str:
    """Cache entry of a sub-module's output: ``<block>.<module>/out`` (``/out<i>`` for tuple
    outputs); ``kind="in"``: of its token input, ``<block>.<module>/in`` (read by ``PRUNE``);
    :func:`output_kind` names the outputs of earlier computes (read by ``FORECAST``)."""
    return f"{block}.{module}/{kind}" + ("" if index is None else str(index))


def output_kind(i: int) -> str:
    """Cache-entry kind of a sub-module's output ``i`` computes back: ``out``, ``prev``, ``hist2``, ..."""
    return "out" if i == 0 else history_kind(i)


def module_token_input(graph: DiTGraph, spec: BlockSpec, module: str) -> tuple[int | None, str]:
    """Which argument of ``module``'s call in ``spec``'s block graph ``PRUNE`` gathers tokens of.

    Args:
        graph: the captured graph.
        spec: the block.
        module: a role sub-module's name, relative to the block (e.g. ``"attn2"``).

    Returns:
        ``(index, reason)``: the position of the token input among the call's arguments, or
        ``None`` and why the sub-module cannot be pruned (see the module docstring).
    """
    interp = graph.module.get_submodule(spec.name)
    calls = [n for n in interp.graph.nodes if n.op == "call_module" and n.target == module]
    if len(calls) != 1:
        return None, f"it is called {len(calls)} times in the block"
    (node,) = calls
    role = next((r for r in ("attn", "cross_attn", "mlp") if module in spec.role_modules(r)), None)
    if role is None:
        return None, "it is not an attention, cross-attention or MLP"
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        return None, "its output is not one (batch, tokens, channels) tensor"
    tensors = [(i, a) for i, a in enumerate(node.args)
               if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]
    if node.kwargs:
        return None, "its call passes keyword arguments the rewrite does not handle"
    streamed = _stream_dependent(interp, spec, graph.model.get_submodule(spec.name))
    on_stream = [(i, a) for i, a in tensors if a in streamed]
    if not on_stream:
        return None, "none of its inputs comes from the block's streams"
    if len(on_stream) > 1:
        return None, (f"{len(on_stream)} of its inputs come from the block's streams (a joint attention "
                      f"would have to prune every stream in step)")
    (i, x), = on_stream
    layout = token_layout(tuple(x.meta["val"].shape), call_batch(graph))
    if layout is not None:  # a sequence-first block (Ernie-Image's MLP runs on (tokens, batch, channels))
        return None, layout
    if tuple(x.meta["val"].shape[:2]) != tuple(out.shape[:2]):
        return None, "its output does not have one row per token of its input"
    if role in ("attn", "mlp") and len(tensors) > 1:
        # a self-attention's rotary embeddings or mask are indexed by token: they would have
        # to be gathered in step with the tokens (and an MLP taking them is not token-wise)
        return None, "it takes other tensor inputs (rotary embeddings, masks) that would need gathering too"
    return i, ""


def _stream_dependent(interp: torch.fx.GraphModule, spec: BlockSpec, block: nn.Module) -> set[torch.fx.Node]:
    """Nodes of a block graph whose value depends on one of the block's stream inputs."""
    params = [p.name for p in inspect.signature(block.forward).parameters.values() if p.kind != p.VAR_KEYWORD]
    streams = {o.input_name for o in spec.outputs if o.input_name}

    def is_stream(ph: torch.fx.Node) -> bool:
        name = str(ph.target)
        if name.startswith("_positional_arg_"):
            pos = int(name.rsplit("_", 1)[1])
            name = params[pos] if pos < len(params) else name
        return name in streams

    dep: set[torch.fx.Node] = set()
    flat: dict[torch.fx.Node, list[Any] | None] = {}  # tree_flatten_spec node -> the input behind each leaf
    for n in interp.graph.nodes:
        if n.op == "placeholder":
            if is_stream(n):
                dep.add(n)
        elif n.op == "call_function" and "tree_flatten_spec" in str(n.target):
            # The block graph flattens all its inputs at once: follow each leaf to its own input
            # (or, if the structure is not understood, to all of them).
            flat[n] = _leaf_sources(n.args[0], getattr(interp, str(n.args[1].target), None))
        elif n.op == "call_function" and n.target is operator.getitem and n.args[0] in flat:
            leaves = flat[n.args[0]]
            src = leaves[n.args[1]] if leaves is not None and n.args[1] < len(leaves) else None
            if (src in dep) if isinstance(src, torch.fx.Node) else any(a in dep for a in n.args[0].all_input_nodes):
                dep.add(n)
        elif any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _leaf_sources(tree: Any, spec: Any) -> list[Any] | None:
    """Per leaf of ``spec``, the graph value of ``tree`` it comes from (``None``: not understood)."""
    try:
        if spec.is_leaf() or isinstance(tree, torch.fx.Node):
            return [tree] * spec.num_leaves  # a placeholder may hold a whole tuple (rotary (cos, sin))
        if isinstance(tree, dict):
            children = [tree[k] for k in spec.context]
        elif isinstance(tree, list | tuple):
            children = list(tree)
        else:
            return None
        subs = spec.children() if hasattr(spec, "children") else spec.children_specs  # renamed in torch 2.9
        out: list[Any] = []
        for child, sub in zip(children, subs, strict=True):
            leaves = _leaf_sources(child, sub)
            if leaves is None:
                return None
            out += leaves
        return out
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def rewrite_modules(
    sg: StepGraph,
    spec: BlockSpec,
    actions: dict[str, Action],
    writes: dict[str, bool],
    narrow_mlp: Any = None,
    *,
    write_inputs: dict[str, bool] | None = None,
    keeps: dict[str, int] | None = None,
    half_module: Any = None,
    cache: dict | None = None,
) -> PassResult:
    """Rewrite ``spec``'s block call with per-role actions.

    Args:
        sg: the step graph.
        spec: the block.
        actions: role -> action (``COMPUTE``, ``REUSE``, ``FORECAST``, ``WIDTH``, ``SKIP`` or ``PRUNE``).
        writes: role -> whether a ``COMPUTE`` must write the outputs for a later ``REUSE`` or ``PRUNE``.
        narrow_mlp: ``(module, width) -> module`` for ``WIDTH``.
        write_inputs: role -> whether a ``COMPUTE`` must also write the token inputs for a later
            ``PRUNE`` (sub-modules that cannot be pruned write none).
        keeps: role -> on ``COMPUTE``, how many outputs of earlier computes to keep, shifted one
            place down (``out`` to ``prev``, ``prev`` to ``hist2``, ...) for a later ``FORECAST``.
        half_module: ``(spec, name) -> module`` for ``CFG``: the sub-module ``name`` of the block as
            captured at half the batch (a captured sub-module graph is specialised to its batch).
        cache: a dict to share rewritten block graphs in: the steps of a plan (and the plans
            built on one graph) that give a block the same actions build its graph once.

    Raises:
        DitOptError: an action that has no module-level form, or ``PRUNE`` of a sub-module that
            cannot be pruned (the message says why).
    """
    key = (spec.name, *(tuple(sorted((d or {}).items(), key=lambda kv: kv[0]))
                         for d in (actions, writes, write_inputs, keeps)))
    if cache is None or key not in cache:
        built = _block_graph(sg, spec, actions, writes, narrow_mlp, write_inputs, keeps, half_module)
        if cache is None:
            return _wire(sg, spec, *built)
        cache[key] = built
    return _wire(sg, spec, *cache[key])


def _block_graph(sg, spec, actions, writes, narrow_mlp, write_inputs, keeps, half_module
                 ) -> tuple[nn.Module, list[tuple[str, str]], list[str]]:
    """The rewritten block graph (see :func:`rewrite_modules`), the cache keys it reads (with
    the names of their placeholders) and the keys of its extra outputs, in order."""
    interp = sg.graph.module.get_submodule(spec.name)
    g = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = g.graph_copy(interp.graph, val_map)  # node meta copied: the recorded shapes SKIP and PRUNE use
    modules: dict[str, Any] = {}
    for n in g.nodes:
        if n.op in ("call_module", "get_attr"):
            modules[n.target] = _lookup(interp, n.target)
    role_of = {m: role for role in actions for m in spec.role_modules(role)}
    reads: dict[str, torch.fx.Node] = {}  # key -> placeholder in the block graph
    extra: list[tuple[str, torch.fx.Node]] = []  # (key, value returned by the block graph)
    last_ph = [[n for n in g.nodes if n.op == "placeholder"][-1]]

    def read(key: str) -> torch.fx.Node:
        if key not in reads:
            with g.inserting_after(last_ph[0]):
                reads[key] = last_ph[0] = g.placeholder("cache_" + key.replace("/", "_").replace(".", "_"))
        return reads[key]

    for n in list(g.nodes):
        if n.op != "call_module" or n.target not in role_of:
            continue
        role = role_of[n.target]
        action = actions[role]
        users = list(n.users)
        tuple_out = bool(users) and all(u.op == "call_function" and u.target is operator.getitem for u in users)
        outs = [(u.args[1], u) for u in users] if tuple_out else [(None, n)]
        keys = [(module_key(spec.name, n.target, i), v) for i, v in outs]
        if action.kind in (ActionKind.REUSE, ActionKind.FORECAST):
            for i, value in outs:
                if action.kind is ActionKind.REUSE:
                    served = read(module_key(spec.name, n.target, i))
                else:
                    history = tuple(read(module_key(spec.name, n.target, i, output_kind(j)))
                                    for j in range(action.order + 1))
                    with g.inserting_before(n):
                        served = g.call_function(combine, (history, read(weights_key(f"{spec.name}.{role}"))))
                    served.meta["val"] = value.meta.get("val")
                value.replace_all_uses_with(served)
            for u in users if tuple_out else []:
                g.erase_node(u)
            g.erase_node(n)
        elif action.kind is ActionKind.COMPUTE:
            if writes.get(role):
                extra.extend(keys)
            for j in range((keeps or {}).get(role, 0), 0, -1):
                extra.extend((module_key(spec.name, n.target, i, output_kind(j)),
                              read(module_key(spec.name, n.target, i, output_kind(j - 1)))) for i, _ in outs)
            if (write_inputs or {}).get(role):
                pos, _ = module_token_input(sg.graph, spec, n.target)
                if pos is not None:
                    extra.append((module_key(spec.name, n.target, kind="in"), n.args[pos]))
        elif action.kind is ActionKind.WIDTH:
            if narrow_mlp is None:
                raise DitOptError(f"block {spec.name}: WIDTH of {n.target} needs a narrowing function")
            target = f"{n.target}_width{round(action.width * 100)}"
            modules[target] = narrow_mlp(spec, n.target, action.width)
            n.target = target
        elif action.kind is ActionKind.SKIP:
            _skip(g, n, [v for _, v in keys], spec)
        elif action.kind is ActionKind.PRUNE:
            pos, why = module_token_input(sg.graph, spec, n.target)
            if pos is None:
                raise DitOptError(f"block {spec.name}: {n.target} ({role}) cannot be pruned: {why}; "
                                  f"plan another action for it (profiles offer PRUNE only where it applies)")
            _prune(g, n, pos, action.rate, read(module_key(spec.name, n.target, kind="in")),
                   read(module_key(spec.name, n.target)))
        elif action.kind is ActionKind.CFG:
            if half_module is None:
                raise DitOptError(f"block {spec.name}: CFG of {n.target} needs its sub-module captured at half "
                                  f"the batch (half_module)")
            target = f"{n.target}_half"
            modules[target] = half_module(spec, n.target)
            _cfg(g, n, [v for _, v in outs], action.branch, [read(module_key(spec.name, n.target, i)) for i, _ in outs],
                 spec, _halved_args(n, modules[target]))
            n.target = target
        else:
            raise DitOptError(
                f"block {spec.name}: {action} has no module-level form "
                f"(module units take COMPUTE, REUSE, FORECAST, WIDTH, SKIP, PRUNE or CFG)"
            )
    g.output((out, *[v for _, v in extra]))
    g.lint()
    eliminate_dead_code(g, modules)
    # GraphModule generates its code once, here (an explicit recompile would do it again)
    gm = BlockGraph(modules, g, class_name=f"{spec.cls_name}Modules")
    return gm, [(k, ph.target) for k, ph in reads.items()], [k for k, _ in extra]


def _wire(sg: StepGraph, spec: BlockSpec, gm: nn.Module, reads: list[tuple[str, str]], extra: list[str]
          ) -> PassResult:
    """Call the rewritten block graph ``gm`` in the step graph in place of ``spec``'s block."""
    # The step graph calls this block graph with the original arguments plus the cache reads.
    node = sg.node(spec)
    target = sg.add_module(f"{spec.name.replace('.', '_')}_modules_{len(sg.modules)}", gm)
    with sg.fx.inserting_before(node):
        kwargs = dict(node.kwargs)
        for key, name in reads:
            kwargs[name] = sg.read(key)
        call = sg.fx.call_module(target, node.args, kwargs)
        result = sg.fx.call_function(operator.getitem, (call, 0))
    sg.replace_block(spec, result)
    for i, key in enumerate(extra):
        with sg.fx.inserting_after(result):
            sg.write(key, sg.fx.call_function(operator.getitem, (call, i + 1)))
    return PassResult(sg, True)


class BlockGraph(torch.fx.GraphModule):
    """A rewritten block graph: built once, then shared by every step variant (and plan) that
    gives the block the same actions, so its code is generated once. (A ``GraphModule``
    regenerates the code of its ``GraphModule`` children at each of its own ``recompile``,
    which each step variant's construction does; a ``BlockGraph`` keeps the code it has.)
    Its graph is not edited after construction."""

    def recompile(self):  # noqa: D102 - see the class docstring
        code = self.__dict__.get("_block_code")
        if code is None:
            code = self.__dict__["_block_code"] = super().recompile()
        return code


def _skip(g: torch.fx.Graph, node: torch.fx.Node, values: list[torch.fx.Node], spec: BlockSpec) -> None:
    """Replace the sub-module call ``node`` (its outputs ``values``) by zeros of the recorded shapes."""
    ref = next((a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)), None)
    if ref is None:
        raise DitOptError(f"block {spec.name}: {node.target} takes no tensor input to build SKIP's zeros from")
    for value in values:
        val = value.meta.get("val")
        if not isinstance(val, torch.Tensor):
            if value.users:
                raise DitOptError(f"block {spec.name}: {node.target}'s output has no recorded shape, so it "
                                  f"cannot be replaced by zeros; plan another action for it")
            continue
        # new_zeros: the device (and, unless the module changes it, the dtype) of the runtime input
        kwargs = {} if val.dtype == ref.meta["val"].dtype else {"dtype": val.dtype}
        with g.inserting_before(node):
            zeros = g.call_method("new_zeros", (ref, tuple(int(s) for s in val.shape)), kwargs)
        zeros.meta["val"] = val
        value.replace_all_uses_with(zeros)
    for u in list(node.users):
        g.erase_node(u)
    g.erase_node(node)


def _prune(g: torch.fx.Graph, node: torch.fx.Node, pos: int, rate: float, cached_in: torch.fx.Node,
           cached_out: torch.fx.Node) -> None:
    """Run the sub-module call ``node`` on the top ``rate`` of the tokens of its argument ``pos``
    (by drift from ``cached_in``) and scatter its output into ``cached_out``."""
    x = node.args[pos]
    k = max(1, round(rate * int(x.meta["val"].shape[1])))
    with g.inserting_before(node):
        scores = g.call_function(token_scores, (x, cached_in))
        idx = g.call_function(topk_tokens, (scores, k))
        picked = g.call_function(gather_tokens, (x, idx))
    node.args = tuple(picked if i == pos else a for i, a in enumerate(node.args))
    with g.inserting_after(node):
        merged = g.call_function(scatter_tokens, (cached_out, idx, node))
    # the full output's shape, for a later sub-module of the role that takes it (Flux's act_mlp)
    merged.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(merged, delete_user_cb=lambda user: user is not merged)


def _halved_args(node: torch.fx.Node, half: nn.Module) -> set[int] | None:
    """Positions of ``node``'s arguments that the sub-module captured at half the batch takes
    halved (its placeholders' recorded shapes against the arguments'); ``None`` where the two
    cannot be matched (then every tensor whose first dimension is the batch is halved)."""
    graph = getattr(half, "graph", None)
    phs = [p for p in graph.nodes if p.op == "placeholder"] if isinstance(graph, torch.fx.Graph) else []
    if node.kwargs or len(phs) != len(node.args):
        return None
    out = set()
    for i, (a, ph) in enumerate(zip(node.args, phs, strict=True)):
        full, got = (a.meta.get("val") if isinstance(a, torch.fx.Node) else None), ph.meta.get("val")
        if not isinstance(full, torch.Tensor) or not isinstance(got, torch.Tensor):
            if isinstance(full, torch.Tensor) or isinstance(got, torch.Tensor):
                return None
            continue
        if tuple(got.shape) != tuple(full.shape):
            if not full.dim() or tuple(got.shape) != (full.shape[0] // 2, *full.shape[1:]):
                return None
            out.add(i)
    return out


def _cfg(g: torch.fx.Graph, node: torch.fx.Node, values: list[torch.fx.Node], branch: int,
         cached: list[torch.fx.Node], spec: BlockSpec, halved: set[int] | None = None) -> None:
    """Run the sub-module call ``node`` on half ``1 - branch`` of the batch and derive half
    ``branch`` of each of its outputs ``values`` from the cached outputs ``cached``; ``halved``:
    the positions of the arguments to halve (default: every batch-major tensor)."""
    batch = [int(v.meta["val"].shape[0]) for v in values if isinstance(v.meta.get("val"), torch.Tensor)]
    ref = next((a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)
                and a.meta["val"].dim() and batch and int(a.meta["val"].shape[0]) == batch[0]), None)
    if ref is None or len(batch) != len(values):
        raise DitOptError(f"block {spec.name}: {node.target}'s outputs and inputs are not all batch-major tensors, "
                          f"so it cannot run on one guidance half; plan another action for it")
    with g.inserting_before(node):
        node.args = tuple(half_of(g, a, ref, 1 - branch) if halved is None or i in halved else a
                          for i, a in enumerate(node.args))
        node.kwargs = {k: half_of(g, v, ref, 1 - branch) for k, v in node.kwargs.items()}
    for value, entry in zip(values, cached, strict=True):
        with g.inserting_after(value):
            merged = g.call_function(cfg_merge_output, (value, entry, branch))
        merged.meta["val"] = value.meta.get("val")
        value.replace_all_uses_with(merged, delete_user_cb=lambda user, merged=merged: user is not merged)


def narrow_feedforward(module: nn.Module, width: float, order: torch.Tensor | None = None) -> nn.Module:
    """A copy of a diffusers ``FeedForward`` keeping a prefix ``width`` of its hidden channels."""
    from dit_opt.executor import narrow_block
    from dit_opt.ir import BlockSpec as _Spec

    holder = nn.Module()
    holder.mlp = copy.deepcopy(module)
    spec = _Spec("_", 0, "FeedForward", (), (), False, (("mlp", ("mlp",)),))
    return narrow_block(holder, spec, width, {"mlp": order} if order is not None else None).mlp


def _lookup(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
