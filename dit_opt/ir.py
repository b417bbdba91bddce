"""The captured IR: :class:`DiTGraph` and the frozen :class:`BlockSpec` of each block.

A :class:`DiTGraph` wraps what ``torch.export.export`` + ``torch.export.unflatten`` give:
a top-level graph in which every transformer block is one ``call_module`` node, and in
which each block's own graph calls its sub-modules (attention, MLP, norms) as
``call_module`` nodes too. Annotations that the passes add live in ``node.meta`` under keys
that start with ``dit_opt.`` (see :data:`META_BLOCK` and friends).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
import torch.fx
import torch.utils._pytree as pytree

if TYPE_CHECKING:
    from dit_opt.blockwise import Blockwise

__all__ = [
    "ROLES",
    "META_BLOCK",
    "META_FLOPS",
    "META_TOKEN_EXP",
    "META_MODULE",
    "META_ROLE",
    "TensorSpec",
    "StreamSpec",
    "BlockSpec",
    "DiTGraph",
]

#: Sub-module roles that capture recognises inside a block.
ROLES = ("attn", "cross_attn", "mlp", "norm")

#: ``node.meta`` key on a top-graph ``call_module`` node: the block's qualified name.
META_BLOCK = "dit_opt.block"
#: ``node.meta`` key: FLOPs of one execution of this node at the captured shapes.
META_FLOPS = "dit_opt.flops"
#: ``node.meta`` key: how the node's FLOPs grow with the token count (0, 1 or 2).
META_TOKEN_EXP = "dit_opt.token_exp"
#: ``node.meta`` key: qualified name of the module whose graph holds the node.
META_MODULE = "dit_opt.module"
#: ``node.meta`` key: role of the sub-module the node belongs to (one of :data:`ROLES`), if any.
META_ROLE = "dit_opt.role"


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor that crosses a block boundary."""

    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(tuple(int(s) for s in t.shape), str(t.dtype).removeprefix("torch."))


@dataclass(frozen=True)
class StreamSpec:
    """One output of a block and the input whose residual stream it continues.

    ``input_name`` is ``None`` when no input has the output's shape (the block changes the
    shape), in which case the output cannot be served from a residual cache. ``spec`` is
    ``None`` for an output that is ``None`` (e.g. the context stream of SD3's last block).
    """

    position: int
    input_name: str | None
    spec: TensorSpec | None


@dataclass(frozen=True)
class BlockSpec:
    """Everything the passes need to know about one transformer block.

    Attributes:
        list_name: qualified name of the ``nn.ModuleList`` holding the block.
        index: position of the block in that list.
        cls_name: class name of the block.
        inputs: tensor inputs as ``(name, TensorSpec)`` pairs, by forward-signature name.
        outputs: the outputs in order; a block returning one tensor has one entry.
        output_is_tuple: whether the block returns a tuple (e.g. Flux's
            ``(encoder_hidden_states, hidden_states)``) rather than a tensor.
        modules: sub-module qualified names (relative to the block) per role.
    """

    list_name: str
    index: int
    cls_name: str
    inputs: tuple[tuple[str, TensorSpec], ...]
    outputs: tuple[StreamSpec, ...]
    output_is_tuple: bool
    modules: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def name(self) -> str:
        """Qualified name of the block in the model, e.g. ``transformer_blocks.3``."""
        return f"{self.list_name}.{self.index}"

    def role_modules(self, role: str) -> tuple[str, ...]:
        """Sub-module names (relative to the block) that play ``role``; empty if none."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; valid roles are {ROLES}")
        return dict(self.modules).get(role, ())

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles found in this block, in :data:`ROLES` order."""
        found = dict(self.modules)
        return tuple(r for r in ROLES if found.get(r))

    @property
    def token_counts(self) -> tuple[int, ...]:
        """Sequence lengths of the block's stream inputs (dim 1 of each ``(B, N, D)`` input)."""
        counts = {spec.shape[1] for _, spec in self.inputs if len(spec.shape) == 3}
        return tuple(sorted(counts))


@dataclass
class DiTGraph:
    """A captured DiT: the FX IR plus what capture and the analysis passes found.

    Attributes:
        model: the original ``nn.Module`` (not modified).
        exported: the ``torch.export.ExportedProgram``.
        module: the unflattened module; calling it behaves like calling the model.
        gm: the top-level ``torch.fx.GraphModule``: every block is one ``call_module`` node.
            It takes the flat tensor inputs (see :meth:`flat_inputs`) and returns a flat tuple.
        blocks: one :class:`BlockSpec` per block, in execution order of their lists.
        example_inputs: the keyword inputs the graph was captured with.
        flops: total FLOPs of one forward at the captured shapes (set by ``annotate_flops``).
        costs: the cost model (set by ``annotate_flops``), see ``passes.annotate_flops.CostModel``.
        repeated_modules: role sub-modules (qualified names) that their block calls more than once
            per call; they are left out of the blocks' roles (served only with their block).
        blockwise: ``None`` for a whole-model capture (:attr:`gm` is the model's forward); for a
            block-by-block one (``torch.export`` rejected the glue), what it recorded
            (:class:`dit_opt.blockwise.Blockwise`): :attr:`gm` then holds the blocks side by
            side and the model's own forward runs the glue.
    """

    model: torch.nn.Module
    exported: Any
    module: torch.nn.Module
    gm: torch.fx.GraphModule
    blocks: tuple[BlockSpec, ...]
    example_inputs: dict[str, Any]
    flops: int | None = None
    costs: Any = None
    capture_seconds: float = 0.0
    repeated_modules: tuple[str, ...] = ()
    blockwise: Blockwise | None = None

    @property
    def capture_mode(self) -> str:
        """``"whole"`` (the model's forward is one graph) or ``"blocks"`` (each block is; see
        :mod:`dit_opt.blockwise`)."""
        return "whole" if self.blockwise is None else "blocks"

    def describe_capture(self) -> str:
        """One line: the capture mode and, for a block-by-block capture, why."""
        if self.blockwise is None:
            return "captured whole (torch.export of the model's forward)"
        text = (f"captured block by block: torch.export rejected the model's forward ({self.blockwise.reason}), "
                f"so the glue between the blocks runs as the model's own Python")
        opaque = self.blockwise.opaque
        if opaque:
            why = next(iter(opaque.values()))[0]
            text += (f"; {len(opaque)} of {len(self.blocks)} blocks run as they are, planned whole (torch.export "
                     f"rejected them too: {why})")
        return text

    # ---- calling -------------------------------------------------------------------------
    def flat_inputs(self, *args: Any, **kwargs: Any) -> list[Any]:
        """Flatten model-style keyword arguments into the flat list that the step variants take
        (:attr:`gm`'s inputs for a whole capture; the keyword inputs' pytree leaves for a
        block-by-block one)."""
        if self.blockwise is not None:
            if args:
                raise TypeError("a block-by-block capture takes the model's inputs by keyword")
            return self.blockwise.flat_inputs(type(self.model).__name__, kwargs)
        return self.module.process_forward_inputs(*args, **kwargs)

    def unflatten_output(self, flat_out: Any) -> Any:
        """Turn a step variant's flat model outputs back into the model's output type."""
        if self.blockwise is not None:
            return pytree.tree_unflatten(list(flat_out), self.blockwise.out_spec)
        out_spec = self.module.module_call_graph[0].signature.out_spec
        return pytree.tree_unflatten(list(flat_out), out_spec)

    def full(self, flat: list[Any]) -> list[Any]:
        """The model's flat outputs with every block computed, from :meth:`flat_inputs`'s list."""
        if self.blockwise is None:
            out = self.gm(*flat)
            return list(out) if isinstance(out, tuple | list) else [out]
        kwargs = pytree.tree_unflatten(list(flat), self.blockwise.in_spec)
        return pytree.tree_leaves(self.model(**kwargs))

    def run(self, gm: torch.fx.GraphModule | None = None, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``gm`` (default: :attr:`gm`) with model-style arguments; return the model's output type.

        For a block-by-block capture and no ``gm``: the model's forward with each block run by its
        captured graph (what checks a block-by-block capture)."""
        if gm is None and self.blockwise is not None:
            from dit_opt.blockwise import standins

            def by_graph(name: str) -> Any:
                sub = self.module.get_submodule(name)
                return lambda a, k: sub(*a, **k)

            with standins(self.model, {b.name: by_graph(b.name) for b in self.blocks}):
                return self.model(*args, **kwargs)
        gm = self.gm if gm is None else gm
        return self.unflatten_output(gm(*self.flat_inputs(*args, **kwargs)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(None, *args, **kwargs)

    # ---- lookup --------------------------------------------------------------------------
    def block(self, name: str) -> BlockSpec:
        """The :class:`BlockSpec` with qualified name ``name`` (e.g. ``transformer_blocks.0``)."""
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no block named {name!r}; blocks are {[b.name for b in self.blocks][:6]}...")

    def block_nodes(self) -> Iterator[tuple[BlockSpec, torch.fx.Node]]:
        """The top-graph ``call_module`` node of each block, with its spec."""
        by_name = {b.name: b for b in self.blocks}
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and node.target in by_name:
                yield by_name[node.target], node

    @property
    def list_names(self) -> tuple[str, ...]:
        """The block lists found, in execution order."""
        seen: dict[str, None] = {}
        for b in self.blocks:
            seen.setdefault(b.list_name)
        return tuple(seen)

    # ---- inspection ----------------------------------------------------------------------
    def summary(self) -> str:
        """A readable table: one row per block with its contract, roles and FLOPs."""
        total = self.flops or 0
        block_flops = self.costs.block_flops() if self.costs is not None else {}
        head = f"{type(self.model).__name__}: {len(self.blocks)} blocks in {len(self.list_names)} list(s)"
        if total:
            in_blocks = sum(block_flops.values())
            head += f", {total / 1e9:.4g} GFLOPs per forward ({100 * in_blocks / total:.1f} % in blocks)"
        rows = [("block", "class", "inputs", "outputs", "roles", "GFLOPs", "%")]
        for b in self.blocks:
            ins = ", ".join(n for n, _ in b.inputs)
            outs = ", ".join(
                o.input_name or ("None" if o.spec is None else f"out{o.position}") for o in b.outputs
            )
            if b.output_is_tuple:
                outs = f"({outs})"
            roles = " ".join(f"{r}:{'+'.join(b.role_modules(r))}" for r in b.roles)
            f = block_flops.get(b.name)
            rows.append(
                (
                    b.name,
                    b.cls_name,
                    ins,
                    outs,
                    roles,
                    f"{f / 1e9:.4g}" if f is not None else "-",
                    f"{100 * f / total:.1f}" if f is not None and total else "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        if self.repeated_modules:
            head += (f"\nmodules called more than once per block call, so served only with their block (no "
                     f"module-level action): {', '.join(self.repeated_modules[:6])}"
                     f"{' ...' if len(self.repeated_modules) > 6 else ''}")
        lines = [head, self.describe_capture()]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_networkx(self) -> nx.DiGraph:
        """The block/module graph.

        Nodes: ``"model"``, each block (``kind="block"``) and each role sub-module
        (``kind="module"``, with ``role``). Edges: ``kind="contains"`` from the model to its
        blocks and from a block to its sub-modules; ``kind="data"`` from a block to each
        block that consumes one of its outputs (through the top graph).
        """
        g = nx.DiGraph()
        g.add_node("model", kind="model", cls=type(self.model).__name__, flops=self.flops)
        block_flops = self.costs.block_flops() if self.costs is not None else {}
        module_flops = self.costs.module_flops() if self.costs is not None else {}
        for b in self.blocks:
            g.add_node(b.name, kind="block", cls=b.cls_name, flops=block_flops.get(b.name))
            g.add_edge("model", b.name, kind="contains")
            for role in b.roles:
                for m in b.role_modules(role):
                    q = f"{b.name}.{m}"
                    g.add_node(q, kind="module", role=role, flops=module_flops.get(q))
                    g.add_edge(b.name, q, kind="contains")
        block_of = {node: spec.name for spec, node in self.block_nodes()}
        for node, name in block_of.items():
            for src in _upstream_blocks(node, block_of):
                g.add_edge(src, name, kind="data")
        return g


def _upstream_blocks(node: torch.fx.Node, block_of: dict[torch.fx.Node, str]) -> set[str]:
    """Blocks whose outputs reach ``node`` without passing through another block."""
    found: set[str] = set()
    stack = list(node.all_input_nodes)
    seen: set[torch.fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in block_of:
            found.add(block_of[n])
            continue
        stack.extend(n.all_input_nodes)
    return found
