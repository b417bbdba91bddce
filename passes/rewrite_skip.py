"""rewrite_skip: ``SKIP`` makes a block the identity on its streams."""

from __future__ import annotations

from dit_opt.ir import BlockSpec
from passes.infra import PassResult
from passes.step_graph import StepGraph

__all__ = ["rewrite_skip"]


def rewrite_skip(sg: StepGraph, spec: BlockSpec) -> PassResult:
    """Replace ``spec``'s block call by its stream inputs (outputs with no stream become ``None``).

    Example:
        >>> rewrite_skip(sg, graph.block("transformer_blocks.3"))  # doctest: +SKIP
    """
    node = sg.node(spec)
    outs = [x if o.spec is not None else None for o, x in zip(spec.outputs, sg.stream_nodes(spec), strict=True)]
    if any(o.spec is not None and x is None for o, x in zip(spec.outputs, outs, strict=True)):
        raise ValueError(f"block {spec.name} changes the shape of an output, so it cannot be skipped")
    packed = sg.pack(spec, outs, after=node)
    sg.replace_block(spec, packed)
    return PassResult(sg, True)
