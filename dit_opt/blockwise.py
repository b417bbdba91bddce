"""Block-by-block capture, for models whose forward ``torch.export`` cannot capture whole.

Some transformers compute their glue (embeddings, masks, the packing of variable-length text)
with Python that ``torch.export`` rejects: ``len(set(seq_lengths))`` over symbolic sizes
(Lumina2), ``.numpy()`` (HiDream), branching on tensor values. Their blocks are plain tensor
code. When the whole export fails, :func:`dit_opt.capture` falls back to this mode:

* **capture**: each block's first call is recorded during one eager forward and all blocks are
  exported together, each on its own recorded inputs (a wrapper that calls every block once,
  their call signatures preserved), so that every block is a ``call_module`` node with the same
  ``torch.export.unflatten`` sub-graphs as a whole-model capture gives. The top graph holds the
  blocks side by side with no glue between them (:attr:`Blockwise.views` slices it per block);
* **cost model**: blocks are costed from their graphs, as in a whole capture; the glue is what
  ``FlopCounterMode`` counts over the model's forward beyond them (:attr:`Blockwise.forward_flops`);
* **running a step**: the model's own forward runs with each block replaced, in its list, by a
  stand-in (:func:`standins`) that feeds the block's arguments to the block's rewritten graph
  (``passes.blockwise_step``); every action works the same, the glue runs as the model's Python.

A block-wise capture cannot be exported as ``.pt2`` programs (the glue is not a graph); plans,
``save``/``load``, ``graph(step)`` (the blocks' rewritten graphs side by side) and ``explain``
work.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from dit_opt.errors import CaptureError, DitOptError

#: marks a tensor among the recorded leaves of a call (``None`` is a value a block can be passed)
TENSOR = type("Tensor", (), {"__repr__": lambda self: "<tensor>"})()

__all__ = ["TENSOR", "BlockCall", "Blockwise", "block_leaves", "export_blocks", "slice_views", "standins"]


@dataclass(frozen=True)
class BlockCall:
    """How the model calls one block, as recorded at capture.

    Attributes:
        name: the block's qualified name.
        spec: pytree structure of its ``(args, kwargs)``.
        constants: per leaf, :data:`TENSOR` for a tensor, else the (non-tensor) value it was
            captured with (the block's graph is specialised to it).
        start: position of its first leaf among the top graph's placeholders.
        out_spec: pytree structure of its return value.
    """

    name: str
    spec: pytree.TreeSpec
    constants: tuple[Any, ...]
    start: int
    out_spec: pytree.TreeSpec

    @property
    def count(self) -> int:
        """Number of leaves (the block view's placeholders)."""
        return len(self.constants)

    def leaves(self, args: tuple, kwargs: dict) -> list[Any]:
        """The leaves of a call's ``(args, kwargs)``, checked against the captured call.

        Raises:
            DitOptError: the model calls the block with other arguments than at capture (another
                structure, or another value of a non-tensor argument its graph is specialised to).
        """
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.spec:
            raise DitOptError(f"block {self.name} is called with arguments of another structure than at capture "
                              f"({spec} instead of {self.spec}); optimise the model with inputs like these calls'")
        for i, (x, c) in enumerate(zip(leaves, self.constants, strict=True)):
            if c is TENSOR:
                if not isinstance(x, torch.Tensor):
                    raise DitOptError(f"block {self.name}: argument leaf {i} was a tensor at capture, got "
                                      f"{type(x).__name__}; optimise the model with inputs like these calls'")
            elif isinstance(x, torch.Tensor) or not _same(x, c):
                raise DitOptError(f"block {self.name}: argument leaf {i} is {x!r}, captured as {c!r} (the block's "
                                  f"graph is specialised to it); optimise the model with inputs like these calls'")
        return leaves


@dataclass
class Blockwise:
    """What a block-wise capture knows beside the block graphs (see the module docstring).

    Attributes:
        reason: why the whole model could not be captured (the export's error).
        in_spec: pytree structure of the model's keyword inputs.
        out_spec: pytree structure of the model's return value.
        out_constants: per leaf of the return value, :data:`TENSOR` for a tensor, else its value.
        calls: per block (qualified name), how the model calls it.
        forward_flops: ``FlopCounterMode``'s count over one forward of the model.
        views: per block, the top graph sliced to that block (its leaves in, its outputs out).
    """

    reason: str
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    out_constants: tuple[Any, ...]
    calls: dict[str, BlockCall]
    forward_flops: int
    views: dict[str, torch.fx.GraphModule] = field(default_factory=dict)

    def flat_inputs(self, model_name: str, kwargs: dict[str, Any]) -> list[Any]:
        """The model's keyword inputs as pytree leaves (checked against the capture's structure)."""
        leaves, spec = pytree.tree_flatten(kwargs)
        if spec != self.in_spec:
            raise DitOptError(f"{model_name}: these inputs have another structure than the captured ones "
                              f"({sorted(kwargs)}); a new input signature is captured anew")
        return leaves

    def tensor_positions(self) -> list[int]:
        """Positions of the return value's leaves that are tensors."""
        return [i for i, c in enumerate(self.out_constants) if c is TENSOR]


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that do not compare (arrays): identity only
        return a is b


class _Calls(nn.Module):
    """Calls every block once on its own recorded inputs (what a block-wise capture exports).
    The model's block lists are registered under their own paths, so that the exported
    sub-graphs have the blocks' qualified names."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)
        for list_name in dict.fromkeys(n.rsplit(".", 1)[0] for n in names):
            parent: nn.Module = self
            *path, leaf = list_name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, model.get_submodule(list_name))

    def forward(self, calls: list[tuple[tuple, dict]]) -> list[Any]:
        return [self.get_submodule(n)(*a, **k) for n, (a, k) in zip(self.names, calls, strict=True)]


def export_blocks(model: nn.Module, example_inputs: dict[str, Any], records: dict[str, dict[str, Any]],
                  names: Sequence[str], reference: Any, reason: str) -> tuple[Any, nn.Module, Blockwise]:
    """Export every block on its recorded inputs (see the module docstring).

    Args:
        model: the transformer.
        example_inputs: the keyword inputs the blocks were recorded under.
        records: per block, its first call's ``args``, ``kwargs`` and ``output``.
        names: the blocks' qualified names, in execution order.
        reference: the model's output on ``example_inputs``.
        reason: why the whole export failed (kept for the summary).

    Returns:
        ``(exported, module, blockwise)``: the ``ExportedProgram``, its unflattened module (the
        blocks at their qualified names) and the :class:`Blockwise` record.

    Raises:
        CaptureError: a block does not export, or is called more or less than once per forward.
    """
    from dit_opt.flops import count_flops

    cls = type(model).__name__
    repeated = [n for n in names if records[n].get("calls", 1) != 1]
    if repeated:
        raise CaptureError(f"{cls}: torch.export cannot capture the whole model ({reason}), and blocks "
                           f"{repeated[:4]} are called {records[repeated[0]]['calls']} times per forward, so they "
                           f"cannot be captured one by one either. Name lists whose blocks run once per forward: "
                           f"capture(model, inputs, blocks=[...]).")
    # every block gets copies of its own inputs: export merges inputs that are the same tensor
    # object (one temb for all blocks), which would tie one block's graph to another's inputs
    calls = [pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (tuple(records[n]["args"]),
                                                                               dict(records[n]["kwargs"])))
             for n in names]
    wrapper = _Calls(model, names)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            exported = torch.export.export(wrapper, (calls,), strict=False, preserve_module_call_signature=tuple(names))
            module = torch.export.unflatten(exported)
    except Exception as e:
        raise CaptureError(
            f"{cls}: torch.export could not capture the model ({reason}), nor its blocks one by one "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}). dit-opt "
            f"needs blocks that torch.export.export(block, args, kwargs, strict=False) accepts."
        ) from e
    block_calls: dict[str, BlockCall] = {}
    start = 0
    for name, (args, kwargs) in zip(names, calls, strict=True):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        out_spec = pytree.tree_structure(records[name]["output"])
        constants = tuple(TENSOR if isinstance(x, torch.Tensor) else x for x in leaves)
        block_calls[name] = BlockCall(name, spec, constants, start, out_spec)
        start += len(leaves)
    out_leaves, out_spec = pytree.tree_flatten(reference)
    blockwise = Blockwise(
        reason=reason,
        in_spec=pytree.tree_structure(dict(example_inputs)),
        out_spec=out_spec,
        out_constants=tuple(TENSOR if isinstance(x, torch.Tensor) else x for x in out_leaves),
        calls=block_calls,
        forward_flops=count_flops(model, **example_inputs),
    )
    return exported, module, blockwise


def slice_views(gm: torch.fx.GraphModule, blockwise: Blockwise, block_nodes: dict[str, torch.fx.Node]) -> None:
    """Fill ``blockwise.views``: per block, the part of the side-by-side top graph ``gm`` that
    computes it, with all of its leaves as placeholders (in order) and its flat outputs out."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for name, call in blockwise.calls.items():
        node = block_nodes[name]
        others = {n for b, n in block_nodes.items() if b != name}
        keep = set(placeholders[call.start:call.start + call.count])
        stack = [node]
        while stack:  # what the block call depends on
            n = stack.pop()
            if n not in keep:
                keep.add(n)
                stack.extend(n.all_input_nodes)
        stack = list(node.users)
        while stack:  # what depends on it, up to the output, and what that reads besides (pytree specs)
            n = stack.pop()
            if n is not output and n not in keep:
                if n is not node and n in others:
                    raise CaptureError(f"block {name}'s outputs reach block {n.target} in the side-by-side graph")
                keep.add(n)
                stack.extend(n.users)
                stack.extend(n.all_input_nodes)
        g = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for n in gm.graph.nodes:
            if n in keep:
                env[n] = g.node_copy(n, env.__getitem__)
                env[n].meta = dict(n.meta)
        flat = output.args[0]
        g.output(tuple(env[a] for a in (flat if isinstance(flat, tuple | list) else (flat,)) if a in keep))
        blockwise.views[name] = torch.fx.GraphModule(gm, g, class_name=f"{name.replace('.', '_')}_view")


class _Standin(nn.Module):
    """Takes a block's place in its list for one forward: calls go to ``run(args, kwargs)``;
    attributes the model's forward reads through the list (DiT's final layer reads
    ``transformer_blocks[0].norm1.emb``) come from the block."""

    def __init__(self, block: nn.Module, run: Callable[[tuple, dict], Any]) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a child: the stand-in owns no parameters
        object.__setattr__(self, "_run", run)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


@contextlib.contextmanager
def standins(model: nn.Module, runners: dict[str, Callable[[tuple, dict], Any]]) -> Iterator[None]:
    """Inside the ``with``, each block named in ``runners`` is replaced in its list by a stand-in
    that calls ``runners[name](args, kwargs)``; the lists are restored on exit, also on error."""
    swapped: list[tuple[nn.ModuleList, int, nn.Module]] = []
    try:
        for name, run in runners.items():
            list_name, index = name.rsplit(".", 1)
            blocks = model.get_submodule(list_name)
            block = blocks[int(index)]
            blocks[int(index)] = _Standin(block, run)
            swapped.append((blocks, int(index), block))
        yield
    finally:
        for blocks, index, block in reversed(swapped):
            blocks[index] = block


def block_leaves(model: nn.Module, blockwise: Blockwise, inputs: dict[str, Any]) -> dict[str, list[Any]]:
    """Per block, the leaves of its call's arguments in one plain forward of ``model`` on ``inputs``
    (what a block's rewritten graph takes, for tracing it alone)."""
    leaves: dict[str, list[Any]] = {}

    def recording(name: str, block: nn.Module) -> Callable[[tuple, dict], Any]:
        def run(args: tuple, kwargs: dict) -> Any:
            leaves.setdefault(name, blockwise.calls[name].leaves(args, kwargs))
            return block(*args, **kwargs)

        return run

    runners = {name: recording(name, model.get_submodule(name)) for name in blockwise.calls}
    with torch.no_grad(), standins(model, runners):
        model(**inputs)
    return leaves
