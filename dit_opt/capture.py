"""Capture a diffusers DiT as dit-opt's FX IR.

``torch.fx.symbolic_trace`` fails on diffusers transformers (shape-dependent control
flow), so capture uses ``torch.export.export(strict=False)`` with the blocks' call
signatures preserved, then ``torch.export.unflatten``: the top graph calls each block as
one ``call_module`` node and each block graph calls its sub-modules the same way. Where the
export rejects the model's forward (Python glue over symbolic sizes, ``.numpy()``), the blocks
are captured one by one and the glue runs as the model's own code (:mod:`dit_opt.blockwise`).

Block lists are discovered, not hard-coded: the ``nn.ModuleList``s of same-class blocks
that hold most of the parameters (so most of the FLOPs). Flux- and SD3-style MMDiTs have
two such lists and get both.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from dit_opt.blockwise import export_blocks
from dit_opt.errors import CaptureError, ConfigError, InputMismatchError, NoBlocksFoundError
from dit_opt.export_tables import exported_at, record_table_sizes
from dit_opt.ir import META_BLOCK, ROLES, BlockSpec, DiTGraph, StreamSpec, TensorSpec

__all__ = ["CAPTURE_MODES", "capture", "check_capture_mode", "context_parallel_config", "find_block_lists"]

#: ``capture(mode=...)``: the whole forward where ``torch.export`` takes it, else block by block
#: (``"auto"``); only the whole forward; only block by block (see :mod:`dit_opt.blockwise`)
CAPTURE_MODES = ("auto", "whole", "blocks")


def check_capture_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`CAPTURE_MODES`.

    Raises:
        ConfigError: any other value (the message lists the valid ones).
    """
    if not isinstance(mode, str) or mode not in CAPTURE_MODES:
        raise ConfigError(f"capture mode {mode!r} does not exist: use one of {CAPTURE_MODES} ('auto': the whole "
                          f"forward, block by block where torch.export rejects it)")
    return mode

# A list must hold at least this share of the model's parameters to count as a block list.
_MIN_PARAM_SHARE = 0.10


def find_block_lists(model: nn.Module, blocks: Sequence[str] | None = None) -> list[str]:
    """Qualified names of the model's transformer block lists, in registration order.

    Args:
        model: the transformer.
        blocks: names given by hand (e.g. ``["transformer_blocks"]``); each must name an
            ``nn.ModuleList`` of same-class modules.

    Returns:
        The list names.

    Raises:
        NoBlocksFoundError: nothing found, or a given name is not a block list; the message
            lists the candidates and how to name the blocks by hand.
    """
    cls = type(model).__name__
    candidates = _candidate_lists(model)
    if blocks is not None:
        if isinstance(blocks, str):
            blocks = [blocks]
        modules = dict(model.named_modules())
        for name in blocks:
            mod = modules.get(name)
            if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(c) for c in mod}) != 1:
                found = "is not a module of the model" if mod is None else f"is a {type(mod).__name__}"
                raise NoBlocksFoundError(
                    f"{cls}: blocks={list(blocks)!r} names {name!r}, which {found}, not a non-empty "
                    f"nn.ModuleList of same-class blocks. Lists of repeated blocks in this model: "
                    f"{_describe(candidates) or 'none'}. Pass one of those, e.g. "
                    f"capture(model, inputs, blocks=[{(candidates[0][0] if candidates else 'transformer_blocks')!r}])."
                )
        return list(blocks)
    total = sum(p.numel() for p in model.parameters()) or 1
    chosen = [name for name, params, _ in candidates if params >= _MIN_PARAM_SHARE * total]
    if not chosen:
        # A tiny config (one small block beside large learned text paddings, HunyuanDiT's test
        # config) holds less than the share in its blocks: the largest list of modules its
        # library names blocks is then the block list.
        named = [(params, name) for name, params, desc in candidates if re.search(r"Block$", desc)]
        chosen = [max(named)[1]] if named else []
    if not chosen:
        raise NoBlocksFoundError(
            f"{cls}: found no transformer block list, i.e. no nn.ModuleList of same-class blocks "
            f"holding at least {_MIN_PARAM_SHARE:.0%} of the model's parameters "
            f"(lists of repeated modules: {_describe(candidates) or 'none'}). If the blocks live "
            f"elsewhere, name the list by hand: capture(model, inputs, blocks=['transformer_blocks'])."
        )
    return chosen


def _candidate_lists(model: nn.Module) -> list[tuple[str, int, str]]:
    """(name, parameter count, "<count> x <block class>") of every ModuleList of same-class modules."""
    out: list[tuple[str, int, str]] = []
    containers: list[str] = []
    for name, mod in model.named_modules():
        if not name or not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if any(name.startswith(c + ".") for c in containers):
            continue
        if all(isinstance(c, nn.ModuleList | nn.ModuleDict) for c in mod):
            # containers the model iterates (ConsisID's face extractor layers), not modules it
            # calls; nor are the lists inside them its blocks
            containers.append(name)
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        # A list nested inside a block of an already chosen list is part of that block.
        if any(name.startswith(prev + ".") for prev, _, _ in out):
            continue
        params = sum(p.numel() for p in mod.parameters())
        if params:
            out.append((name, params, f"{len(mod)} x {type(mod[0]).__name__}"))
    return out


def _describe(candidates: list[tuple[str, int, str]]) -> str:
    return ", ".join(f"{n} ({c}, {p:,} params)" for n, p, c in candidates)


def context_parallel_config(model: nn.Module) -> Any | None:
    """The diffusers context-parallel config the model runs under
    (``model.enable_parallelism(config=ContextParallelConfig(...))``), or ``None``."""
    config = getattr(model, "_parallel_config", None)
    return getattr(config, "context_parallel_config", None) if config is not None else None


@contextlib.contextmanager
def _tuple_outputs(model: nn.Module) -> Iterator[None]:
    """Call a context-parallel model with ``return_dict=False`` inside the ``with``: diffusers'
    context-parallel hooks split its inputs and gather its outputs, and gather only tuples. (The
    capture then traces through them: each rank's graph holds its shard's split and the gather,
    its blocks see their shard of the sequence.)"""
    if context_parallel_config(model) is None or "return_dict" not in inspect.signature(model.forward).parameters:
        yield
        return
    saved = model.__dict__.get("forward")  # diffusers' hook registry keeps its wrapper here
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return inner(*args, **{**kwargs, "return_dict": False})

    model.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del model.forward
        else:
            model.forward = saved


def capture(
    model: nn.Module,
    example_inputs: dict[str, Any],
    *,
    blocks: Sequence[str] | None = None,
    check: bool = True,
    atol: float = 1e-5,
    mode: str = "auto",
) -> DiTGraph:
    """Capture ``model`` as a :class:`~dit_opt.ir.DiTGraph`.

    Args:
        model: a diffusers transformer (or any DiT-like ``nn.Module`` with a list of blocks).
        example_inputs: keyword arguments of one forward call, at the shapes to optimise for.
        blocks: names of the block lists, when discovery picks the wrong ones.
        check: run the captured graph once and compare with the model's own output.
        atol: tolerance of that comparison (float32).
        mode: ``"auto"``: the whole forward as one graph, or, where ``torch.export`` rejects it,
            block by block (:mod:`dit_opt.blockwise`: each block a graph, the glue the model's own
            Python); ``"whole"``: only the former (a rejected export raises); ``"blocks"``: only
            the latter.

    Returns:
        The captured graph, with a :class:`~dit_opt.ir.BlockSpec` per block. FLOPs are filled
        in by :func:`passes.annotate_flops.annotate_flops`.

    Raises:
        InputMismatchError: ``example_inputs`` does not fit ``model.forward``.
        NoBlocksFoundError: no block list found (see :func:`find_block_lists`).
        CaptureError: ``torch.export`` failed (in ``"auto"`` mode: on the blocks too), or the
            captured graph computes something else.
        ConfigError: ``mode`` is not one of :data:`CAPTURE_MODES`.

    Example:
        >>> g = capture(model, {"hidden_states": x, "timestep": t, "class_labels": y})
        >>> print(g.summary())
    """
    cls = type(model).__name__
    t0 = time.perf_counter()
    check_capture_mode(mode)
    _check_inputs(model, example_inputs)
    list_names = find_block_lists(model, blocks)
    block_modules = [(ln, i, blk) for ln in list_names for i, blk in enumerate(model.get_submodule(ln))]
    names = tuple(f"{ln}.{i}" for ln, i, _ in block_modules)

    # One eager run records each block's real inputs and outputs (their contract) and the
    # reference output to check the capture against.
    records: dict[str, dict[str, Any]] = {}
    handles = [_record_io(blk, records.setdefault(f"{ln}.{i}", {})) for ln, i, blk in block_modules]
    calls: dict[str, int] = {}  # role sub-module -> calls in the run (module-level units need one per block call)
    for ln, i, blk in block_modules:
        for _, mods in _roles(blk):
            for m in mods:
                key = f"{ln}.{i}.{m}"
                handles.append(blk.get_submodule(m).register_forward_pre_hook(
                    lambda *_, key=key: calls.__setitem__(key, calls.get(key, 0) + 1)))
    table_sizes: dict[str, tuple[int, int, int]] = {}  # positional tables forward computes (export_tables)
    handles += record_table_sizes(model, table_sizes)
    try:
        with torch.no_grad(), _tuple_outputs(model):
            reference = model(**example_inputs)
    except Exception as e:
        raise InputMismatchError(
            f"{cls}: the model itself fails on the example inputs ({type(e).__name__}: {_first_line(e)}). "
            f"Pass inputs that run with model(**example_inputs): right keys, shapes, dtypes and device."
        ) from e
    finally:
        for h in handles:
            h.remove()
    not_run = [n for n in names if "args" not in records[n]]
    idle = set(list_names) - {n.rsplit(".", 1)[0] for n in names if n not in not_run}
    if blocks is None and not_run and idle and len(idle) < len(list_names) and \
            all(n.rsplit(".", 1)[0] in idle for n in not_run):
        # a discovered list that this forward never calls (a branch for inputs not given) is
        # not where its work is: the lists it calls are the blocks
        list_names = [ln for ln in list_names if ln not in idle]
        block_modules = [(ln, i, blk) for ln, i, blk in block_modules if ln not in idle]
        names = tuple(f"{ln}.{i}" for ln, i, _ in block_modules)
        not_run = []
    if not_run:
        raise NoBlocksFoundError(
            f"{cls}: blocks {not_run[:4]} were never called in a forward pass with these inputs, so they "
            f"are not the model's transformer blocks. Name the right list: capture(model, inputs, blocks=[...])."
        )

    exported = module = blockwise = None
    if mode != "blocks":
        try:
            with torch.no_grad(), warnings.catch_warnings(), _tuple_outputs(model), exported_at(model, table_sizes), \
                    _fresh_passthrough_outputs(block_modules, records):
                warnings.simplefilter("ignore")
                exported = torch.export.export(
                    model, (), dict(example_inputs), strict=False, preserve_module_call_signature=names
                )
                # torch 2.13's unflatten prints debugging lines ("Checking mutability ...") to stdout
                with contextlib.redirect_stdout(io.StringIO()):
                    module = torch.export.unflatten(exported)
                _run_generated_code(module)
        except Exception as e:
            if mode == "whole":
                raise CaptureError(
                    f"{cls}: torch.export could not capture the model ({type(e).__name__}: {_first_line(e)}). "
                    f"dit-opt needs a model that torch.export.export(model, (), inputs, strict=False) accepts "
                    f"for mode='whole': remove data-dependent Python control flow (branching on tensor values, "
                    f".item()) from forward, or capture with mode='auto' (block by block where the whole fails)."
                ) from e
            reason = f"{type(e).__name__}: {_first_line(e)[:200]}"
    else:
        reason = "mode='blocks' was asked for"
    if module is None:
        with warnings.catch_warnings(), _fresh_passthrough_outputs(block_modules, records):
            warnings.simplefilter("ignore")
            module, blockwise = export_blocks(model, example_inputs, records, names, reference, reason)
        _run_generated_code(module)

    gm = torch.fx.GraphModule(module, module.graph, class_name=f"{cls}Graph")
    if blocks is None and blockwise is None:
        # A discovered list whose blocks another module calls (HunyuanVideo's token refiner
        # inside its context embedder) is that module's glue, not the model's blocks.
        top = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        inner = {ln for ln, i, _ in block_modules if f"{ln}.{i}" not in top}
        if inner and len(inner) < len(list_names):
            block_modules = [(ln, i, blk) for ln, i, blk in block_modules if ln not in inner]
            names = tuple(f"{ln}.{i}" for ln, i, _ in block_modules)
    # A sub-module a block calls more than once (CogView4's ``ff``, on the image and then on the
    # text tokens) has no one output to reuse, prune or skip: it is served only with its block.
    repeated = tuple(sorted(k for k, n in calls.items() if n > 1 and k.rsplit(".", 1)[0] in set(names)))
    # an opaque block (dit_opt.blockwise: it did not export itself) has no graph to serve modules from
    opaque = set(blockwise.opaque) if blockwise is not None else set()
    specs = tuple(
        _block_spec(ln, i, blk, records[f"{ln}.{i}"], module.get_submodule(f"{ln}.{i}"),
                    exclude={k.removeprefix(f"{ln}.{i}.") for k in repeated if k.startswith(f"{ln}.{i}.")},
                    whole=f"{ln}.{i}" in opaque)
        for ln, i, blk in block_modules
    )
    graph = DiTGraph(
        model=model,
        exported=exported,
        module=module,
        gm=gm,
        blocks=specs,
        example_inputs=dict(example_inputs),
        repeated_modules=repeated,
        blockwise=blockwise,
    )
    for spec, node in graph.block_nodes():
        node.meta[META_BLOCK] = spec.name

    missing = sorted(set(names) - {s.name for s, _ in graph.block_nodes()})
    if missing:
        raise CaptureError(
            f"{cls}: after export, blocks {missing[:4]} are not single call_module nodes of the top graph "
            f"(their calls were inlined). Name only lists whose blocks are called once per forward: "
            f"capture(model, inputs, blocks=[...])."
        )
    if check:
        with torch.no_grad():
            got = graph(**example_inputs)
        diff = _max_abs_diff(reference, got)
        if not diff <= atol:
            raise CaptureError(
                f"{cls}: the captured graph's output differs from the model's by {diff:.3g} (> atol={atol}). "
                f"The model's forward is probably not deterministic (dropout in training mode? call "
                f"model.eval()) or depends on state torch.export cannot see."
            )
    graph.capture_seconds = time.perf_counter() - t0
    return graph


def _check_inputs(model: nn.Module, inputs: Any) -> None:
    cls = type(model).__name__
    if not isinstance(inputs, dict):
        raise InputMismatchError(
            f"{cls}: example_inputs must be a dict of keyword arguments for model.forward, got "
            f"{type(inputs).__name__}. Pass e.g. {{'hidden_states': x, 'timestep': t, ...}}."
        )
    sig = inspect.signature(model.forward)
    try:
        sig.bind(**inputs)
    except TypeError as e:
        params = [p for p in sig.parameters if p not in ("self", "kwargs", "args")]
        raise InputMismatchError(
            f"{cls}: example_inputs {sorted(inputs)} do not fit {cls}.forward ({e}). "
            f"Its parameters are {params}."
        ) from e


@contextlib.contextmanager
def _fresh_passthrough_outputs(block_modules: Sequence[tuple[str, int, nn.Module]],
                               records: dict[str, dict[str, Any]]) -> Iterator[None]:
    """Inside the ``with``, a block that returns one of its inputs as it is (Mochi's last block passes
    the text stream through) returns a copy of it: ``torch.export.unflatten`` cannot give a
    preserved module call an output that is its input ("Could not find output node")."""
    patched = []
    for ln, i, blk in block_modules:
        rec = records.get(f"{ln}.{i}", {})
        out = rec.get("output")
        ins = [x for x in torch.utils._pytree.tree_leaves((rec.get("args", ()), rec.get("kwargs", {})))
               if isinstance(x, torch.Tensor)]
        if not isinstance(out, tuple | list) or not any(any(o is x for x in ins) for o in out):
            continue
        saved, inner = blk.__dict__.get("forward"), blk.forward

        def forward(*args: Any, inner: Any = inner, **kwargs: Any) -> Any:
            result = inner(*args, **kwargs)
            given = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            return type(result)(o.clone() if any(o is x for x in given) else o for o in result)

        blk.forward = forward
        patched.append((blk, saved))
    try:
        yield
    finally:
        for blk, saved in patched:
            if saved is None:
                del blk.forward
            else:
                blk.forward = saved


def _record_io(block: nn.Module, rec: dict[str, Any]) -> Any:
    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if "args" not in rec:  # the first call defines the contract
            rec["args"], rec["kwargs"], rec["output"] = args, kwargs, output
        rec["calls"] = rec.get("calls", 0) + 1

    return block.register_forward_hook(hook, with_kwargs=True)


def _block_spec(list_name: str, index: int, block: nn.Module, rec: dict[str, Any], sub: nn.Module,
                exclude: set[str] = frozenset(), whole: bool = False) -> BlockSpec:
    """The block's contract from its recorded call and its graph ``sub`` (``whole``: no graph, the
    block is served only whole: no role sub-modules, streams matched by shape)."""
    positional = _positional_name(block)
    inputs: list[tuple[str, TensorSpec]] = []
    named = [(positional(i), a) for i, a in enumerate(rec["args"])]
    for k, v in [*named, *rec["kwargs"].items()]:
        if isinstance(v, torch.Tensor):
            inputs.append((k, TensorSpec.of(v)))
        elif isinstance(v, tuple | list):  # e.g. rotary embeddings as (cos, sin)
            inputs.extend((f"{k}.{j}", TensorSpec.of(x)) for j, x in enumerate(v) if isinstance(x, torch.Tensor))
    out = rec["output"]
    is_tuple = isinstance(out, tuple | list)
    outs = list(out) if is_tuple else [out]
    # The block graph names positional inputs ``_positional_arg_<i>``: map them back to the
    # forward signature's names.
    sources = {} if whole else {
        pos: {positional(int(n.rsplit("_", 1)[1])) if n.startswith("_positional_arg_") else n for n in v}
        for pos, v in _residual_sources(sub).items()
    }
    streams: list[StreamSpec] = []
    used: set[str] = set()
    for pos, o in enumerate(outs):
        if o is None:
            streams.append(StreamSpec(pos, None, None))
            continue
        if not isinstance(o, torch.Tensor):
            raise CaptureError(
                f"block {list_name}.{index} ({type(block).__name__}) returns a {type(o).__name__} at "
                f"position {pos}; dit-opt supports blocks that return tensors or tuples of tensors."
            )
        same_shape = [n for n, s in inputs if s.shape == tuple(o.shape)]
        traced = [n for n in same_shape if n in sources.get(pos, ())]
        pick = next((n for n in traced + same_shape if n not in used), None)
        if pick is not None:
            used.add(pick)
        streams.append(StreamSpec(pos, pick, TensorSpec.of(o)))
    return BlockSpec(
        list_name=list_name,
        index=index,
        cls_name=type(block).__name__,
        inputs=tuple(inputs),
        outputs=tuple(streams),
        output_is_tuple=is_tuple,
        modules=() if whole else tuple((r, kept) for r, mods in _roles(block)
                                       if (kept := tuple(m for m in mods if m not in exclude))),
    )


def _positional_name(block: nn.Module) -> Any:
    """``name(i)``: the forward-signature name of the block's ``i``-th positional argument; one
    past the named ones is ``<var>.<j>``, the ``j``-th of its ``*args`` (HunyuanVideo's blocks
    take ``*args``), or ``arg<i>``."""
    params = [p for p in inspect.signature(block.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var = next((p.name for p in inspect.signature(block.forward).parameters.values()
                if p.kind == p.VAR_POSITIONAL), None)

    def name(i: int) -> str:
        if i < len(params):
            return params[i].name
        return f"{var}.{i - len(params)}" if var is not None else f"arg{i}"

    return name


# Ops through which a residual stream flows unchanged in identity (the skip path).
_STREAM_OPS = {"add", "getitem", "to", "_to_copy", "clone", "contiguous", "clamp", "slice", "split", "cat",
               "view", "reshape", "tree_flatten_spec", "_assert_tensor_metadata"}


def _residual_sources(sub: nn.Module) -> dict[int, set[str]]:
    """For each flat output of a block graph, the input names reached along its skip path."""
    graph: torch.fx.Graph = sub.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names: dict[torch.fx.Node, str] = {n: str(n.target) for n in placeholders}
    out: dict[int, set[str]] = {}
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0]
    if isinstance(flat, torch.fx.Node) and flat.op == "call_function" and "tree_unflatten" in str(flat.target):
        flat = flat.args[0]
    if isinstance(flat, torch.fx.Node):
        flat = (flat,)
    for pos, node in enumerate(flat):
        found: set[str] = set()
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if not isinstance(n, torch.fx.Node) or n in seen:
                continue
            seen.add(n)
            if n in names:
                found.add(names[n])
                continue
            op = getattr(n.target, "__name__", str(n.target)).split(".")[0]
            if n.op == "call_function" and op in _STREAM_OPS:
                stack.extend(n.all_input_nodes)
        out[pos] = found
    return out


def _roles(block: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Sub-modules of ``block`` by role: attention, cross-attention, MLP, norms."""
    found: dict[str, list[str]] = {r: [] for r in ROLES}
    children = dict(block.named_children())
    for name, mod in children.items():
        role = _role_of(name, mod)
        if role is not None:
            found[role].append(name)
    # A fused block (Flux's single-stream block: proj_out over the concatenated attention and
    # proj_mlp outputs) ends in a projection of both branches, most of whose FLOPs are in neither
    # role. It joins the MLP: serving the MLP then serves proj_out's output too (the attention,
    # whose output feeds nothing else, is dropped from the step graph if it is served as well),
    # which is TaylorSeer's policy for these blocks.
    if "proj_mlp" in found["mlp"] and isinstance(children.get("proj_out"), nn.Linear):
        found["mlp"].append("proj_out")
    return tuple((r, tuple(v)) for r, v in found.items() if v)


def _role_of(name: str, mod: nn.Module) -> str | None:
    cls = type(mod).__name__
    lname = name.lower()
    if "attention" in cls.lower() or lname.startswith("attn") or lname.endswith("attn"):
        cross = bool(getattr(mod, "is_cross_attention", False)) or "cross" in lname or lname == "attn2"
        return "cross_attn" if cross else "attn"
    if cls in ("FeedForward", "GELU", "SwiGLU") or lname in ("ff", "ff_context", "mlp", "ffn", "proj_mlp"):
        return "mlp"
    if lname.startswith("ff") or "mlp" in lname or "feedforward" in cls.lower():
        return "mlp"
    if "norm" in cls.lower() or lname.startswith("norm"):
        return "norm"
    return None


def _run_generated_code(module: nn.Module) -> None:
    """Make ``torch.export.unflatten``'s modules run their generated ``forward`` rather than an
    ``fx.Interpreter`` over their graph (as they do under dynamo): the same ops, without the
    interpreter's Python work per node, which slowed every eager run of the captured blocks
    (the profile's hooked runs, the selection's candidates).

    Only where the generated code is still its graph's: unflatten edits some graphs after
    generating their code (a module the model calls twice has its later call renamed from
    ``<name>@1``, which the stale code still looks up)."""
    from torch.export.unflatten import InterpreterModule, UnflattenedModule

    for m in module.modules():
        if not isinstance(m, InterpreterModule | UnflattenedModule):
            continue
        generated = m.__dict__.get("graph_module")
        if generated is not None and generated.code == m.graph.python_code("self").src:
            m._run_with_interpreter = False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _max_abs_diff(a: Any, b: Any) -> float:
    import torch.utils._pytree as pytree

    la = [x for x in pytree.tree_leaves(a) if isinstance(x, torch.Tensor)]
    lb = [x for x in pytree.tree_leaves(b) if isinstance(x, torch.Tensor)]
    if len(la) != len(lb) or not la:
        return float("inf")
    return max(float((x.float() - y.float()).abs().max()) if x.numel() else 0.0 for x, y in zip(la, lb, strict=True))
