"""annotate_flops: the FLOP cost model, as an analysis pass over the captured IR.

Every ATen node of every graph (the top graph, each block's graph and each sub-module's)
gets ``node.meta["dit_opt.flops"]``: the FLOPs ``FlopCounterMode`` counts for that op at the
captured shapes (two per multiply-add, attention included). The op is replayed on the fake
tensors that ``torch.export`` recorded in ``node.meta["val"]``, so nothing real is computed
and the numbers are those of ``FlopCounterMode`` by construction.

Nodes inside blocks also get ``node.meta["dit_opt.token_exp"]``: how their FLOPs grow when
the block runs on a fraction ``r`` of its stream tokens (token pruning): 0 for ops that do
not see the tokens (e.g. adaLN modulation from the timestep embedding), 1 for linear layers
and cross-attention, 2 for self-attention. It is found by replaying the op on ``meta``
tensors with the token dimension doubled. Summed per sub-module and block, this gives a
:class:`Cost` ``c0 + c1 r + c2 r^2``; MLP FLOPs scale with the MLP width ``w``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode

from dit_opt.flops import flop_counter
from dit_opt.ir import META_FLOPS, META_MODULE, META_ROLE, META_TOKEN_EXP, BlockSpec, DiTGraph
from passes.infra import PassResult

__all__ = ["Cost", "CostModel", "annotate_flops"]


@dataclass(frozen=True)
class Cost:
    """FLOPs of one call as a function of the token fraction ``r``: ``c0 + c1 r + c2 r^2``."""

    c0: float = 0.0
    c1: float = 0.0
    c2: float = 0.0

    def at(self, tokens: float = 1.0) -> float:
        """FLOPs when a fraction ``tokens`` of the stream tokens goes through."""
        return self.c0 + self.c1 * tokens + self.c2 * tokens * tokens

    @property
    def total(self) -> float:
        """FLOPs at the captured shapes (``r = 1``)."""
        return self.c0 + self.c1 + self.c2

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.c0 + other.c0, self.c1 + other.c1, self.c2 + other.c2)

    def scaled(self, k: float) -> Cost:
        return Cost(self.c0 * k, self.c1 * k, self.c2 * k)


@dataclass
class CostModel:
    """FLOPs per block and per role sub-module, as functions of token fraction and MLP width.

    Attributes:
        total: FLOPs of one forward at the captured shapes.
        blocks: block name -> :class:`Cost` of one call.
        modules: ``"<block>.<sub>"`` -> :class:`Cost` of one call of a role sub-module.
        roles: ``"<block>.<sub>"`` -> its role.
    """

    total: int
    blocks: dict[str, Cost] = field(default_factory=dict)
    modules: dict[str, Cost] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)

    def block_flops(self) -> dict[str, int]:
        """Block name -> FLOPs at the captured shapes."""
        return {k: round(v.total) for k, v in self.blocks.items()}

    def module_flops(self) -> dict[str, int]:
        """Sub-module name -> FLOPs at the captured shapes."""
        return {k: round(v.total) for k, v in self.modules.items()}

    @property
    def outside_blocks(self) -> int:
        """FLOPs outside every block (embeddings, final layer): always computed."""
        return self.total - sum(self.block_flops().values())

    def role_cost(self, block: str, role: str) -> Cost:
        """Summed :class:`Cost` of the sub-modules of ``block`` that play ``role``."""
        out = Cost()
        for name, r in self.roles.items():
            if r == role and name.startswith(block + "."):
                out = out + self.modules[name]
        return out

    def flops(self, block: str, role: str | None = None, *, tokens: float = 1.0, width: float = 1.0) -> float:
        """FLOPs of one call of ``block`` (or of its ``role`` sub-modules).

        Args:
            block: block name, e.g. ``transformer_blocks.2``.
            role: ``None`` for the whole block, else a role such as ``"mlp"``.
            tokens: fraction of the stream tokens that go through (pruning).
            width: MLP prefix width; scales the MLP FLOPs.
        """
        if not 0.0 <= tokens <= 1.0 or not 0.0 < width <= 1.0:
            raise ValueError(f"tokens must be in [0, 1] and width in (0, 1], got tokens={tokens}, width={width}")
        if block not in self.blocks:
            raise KeyError(f"no block {block!r} in the cost model")
        if role is not None:
            cost = self.role_cost(block, role).at(tokens)
            return cost * width if role == "mlp" else cost
        mlp = self.role_cost(block, "mlp").at(tokens)
        return self.blocks[block].at(tokens) - mlp * (1.0 - width)


def annotate_flops(graph: DiTGraph) -> PassResult:
    """Annotate every node with its FLOPs and build the :class:`CostModel`.

    Sets ``graph.flops`` (total FLOPs of one forward, as ``FlopCounterMode`` counts them,
    attention included) and ``graph.costs``.

    Args:
        graph: a captured :class:`~dit_opt.ir.DiTGraph`.

    Returns:
        ``PassResult(graph.gm, modified=True)`` (annotations were added).

    Example:
        >>> annotate_flops(g); g.flops, g.costs.block_flops()
    """
    counter = _Counter(graph)
    total = counter.module_cost(graph.module, "", None, None)
    if graph.blockwise is not None:
        # block by block, the top graph holds only the blocks: the glue (the model's own Python)
        # costs what FlopCounterMode counted over the model's forward beyond them
        total = total + Cost(c0=max(0.0, graph.blockwise.forward_flops - total.total))
    graph.flops = round(total.total)
    graph.costs = CostModel(total=graph.flops, blocks=counter.blocks, modules=counter.modules, roles=counter.roles)
    return PassResult(graph.gm, True)


class _Counter:
    def __init__(self, graph: DiTGraph) -> None:
        self.specs = {b.name: b for b in graph.blocks}
        self.blocks: dict[str, Cost] = {}
        self.modules: dict[str, Cost] = {}
        self.roles: dict[str, str] = {}
        self.role_of = {
            f"{b.name}.{m}": role for b in graph.blocks for role in b.roles for m in b.role_modules(role)
        }
        self.opaque = {name: Cost(*cost) for name, (_, cost) in graph.blockwise.opaque.items()} \
            if graph.blockwise is not None else {}

    def module_cost(self, module: torch.nn.Module, qual: str, block: BlockSpec | None, role: str | None) -> Cost:
        cost = Cost()
        targets = Counter(str(n.target) for n in module.graph.nodes if n.op == "call_module")
        for node in module.graph.nodes:
            if node.op == "call_module":
                sub_qual = str(node.target) if not qual else f"{qual}.{node.target}"
                # The top graph calls some sub-modules of blocks directly (e.g. DiT's final
                # layer reuses ``transformer_blocks.0.norm1.emb``): those are not block work.
                sub_block = block or (self.specs.get(sub_qual))
                sub_role = role or (self.role_of.get(sub_qual) if sub_block is not None else None)
                sub = module.get_submodule(str(node.target))
                if sub_qual in self.opaque:
                    # a block that did not export itself (dit_opt.blockwise): no graph to walk, its
                    # FLOPs counted by FlopCounterMode on its recorded call
                    c = self.opaque[sub_qual]
                else:
                    c = self.module_cost(sub, sub_qual, sub_block, sub_role)
                if targets[str(node.target)] > 1 and c.total > 0:
                    # unflatten shares one sub-graph between calls of a module whose graphs match
                    # (CogView4's ``ff`` on image then text tokens): its shapes are one call's, so
                    # the total is re-counted at this call's inputs and the split kept.
                    c = c.scaled(_call_flops(node, sub) / c.total)
                if block is None and sub_qual in self.specs:
                    self.blocks[sub_qual] = self.blocks.get(sub_qual, Cost()) + c
                elif role is None and sub_role is not None and sub_qual in self.role_of:
                    self.modules[sub_qual] = self.modules.get(sub_qual, Cost()) + c
                    self.roles[sub_qual] = sub_role
                node.meta[META_FLOPS] = round(c.total)
                node.meta[META_MODULE] = sub_qual
                if sub_role:
                    node.meta[META_ROLE] = sub_role
                cost = cost + c
            elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                flops = _node_flops(node)
                node.meta[META_FLOPS] = flops
                node.meta[META_MODULE] = qual
                if role:
                    node.meta[META_ROLE] = role
                if flops == 0:
                    continue
                exp = _token_exponent(node, block, flops) if block is not None else 0
                node.meta[META_TOKEN_EXP] = exp
                cost = cost + Cost(**{f"c{exp}": float(flops)})
        return cost


def _vals(args: Any) -> Any:
    return pytree.tree_map_only(torch.fx.Node, lambda n: n.meta.get("val"), args)


def _node_flops(node: torch.fx.Node) -> int:
    args, kwargs = _vals(node.args), _vals(node.kwargs)
    fake = detect_fake_mode([x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)])
    if fake is None:
        return 0  # no tensor inputs: nothing to count
    with fake, flop_counter() as fc:
        node.target(*args, **kwargs)
    return _concrete(fc.get_total_flops(), fake)


def _concrete(flops: Any, fake: Any) -> int:
    """``flops`` as an int. A count over a data-dependent size (Mochi's attention over the valid
    text tokens, ``nonzero`` of the mask) has no value at capture time: it is counted at the
    largest value the size can take (every text token valid, as in the example inputs)."""
    if not isinstance(flops, torch.SymInt) or flops.node.expr.is_number:
        return int(flops)
    env = fake.shape_env
    expr = flops.node.expr
    values = {}
    for sym in expr.free_symbols:
        bound = env.var_to_range[sym].upper if sym in env.var_to_range else None
        hint = env.var_to_val.get(sym)
        if hint is None and (bound is None or not bound.is_finite):
            raise ValueError(f"cannot count FLOPs over the unbounded data-dependent size {sym} ({expr})")
        values[sym] = hint if hint is not None else bound
    return int(expr.xreplace(values))


def _call_flops(node: torch.fx.Node, sub: torch.nn.Module) -> int:
    """FLOPs of calling ``sub`` on the fake inputs recorded at ``node`` (its real parameters allowed)."""
    args, kwargs = _vals(node.args), _vals(node.kwargs)
    fake = detect_fake_mode([x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)])
    if fake is None:
        return 0
    allowed, fake.allow_non_fake_inputs = fake.allow_non_fake_inputs, True
    try:
        with fake, flop_counter() as fc:
            sub(*args, **kwargs)
    finally:
        fake.allow_non_fake_inputs = allowed
    return _concrete(fc.get_total_flops(), fake)


def _token_exponent(node: torch.fx.Node, block: BlockSpec, flops: int) -> int:
    """0, 1 or 2: how ``node``'s FLOPs grow with the number of stream tokens of ``block``."""
    streams = {o.input_name for o in block.outputs if o.input_name}
    specs = dict(block.inputs)
    counts = {specs[s].shape[1] for s in streams if s in specs and len(specs[s].shape) == 3}
    if not counts:
        return 1
    batch = next(iter(specs[s].shape[0] for s in streams if s in specs))
    token_dims = set(counts) | {sum(counts)} | {batch * c for c in counts}

    def scale(n: Any, val: Any) -> Any:
        if not isinstance(val, torch.Tensor):
            return val
        shape = list(val.shape)
        # Parameters and buffers (get_attr) never carry the token dimension.
        if not (isinstance(n, torch.fx.Node) and n.op == "get_attr"):
            start = 1 if len(shape) >= 3 else 0
            for i in range(start, len(shape)):
                if shape[i] in token_dims:
                    shape[i] *= 2
                    break
        return torch.empty(shape, dtype=val.dtype, device="meta")

    def convert(args: Iterable[Any]) -> Any:
        return pytree.tree_map_only(torch.fx.Node, lambda n: scale(n, n.meta.get("val")), args)

    try:
        args, kwargs = convert(node.args), convert(node.kwargs)
        with flop_counter() as fc:
            node.target(*args, **kwargs)
        ratio = fc.get_total_flops() / flops
    except Exception:
        return 1  # shapes became inconsistent: treat as linear, the common case
    return min(2, max(0, round(math.log2(ratio)))) if ratio > 0 else 0
