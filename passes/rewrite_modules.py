"""rewrite_modules: module-level actions inside one block (attention, cross-attention, MLP).

The block runs as a copy of its captured graph (``torch.export``'s unflattened block, whose
sub-modules are ``call_module`` nodes). For each role the plan gives an action:

* ``COMPUTE``: the sub-module runs; its output is also returned as a cache write when a later
  step reuses it;
* ``REUSE``: the sub-module call is replaced by a cache read (an extra input of the block);
* ``WIDTH(w)``: an MLP sub-module is replaced by a copy at prefix width ``w``.

The rest of the block (norms, modulation, residual adds) always runs. Cache traffic stays
functional: reads are extra inputs of the block graph and of the step graph, writes extra
outputs.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.fx
from torch import nn

from dit_opt.errors import DitOptError
from dit_opt.ir import BlockSpec
from dit_opt.plan import Action, ActionKind
from passes.infra import PassResult
from passes.step_graph import StepGraph

__all__ = ["rewrite_modules", "module_key"]


def module_key(block: str, module: str, index: int | None = None) -> str:
    """Cache entry of a sub-module's output: ``<block>.<module>/out`` (``/out<i>`` for tuple outputs)."""
    return f"{block}.{module}/out" + ("" if index is None else str(index))


def rewrite_modules(
    sg: StepGraph,
    spec: BlockSpec,
    actions: dict[str, Action],
    writes: dict[str, bool],
    narrow_mlp: Any = None,
) -> PassResult:
    """Rewrite ``spec``'s block call with per-role actions.

    Args:
        sg: the step graph.
        spec: the block.
        actions: role -> action (``COMPUTE``, ``REUSE`` or ``WIDTH``).
        writes: role -> whether a ``COMPUTE`` must write the outputs for a later ``REUSE``.
        narrow_mlp: ``(module, width) -> module`` for ``WIDTH``.

    Raises:
        DitOptError: an action that has no module-level form here (``PRUNE``, ``SKIP``).
    """
    interp = sg.graph.module.get_submodule(spec.name)
    g = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = g.graph_copy(interp.graph, val_map)
    modules: dict[str, Any] = {}
    for n in g.nodes:
        if n.op in ("call_module", "get_attr"):
            modules[n.target] = _lookup(interp, n.target)
    role_of = {m: role for role in actions for m in spec.role_modules(role)}
    reads: list[tuple[str, torch.fx.Node]] = []  # (key, placeholder in the block graph)
    extra: list[tuple[str, torch.fx.Node]] = []  # (key, value returned by the block graph)
    last_ph = [n for n in g.nodes if n.op == "placeholder"][-1]
    for n in list(g.nodes):
        if n.op != "call_module" or n.target not in role_of:
            continue
        action = actions[role_of[n.target]]
        users = list(n.users)
        tuple_out = bool(users) and all(u.op == "call_function" and u.target is operator.getitem for u in users)
        keys = ([(module_key(spec.name, n.target, u.args[1]), u) for u in users] if tuple_out
                else [(module_key(spec.name, n.target), n)])
        if action.kind is ActionKind.REUSE:
            for key, value in keys:
                with g.inserting_after(last_ph):
                    ph = g.placeholder("cache_" + key.replace("/", "_").replace(".", "_"))
                last_ph = ph
                value.replace_all_uses_with(ph)
                reads.append((key, ph))
            for u in users if tuple_out else []:
                g.erase_node(u)
            g.erase_node(n)
        elif action.kind is ActionKind.COMPUTE:
            if writes.get(role_of[n.target]):
                extra.extend(keys)
        elif action.kind is ActionKind.WIDTH:
            if narrow_mlp is None:
                raise DitOptError(f"block {spec.name}: WIDTH of {n.target} needs a narrowing function")
            target = f"{n.target}_width{round(action.width * 100)}"
            modules[target] = narrow_mlp(spec, n.target, action.width)
            n.target = target
        else:
            raise DitOptError(
                f"block {spec.name}: {action} has no module-level form (module units take COMPUTE, REUSE or WIDTH)"
            )
    g.output((out, *[v for _, v in extra]))
    g.lint()
    gm = torch.fx.GraphModule(modules, g, class_name=f"{spec.cls_name}Modules")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    # The step graph calls this block graph with the original arguments plus the cache reads.
    node = sg.node(spec)
    target = sg.add_module(f"{spec.name.replace('.', '_')}_modules_{len(sg.modules)}", gm)
    with sg.fx.inserting_before(node):
        kwargs = dict(node.kwargs)
        for key, ph in reads:
            kwargs[ph.target] = sg.read(key)
        call = sg.fx.call_module(target, node.args, kwargs)
        result = sg.fx.call_function(operator.getitem, (call, 0))
    sg.replace_block(spec, result)
    for i, (key, _) in enumerate(extra):
        with sg.fx.inserting_after(result):
            sg.write(key, sg.fx.call_function(operator.getitem, (call, i + 1)))
    return PassResult(sg, True)


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
