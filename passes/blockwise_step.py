"""One step of a plan on a block-by-block capture (:mod:`dit_opt.blockwise`): the model's own forward
runs the glue, each block's call goes to the block's rewritten graph.

A :class:`BlockwiseStep` has the interface of a whole capture's step variant
(:class:`passes.rewrite_plan.Variant`): it takes the model's flat inputs (the keyword inputs'
pytree leaves) and the cache entries it reads, and returns the model's flat outputs and the
cache entries it writes, under the same keys. Each block's graph is built by the same rewrite
passes as in a whole capture, on the block's slice of the captured top graph
(:attr:`dit_opt.blockwise.Blockwise.views`). A ``STEP`` (whole step forecast) does not call the
model at all: its outputs are the polynomial through the cached outputs of the last full steps,
which those steps write (``passes.rewrite_step``'s keys).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from dit_opt.blockwise import standins
from dit_opt.executor import combine
from dit_opt.ir import DiTGraph
from dit_opt.plan import Action, ActionKind
from passes.rewrite_cache import history_kind
from passes.rewrite_step import OUTPUT
from passes.step_graph import cache_key, weights_key

__all__ = ["BlockwiseStep", "step_forecast_step"]


@dataclass(frozen=True)
class BlockwiseStep:
    """A step of a block-by-block capture (see the module docstring).

    Attributes:
        graph: the block-by-block capture.
        blocks: per block that the model calls (qualified name), its rewritten graph's variant
            (``passes.rewrite_plan.Variant``: the block's leaves and its cache reads in, its flat
            outputs and cache writes out).
        actions: the step's actions, one per plan unit.
        order: for a ``STEP``, its order (no block and no glue runs); ``None`` otherwise.
        keep_outputs: ``None``, or for a full step a later ``STEP`` reads: how many older model
            outputs it keeps shifted down beside its own.
    """

    graph: DiTGraph
    blocks: tuple[tuple[str, Any], ...]
    actions: tuple[Action, ...]
    order: int | None = None
    keep_outputs: int | None = None

    @cached_property
    def _positions(self) -> list[int]:
        return self.graph.blockwise.tensor_positions()

    @cached_property
    def reads(self) -> tuple[str, ...]:
        """Cache entries (and forecast weights) the step reads, in the order it takes them."""
        keys: dict[str, None] = {}
        if self.order is not None:
            for i in range(self.order + 1):
                keys.update(dict.fromkeys(cache_key(OUTPUT, history_kind(i), p) for p in self._positions))
            keys[weights_key(OUTPUT)] = None
            return tuple(keys)
        for _, v in self.blocks:
            keys.update(dict.fromkeys(v.reads))
        for i in range(self.keep_outputs or 0):
            keys.update(dict.fromkeys(cache_key(OUTPUT, history_kind(i), p) for p in self._positions))
        return tuple(keys)

    @cached_property
    def writes(self) -> tuple[str, ...]:
        """Cache entries the step writes, in the order it returns them after the model's outputs."""
        keys = [k for _, v in self.blocks for k in v.writes]
        if self.keep_outputs is not None:
            for p in self._positions:
                keys += [cache_key(OUTPUT, history_kind(i), p) for i in range(self.keep_outputs, 0, -1)]
                keys.append(cache_key(OUTPUT, "res", p))
        return tuple(keys)

    @property
    def num_model_outputs(self) -> int:
        """How many of the returned values are the model's flat outputs (the rest: cache writes)."""
        return len(self.graph.blockwise.out_constants)

    @cached_property
    def derives_guidance(self) -> bool:
        """Whether a block of this step runs on one guidance half and derives the other (``CFG``)."""
        return any(a.kind is ActionKind.CFG for a in self.actions)

    def map_blocks(self, fn: Any) -> BlockwiseStep:
        """This step with each block's variant replaced by ``fn(variant)`` (lowering)."""
        return replace(self, blocks=tuple((name, fn(v)) for name, v in self.blocks))

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        """Run the step: the model's flat inputs and the cache reads in, its flat outputs and the
        cache writes out."""
        bw = self.graph.blockwise
        n_in = bw.in_spec.num_leaves
        flat, feed = list(args[:n_in]), dict(zip(self.reads, args[n_in:], strict=True))
        if self.order is not None:
            return tuple(self._forecast(feed))
        written: dict[str, Any] = {}

        def runner(name: str, variant: Any) -> Any:
            call = bw.calls[name]

            def run(a: tuple, k: dict) -> Any:
                # the block's graph returns the block's value (one output), then its cache writes
                out = variant(*call.leaves(a, k), *[feed[key] for key in variant.reads])
                written.update(zip(variant.writes, out[1:], strict=True))
                return out[0]

            return run

        with standins(self.graph.model, {name: runner(name, v) for name, v in self.blocks}):
            result = self.graph.model(**pytree.tree_unflatten(flat, bw.in_spec))
        outs, spec = pytree.tree_flatten(result)
        if spec != bw.out_spec:
            raise RuntimeError(f"{type(self.graph.model).__name__} returned {spec}, captured as {bw.out_spec}")
        if self.keep_outputs is not None:
            for p in self._positions:
                for i in range(self.keep_outputs, 0, -1):
                    written[cache_key(OUTPUT, history_kind(i), p)] = feed[cache_key(OUTPUT, history_kind(i - 1), p)]
                written[cache_key(OUTPUT, "res", p)] = outs[p]
        return (*outs, *[written[k] for k in self.writes])

    def _forecast(self, feed: dict[str, Any]) -> list[Any]:
        weights = feed[weights_key(OUTPUT)]
        outs = list(self.graph.blockwise.out_constants)
        for p in self._positions:
            outs[p] = combine(tuple(feed[cache_key(OUTPUT, history_kind(i), p)] for i in range(self.order + 1)),
                              weights)
        return outs

    @cached_property
    def gm(self) -> torch.fx.GraphModule:
        """The blocks' rewritten graphs side by side in one ``GraphModule`` (for reading; the glue
        between them is the model's own Python): each block's leaves and cache reads in, its
        outputs and cache writes out, block after block."""
        g = torch.fx.Graph()
        root = torch.nn.Module()
        outputs: list[torch.fx.Node] = []
        for name, v in self.blocks:
            prefix = name.replace(".", "_") + "_"
            env: dict[torch.fx.Node, torch.fx.Node] = {}
            for n in v.gm.graph.nodes:
                if n.op == "output":
                    flat = n.args[0]
                    outputs += [env[x] if isinstance(x, torch.fx.Node) else x
                                for x in (flat if isinstance(flat, tuple | list) else (flat,))]
                    continue
                if n.op in ("call_module", "get_attr"):
                    target = prefix + str(n.target).replace(".", "_")
                    _set(root, target, _get(v.gm, str(n.target)))
                    env[n] = g.create_node(n.op, target, pytree.tree_map_only(torch.fx.Node, env.__getitem__, n.args),
                                           pytree.tree_map_only(torch.fx.Node, env.__getitem__, n.kwargs),
                                           name=prefix + n.name)
                elif n.op == "placeholder":
                    env[n] = g.placeholder(prefix + str(n.target))
                else:
                    env[n] = g.node_copy(n, env.__getitem__)
        g.output(tuple(outputs))
        return torch.fx.GraphModule(root, g, class_name="BlockwiseStep")


def step_forecast_step(graph: DiTGraph, actions: tuple[Action, ...], order: int) -> BlockwiseStep:
    """The :class:`BlockwiseStep` of a ``STEP`` of ``order``."""
    return BlockwiseStep(graph, (), actions, order=order)


def _get(root: Any, target: str) -> Any:
    for part in target.split("."):
        root = getattr(root, part)
    return root


def _set(root: torch.nn.Module, name: str, value: Any) -> None:
    if isinstance(value, torch.nn.Module):
        root.add_module(name, value)
    else:
        setattr(root, name, value)
