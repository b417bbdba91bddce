"""annotate_flops: the FLOP cost model, as an analysis pass over the captured IR.

Every ATen node of every graph (the top graph, each block's graph and each sub-module's)
gets ``node.meta["dit_opt.flops"]``: the FLOPs ``FlopCounterMode`` counts for that op at the
captured shapes (two per multiply-add, attention included). The op is replayed on the fake
tensors that ``torch.export`` recorded in ``node.meta["val"]``, so nothing real is computed
and the numbers are those of ``FlopCounterMode`` by construction. They count what the
captured graph computes: an op whose result the model discards (the last joint block's text
MLP, where only the image tokens are returned) is removed by export and costs nothing here,
though the model's own forward runs it. A size that depends on the data (tokens kept by a
mask) is counted at the value it took in the capture run.

Nodes inside blocks also get ``node.meta["dit_opt.token_exp"]``: how their FLOPs grow when
the block runs on a fraction ``r`` of its stream tokens (token pruning): 0 for ops that do
not see the tokens (e.g. adaLN modulation from the timestep embedding), 1 for linear layers
and cross-attention, 2 for self-attention. It is found by replaying the op on ``meta``
tensors with the token dimension doubled. Summed per sub-module and block, this gives a
:class:`Cost` ``c0 + c1 r + c2 r^2``; MLP FLOPs scale with the MLP width ``w``.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.fx._pytree as fx_pytree
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
    """Walks the unflattened module's graphs, summing FLOPs per node, sub-module and block."""

    def __init__(self, graph: DiTGraph) -> None:
        self.graph = graph
        self.specs = {b.name: b for b in graph.blocks}
        self.shared = _shared_modules(graph.module)
        self._sizes: _ExampleSizes | None = None
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
                if id(sub) in self.shared and c.total > 0:
                    # unflatten shares one sub-graph between calls of a module whose graphs match
                    # (CogView4's ``ff`` on image then text tokens, twice in one graph; GLM-Image's
                    # ``ff.net.0``, called from ``ff`` and from ``ff@1``): its shapes are one call's,
                    # so the total is re-counted at this call's inputs and the split kept.
                    c = c.scaled(self._call_flops(node, sub) / c.total)
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
            elif node.op == "call_function":
                cost = cost + self._function_cost(node, module, qual, block, role)
        return cost

    def _function_cost(self, node: torch.fx.Node, module: torch.nn.Module, qual: str, block: BlockSpec | None,
                       role: str | None) -> Cost:
        """:class:`Cost` of one ``call_function`` node: an ATen op, or a region whose body runs once."""
        if isinstance(node.target, torch._ops.OpOverload):
            flops = self._node_flops(node)
            exp = _token_exponent(node, block, flops) if block is not None and flops else 0
            cost = Cost(**{f"c{exp}": float(flops)})
        elif _body_runs_once(node):
            # an autocast or no-grad region (Mochi's rotary table under ``torch.autocast``) is a
            # higher-order op over a sub-graph: its ops are counted there, once
            cost = Cost()
            for body in _bodies(node, module):
                for inner in body.graph.nodes:
                    if inner.op == "call_function":
                        cost = cost + self._function_cost(inner, body, qual, block, role)
            flops, exp = round(cost.total), None
        else:
            return Cost()
        node.meta[META_FLOPS] = flops
        node.meta[META_MODULE] = qual
        if role:
            node.meta[META_ROLE] = role
        if flops and exp is not None:
            node.meta[META_TOKEN_EXP] = exp
        return cost

    def _node_flops(self, node: torch.fx.Node) -> int:
        """FLOPs ``FlopCounterMode`` counts for ``node``'s op on its recorded fake inputs."""
        args, kwargs = _vals(node.args), _vals(node.kwargs)
        return self._count(lambda: node.target(*args, **kwargs), (args, kwargs))

    def _call_flops(self, node: torch.fx.Node, sub: torch.nn.Module) -> int:
        """FLOPs of calling ``sub`` on the fake inputs recorded at ``node`` (its real parameters allowed)."""
        args, kwargs = _vals(node.args), _vals(node.kwargs)
        return self._count(lambda: sub(*args, **kwargs), (args, kwargs), allow_real=True)

    def _count(self, run: Callable[[], Any], inputs: Any, allow_real: bool = False) -> int:
        """FLOPs of ``run()`` under the fake mode of the tensors in ``inputs`` (0 without any)."""
        fake = detect_fake_mode([x for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)])
        if fake is None:
            return 0  # no tensor inputs: nothing to count
        allowed, fake.allow_non_fake_inputs = fake.allow_non_fake_inputs, allow_real or fake.allow_non_fake_inputs
        try:
            with fake, flop_counter() as fc:
                run()
        finally:
            fake.allow_non_fake_inputs = allowed
        flops = fc.get_total_flops()
        if not isinstance(flops, torch.SymInt) or flops.node.expr.is_number:
            return int(flops)
        if self._sizes is None:
            self._sizes = _ExampleSizes.of(self.graph)
        return _concrete(flops, fake, self._sizes)


def _shared_modules(root: torch.nn.Module) -> set[int]:
    """``id``s of the sub-modules that more than one ``call_module`` node calls.

    ``torch.export.unflatten`` gives a module called several times one sub-graph per call
    (``ff``, ``ff@1``) unless the calls' graphs match, and then shares one module object
    between the call sites, anywhere in the hierarchy: its graph's recorded shapes are one
    call's. Each distinct graph is walked once: a module called once by a shared parent is
    counted with that parent, which is itself re-counted at each of its calls.
    """
    calls: Counter[int] = Counter()
    seen: set[int] = set()
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in seen or not isinstance(getattr(module, "graph", None), torch.fx.Graph):
            continue
        seen.add(id(module))
        for node in module.graph.find_nodes(op="call_module"):
            sub = module.get_submodule(str(node.target))
            calls[id(sub)] += 1
            stack.append(sub)
    return {k for k, n in calls.items() if n > 1}


# higher-order ops that run their sub-graph exactly once (export wraps ``torch.autocast`` and
# ``torch.set_grad_enabled`` regions so); a ``cond`` runs one of two, so it is not among them
_RUN_ONCE = frozenset({"wrap_with_autocast", "wrap_with_set_grad_enabled"})


def _body_runs_once(node: torch.fx.Node) -> bool:
    return isinstance(node.target, torch._ops.HigherOrderOperator) and node.target.name() in _RUN_ONCE


def _bodies(node: torch.fx.Node, module: torch.nn.Module) -> list[torch.fx.GraphModule]:
    """The sub-graphs a higher-order op node runs (its ``get_attr`` arguments)."""
    attrs = [a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
    subs = (getattr(module, str(a.target), None) for a in attrs)
    return [s for s in subs if isinstance(s, torch.fx.GraphModule)]


def _vals(args: Any) -> Any:
    return pytree.tree_map_only(torch.fx.Node, lambda n: n.meta.get("val"), args)


@dataclass
class _ExampleSizes:
    """The values the data-dependent sizes (unbacked ``SymInt``s) of the export took in its example run.

    ``torch.export`` records no value for them (``ShapeEnv.var_to_val`` holds only backed sizes),
    but every node that creates one names, in ``meta["unbacked_bindings"]``, where the size sits in
    its output (``{u1: size()[1]}``; ``{u0: ()}`` for ``.item()``). Running the exported program
    on the example inputs it keeps reads them off the real outputs.

    Attributes:
        shape_env: the export's ``ShapeEnv``: its symbols are the ones valued here.
        values: symbol -> the value it took.
        missing: why no values could be read, if so (the counts fall back to the upper bounds).
    """

    shape_env: Any = None
    values: dict[Any, int] = field(default_factory=dict)
    missing: str | None = None

    @classmethod
    def of(cls, graph: DiTGraph) -> _ExampleSizes:
        """Run ``graph.exported`` once on its example inputs, recording every data-dependent size."""
        ep = graph.exported
        if ep is None or getattr(ep, "example_inputs", None) is None:
            return cls(missing="the export kept no example inputs")
        fake = detect_fake_mode([v for n in ep.graph.nodes if isinstance(v := n.meta.get("val"), torch.Tensor)])
        values: dict[Any, int] = {}

        class _Record(torch.fx.Interpreter):
            def run_node(self, n: torch.fx.Node) -> Any:
                out = super().run_node(n)
                for sym, path in (n.meta.get("unbacked_bindings") or {}).items():
                    value = pytree.key_get(out, path)
                    if isinstance(value, int | torch.SymInt | torch.Tensor):
                        values[sym] = int(value)
                return out

        try:
            gm = ep.module(check_guards=False)
            flat = fx_pytree.tree_flatten_spec(ep.example_inputs, ep.call_spec.in_spec)
            with torch.no_grad():
                _Record(gm).run(*flat)
        except Exception as e:  # noqa: BLE001 - the bounds remain, and the warning says so
            return cls(fake.shape_env if fake else None, values, f"{type(e).__name__}: {e}")
        return cls(fake.shape_env if fake else None, values)

    def value(self, env: Any, sym: Any) -> int | None:
        """The value ``sym`` of ``env`` took in the example run, if known."""
        return self.values.get(sym) if env is self.shape_env else None


def _concrete(flops: torch.SymInt, fake: Any, sizes: _ExampleSizes) -> int:
    """A symbolic FLOP count as an int, at the sizes of the example (capture) run.

    A count over a data-dependent size (Mochi's attention over the valid text tokens, FramePack's
    history packed by a mask) has no value at trace time: it takes the value the size had when
    the exported program ran on its example inputs, as ``FlopCounterMode`` over the model's
    forward sees it. Where that is unknown (a size created anew when a shared sub-graph is
    re-counted at another call's inputs, no example inputs kept), the largest value it can take.
    """
    env = fake.shape_env
    backed = getattr(env, "backed_var_to_val", None)  # torch 2.13's name; var_to_val before
    if backed is None:
        backed = env.var_to_val
    expr = flops.node.expr
    values, bounded = {}, []
    for sym in expr.free_symbols:
        known = backed.get(sym)
        if known is None:
            known = sizes.value(env, sym)
        if known is None:
            bound = env.var_to_range[sym].upper if sym in env.var_to_range else None
            if bound is None or not bound.is_finite:
                raise ValueError(f"cannot count FLOPs over the unbounded data-dependent size {sym} ({expr})")
            known = bound
            bounded.append(sym)
        values[sym] = known
    if bounded:
        why = sizes.missing or "sizes created anew, re-counting a shared sub-graph at another call's inputs"
        warnings.warn(f"FLOPs over the data-dependent sizes {sorted(map(str, bounded))} are counted at their upper "
                      f"bounds: their values in the capture run are unknown ({why})", stacklevel=2)
    return int(expr.xreplace(values))


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
