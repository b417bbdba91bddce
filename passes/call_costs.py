"""The blocks' FLOPs per call as the calibration runs them, where calls differ from the captured one.

The cost model (``passes.annotate_flops``) counts each block at the shapes of the call it was
captured on. In a whole capture every call has those shapes: the graph is specialised to them.
Captured block by block (:mod:`dit_opt.blockwise`), the model's own glue sizes the blocks'
inputs, and they can change from call to call under the same model inputs: Lumina2 packs each
sample's valid text tokens before its image tokens, so its joint blocks see as many tokens as
the longest prompt of the batch has, fewer in the unconditional call than in the conditional
one. A plan costed at the first call alone then misses its budget (a tiny Lumina2 pipeline
spent 0.57 of its FLOPs at budget 0.5). :class:`CallCosts` watches the calibration's block
calls and gives each block's mean cost per call relative to the captured one, from its token
count and the cost model's growth with tokens (``Cost.at``); the profile's FLOPs are scaled by it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dit_opt.executor import bind_inputs, stream_inputs
from dit_opt.ir import DiTGraph

__all__ = ["CallCosts"]


class CallCosts:
    """Per block, the token counts of its calls (hooks on the model's blocks) and the mean cost
    they imply, relative to the captured call's (:meth:`scales`)."""

    def __init__(self, graph: DiTGraph, ignore: Any = None) -> None:
        """``ignore()``: true while a block call is not one of the calibration's own (a probe's
        re-run of the block on other inputs), which is then not recorded."""
        self.graph, self.ignore = graph, ignore
        self.tokens: list[list[int]] = [[] for _ in graph.blocks]
        self.captured = [_token_count(spec, {n: s.shape for n, s in spec.inputs}) for spec in graph.blocks]

    def hooks(self) -> list[Any]:
        """Forward pre-hooks on every block that record its stream tokens per call (remove them
        when the calibration has run)."""
        model = self.graph.model
        return [model.get_submodule(spec.name).register_forward_pre_hook(self._hook(u), with_kwargs=True)
                for u, spec in enumerate(self.graph.blocks)]

    def _hook(self, u: int) -> Any:
        spec = self.graph.blocks[u]

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self.ignore is not None and self.ignore():
                return
            named = bind_inputs(module, args, kwargs)
            shapes = {o.input_name: tuple(x.shape) for o, x in zip(spec.outputs, stream_inputs(spec, named),
                                                                   strict=True)
                      if o.input_name and isinstance(x, torch.Tensor)}
            n = _token_count(spec, shapes)
            if n is not None:
                self.tokens[u].append(n)

        return hook

    def scales(self, group: Any = None) -> np.ndarray:
        """Per block, its mean FLOPs per observed call over its FLOPs at the captured call (1 where
        every call had the captured token count, or none was observed); with ``group`` (a
        :class:`dit_opt.distributed.Group`), over the calls of every rank."""
        costs = self.graph.costs
        U = len(self.graph.blocks)
        sums, counts = np.zeros(U), np.zeros(U)
        for u, spec in enumerate(self.graph.blocks):
            n0, seen = self.captured[u], self.tokens[u]
            cost = costs.blocks.get(spec.name)
            if seen and n0 and cost is not None and cost.total > 0:
                sums[u] = sum(cost.at(n / n0) for n in seen) / cost.total
                counts[u] = len(seen)
        if group is not None:
            sums = np.asarray(group.all_sum(sums.tolist()), dtype=np.float64)
            counts = np.asarray(group.all_sum(counts.tolist()), dtype=np.float64)
        return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)


def _token_count(spec: Any, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Tokens of the block's first stream input (dimension 1 of a ``(batch, tokens, channels)`` one)."""
    for o in spec.outputs:
        shape = shapes.get(o.input_name) if o.input_name else None
        if shape is not None and len(shape) == 3:
            return int(shape[1])
    return None
