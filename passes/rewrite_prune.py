"""rewrite_prune: ``PRUNE(r)`` recomputes the top ``r`` of the tokens and reuses the rest.

The graph scores each token by how far its input moved since the cache was written, gathers
the top ``k = round(r N)`` tokens, runs the block on them alone, and scatters the result into
``input + cached residual``. At ``r = 0`` this would be ``REUSE``. Only single-stream blocks
laid out ``(batch, tokens, channels)`` with no other token-indexed input can be pruned (see
``dit_opt.executor.prunable``).
"""

from __future__ import annotations

import operator

from dit_opt.executor import gather_tokens, prunable, reuse, scatter_tokens, token_scores, topk_tokens
from dit_opt.ir import BlockSpec
from dit_opt.synthetic import call_batch
from passes.infra import PassResult
from passes.step_graph import StepGraph, cache_key

__all__ = ["rewrite_prune"]


def rewrite_prune(sg: StepGraph, spec: BlockSpec, rate: float) -> PassResult:
    """Rewrite ``spec``'s block call as a pruned recompute at ``rate``.

    Raises:
        ValueError: the block cannot be pruned, or the rate is not in (0, 1).
    """
    if not prunable(spec, call_batch(sg.graph)):
        raise ValueError(f"block {spec.name} cannot be pruned (several streams, a stream not laid out (batch, "
                         f"tokens, channels), or token-indexed side inputs); plan another action for it")
    if not 0.0 < rate < 1.0:
        raise ValueError(f"prune rate must be in (0, 1), got {rate}")
    node = sg.node(spec)
    (pos,) = [o.position for o in spec.outputs if o.spec is not None]
    out_spec = spec.outputs[pos]
    x = sg.stream_nodes(spec)[pos]
    k = max(1, round(rate * out_spec.spec.shape[1]))
    fx = sg.fx
    with fx.inserting_before(node):
        cached_in = sg.read(cache_key(spec.name, "in", pos))
        residual = sg.read(cache_key(spec.name, "res", pos))
    with fx.inserting_before(node):
        scores = fx.call_function(token_scores, (x, cached_in))
        idx = fx.call_function(topk_tokens, (scores, k))
        picked = fx.call_function(gather_tokens, (x, idx))
        args = tuple(picked if a is x else a for a in node.args)
        kwargs = {key: (picked if v is x else v) for key, v in node.kwargs.items()}
        sub = fx.call_module(node.target, args, kwargs)
        sub_out = fx.call_function(operator.getitem, (sub, pos)) if spec.output_is_tuple else sub
        base = fx.call_function(reuse, (x, residual))
        merged = fx.call_function(scatter_tokens, (base, idx, sub_out))
    outs = [merged if o.position == pos else None for o in spec.outputs]
    packed = sg.pack(spec, outs, after=merged)
    sg.replace_block(spec, packed)
    return PassResult(sg, True)
