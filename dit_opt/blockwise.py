"""Block-by-block capture, for models whose forward ``torch.export`` cannot capture whole.

Some transformers compute their glue (embeddings, masks, the packing of variable-length text)
with Python that ``torch.export`` rejects: ``len(set(seq_lengths))`` over symbolic sizes
(Lumina2), ``.numpy()`` (HiDream), branching on tensor values. Their blocks are plain tensor
code. When the whole export fails, :func:`dit_opt.capture` falls back to this mode:

* **capture**: each block's first call is recorded during one eager forward and all blocks are
  exported together, each on its own recorded inputs (a wrapper that calls every block once,
  their call signatures preserved), so that every block has the same ``torch.export.unflatten``
  sub-graphs as a whole-model capture gives. A block that does not export itself runs as it is
  (*opaque*: whole-block actions only). The top graph calls the blocks side by side, with no
  glue between them; :attr:`Blockwise.views` holds each block's call alone;
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

import numpy as np
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from dit_opt.errors import CaptureError, DitOptError

#: marks a tensor among the recorded leaves of a call (``None`` is a value a block can be passed)
TENSOR = type("Tensor", (), {"__repr__": lambda self: "<tensor>"})()

__all__ = ["TENSOR", "BlockCall", "Blockwise", "block_leaves", "export_blocks", "standins"]


@dataclass(frozen=True)
class BlockCall:
    """How the model calls one block, as recorded at capture.

    Attributes:
        name: the block's qualified name.
        spec: pytree structure of its ``(args, kwargs)``.
        constants: per leaf, :data:`TENSOR` for a tensor, else the (non-tensor) value it was
            captured with (the block's graph is specialised to it).
        start: position of its first leaf among the top graph's placeholders.
        opaque: the block did not export itself and runs as it is: its leaves are passed through
            whatever their values (only the structure is checked).
    """

    name: str
    spec: pytree.TreeSpec
    constants: tuple[Any, ...]
    start: int
    opaque: bool = False

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
        if self.opaque:
            return leaves
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
        views: per block, the graph that calls it once (a placeholder per leaf of its arguments,
            its return value out): what the rewrite passes rewrite for the block's actions.
        opaque: per block that did not export itself, why, and ``(c0, c1, c2)``: its FLOPs
            against the fraction of its tokens (see :func:`export_blocks`).
    """

    reason: str
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    out_constants: tuple[Any, ...]
    calls: dict[str, BlockCall]
    forward_flops: int
    views: dict[str, torch.fx.GraphModule] = field(default_factory=dict)
    opaque: dict[str, tuple[str, tuple[float, float, float]]] = field(default_factory=dict)

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
    The model's blocks are registered under their own paths, so that the exported sub-graphs
    have the blocks' qualified names."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)
        for name in names:
            _place(self, name, model.get_submodule(name))

    def forward(self, calls: list[tuple[tuple, dict]]) -> list[Any]:
        return [self.get_submodule(n)(*a, **k) for n, (a, k) in zip(self.names, calls, strict=True)]


def _place(root: nn.Module, name: str, module: nn.Module) -> None:
    """Register ``module`` under the dotted ``name`` in ``root``, making the parents on the way."""
    parent = root
    *path, leaf = name.split(".")
    for part in path:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(leaf, module)


def _export(model: nn.Module, names: Sequence[str], calls: list) -> nn.Module:
    """The unflattened export of the blocks ``names`` on their ``calls`` (one program)."""
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        exported = torch.export.export(_Calls(model, names), (calls,), strict=False,
                                       preserve_module_call_signature=tuple(names))
        return torch.export.unflatten(exported)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def export_blocks(model: nn.Module, example_inputs: dict[str, Any], records: dict[str, dict[str, Any]],
                  names: Sequence[str], reference: Any, reason: str) -> tuple[nn.Module, Blockwise]:
    """Export every block on its recorded inputs (see the module docstring).

    A block that does not export itself (a mixture of experts that routes its tokens through
    ``.numpy()``, HiDream's; an argument export does not take, a flex-attention ``BlockMask``)
    is kept as it is, *opaque*: planned and run as a whole block (no module-level unit), its
    FLOPs counted by ``FlopCounterMode`` on its recorded call (:attr:`Blockwise.opaque`).

    Args:
        model: the transformer.
        example_inputs: the keyword inputs the blocks were recorded under.
        records: per block, its first call's ``args``, ``kwargs`` and ``output``.
        names: the blocks' qualified names, in execution order.
        reference: the model's output on ``example_inputs``.
        reason: why the whole export failed (kept for the summary).

    Returns:
        ``(module, blockwise)``: a ``GraphModule`` whose graph calls the blocks side by side (each
        the unflattened export of its call, or the block itself where opaque, at its qualified
        name) and the :class:`Blockwise` record.

    Raises:
        CaptureError: a block is called more or less than once per forward.
    """
    cls = type(model).__name__
    repeated = [n for n in names if records[n].get("calls", 1) != 1]
    if repeated:
        raise CaptureError(f"{cls}: torch.export cannot capture the whole model ({reason}), and blocks "
                           f"{repeated[:4]} are called {records[repeated[0]]['calls']} times per forward, so they "
                           f"cannot be captured one by one either. Name lists whose blocks run once per forward: "
                           f"capture(model, inputs, blocks=[...]).")
    # every block gets copies of its own inputs: export merges inputs that are the same tensor
    # object (one temb for all blocks), which would tie one block's graph to another's inputs
    calls = {n: pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(),
                                     (tuple(records[n]["args"]), dict(records[n]["kwargs"]))) for n in names}
    opaque: dict[str, str] = {}
    try:
        unflat = _export(model, names, [calls[n] for n in names])
    except Exception:  # noqa: BLE001 - find the blocks that do not export, and export the others
        unflat = None
        for n in names:
            try:
                _export(model, [n], [calls[n]])
            except Exception as e:  # noqa: BLE001 - this block runs as it is
                opaque[n] = _first_line(e)
        exportable = [n for n in names if n not in opaque]
        if exportable:
            unflat = _export(model, exportable, [calls[n] for n in exportable])
    root = nn.Module()
    for n in names:
        _place(root, n, model.get_submodule(n) if n in opaque else unflat.get_submodule(n))
    graph = torch.fx.Graph()
    block_calls: dict[str, BlockCall] = {}
    views: dict[str, torch.fx.GraphModule] = {}
    outs: list[torch.fx.Node] = []
    start = 0
    for n in names:
        leaves, spec = pytree.tree_flatten(calls[n])
        constants = tuple(TENSOR if isinstance(x, torch.Tensor) else x for x in leaves)
        block_calls[n] = BlockCall(n, spec, constants, start, opaque=n in opaque)
        start += len(leaves)
        views[n] = _view(root, n, leaves, spec)
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in views[n].graph.nodes:
            if node.op == "output":
                outs.append(env[node.args[0][0]])
            else:
                env[node] = graph.node_copy(node, env.__getitem__)
                env[node].meta = dict(node.meta)
    graph.output(tuple(outs))
    module = torch.fx.GraphModule(root, graph, class_name=f"{cls}Blocks")
    out_leaves, out_spec = pytree.tree_flatten(reference)
    blockwise = Blockwise(
        reason=reason,
        in_spec=pytree.tree_structure(dict(example_inputs)),
        out_spec=out_spec,
        out_constants=tuple(TENSOR if isinstance(x, torch.Tensor) else x for x in out_leaves),
        calls=block_calls,
        forward_flops=_forward_flops(model, example_inputs, reason),
        views=views,
        opaque={n: (why, _opaque_cost(model.get_submodule(n), *calls[n])) for n, why in opaque.items()},
    )
    return module, blockwise


def _forward_flops(model: nn.Module, inputs: dict[str, Any], reason: str) -> int:
    """``FlopCounterMode``'s count over the model's forward (what the glue's FLOPs are taken from).

    Raises:
        CaptureError: ``FlopCounterMode`` cannot run the forward (torch 2.13's CPU flex attention).
    """
    from dit_opt.flops import count_flops

    try:
        return count_flops(model, **inputs)
    except Exception as e:
        raise CaptureError(
            f"{type(model).__name__}: torch.export rejected the model's forward ({reason}), and FlopCounterMode "
            f"cannot count it either ({_first_line(e)}), so its FLOPs, which every budget is a fraction of, are "
            f"unknown. dit-opt needs a forward that torch.utils.flop_counter.FlopCounterMode runs."
        ) from e


def _view(root: nn.Module, name: str, leaves: list[Any], spec: pytree.TreeSpec) -> torch.fx.GraphModule:
    """The graph that calls block ``name`` once: a placeholder per leaf of its call's arguments
    (in order), the call with their structure, the block's return value out."""
    g = torch.fx.Graph()
    prefix = name.replace(".", "_")
    nodes = []
    for i, x in enumerate(leaves):
        ph = g.placeholder(f"{prefix}_arg{i}")
        if isinstance(x, torch.Tensor):
            ph.meta["val"] = x
        nodes.append(ph)
    args, kwargs = pytree.tree_unflatten(nodes, spec)
    g.output((g.call_module(name, tuple(args), dict(kwargs)),))
    return torch.fx.GraphModule(root, g, class_name=f"{prefix}_view")


def _opaque_cost(block: nn.Module, args: tuple, kwargs: dict) -> tuple[float, float, float]:
    """``(c0, c1, c2)`` of an opaque block's FLOPs against the fraction ``r`` of its tokens
    (``c0 + c1 r + c2 r^2``, as the cost model's): counted on its recorded call and on the first
    half and quarter of the tokens of its ``(batch, tokens, channels)`` inputs; where the block
    does not run on fewer tokens, all of it linear (its ``PRUNE`` is then left out by the profile)."""
    from dit_opt.flops import count_flops

    full = float(count_flops(block, *args, **kwargs))
    tokens = {x.shape[1] for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.dim() == 3}
    if len(tokens) != 1:
        return 0.0, full, 0.0
    (n,) = tokens
    points = [(1.0, full)]
    for r in (0.5, 0.25):
        k = max(1, round(r * n))
        a, kw = pytree.tree_map_only(torch.Tensor, lambda t, k=k: t[:, :k] if t.dim() == 3 and t.shape[1] == n else t,
                                     (args, kwargs))
        try:
            points.append((k / n, float(count_flops(block, *a, **kw))))
        except Exception:  # noqa: BLE001 - the block does not run on fewer tokens
            return 0.0, full, 0.0
    rs = np.array([r for r, _ in points])
    if len(set(rs)) < 3:
        return 0.0, full, 0.0
    c = np.linalg.solve(np.stack([np.ones(3), rs, rs ** 2], axis=1), np.array([f for _, f in points]))
    return float(c[0]), float(c[1]), float(c[2])


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
