"""The step graph that the rewrite passes edit, and how one step's variant is built.

A step variant is a copy of the captured top graph in which every block ``call_module``
node has been rewritten for the block's action at that step. Cache traffic is functional, so
variants can be compiled and exported: the variant takes the model's flat inputs followed by
the cache tensors it reads, and returns the model's flat outputs followed by the cache
tensors it writes. :class:`StepGraph` owns those extra placeholders and outputs; the rewrite
passes (``rewrite_cache``, ``rewrite_prune``, ``rewrite_width``, ``rewrite_skip``) each
rewrite one block node through it.

Blocks are called as the model's own ``nn.Module``s (shape-generic, so a pruned block runs on
fewer tokens, and regional compilation shares one compiled body across identical blocks).
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from dit_opt.executor import pack_outputs
from dit_opt.ir import BlockSpec, DiTGraph

__all__ = ["StepGraph", "cache_key"]


def cache_key(block: str, kind: str, position: int) -> str:
    """Name of a cache entry: ``<block>/<kind><output position>``, kind ``res``, ``in``, ``prev``,
    ``hist2`` or ``hist3`` (see ``passes.rewrite_cache.history_kind``)."""
    return f"{block}/{kind}{position}"


def weights_key(unit: str) -> str:
    """Name of the input that carries a unit's ``FORECAST`` weights at a step, ``<unit>/weights``
    (``unit`` a block, or ``<block>.<role>`` for a module unit): a 1-D tensor the runtime feeds per
    step (:func:`passes.rewrite_plan.step_weights`), so steps that differ only in their weights
    share one graph."""
    return f"{unit}/weights"


def _attr_name(qualname: str) -> str:
    return qualname.replace(".", "_")


@dataclass
class StepGraph:
    """A mutable copy of the captured top graph plus the modules and cache I/O it uses.

    Attributes:
        graph: the captured graph (read only).
        fx: the copy being rewritten.
        modules: qualified name -> module (or attribute) for ``call_module``/``get_attr``.
        reads: cache keys read, in placeholder order.
        writes: cache keys written, in output order.
    """

    graph: DiTGraph
    fx: torch.fx.Graph = field(init=False)
    modules: dict[str, Any] = field(init=False)
    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    _read_nodes: dict[str, torch.fx.Node] = field(default_factory=dict)
    _write_nodes: list[torch.fx.Node] = field(default_factory=list)
    _nodes: dict[str, torch.fx.Node] = field(default_factory=dict)
    _last_placeholder: torch.fx.Node | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.fx = torch.fx.Graph()
        val_map: dict[torch.fx.Node, torch.fx.Node] = {}
        out = self.fx.graph_copy(self.graph.gm.graph, val_map)
        self.fx.output(out)
        for old, new in val_map.items():
            new.meta = dict(old.meta)
        self.modules = {}
        src = self.graph.module
        for node in self.fx.nodes:
            if node.op in ("call_module", "get_attr"):
                self.modules[node.target] = _lookup(src, node.target)
        # Blocks run as the model's own modules (see the module docstring), registered under
        # flat names: a dotted name would make GraphModule write other targets nested below
        # it (e.g. DiT's ``transformer_blocks.0.norm1.emb``) into the model's own block.
        self._nodes = {}
        for spec, node in list(self._block_nodes()):
            del self.modules[spec.name]
            node.target = _attr_name(spec.name)
            self.modules[node.target] = self.graph.model.get_submodule(spec.name)
            self._nodes[spec.name] = node

    def _block_nodes(self):
        names = {b.name: b for b in self.graph.blocks}
        for node in self.fx.nodes:
            if node.op == "call_module" and node.target in names:
                yield names[node.target], node

    # ---- helpers for the passes ----------------------------------------------------------------
    def node(self, spec: BlockSpec) -> torch.fx.Node:
        """The (current) node that produces ``spec``'s block output."""
        return self._nodes[spec.name]

    def stream_nodes(self, spec: BlockSpec) -> list[torch.fx.Node | None]:
        """Per block output, the graph value of the input whose stream it continues."""
        node = self._nodes[spec.name]
        block = self.graph.model.get_submodule(spec.name)
        named = inspect.signature(block.forward).bind_partial(*node.args, **node.kwargs).arguments
        return [named.get(o.input_name) if o.input_name else None for o in spec.outputs]

    def output_nodes(self, spec: BlockSpec, node: torch.fx.Node) -> list[torch.fx.Node | None]:
        """Per block output, a node holding it (``getitem`` for tuple outputs)."""
        if not spec.output_is_tuple:
            return [node]
        with self.fx.inserting_after(node):
            return [
                None if o.spec is None else self.fx.call_function(operator.getitem, (node, o.position))
                for o in spec.outputs
            ]

    def read(self, key: str) -> torch.fx.Node:
        """A placeholder for cache entry ``key`` (one per key)."""
        if key not in self._read_nodes:
            if self._last_placeholder is None:
                self._last_placeholder = [n for n in self.fx.nodes if n.op == "placeholder"][-1]
            with self.fx.inserting_after(self._last_placeholder):
                ph = self.fx.placeholder("cache_" + key.replace("/", "_").replace(".", "_"))
            self._read_nodes[key] = self._last_placeholder = ph
            self.reads.append(key)
        return self._read_nodes[key]

    def write(self, key: str, value: torch.fx.Node) -> None:
        """Return ``value`` as cache entry ``key`` from the variant."""
        self.writes.append(key)
        self._write_nodes.append(value)

    def model_outputs(self) -> list[torch.fx.Node | Any]:
        """The model's flat outputs as the graph returns them now (before the cache writes)."""
        flat = next(n for n in self.fx.nodes if n.op == "output").args[0]
        return list(flat) if isinstance(flat, tuple | list) else [flat]

    def set_model_outputs(self, values: list[torch.fx.Node | Any]) -> None:
        """Return ``values`` as the model's flat outputs (as many as :meth:`model_outputs`)."""
        output = next(n for n in self.fx.nodes if n.op == "output")
        if len(values) != len(self.model_outputs()):
            raise ValueError(f"the model has {len(self.model_outputs())} flat outputs, got {len(values)}")
        flat = output.args[0]
        output.args = (tuple(values) if isinstance(flat, tuple | list) else values[0],)

    def add_module(self, qualname: str, module: nn.Module) -> str:
        """Register ``module`` for ``call_module`` under ``qualname``; return the target."""
        self.modules[qualname] = module
        return qualname

    def replace_block(self, spec: BlockSpec, value: torch.fx.Node) -> None:
        """Make every user of the block node use ``value`` (the block's packed output)."""
        node = self._nodes[spec.name]
        node.replace_all_uses_with(value, delete_user_cb=lambda user: user is not value)
        if not node.users:
            self.fx.erase_node(node)
        self._nodes[spec.name] = value

    def pack(self, spec: BlockSpec, outs: list[torch.fx.Node | None], after: torch.fx.Node) -> torch.fx.Node:
        """A node building the block's return value from per-output nodes."""
        with self.fx.inserting_after(after):
            return self.fx.call_function(pack_outputs, (spec.output_is_tuple, *outs))

    # ---- result -------------------------------------------------------------------------------
    def build(self, class_name: str = "StepVariant") -> torch.fx.GraphModule:
        """The rewritten variant as a ``GraphModule`` (cache writes appended to the outputs)."""
        output = next(n for n in self.fx.nodes if n.op == "output")
        flat = output.args[0]
        flat = tuple(flat) if isinstance(flat, tuple | list) else (flat,)
        output.args = (flat + tuple(self._write_nodes),)
        self.fx.lint()
        eliminate_dead_code(self.fx, self.modules)
        used = {n.target for n in self.fx.nodes if n.op in ("call_module", "get_attr")}
        root = {k: v for k, v in self.modules.items() if k in used}
        # GraphModule generates its code once, here (an explicit recompile would do it again)
        gm = torch.fx.GraphModule(root, self.fx, class_name=class_name)
        gm.num_model_outputs = len(flat)
        return gm


#: ops ``torch.export`` inserts to check a value's metadata; they compute nothing the graph returns
_ASSERTIONS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
               torch.ops.aten.sym_constrain_range_for_size.default}


def eliminate_dead_code(g: torch.fx.Graph, modules: dict[str, nn.Module]) -> None:
    """``g.eliminate_dead_code()`` before ``g`` has a ``GraphModule``: a ``call_module`` node's
    purity is read from ``modules`` (its target's ``_is_impure``, as fx does)."""
    def impure(n: torch.fx.Node) -> bool:
        if n.op == "call_module":
            return bool(getattr(modules[n.target], "_is_impure", False))
        if n.op == "call_function" and n.target in _ASSERTIONS:
            # export's checks of a value's shape and dtype: not a reason to compute the value (a
            # STEP's graph would otherwise keep glue whose output nothing uses)
            return False
        return n.is_impure()

    g.eliminate_dead_code(is_impure_node=impure)


def _lookup(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
