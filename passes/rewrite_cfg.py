"""rewrite_cfg: ``CFG`` runs a block on one half of a guidance batch and derives the other half.

With classifier-free guidance batched into one call (``cat([x, x])`` with two conditionings),
the block's two halves differ by the conditioning, and that difference drifts slowly over the
steps. ``CFG(branch)`` slices every batch-major input of the block call to the computed half
(``1 - branch``), runs the block on it, and serves half ``branch`` as its input plus the
computed half's residual plus the difference of the two halves' residuals cached at the
block's last ``COMPUTE`` (FasterCache's reuse across guidance branches, per block). Half the
block's FLOPs; the cache is read, not refreshed.
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx

from dit_opt.errors import DitOptError
from dit_opt.executor import cfg_merge, half_rows
from dit_opt.ir import BlockSpec
from passes.infra import PassResult
from passes.step_graph import StepGraph, cache_key

__all__ = ["half_of", "rewrite_cfg"]


def half_of(graph: torch.fx.Graph, value: Any, ref: torch.fx.Node, half: int) -> Any:
    """A node of ``graph`` (at its insertion point) giving ``value``, a graph value or a structure
    of them, cut to half ``half`` of ``ref``'s batch at run time (:func:`~dit_opt.executor.half_rows`);
    a constant is returned as it is."""
    if isinstance(value, torch.fx.Node | tuple | list | dict):
        return graph.call_function(half_rows, (value, ref, half))
    return value


def rewrite_cfg(sg: StepGraph, spec: BlockSpec, branch: int) -> PassResult:
    """Rewrite ``spec``'s block call to compute half ``1 - branch`` of the batch and derive half ``branch``.

    Raises:
        ValueError: ``branch`` is not 0 or 1.
        DitOptError: an output of the block does not continue an input stream (no residual to
            derive from).
    """
    if branch not in (0, 1):
        raise ValueError(f"CFG branch must be 0 or 1, got {branch!r}")
    node = sg.node(spec)
    ins = sg.stream_nodes(spec)
    ref = next((x for x in ins if x is not None), None)
    if ref is None or any(x is None for o, x in zip(spec.outputs, ins, strict=True) if o.spec is not None):
        raise DitOptError(f"block {spec.name}: an output does not continue an input stream, so the other guidance "
                          f"half cannot be derived from a residual; plan COMPUTE for this block")
    fx = sg.fx
    with fx.inserting_before(node):
        args = tuple(half_of(fx, a, ref, 1 - branch) for a in node.args)
        kwargs = {k: half_of(fx, v, ref, 1 - branch) for k, v in node.kwargs.items()}
        sub = fx.call_module(node.target, args, kwargs)
        outs = []
        for o, x in zip(spec.outputs, ins, strict=True):
            if o.spec is None:
                outs.append(None)
                continue
            y = fx.call_function(operator.getitem, (sub, o.position)) if spec.output_is_tuple else sub
            residual = sg.read(cache_key(spec.name, "res", o.position))
            outs.append(fx.call_function(cfg_merge, (x, y, residual, branch)))
    packed = sg.pack(spec, outs, after=[n for n in outs if n is not None][-1])
    sg.replace_block(spec, packed)
    return PassResult(sg, True)
