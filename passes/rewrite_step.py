"""rewrite_step: the whole step forecast (``STEP``) and the model-output cache it reads.

A ``STEP`` of order ``k`` serves the whole step from the model's outputs at its last ``k + 1``
full steps (every unit computed): each flat output becomes ``sum_i w_i * output_i`` over them,
newest first, with the Lagrange weights of :func:`dit_opt.plan.forecast_weights` read from the
step's input ``model_output/weights`` (:func:`passes.step_graph.weights_key`). Nothing else of
the graph is used, so dead-code elimination leaves neither a block nor the glue (embeddings,
modulation, final layer): TeaCache's and FirstBlockCache's whole-step reuse, with TaylorSeer's
extrapolation, at no FLOPs. A full step that a later ``STEP`` reads writes its outputs
(``model_output/res<i>``) and keeps the older ones shifted down (``prev``, ``hist2``, ...), as a
block's ``COMPUTE`` keeps its residuals for a ``FORECAST``.
"""

from __future__ import annotations

import torch

from dit_opt.executor import combine
from passes.infra import PassResult
from passes.rewrite_cache import history_kind
from passes.step_graph import StepGraph, cache_key, weights_key

__all__ = ["OUTPUT", "rewrite_step", "write_outputs"]

#: The name under which the model's outputs are cached (never a block's: those are ``list.index``).
OUTPUT = "model_output"


def _tensor_positions(sg: StepGraph) -> list[int]:
    """Positions of the flat outputs that are tensors (the ones a forecast extrapolates)."""
    return [i for i, n in enumerate(sg.model_outputs())
            if isinstance(n, torch.fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)]


def write_outputs(sg: StepGraph, keep: int) -> PassResult:
    """Write the model's tensor outputs as the cache entries a later ``STEP`` reads, keeping
    ``keep`` older ones shifted one place down (an order-``k`` ``STEP`` reads ``k`` of them)."""
    outs = sg.model_outputs()
    for p in _tensor_positions(sg):
        for i in range(keep, 0, -1):
            sg.write(cache_key(OUTPUT, history_kind(i), p), sg.read(cache_key(OUTPUT, history_kind(i - 1), p)))
        sg.write(cache_key(OUTPUT, "res", p), outs[p])
    return PassResult(sg, True)


def rewrite_step(sg: StepGraph, order: int) -> PassResult:
    """Serve the whole step from the cached outputs of the last ``order + 1`` full steps."""
    outs = sg.model_outputs()
    positions = _tensor_positions(sg)
    if not positions:
        raise ValueError("the model returns no tensor to forecast")
    weights = sg.read(weights_key(OUTPUT))
    history = {p: tuple(sg.read(cache_key(OUTPUT, history_kind(i), p)) for i in range(order + 1)) for p in positions}
    new = list(outs)
    output = next(n for n in sg.fx.nodes if n.op == "output")
    with sg.fx.inserting_before(output):
        for p in positions:
            node = sg.fx.call_function(combine, (history[p], weights))
            node.meta["val"] = outs[p].meta.get("val")
            new[p] = node
    sg.set_model_outputs(new)
    return PassResult(sg, True)
