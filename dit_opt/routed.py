"""The runtime of elastic routers: :class:`RoutedTransformer` runs a model whose blocks are gated
per sample by a :class:`~dit_opt.routers.RouterSet`.

At each routed block call every row of the batch (a sample, or one guidance branch of one) gets
its router's decision: compute at one of the MLP widths, or, where the gate is closed, reuse
(the input plus the row's residual cached at its last compute of the block, at most
``max_reuse`` times in a row; :attr:`~dit_opt.routers.RouterConfig.closed`) or skip (the block
returns its inputs; with E-DiT's block caching where the gate is open by less than ``margin``).
The rows that compute at a width are gathered into one sub-batch and run through that width's
block (the block itself at full width; a copy with narrowed MLPs,
:func:`dit_opt.executor.narrow_block`, otherwise), and scattered back: one sample's decisions
never change another's output. A call where every row computes at full width runs the block as
it is.

Under a static plan (:attr:`~dit_opt.routers.RouterConfig.served`, :func:`dit_opt.optimize` with
``dynamic``) the blocks the plan serves at a step are served from every row's cache without
asking their routers (at any streak), and only the plan's computes are the routers' to gate.

Every call counts the FLOPs each row spends (the cost model's, per row: the glue outside the
blocks, the routers, each block at its width, the reuses' adds), summed per sample over a
generation; :meth:`RoutedTransformer.stats` reports their mean, spread and the decisions made.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from dit_opt.errors import ArtifactError, ConfigError, InputMismatchError
from dit_opt.executor import combine, is_guidance_batch, mlp_linears, narrow_block, pack_outputs, split_outputs
from dit_opt.ir import BlockSpec, DiTGraph, StreamSpec
from dit_opt.plan import MAX_FORECAST_ORDER, Plan, forecast_weights
from dit_opt.routers import RouterSet, timestep_embedding
from dit_opt.steps import StepTracker
from dit_opt.synthetic import call_batch, call_names
from dit_opt.wrapping import TransformerWrapper

__all__ = ["RoutedBlock", "RoutedTransformer", "routed_blocks", "row_timesteps", "swapped_forwards"]


@dataclass
class RoutedBlock:
    """A block a router gates: where its router reads and what each choice costs per row."""

    spec: BlockSpec
    module: nn.Module
    #: the forward argument the router reads (the first stream's input)
    x_name: str
    #: per row: FLOPs at each width of the router set (the last is full width)
    flops: tuple[float, ...]
    #: per row: FLOPs of a reuse (one add per stream element)
    reuse_flops: float
    #: whether the block has MLPs a width can narrow (else every width runs the whole block)
    narrowable: bool

    def serve_flops(self, order: int) -> float:
        """Per row, FLOPs of serving the block from its cache with a forecast of ``order`` (0: a
        reuse, one add per stream element; each order adds a multiply and an add)."""
        return (1 + 2 * order) * self.reuse_flops

    def closed_flops(self, closed: str) -> float:
        """Per row, FLOPs of serving the block with its gate closed (:class:`~dit_opt.routers.RouterConfig`
        ``closed``): nothing for a skip, a reuse or a first-order forecast otherwise."""
        return 0.0 if closed == "skip" else self.serve_flops(int(closed == "forecast"))

    def to_json(self) -> dict[str, Any]:
        """What :meth:`from_json` needs to rebuild the block on the same model (no capture)."""
        return {"name": self.spec.name, "x_name": self.x_name, "streams": [o.input_name for o in self.spec.outputs],
                "tuple": self.spec.output_is_tuple, "mlp": list(self.spec.role_modules("mlp")),
                "cls": self.spec.cls_name, "flops": list(self.flops), "reuse_flops": self.reuse_flops,
                "narrowable": self.narrowable}

    @classmethod
    def from_json(cls, model: nn.Module, d: dict[str, Any]) -> RoutedBlock:
        """The block :meth:`to_json` described, on ``model`` (which must have it)."""
        list_name, _, index = d["name"].rpartition(".")
        spec = BlockSpec(list_name, int(index), d["cls"], (),
                         tuple(StreamSpec(k, n, None) for k, n in enumerate(d["streams"])), bool(d["tuple"]),
                         (("mlp", tuple(d["mlp"])),) if d["mlp"] else ())
        return cls(spec, model.get_submodule(d["name"]), d["x_name"], tuple(float(f) for f in d["flops"]),
                   float(d["reuse_flops"]), bool(d["narrowable"]))


def routed_blocks(graph: DiTGraph, widths: tuple[float, ...]) -> tuple[list[RoutedBlock], dict[str, str]]:
    """The blocks of ``graph`` a router can gate, and why each other one cannot.

    A block can be gated when each of its outputs continues an input stream (so that skipping
    it returns that input) and its first stream is ``(batch, tokens, dim)``."""
    batch = call_batch(graph) or 1
    out, excluded = [], {}
    for spec in graph.blocks:
        if not spec.outputs or any(o.input_name is None for o in spec.outputs):
            excluded[spec.name] = "an output continues no input stream, so the block cannot be skipped"
            continue
        shapes = dict(spec.inputs)
        first = shapes.get(spec.outputs[0].input_name)
        if first is None or len(first.shape) != 3 or first.shape[0] != batch:
            excluded[spec.name] = "its first stream is not (batch, tokens, dim)"
            continue
        module = graph.model.get_submodule(spec.name)
        narrowable = bool(mlp_linears(module, spec))
        flops = tuple(graph.costs.flops(spec.name, width=w if narrowable else 1.0) / batch for w in widths)
        elems = sum(int(np.prod(o.spec.shape[1:])) for o in spec.outputs if o.spec is not None)
        out.append(RoutedBlock(spec, module, spec.outputs[0].input_name, flops, float(elems), narrowable))
    return out, excluded


def row_timesteps(timestep: Any, batch: int, device: Any) -> torch.Tensor:
    """The call's timestep per row, ``(batch,)`` float32 (a scalar or one-element timestep repeated)."""
    t = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == batch:
        return t
    return t[:1].expand(batch) if t.numel() else torch.zeros(batch, device=device)


def gather_rows(value: Any, batch: int, idx: torch.Tensor) -> Any:
    """``value`` (tensors in tuples, lists and dicts) with every tensor whose first dimension is
    ``batch`` cut to rows ``idx``."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.index_select(0, idx) if t.dim() and t.shape[0] == batch
                                else t, value)


@contextlib.contextmanager
def swapped_forwards(swaps: list[tuple[nn.Module, Any]]) -> Iterator[None]:
    """Within the block, each module's ``forward`` is its paired callable; afterwards, what it was
    (an instance attribute a hook library set is put back, not deleted)."""
    saved = [(m, m.__dict__.get("forward")) for m, _ in swaps]
    for m, f in swaps:
        m.forward = f
    try:
        yield
    finally:
        for m, f in saved:
            if f is not None:
                m.forward = f
            elif "forward" in m.__dict__:
                del m.forward


class RoutedTransformer(TransformerWrapper):
    """``model`` with its blocks gated per sample by ``routers`` (see the module docstring).

    Args:
        model: the transformer (left unchanged: the blocks' forwards are swapped in per call).
        routers: a :class:`~dit_opt.routers.RouterSet` for ``model``.
        blocks: the gated blocks (:func:`routed_blocks`), in ``routers.config.blocks`` order.
        glue_flops: per row, the FLOPs of one call outside the blocks.
        full_flops: per row, the FLOPs of one call of the model.
        order: per ``"<block>.<mlp>"`` the hidden channels from most to least important (the
            widths keep a prefix of it).
        num_steps: the loop's steps (where ``reuse_from`` starts), from the calibration.
        cap: a hard cap: a row whose FLOPs so far (this block at full cost included) would exceed
            ``cap`` of the full model's skips the block. ``None``: the budget holds on average.
        latent_shape: the latent's shape past the batch the routers were made for.
        compile: compile each block at each width and each router with Inductor, the batch
            dimension dynamic (the sub-batches' sizes vary from call to call; no recompile per size).
        plan: the static plan the routers run under (:func:`dit_opt.optimize` with ``dynamic``;
            its schedule is ``routers.config.served``), kept for inspection and saved with them.
    """

    def __init__(self, model: nn.Module, routers: RouterSet, blocks: list[RoutedBlock], *, glue_flops: float,
                 full_flops: float, order: dict[str, torch.Tensor] | None = None, num_steps: int = 0,
                 cap: float | None = None, latent_shape: tuple[int, ...] | None = None, compile: bool = False,
                 plan: Plan | None = None):
        super().__init__()
        if [b.spec.name for b in blocks] != list(routers.config.blocks):
            raise ConfigError("RoutedTransformer: the blocks must be the router set's, in its order")
        if cap is not None and not 0.0 < cap <= 1.0:
            raise ConfigError(f"cap={cap}: a hard FLOP cap is a fraction in (0, 1]")
        self.model = model
        self.routers = routers
        self.blocks = blocks
        self.glue_flops, self.full_flops = float(glue_flops), float(full_flops)
        self.num_steps, self.cap, self.latent_shape, self.plan = num_steps, cap, latent_shape, plan
        self.names = call_names(model)
        cfg = routers.config
        # per block and width, what runs the rows computing at that width: the block's own forward
        # (taken before any call swaps it) at full width, a narrowed copy otherwise
        self._runs: list[list[Any]] = []
        for b in blocks:
            prefix = {k.removeprefix(b.spec.name + "."): v for k, v in (order or {}).items()
                      if k.startswith(b.spec.name + ".")}
            runs = [b.module.forward if w == 1.0 or not b.narrowable else narrow_block(b.module, b.spec, w, prefix)
                    for w in cfg.widths]
            self._runs.append([torch.compile(r, dynamic=True) for r in runs] if compile else runs)
        self._route = [torch.compile(routers[b.spec.name], dynamic=True) if compile else routers[b.spec.name]
                       for b in blocks]
        self.order = dict(order or {})
        self._router_flops = [routers[b.spec.name].flops(cfg.tokens[i]) for i, b in enumerate(blocks)]
        self._decisions: Counter = Counter()
        self._done: list[float] = []  # per sample of each finished generation: its FLOP fraction
        self.reset()
        self.expose_forward(model, self._forward)

    @contextlib.contextmanager
    def cache_context(self, name: str, **details: Any):
        """What diffusers pipelines wrap each guidance branch's call in; the branches are told apart
        by their repeated timestep (:class:`~dit_opt.steps.StepTracker`), each with its own caches."""
        yield

    @classmethod
    def from_graph(cls, graph: DiTGraph, routers: RouterSet, **kwargs: Any) -> RoutedTransformer:
        """The routed model of a captured, FLOP-annotated ``graph`` (``annotate_flops``): its gated
        blocks those of ``routers.config`` (:func:`routed_blocks`), the per-row FLOPs from its cost
        model (blocks left ungated count with the glue, which always runs). ``kwargs``: as the
        constructor's (``order``, ``num_steps``, ``cap``, ``latent_shape``)."""
        found, excluded = routed_blocks(graph, routers.config.widths)
        by_name = {b.spec.name: b for b in found}
        missing = [n for n in routers.config.blocks if n not in by_name]
        if missing:
            raise ConfigError(f"the routers gate {missing}, which this graph cannot gate: "
                              + "; ".join(f"{k}: {excluded.get(k, 'not a block')}" for k in missing))
        blocks = [by_name[n] for n in routers.config.blocks]
        batch = call_batch(graph) or 1
        gated = sum(graph.costs.flops(n) for n in routers.config.blocks)
        full = graph.flops / batch
        return cls(graph.model, routers, blocks, glue_flops=full - gated / batch, full_flops=full, **kwargs)

    @property
    def report(self) -> dict[str, Any]:
        """What training cost and found (``routers.config.report``: seconds, losses, the gate
        offset's calibration runs; under ``optimize(..., dynamic=...)`` the plan's budget, FLOP
        fraction and ``optimize`` cost in calibration generations)."""
        return self.routers.config.report

    def compiled(self) -> RoutedTransformer:
        """The same routed model (routers, state-free) with its blocks and routers compiled
        (the constructor's ``compile``)."""
        return type(self)(self.model, self.routers, self.blocks, glue_flops=self.glue_flops,
                          full_flops=self.full_flops, order=self.order, num_steps=self.num_steps, cap=self.cap,
                          latent_shape=self.latent_shape, compile=True, plan=self.plan)

    def set_schedule(self, timesteps: Any) -> None:
        """What an attached pipeline's scheduler declares for each loop (:func:`dit_opt.attach`):
        under a plan, a loop of another step count is rejected here, before its first call.

        Raises:
            InputMismatchError: the plan was made for another number of steps.
        """
        steps = len(self.routers.config.served)
        if steps and len(timesteps) != steps:
            raise InputMismatchError(f"a loop of {len(timesteps)} steps, but the plan these routers run under was "
                                     f"made for {steps}: optimize with a calibration of {len(timesteps)} steps")

    def use(self, routers: RouterSet) -> None:
        """Run with ``routers``, the same routers under another config (another gate ``offset``,
        caching margin ...: :meth:`RouterSet.with_config`), from a fresh state: no caches, no counts."""
        if routers.routers is not self.routers.routers or routers.config.blocks != self.routers.config.blocks \
                or routers.config.widths != self.routers.config.widths:
            raise ConfigError("RoutedTransformer.use takes the same routers under another config "
                              "(RouterSet.with_config); build a new RoutedTransformer for others")
        self.routers = routers
        self.reset()
        self.clear_stats()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Start a new generation: caches and the current generation's counts cleared."""
        self.tracker = StepTracker(self.names)
        self._branches: dict[int, SimpleNamespace] = {}  # per guidance branch: its caches
        self._spent: torch.Tensor | None = None
        self._full: torch.Tensor | None = None
        self._guidance = False
        self._uncounted = False  # the current generation's samples are left out of stats()
        cfg = self.routers.config
        # residuals kept per row and block: as many as the highest forecast order served needs
        self._depth = 1 + max([int(cfg.closed == "forecast")] + [k for row in cfg.served for _, k in row])
        self._weights: dict[tuple, tuple[float, ...]] = {}

    def _current(self) -> list[float]:
        """Per sample of the current generation, the FLOP fraction spent so far."""
        if self._spent is None or self._uncounted:
            return []
        spent, full = self._spent, self._full
        if self._guidance and spent.numel() % 2 == 0:  # a sample's two branches are one sample
            h = spent.numel() // 2
            spent, full = spent[:h] + spent[h:], full[:h] + full[h:]
        return (spent / full).tolist()

    def _finish_generation(self) -> None:
        self._done.extend(self._current())
        self._spent = self._full = None
        self._uncounted = False

    def stats(self) -> dict[str, Any]:
        """FLOPs spent per sample (fractions of the full model's, counted per call; finished
        generations and the current one) and the decisions made, per block and kind."""
        done = self._done + self._current()
        arr = np.asarray(done, dtype=float)
        per = ({"min": float(arr.min()), "median": float(np.median(arr)), "max": float(arr.max())}
               if arr.size else {})
        blocks: dict[str, dict[str, int]] = {}
        for (name, kind), n in sorted(self._decisions.items()):
            blocks.setdefault(name, {})[kind] = n
        return {"samples": int(arr.size), "flop_fraction": float(arr.mean()) if arr.size else None,
                "per_sample": per, "decisions": blocks}

    def clear_stats(self) -> None:
        """Forget the counted samples and decisions (the caches stay). A generation under way is
        not counted: the samples counted next are those of the generations that start after."""
        self._decisions.clear()
        self._done = []
        self._uncounted = self._spent is not None

    # ------------------------------------------------------------------ artifacts
    def save(self, path: str | Path) -> Path:
        """Write the routers and what running them needs (the blocks' costs and streams, the
        MLPs' channel order) to one safetensors file; :meth:`load` reads it back."""
        runtime = {"blocks": [b.to_json() for b in self.blocks], "glue_flops": self.glue_flops,
                   "full_flops": self.full_flops, "num_steps": self.num_steps, "cap": self.cap,
                   "latent_shape": list(self.latent_shape) if self.latent_shape is not None else None,
                   "plan": self.plan.to_dict() if self.plan is not None else None}
        return self.routers.save(path, runtime, {f"order.{k}": v for k, v in self.order.items()})

    def export(self, path: str | Path) -> None:
        """Not available for routed modules yet: their routers split each batch on the host,
        which a ``torch.export`` program cannot; :meth:`save` keeps routers and plan.

        Raises:
            ConfigError: always, naming :meth:`save` and :func:`dit_opt.load`.
        """
        raise ConfigError(f"{path}: a routed module has no torch.export program (its routers split every batch on "
                          f"the host); save it with opt.save('routers.safetensors') and load it with "
                          f"dit_opt.load(path, model)")

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, *, cap: float | None = None,
             compile: bool = False) -> RoutedTransformer:
        """The routed ``model`` saved by :meth:`save` (``cap``: a hard cap in place of the saved one;
        ``compile``: as the constructor's).

        Raises:
            ArtifactError: the file is missing, corrupt, of another format, or made for another model.
        """
        routers, runtime, extra = RouterSet.read(path)
        routers.check_model(model, str(path))
        try:
            blocks = [RoutedBlock.from_json(model, d) for d in runtime["blocks"]]
            order = {k.removeprefix("order."): v for k, v in extra.items() if k.startswith("order.")}
            shape = runtime.get("latent_shape")
            plan = Plan.from_dict(runtime["plan"]) if runtime.get("plan") else None
            return cls(model, routers, blocks, glue_flops=runtime["glue_flops"], full_flops=runtime["full_flops"],
                       order=order, num_steps=int(runtime["num_steps"]), cap=cap if cap is not None else runtime["cap"],
                       latent_shape=tuple(shape) if shape is not None else None, compile=compile, plan=plan)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{path}: its runtime record is corrupt or does not fit "
                                f"{type(model).__name__} ({type(e).__name__}: {e}); train the routers again") from e

    # ------------------------------------------------------------------ forward
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        named = self.names.named(args, kwargs)
        latent = self.names.latent_of(named)
        if not isinstance(latent, torch.Tensor) or latent.dim() < 2:
            raise InputMismatchError(f"{type(self.model).__name__}: RoutedTransformer needs the latent "
                                     f"'{self.names.latent}' as a batched tensor")
        if self.latent_shape is not None and tuple(latent.shape[1:]) != tuple(self.latent_shape):
            raise InputMismatchError(
                f"latent of shape {tuple(latent.shape[1:])} per sample, but the routers were made for "
                f"{tuple(self.latent_shape)} (their FLOP counts and caches are per token): train routers "
                f"at this resolution")
        batch = int(latent.shape[0])
        timestep = self.names.timestep_of(named, 0.0)
        t = row_timesteps(timestep, batch, latent.device)
        pos = self.tracker.peek(float(t[0]), named)
        cfg = self.routers.config
        if cfg.served and pos.step >= len(cfg.served):
            raise InputMismatchError(
                f"step {pos.step + 1} of a generation, but the plan these routers run under was made for "
                f"{len(cfg.served)} steps: optimize for this step count (or reset() between generations)")
        if not pos.new_generation and self._spent is not None and self._spent.numel() != batch:
            raise InputMismatchError(f"batch of {batch} rows in the middle of a generation of "
                                     f"{self._spent.numel()}: start a new generation (opt.reset())")
        if pos.new_generation:
            self._finish_generation()
            self._branches = {}
        # what a call that raises must not leave behind: its counts, and caches it half updated
        before = (None if self._spent is None else (self._spent.clone(), self._full.clone()), self._decisions.copy())
        if self._spent is None:
            self._spent = torch.zeros(batch, dtype=torch.float64)
            self._full = torch.zeros(batch, dtype=torch.float64)
            self._guidance = is_guidance_batch(latent)
        if pos.branch not in self._branches:
            U = len(self.blocks)
            self._branches[pos.branch] = SimpleNamespace(
                hist=[None] * U,  # per block: its last residuals per row, newest first (per stream)
                computed=[torch.full((batch, self._depth), -1, dtype=torch.long) for _ in range(U)],
                have=[torch.zeros(batch, dtype=torch.bool) for _ in range(U)],
                streak=[torch.zeros(batch, dtype=torch.long) for _ in range(U)],
                outputs=[])  # the model's outputs at the plan's last full steps: (step, leaves, spec)
        state = self._branches[pos.branch]
        order = cfg.step_orders[pos.step] if cfg.step_orders else -1
        if order >= 0 and state.outputs:  # the plan's whole-step forecast: the model is not called
            out, per_row = self._forecast_output(state.outputs, pos.step, order)
            self._full += self.full_flops
            self._spent += per_row
            self._decisions[("model", "plan step forecast")] += batch
            self.tracker.commit(pos)
            return out
        # the blocks the plan serves at this step: their routers are not asked
        forced = dict(cfg.served[pos.step]) if cfg.served else {}
        self._full += self.full_flops
        self._spent += self.glue_flops + sum(f for i, f in enumerate(self._router_flops) if i not in forced)
        temb = timestep_embedding(t, scale=cfg.timestep_scale)
        call = {"step": pos.step, "temb": temb, "decisions": None, "state": state, "forced": forced}
        swaps = [(b.module, self._wrapped(i, b, call, b.module.forward)) for i, b in enumerate(self.blocks)]
        try:
            with swapped_forwards(swaps), torch.no_grad():
                out = self.model(*args, **kwargs)
        except BaseException:
            counts, self._decisions = before[0], before[1]
            self._spent, self._full = counts if counts is not None else (None, None)
            self._branches.pop(pos.branch, None)  # the rows compute again where it left caches half written
            raise
        if cfg.step_orders and cfg.full_steps[pos.step]:  # what the plan's later whole-step forecasts read
            leaves, spec = pytree.tree_flatten(out)
            kept = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves]
            state.outputs = [(pos.step, kept, spec), *state.outputs[: MAX_FORECAST_ORDER]]
        self.tracker.commit(pos)  # only a call that ran moves the loop on
        return out

    def _forecast_output(self, outputs: list, step: int, order: int) -> tuple[Any, float]:
        """The model's output at ``step`` extrapolated through its outputs at the last ``order + 1``
        full steps (fewer where there are fewer), and the FLOPs per row that cost."""
        used = outputs[: order + 1]
        weights = forecast_weights(step, [s for s, _, _ in used], self.routers.config.forecast_form)
        leaves, per_row = [], 0.0
        for j, x in enumerate(used[0][1]):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                x = combine(tuple(kept[1][j] for kept in used), weights)
                per_row += (2 * len(weights) - 1) * x[0].numel() if x.dim() else 0.0
            leaves.append(x)
        return pytree.tree_unflatten(leaves, used[0][2]), per_row

    def _decide(self, i: int, x: torch.Tensor, call: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate probability and width index of every row at block ``i``."""
        cfg = self.routers.config
        if cfg.decide == "step":
            if call["decisions"] is None:  # every router reads the first routed block's input: one host read
                asked = [j for j in range(len(self.blocks)) if j not in call["forced"]]
                out = [self._route[j](x, call["temb"]) for j in asked]
                gates = torch.zeros(len(self.blocks), x.shape[0])
                widths = torch.zeros(len(self.blocks), x.shape[0], dtype=torch.long)
                if out:
                    gates[asked] = torch.sigmoid(torch.stack([g.float() for g, _ in out]) - cfg.offset).cpu()
                    widths[asked] = torch.stack([w.argmax(-1) for _, w in out]).cpu()
                call["decisions"] = (gates, widths)
            return call["decisions"][0][i], call["decisions"][1][i]
        gate, width = self._route[i](x, call["temb"])
        return torch.sigmoid(gate.float() - cfg.offset).cpu(), width.argmax(-1).cpu()

    def _wrapped(self, i: int, b: RoutedBlock, call: dict, forward: Any) -> Any:
        cfg = self.routers.config

        signature = inspect.signature(forward)

        def run(*args: Any, **kwargs: Any) -> Any:
            named = dict(signature.bind(*args, **kwargs).arguments)
            state = call["state"]
            streams = [named[o.input_name] for o in b.spec.outputs]
            x = named[b.x_name]
            batch = x.shape[0]
            forced = i in call["forced"]
            if forced:  # the plan serves the block: every row with a cache is served, at any streak
                p, width = torch.zeros(batch), torch.full((batch,), len(cfg.widths) - 1)
                cached = state.have[i].clone()
            else:
                p, width = self._decide(i, x, call)
                cached = state.have[i] & (state.streak[i] < cfg.max_reuse)
            opened = p >= 0.5
            if self.cap is not None:  # the row's FLOPs so far, this block at full cost, within the cap
                opened &= ~(self._spent + b.flops[-1] > self.cap * self._full)
            if cfg.closed != "skip":
                compute, reuse = opened | ~cached, ~opened & cached
            else:
                compute, reuse = opened, torch.zeros_like(opened)
                if cfg.margin > 0 and call["step"] >= round(cfg.reuse_from * self.num_steps):
                    reuse = compute & (p < 0.5 + cfg.margin) & cached
                    compute &= ~reuse
            name, depth, step = b.spec.name, self._depth, call["step"]
            if bool(compute.all()) and bool((width == len(cfg.widths) - 1).all()):
                out = self._runs[i][-1](*args, **kwargs)  # every row at full width: the block as it is
                new = [(o - s).detach() for o, s in zip(split_outputs(out), streams, strict=True)]
                older = state.hist[i] or [[torch.zeros_like(r) for r in new] for _ in range(depth - 1)]
                state.hist[i] = [new, *older[: depth - 1]]
                state.computed[i] = torch.cat([torch.full((batch, 1), step), state.computed[i][:, :-1]], 1)
                state.have[i][:] = True
                state.streak[i][:] = 0
                self._spent += b.flops[-1]
                self._decisions[(name, f"width {cfg.widths[-1]:g}")] += batch
                return out
            outs = [s.clone() for s in streams]
            if state.hist[i] is None:
                state.hist[i] = [[torch.zeros_like(s) for s in streams] for _ in range(depth)]
            hist = state.hist[i]
            for j, w in enumerate(cfg.widths):
                rows = (compute & (width == j)).nonzero().flatten()
                if not rows.numel():
                    continue
                idx = rows.to(x.device)
                sub_a = gather_rows(args, batch, idx)
                sub_k = gather_rows(kwargs, batch, idx)
                got = split_outputs(self._runs[i][j](*sub_a, **sub_k))
                for k, (o, g, s) in enumerate(zip(outs, got, streams, strict=True)):
                    o.index_copy_(0, idx, g.to(o.dtype))
                    for a in range(depth - 1, 0, -1):  # the rows' older residuals move down one place
                        hist[a][k].index_copy_(0, idx, hist[a - 1][k].index_select(0, idx))
                    hist[0][k].index_copy_(0, idx, (g - s.index_select(0, idx)).detach().to(hist[0][k].dtype))
                state.computed[i][rows] = torch.cat([torch.full((rows.numel(), 1), step),
                                                     state.computed[i][rows, :-1]], 1)
                self._spent[rows] += b.flops[j]
                self._decisions[(name, f"width {w:g}")] += int(rows.numel())
            rows = reuse.nonzero().flatten()
            if rows.numel():
                idx = rows.to(x.device)
                # the order asked: the plan's where it serves the block, else the closed gate's
                asked = call["forced"][i] if forced else int(cfg.closed == "forecast")
                weights, orders = self._serve_weights(state.computed[i], step, rows, asked)
                used = range(int(orders.max()) + 1)
                for k, (o, s) in enumerate(zip(outs, streams, strict=True)):
                    per_row = (-1,) + (1,) * (s.dim() - 1)  # each row its own weights
                    served = combine(tuple(hist[a][k].index_select(0, idx) for a in used),
                                     tuple(weights[:, a].to(s.device, hist[a][k].dtype).reshape(per_row) for a in used))
                    o.index_copy_(0, idx, (s.index_select(0, idx) + served).to(o.dtype))
                self._spent[rows] += torch.tensor([b.serve_flops(int(k)) for k in orders], dtype=torch.float64)
                kind = "forecast" if asked else "reuse"
                self._decisions[(name, f"plan {kind}" if forced else kind)] += int(rows.numel())
            skipped = int((~compute & ~reuse).sum())
            if skipped:
                self._decisions[(name, "skip")] += skipped
            state.have[i] |= compute
            state.streak[i] = torch.where(compute, 0, state.streak[i] + reuse.long())
            return pack_outputs(b.spec.output_is_tuple, *outs)

        return run

    def _serve_weights(self, computed: torch.Tensor, step: int, rows: torch.Tensor, order: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the served ``rows``: the weights of their cached residuals (newest first,
        ``(len(rows), depth)``) and the order each forecast has: ``order`` through the row's last
        ``order + 1`` computes at their steps (``computed``, ``-1`` where none), lower where the
        row has fewer (a reuse after one compute)."""
        form = self.routers.config.forecast_form
        weights = torch.zeros(rows.numel(), computed.shape[1], dtype=torch.float64)
        orders = torch.zeros(rows.numel(), dtype=torch.long)
        for n, c in enumerate(computed[rows].tolist()):
            c = tuple(v for v in c if v >= 0)[: order + 1]
            w = self._weights.get((step, c))
            if w is None:
                w = self._weights[(step, c)] = forecast_weights(step, c, form)
            weights[n, : len(w)] = torch.tensor(w, dtype=torch.float64)
            orders[n] = len(w) - 1
        return weights, orders
