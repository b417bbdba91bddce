"""rewrite_cache: ``COMPUTE`` refreshes a block's cache; ``REUSE``/``FORECAST`` serve the block from it.

``REUSE`` replaces the block call by ``input + cached residual`` for each output stream (the
residual ``out - in`` written by the block's last ``COMPUTE``). ``FORECAST`` of order ``k``
replaces it by ``input + sum_i w_i * residual_i`` over the residuals of the block's last
``k + 1`` computes (``res``, ``prev``, ``hist2``, ``hist3``, newest first), with the Lagrange
weights of :func:`dit_opt.plan.forecast_weights` read from the step's input
``<block>/weights`` (:func:`passes.step_graph.weights_key`). ``COMPUTE`` keeps the call and returns
``out - in`` (and, for later ``PRUNE`` steps, the input itself; for later ``FORECAST`` steps, the
older residuals shifted one place down) as cache writes.
"""

from __future__ import annotations

import torch

from dit_opt.errors import DitOptError
from dit_opt.executor import forecast, reuse
from dit_opt.ir import BlockSpec
from dit_opt.plan import Action, ActionKind
from passes.infra import PassResult
from passes.step_graph import StepGraph, cache_key, weights_key

__all__ = ["rewrite_cache", "history_kind"]


def history_kind(i: int) -> str:
    """Cache-entry kind of the residual ``i`` computes back: ``res``, ``prev``, ``hist2``, ``hist3``
    (never a prefix of another kind followed by digits, so keys with output positions stay unique)."""
    return "res" if i == 0 else "prev" if i == 1 else f"hist{i}"


def rewrite_cache(
    sg: StepGraph, spec: BlockSpec, action: Action, *, write_residual: bool = True, write_input: bool = False,
    keep: int = 0,
) -> PassResult:
    """Rewrite ``spec``'s block node for ``COMPUTE`` (cache writes) or ``REUSE``/``FORECAST`` (reads).

    Args:
        sg: the step graph being built.
        spec: the block.
        action: ``COMPUTE``, ``REUSE`` or ``FORECAST``.
        write_residual: on ``COMPUTE``, write the residuals (a later step reuses them).
        write_input: on ``COMPUTE``, write the inputs too (a later ``PRUNE`` scores tokens by drift).
        keep: on ``COMPUTE``, how many older residuals to keep, shifted one place down (``res`` to
            ``prev``, ``prev`` to ``hist2``, ...): a later ``FORECAST`` of order ``k`` reads ``k``.

    Raises:
        DitOptError: ``REUSE`` of a block whose output does not continue an input stream.
    """
    node = sg.node(spec)
    ins = sg.stream_nodes(spec)
    if action.kind is ActionKind.COMPUTE:
        if not (write_residual or write_input or keep):
            return PassResult(sg, False)
        outs = sg.output_nodes(spec, node)
        last = max((n for n in outs if n is not None), key=_order)
        with sg.fx.inserting_after(last):
            for o, x, y in zip(spec.outputs, ins, outs, strict=True):
                if x is None or y is None:
                    continue
                for i in range(keep, 0, -1):
                    sg.write(cache_key(spec.name, history_kind(i), o.position),
                             sg.read(cache_key(spec.name, history_kind(i - 1), o.position)))
                if write_residual:
                    sg.write(cache_key(spec.name, "res", o.position), sg.fx.call_function(torch.sub, (y, x)))
                if write_input:
                    sg.write(cache_key(spec.name, "in", o.position), x)
        return PassResult(sg, True)
    if action.kind not in (ActionKind.REUSE, ActionKind.FORECAST):
        raise ValueError(f"rewrite_cache handles COMPUTE, REUSE and FORECAST, not {action}")
    outs = []
    with sg.fx.inserting_before(node):
        for o, x in zip(spec.outputs, ins, strict=True):
            if o.spec is None:
                outs.append(None)
                continue
            if x is None:
                raise DitOptError(
                    f"block {spec.name}: output {o.position} does not continue an input stream, so it cannot be "
                    f"served from a residual cache; plan COMPUTE for this block (or exclude it from REUSE)"
                )
            res = sg.read(cache_key(spec.name, "res", o.position))
            if action.kind is ActionKind.FORECAST:
                history = tuple(sg.read(cache_key(spec.name, history_kind(i), o.position))
                                for i in range(action.order + 1))
                outs.append(sg.fx.call_function(forecast, (x, history, sg.read(weights_key(spec.name)))))
            else:
                outs.append(sg.fx.call_function(reuse, (x, res)))
    packed = sg.pack(spec, outs, after=max((n for n in outs if n is not None), key=_order))
    sg.replace_block(spec, packed)
    return PassResult(sg, True)


def _order(node: torch.fx.Node) -> int:
    return next(i for i, n in enumerate(node.graph.nodes) if n is node)
