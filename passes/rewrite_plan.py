"""From a :class:`~dit_opt.plan.Plan` to one rewritten graph per step (identical steps shared).

The plan is the only input besides the captured graph: for each step, each block node goes
through the rewrite pass of its action (``rewrite_cache``, ``rewrite_prune``,
``rewrite_width``, ``rewrite_skip``, ``rewrite_cfg``), or, for module-level units, each block through
``rewrite_modules`` with the actions of its roles; a ``STEP`` step (the whole step forecast) goes
through ``rewrite_step`` instead, and the full steps it extrapolates from write the model's
outputs (``rewrite_step.write_outputs``). A ``COMPUTE`` writes the cache entries that a
later step of the same unit reads before its next ``COMPUTE``; before a ``FORECAST`` of order
``k`` the computes it extrapolates from also keep the residuals of the ones before them
(``prev``, ``hist2``, ...), and the forecast's weights (:func:`dit_opt.plan.forecast_weights`)
are an input of the step's graph (:func:`step_weights`, fed by the runtime), so steps that
differ only in their weights (the same actions at other spacings) share one graph. For a
module unit the "residual" entry is the module's output and the "input" entry its token input
(read by a module ``PRUNE``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch
import torch.fx
from torch import nn

from dit_opt.errors import DitOptError
from dit_opt.ir import BlockSpec, DiTGraph
from dit_opt.plan import COMPUTE, Action, ActionKind, Plan, compute_history, forecast_weights, step_forecasts
from passes.blockwise_step import BlockwiseStep, step_forecast_step
from passes.rewrite_cache import rewrite_cache
from passes.rewrite_cfg import rewrite_cfg
from passes.rewrite_modules import rewrite_modules
from passes.rewrite_prune import rewrite_prune
from passes.rewrite_skip import rewrite_skip
from passes.rewrite_step import OUTPUT, rewrite_step, write_outputs
from passes.rewrite_width import rewrite_width
from passes.step_graph import StepGraph, weights_key

__all__ = ["BlockwiseStep", "Variant", "build_variants", "cache_needs", "copy_variant", "output_needs", "step_weights"]


@dataclass(frozen=True)
class Variant:
    """One step's rewritten graph and its cache traffic."""

    gm: torch.fx.GraphModule
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    actions: tuple[Action, ...]
    #: what runs ``gm`` when it is lowered as a whole (a ``torch.compile`` of it); ``None``: ``gm`` itself
    call: Any = None

    def __call__(self, *args: Any) -> Any:
        """Run the step: the model's flat inputs and the cache reads in, its flat outputs and
        the cache writes out."""
        return (self.gm if self.call is None else self.call)(*args)

    @property
    def num_model_outputs(self) -> int:
        """How many of the returned values are the model's flat outputs (the rest: cache writes)."""
        return self.gm.num_model_outputs

    @cached_property
    def derives_guidance(self) -> bool:
        """Whether a block of this step runs on one guidance half and derives the other (``CFG``)."""
        return any(a.kind is ActionKind.CFG for a in self.actions)


def cache_needs(plan: Plan) -> list[list[tuple[bool, bool, int]]]:
    """Per step and unit, what a ``COMPUTE`` must write for later steps: (residual, input, how
    many older residuals it keeps shifted down for a later ``FORECAST``).

    Example:
        >>> cache_needs(plan)[0][3]   # step 0, unit 3: (residual, input, older residuals kept)
        (True, True, 0)
    """
    T, U = plan.num_steps, len(plan.units)
    needs = [[(False, False, 0)] * U for _ in range(T)]
    # Step 0 writes every entry: the runtime may switch to a plan re-solved for another
    # schedule after seeing the second timestep, and that plan reads what step 0 wrote.
    needs[0] = [(True, True, 0)] * U
    for u in range(U):
        for _, action, computes in compute_history(plan.actions, u):
            if not action.needs_cache:
                continue
            res, inp, keep = needs[computes[0]][u]
            needs[computes[0]][u] = (True, inp or action.kind is ActionKind.PRUNE, keep)
            if action.kind is ActionKind.FORECAST:
                # the compute i places back keeps the order - i residuals written before it
                for i, c in enumerate(computes[:action.order + 1]):
                    res, inp, keep = needs[c][u]
                    needs[c][u] = (True, inp, max(keep, action.order - i))
    return needs


def output_needs(plan: Plan) -> list[int | None]:
    """Per step, ``None``, or for a full step that a later ``STEP`` reads how many older model
    outputs it keeps shifted down beside its own (``passes.rewrite_step.write_outputs``)."""
    needs: list[int | None] = [None] * plan.num_steps
    for _, step, full in step_forecasts(plan.actions):
        if step is not None:
            for i, c in enumerate(full[:step.order + 1]):
                needs[c] = max(needs[c] or 0, step.order - i)
    return needs


def step_forecast_weights(plan: Plan) -> list[tuple[float, ...] | None]:
    """Per step, the weights of its ``STEP`` over the last ``order + 1`` full steps, newest first
    (``None`` at a step that is not one)."""
    return [None if step is None else forecast_weights(t, full[:step.order + 1], plan.forecast_form)
            for t, step, full in step_forecasts(plan.actions)]


def forecast_plan_weights(plan: Plan) -> list[list[tuple[float, ...] | None]]:
    """Per step and unit, the extrapolation weights of a ``FORECAST`` over the unit's last
    ``order + 1`` computes, newest first (``None`` elsewhere)."""
    T, U = plan.num_steps, len(plan.units)
    out: list[list[tuple[float, ...] | None]] = [[None] * U for _ in range(T)]
    for u in range(U):
        for t, action, computes in compute_history(plan.actions, u):
            if action.kind is ActionKind.FORECAST:
                used = computes[:action.order + 1]
                if len(used) < action.order + 1:
                    raise DitOptError(f"step {t}, unit {plan.units[u]}: {action} needs {action.order + 1} "
                                      f"earlier COMPUTE steps")
                out[t][u] = forecast_weights(t, used, plan.forecast_form)
    return out


def step_weights(plan: Plan, dtype: torch.dtype = torch.float32, device: Any = None
                 ) -> list[dict[str, torch.Tensor]]:
    """Per step, the ``FORECAST`` weights its graph reads, by input name
    (:func:`passes.step_graph.weights_key`: ``<block>/weights``, ``<block>.<role>/weights`` for a
    module unit; ``model_output/weights`` for a ``STEP``), as 1-D tensors of ``dtype`` on
    ``device``; the runtime feeds them beside the cache reads."""
    out: list[dict[str, torch.Tensor]] = []
    for row, whole in zip(forecast_plan_weights(plan), step_forecast_weights(plan), strict=True):
        step = {}
        for unit, w in zip(plan.units, row, strict=True):
            if w is not None:  # str(unit): the block, or <block>.<role>
                step[weights_key(str(unit))] = torch.tensor(w, dtype=dtype, device=device)
        if whole is not None:
            step[weights_key(OUTPUT)] = torch.tensor(whole, dtype=dtype, device=device)
        out.append(step)
    return out


def build_variants(
    graph: DiTGraph,
    plan: Plan,
    narrowed: Callable[[BlockSpec, float], nn.Module],
    narrow_mlp: Callable[[BlockSpec, str, float], nn.Module] | None = None,
    guidance: bool = True,
    half_module: Callable[[BlockSpec, str], nn.Module] | None = None,
    cache: dict | None = None,
) -> list[Variant]:
    """One :class:`Variant` per step; steps with the same actions and cache writes share one.

    Args:
        graph: the captured graph.
        plan: the plan (block-level or module-level units).
        narrowed: returns the block narrowed to a width (built once per block and width).
        narrow_mlp: returns a block's MLP sub-module narrowed to a width (module-level plans).
        guidance: whether the graph's calls are classifier-free-guidance batches; if not (the
            pipeline runs without guidance), ``CFG`` actions compute the block in full, writing
            nothing (more FLOPs than the plan's, the same cache contents).
        half_module: returns a block's sub-module as captured at half the batch (module-level
            ``CFG``: the captured sub-module graphs are specialised to the batch they saw).
        cache: shared by the builds of plans on one graph (and one ``narrowed`` /
            ``narrow_mlp`` / ``half_module``): a step given the same actions and cache writes in
            two plans is built once, and so is a block rewritten the same
            way in two steps (``rewrite_modules``). The variants are then shared too: whoever
            changes one's modules (compiling them) must do it on a copy (:func:`copy_variant`).

    Raises:
        DitOptError: the plan's units are not the graph's blocks.
    """
    specs = {b.name: b for b in graph.blocks}
    groups: dict[str, list[int]] = {}
    for u, unit in enumerate(plan.units):
        name = f"{unit.list_name}.{unit.index}"
        if name not in specs:
            raise DitOptError(f"plan unit {unit} is not a block of {type(graph.model).__name__} "
                              f"(blocks: {list(specs)[:4]}...); the plan was made for another model")
        groups.setdefault(name, []).append(u)
    order = []
    for name, units in groups.items():
        roles = [plan.units[u].role for u in units]
        if None in roles and len(units) > 1:
            raise DitOptError(f"plan has both block-level and module-level units for block {name}; use one granularity")
        order.append((specs[name], units))
    needs, outputs = cache_needs(plan), output_needs(plan)
    cache = {} if cache is None else cache
    out = []
    for t in range(plan.num_steps):
        # everything _build reads besides the graph and the module makers (fixed per cache)
        # (the forecast weights are inputs: steps with the same actions at other spacings share a graph)
        key = ("step", plan.units, guidance, tuple(str(a) for a in plan.actions[t]), tuple(needs[t]), outputs[t])
        if key not in cache:
            build = _build if graph.blockwise is None else _build_blockwise
            cache[key] = build(graph, order, plan, t, needs[t], outputs[t], narrowed, narrow_mlp, guidance,
                               half_module, cache)
        out.append(cache[key])
    return out


def _build_blockwise(graph, order, plan, t, needs, keep_outputs, narrowed, narrow_mlp, guidance, half_module,
                     cache) -> BlockwiseStep:
    """A block-by-block capture's step: each block's graph rewritten by :func:`_build` on the block's
    slice of the top graph (built once per block and actions), the glue the model's own forward."""
    actions = tuple(plan.actions[t])
    if plan.is_step_forecast(t):
        return step_forecast_step(graph, actions, actions[0].order)
    blocks = []
    for spec, units in order:
        key = ("block", spec.name, guidance, tuple(plan.units[u] for u in units),
               tuple(str(actions[u]) for u in units), tuple(needs[u] for u in units))
        if key not in cache:
            view = cache.get(("view", spec.name))
            if view is None:
                view = cache[("view", spec.name)] = replace(graph, gm=graph.blockwise.views[spec.name],
                                                            blocks=(spec,), blockwise=None)
            cache[key] = _build(view, [(spec, units)], plan, t, needs, None, narrowed, narrow_mlp, guidance,
                                half_module, cache)
        blocks.append((spec.name, cache[key]))
    return BlockwiseStep(graph, tuple(blocks), actions, keep_outputs=keep_outputs)


def copy_variant(variant: Variant) -> Variant:
    """``variant`` with a ``GraphModule`` of its own (the same graph, modules and attributes),
    whose children can be replaced without touching the variants shared through a build cache."""
    gm = torch.fx.GraphModule(variant.gm, variant.gm.graph, class_name=type(variant.gm).__name__)
    gm.num_model_outputs = variant.gm.num_model_outputs
    return replace(variant, gm=gm)


def _build(graph, order, plan, t, needs, keep_outputs, narrowed, narrow_mlp, guidance, half_module, cache) -> Variant:
    sg = StepGraph(graph)
    actions = plan.actions[t]
    if plan.is_step_forecast(t):
        rewrite_step(sg, actions[0].order)
        return Variant(sg.build(class_name=f"StepVariant{t}"), tuple(sg.reads), tuple(sg.writes), tuple(actions))
    if not guidance:  # no guidance half to derive: the block computes (a CFG step writes no cache)
        actions = tuple(COMPUTE if a.kind is ActionKind.CFG else a for a in actions)
    for spec, units in order:
        if plan.units[units[0]].role is not None:
            rewrite_modules(sg, spec, {plan.units[u].role.value: actions[u] for u in units},
                            {plan.units[u].role.value: needs[u][0] for u in units}, narrow_mlp,
                            write_inputs={plan.units[u].role.value: needs[u][1] for u in units},
                            keeps={plan.units[u].role.value: needs[u][2] for u in units},
                            half_module=half_module, cache=cache)
            continue
        (u,) = units
        action, (res, inp, keep) = actions[u], needs[u]
        kind = action.kind
        if kind in (ActionKind.COMPUTE, ActionKind.REUSE, ActionKind.FORECAST):
            rewrite_cache(sg, spec, action, write_residual=res, write_input=inp, keep=keep)
        elif kind is ActionKind.PRUNE:
            rewrite_prune(sg, spec, action.rate)
        elif kind is ActionKind.WIDTH:
            rewrite_width(sg, spec, action.width, narrowed(spec, action.width))
        elif kind is ActionKind.SKIP:
            rewrite_skip(sg, spec)
        elif kind is ActionKind.CFG:
            rewrite_cfg(sg, spec, action.branch)
    if keep_outputs is not None:  # a later STEP extrapolates from this full step's outputs
        write_outputs(sg, keep_outputs)
    gm = sg.build(class_name=f"StepVariant{t}")  # named for the first step built with it
    return Variant(gm, tuple(sg.reads), tuple(sg.writes), tuple(actions))
