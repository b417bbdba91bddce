"""Training elastic routers (E-DiT) with the backbone frozen: :func:`train_routers`.

1. The calibration runs once with the full model; every call's inputs and output are recorded
   (the model's own trajectories), and the blocks are captured for the cost model and the MLPs'
   channel importance (:func:`passes.annotate_sensitivity.measure_channel_order`).
2. The routers are trained on the recorded calls: each block's output is
   ``served + g (block(x) - served)`` per row, with ``served`` what a closed gate gives (the
   block's input, plus, unless it skips, the full model's residuals forecast from a random age
   and spacing up to ``max_reuse`` steps back, as the runtime serves them) and ``g`` the hard gate
   decision whose gradient is the gate probability's (straight-through), and its MLPs' hidden
   channels masked to the prefix of
   the width chosen (one-hot, straight-through through the softmax). The loss is the relative
   squared error of the model's output against the recorded one plus ``penalty`` times the squared
   gap between the FLOP fraction the decisions spend (the cost model's FLOPs, averaged over the
   minibatch's rows and calls) and the budget.
3. The gate threshold is then calibrated on the calibration itself, run through the
   :class:`~dit_opt.routed.RoutedTransformer` (its own trajectories, E-DiT's caching included): a
   common offset on every gate logit, searched so that the mean FLOP fraction per sample is as
   high as the budget allows and no higher (within :data:`OFFSET_TOLERANCE`).
"""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from rich.progress import Progress
from torch import nn

from dit_opt.errors import ConfigError, DitOptError, InfeasibleBudgetError
from dit_opt.executor import combine, mlp_linears, model_sample, split_outputs
from dit_opt.fingerprint import weights_digest
from dit_opt.ir import DiTGraph
from dit_opt.plan import Plan, forecast_weights
from dit_opt.routed import (
    RoutedBlock,
    RoutedTransformer,
    gather_rows,
    routed_blocks,
    row_timesteps,
    swapped_forwards,
)
from dit_opt.routers import RouterConfig, RouterSet, plan_served, plan_steps, router_flops, timestep_embedding
from dit_opt.synthetic import call_batch, call_names

__all__ = ["train_routers", "record_calls", "router_flop_share"]

#: calibration runs at most to find the gate offset (one run each)
OFFSET_ROUNDS = 10
#: the offset search stops at a FLOP fraction this far under the budget or closer
OFFSET_TOLERANCE = 0.01


def record_calls(model: nn.Module, calibration: Callable[[nn.Module], Any]
                 ) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """Run ``calibration`` with ``model`` and return every call's named inputs and its output
    (the prediction, :func:`dit_opt.executor.model_sample`), detached."""
    names = call_names(model)
    calls: list[tuple[dict[str, Any], torch.Tensor]] = []
    pending: list[dict[str, Any]] = []

    def pre(module, args, kwargs):
        pending.append(pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), names.named(args, kwargs)))

    def post(module, args, kwargs, out):
        calls.append((pending.pop(), model_sample(out).detach().clone()))

    from passes.annotate_sensitivity import run_hooked

    run_hooked(calibration, model, [model.register_forward_pre_hook(pre, with_kwargs=True),
                                    model.register_forward_hook(post, with_kwargs=True)])
    if not calls:
        raise DitOptError(f"{type(model).__name__}: the calibration never called the model. It must run "
                          f"denoising loops with the module it is given.")
    return calls


def _positions(model: nn.Module, calls: list) -> tuple[list[int | None], list[int], int]:
    """Per recorded call, the index of the call of the same generation and branch one step
    earlier (``None`` at a generation's first step) and the call's step; the loop's number of steps."""
    from dit_opt.steps import StepTracker, timestep_value

    names = call_names(model)
    tracker, steps, seen, prev, at = StepTracker(names), 0, {}, [], []
    for n, (inputs, _) in enumerate(calls):
        pos = tracker.peek(timestep_value(names.timestep_of(inputs, 0.0)), inputs)
        tracker.commit(pos)
        seen[(pos.generation, pos.step, pos.branch)] = n
        prev.append(seen.get((pos.generation, pos.step - 1, pos.branch)))
        at.append(pos.step)
        steps = max(steps, pos.step + 1)
    return prev, at, steps


def _served(residuals: list | None, prev: list[int | None], n: int, closed: str,
            backs: list[tuple[int, ...]], form: str = "lagrange") -> list | None:
    """Per gated block, the residuals a closed gate serves at recorded call ``n``, teacher-forced
    (the full model's, of the steps before): for block ``i``, the polynomial through the residuals
    ``backs[i]`` steps before (newest first; as far back as the recorded steps go) extrapolated
    to this step (``form``: :func:`dit_opt.plan.forecast_weights`), or under ``"reuse"`` the first
    of them as it is; ``None`` at a first step."""
    if residuals is None or prev[n] is None:
        return None

    def back(k: int) -> tuple[int, int]:  # up to k steps before call n: (that call, steps)
        m, walked = n, 0
        while walked < k and prev[m] is not None:
            m, walked = prev[m], walked + 1
        return m, walked

    out = []
    for i, offsets in enumerate(backs):
        reached = dict(back(k)[::-1] for k in (offsets[:1] if closed == "reuse" else offsets))  # steps -> call
        steps = sorted(reached)
        if len(steps) == 1:
            out.append(residuals[reached[steps[0]]][i])
            continue
        weights = forecast_weights(0, [-k for k in steps], form)
        out.append([combine(rs, weights) for rs in zip(*(residuals[reached[k]][i] for k in steps), strict=True)])
    return out


def _plan_backs(served: tuple[tuple[tuple[int, int], ...], ...], blocks: int) -> list[list[tuple[int, ...]]]:
    """Per step of a plan (:attr:`RouterConfig.served`), per block, how many steps back the
    computes lie that a closed gate there forecasts from, newest first, if the plan's computes
    before it ran: the plan's order where it serves the block, first order where it computes it
    (a router that closes it); as many as there are."""
    out, last = [], [[] for _ in range(blocks)]
    for t, row in enumerate(served):
        orders = dict(row)
        out.append([tuple(t - c for c in last[i][: orders.get(i, 1) + 1]) or (1,) for i in range(blocks)])
        for i in range(blocks):
            if i not in orders:
                last[i].insert(0, t)
    return out


def _block_residuals(model: nn.Module, blocks: list[RoutedBlock], calls: list) -> list[list[list[torch.Tensor]]]:
    """Per recorded call, per gated block, its output minus its input per stream (the call
    replayed with the full model)."""
    out: list[list[list[torch.Tensor]]] = []
    current: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, b in enumerate(blocks):
        signature = inspect.signature(b.module.forward)

        def hook(mod, args, kwargs, res, i=i, b=b, signature=signature):
            named = signature.bind(*args, **kwargs).arguments
            current[i] = [(o - named[s.input_name]).detach() for o, s in zip(split_outputs(res), b.spec.outputs,
                                                                                strict=True)]

        handles.append(b.module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for inputs, _ in calls:
                current.clear()
                model(**inputs)
                out.append([current[i] for i in range(len(blocks))])
    finally:
        for h in handles:
            h.remove()
    return out


class _Training:
    """The training-time block wrappers (soft, straight-through decisions on whole batches)."""

    def __init__(self, routers: RouterSet, blocks: list[RoutedBlock], order: dict[str, torch.Tensor]):
        self.routers, self.blocks = routers, blocks
        cfg = routers.config
        self.widths = torch.tensor(cfg.widths)
        # per block, per MLP: (last Linear, (num_widths, hidden) prefix masks in the channel order)
        self.masks: list[list[tuple[nn.Module, torch.Tensor]]] = []
        for b in blocks:
            found = []
            for name, _, last, _ in mlp_linears(b.module, b.spec) if b.narrowable else []:
                hidden = last.in_features
                rank = torch.empty(hidden, dtype=torch.long)
                idx = order.get(f"{b.spec.name}.{name}", torch.arange(hidden)).to(torch.long)
                rank[idx] = torch.arange(hidden)
                m = torch.stack([(rank < max(1, round(w * hidden))).float() for w in cfg.widths])
                found.append((last, m))
            self.masks.append(found)
        self.spent: list[torch.Tensor] = []
        self.call: dict[str, Any] = {}

    def forward(self, model: nn.Module, inputs: dict[str, Any], temb: torch.Tensor,
                cached: list[list[torch.Tensor]] | None = None, forced: dict[int, int] | None = None
                ) -> torch.Tensor:
        """The model's prediction on ``inputs`` with the routers' decisions; ``cached``: per block,
        the residuals a closed gate reuses (``None``: none yet, the gates stay open); ``forced``:
        the blocks a plan serves, with the forecast order (their gates closed)."""
        self.spent, self.call = [], {"temb": temb, "decisions": None, "cached": cached, "forced": forced or {}}
        swaps = [(b.module, self._wrapped(i, b, b.module.forward)) for i, b in enumerate(self.blocks)]
        with swapped_forwards(swaps):
            return model_sample(model(**inputs))

    def _wrapped(self, i: int, b: RoutedBlock, forward: Any) -> Any:
        cfg = self.routers.config

        signature = inspect.signature(forward)

        def run(*args: Any, **kwargs: Any) -> Any:
            named = dict(signature.bind(*args, **kwargs).arguments)
            streams = [named[o.input_name] for o in b.spec.outputs]
            x = named[b.x_name]
            if cfg.decide == "step":
                if self.call["decisions"] is None:
                    self.call["decisions"] = [self.routers[r.spec.name](x, self.call["temb"]) for r in self.blocks]
                gate, wl = self.call["decisions"][i]
            else:
                gate, wl = self.routers[b.spec.name](x, self.call["temb"])
            p = torch.sigmoid(gate.float() - cfg.offset)
            g = (p >= 0.5).float() + p - p.detach()
            cached = self.call["cached"][i] if self.call["cached"] is not None else None
            if cfg.closed != "skip" and cached is None:
                g = torch.ones_like(p)  # nothing to reuse yet: the block computes
            elif i in self.call["forced"]:
                g = torch.zeros_like(p)  # the plan serves the block
            soft = torch.softmax(wl.float(), -1)
            sw = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).float() + soft - soft.detach()
            width = sw @ self.widths
            local = []
            for last, m in self.masks[i]:
                mask = sw @ m  # (rows, hidden)

                def pre(mod, a, mask=mask):
                    h = a[0]
                    shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (h.shape[-1],)
                    return (h * mask.reshape(shape).to(h.dtype), *a[1:])

                local.append(last.register_forward_pre_hook(pre))
            try:
                out = forward(*args, **kwargs)
            finally:
                for h in local:
                    h.remove()
            full, narrowest = b.flops[-1], b.flops[0]
            mlp = (full - narrowest) / (1.0 - cfg.widths[0]) if cfg.widths[0] < 1.0 else 0.0  # linear in width
            forced = self.call["forced"]
            closed = b.serve_flops(forced[i]) if i in forced else b.closed_flops(cfg.closed)
            self.spent.append(g * (full - mlp * (1.0 - width)) + (1 - g) * closed)
            outs = []
            for k, (o, s) in enumerate(zip(split_outputs(out), streams, strict=True)):
                gs = g.reshape((-1,) + (1,) * (s.dim() - 1)).to(s.dtype)
                off = s if cfg.closed == "skip" or cached is None else s + cached[k]
                outs.append(off + gs * (o - off))
            return tuple(outs) if b.spec.output_is_tuple else outs[0]

        return run


def router_flop_share(graph: Any, hidden: int = 128, widths: tuple[float, ...] = (1.0,)) -> float:
    """What routers on every block of ``graph`` that one can gate (:func:`~dit_opt.routed.routed_blocks`)
    cost per call, as a fraction of the model's FLOPs (``graph`` FLOP-annotated)."""
    blocks, _ = routed_blocks(graph, widths)
    per_row = sum(router_flops(int(s[-1]), int(s[1]), hidden, len(widths))
                  for s in (dict(b.spec.inputs)[b.x_name].shape for b in blocks))
    return per_row * (call_batch(graph) or 1) / graph.flops


def train_routers(
    model: nn.Module,
    calibration: Callable[[nn.Module], Any],
    *,
    budget: float = 0.5,
    steps: int = 150,
    lr: float = 3e-3,
    penalty: float = 10.0,
    minibatch: int = 4,
    row_subset: int = 4,
    decide: str = "block",
    widths: tuple[float, ...] = (1.0,),
    hidden: int = 128,
    closed: str = "forecast",
    margin: float = 0.0,
    max_reuse: int = 3,
    reuse_from: float = 0.5,
    calibrate: bool = True,
    plan: Plan | None = None,
    graph: DiTGraph | None = None,
    seed: int = 0,
    progress: bool = True,
) -> RoutedTransformer:
    """Train E-DiT routers for ``model`` (its weights frozen) to spend ``budget`` of its FLOPs.

    Args:
        model: a diffusers transformer (or a DiT-like module dit-opt captures).
        calibration: ``module -> anything``: runs denoising loops with the module it is given
            (as for :func:`dit_opt.optimize`); its calls are the training data, and it is run again
            to calibrate the gate threshold.
        budget: the mean FLOP fraction per sample to spend, in (0, 1].
        steps: optimiser steps (``minibatch`` recorded calls each).
        row_subset: rows of each recorded call a step trains on (a random subset; 0: all of them).
        lr: Adam's learning rate.
        penalty: weight of the squared gap between the FLOP fraction and the budget.
        decide: ``"block"`` (each router reads its block's input) or ``"step"`` (all read the
            first block's, so a step's decisions are taken at once).
        widths: the MLP widths the routers choose among (increasing, ending with 1.0). Full width
            only by default: E-DiT's :data:`~dit_opt.routers.DEFAULT_WIDTHS` narrow the MLPs of a
            backbone that was not trained for it, which on the reference models loses far more
            than it saves (``docs/routers.md``).
        hidden: the routers' hidden size.
        closed: what a closed gate does, ``"forecast"``, ``"reuse"`` or ``"skip"``
            (:class:`~dit_opt.routers.RouterConfig`).
        margin, max_reuse, reuse_from: E-DiT's block caching (:class:`~dit_opt.routers.RouterConfig`).
        calibrate: search the gate offset on the calibration so that the FLOPs meet the budget.
        plan: a static plan for the calibration's loop (block granularity, computes, reuses and
            forecasts only) the routers run under: where it serves a block the gate is closed,
            where it computes one the router decides (:func:`dit_opt.optimize` with ``dynamic``
            solves it at a budget above ``budget``). ``None``: every gate is the router's.
        graph: a FLOP-annotated capture of ``model`` to gate the blocks of (``None``: captured
            here on the calibration's first call).
        seed: seeds the routers' initialisation and the minibatches.
        progress: show a progress bar.

    Returns:
        A :class:`~dit_opt.routed.RoutedTransformer`; ``.routers.config.report`` holds the training
        figures (seconds, final losses, the calibrated FLOP fraction per round).

    Raises:
        ConfigError: a budget outside (0, 1], or bad router options.
        DitOptError: no block of the model can be gated.
    """
    if not isinstance(budget, int | float) or not 0.0 < budget <= 1.0:
        raise ConfigError(f"budget={budget!r}: a FLOP fraction in (0, 1], e.g. 0.5")
    if steps < 0 or minibatch < 1 or row_subset < 0:
        raise ConfigError(f"steps={steps}, minibatch={minibatch}, row_subset={row_subset}: steps and row_subset "
                          f"must be >= 0 and minibatch >= 1")
    from dit_opt.capture import capture
    from dit_opt.runtime import timestep_as_tensor
    from passes.annotate_flops import annotate_flops
    from passes.annotate_sensitivity import measure_channel_order

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    names = call_names(model)
    calls = record_calls(model, calibration)
    if graph is None:
        example = {k: v for k, v in calls[0][0].items() if v is not None and k != "return_dict"}
        graph = capture(model, timestep_as_tensor(model, example, names) or example)
        annotate_flops(graph)
    # the channel order only matters to narrowed MLPs; ranking it costs a calibration run
    order = measure_channel_order(graph, calibration)[0] if min(widths) < 1.0 else {}
    blocks, excluded = routed_blocks(graph, tuple(widths))
    if not blocks:
        raise DitOptError(f"{type(model).__name__}: no block can be gated by a router ("
                          + "; ".join(f"{k}: {v}" for k, v in excluded.items()) + ")")
    prev, at, num_steps = _positions(model, calls)
    served: tuple[tuple[tuple[int, int], ...], ...] = ()
    step_orders: tuple[int, ...] = ()
    fulls: tuple[bool, ...] = ()
    if plan is not None:
        if plan.num_steps != num_steps:
            raise ConfigError(f"the plan has {plan.num_steps} steps, the calibration's loop {num_steps}: "
                              f"solve the plan on the same calibration")
        served = plan_served(plan, [b.spec.name for b in blocks])
        step_orders, fulls = plan_steps(plan)
    shapes = [dict(b.spec.inputs)[b.x_name].shape for b in blocks]
    ts = torch.cat([row_timesteps(names.timestep_of(c[0], 0.0), 1, "cpu") for c in calls])
    config = RouterConfig(
        blocks=tuple(b.spec.name for b in blocks), dims=tuple(int(s[-1]) for s in shapes),
        tokens=tuple(int(s[1]) for s in shapes), widths=tuple(float(w) for w in widths), hidden=hidden,
        timestep_scale=1000.0 if float(ts.abs().max()) <= 1.0 + 1e-6 else 1.0, decide=decide, closed=closed,
        margin=margin, max_reuse=max_reuse, reuse_from=reuse_from, budget=float(budget),
        fingerprint=weights_digest(model), served=served, step_orders=step_orders, full_steps=fulls,
        forecast_form=plan.forecast_form if plan is not None else "lagrange")
    routers = RouterSet(config)
    latent = names.latent_of(calls[0][0])
    residuals = _block_residuals(model, blocks, calls) if config.closed != "skip" else None

    routed = RoutedTransformer.from_graph(graph, routers, order=order, num_steps=num_steps,
                                          latent_shape=tuple(latent.shape[1:]), plan=plan)
    plan_backs = _plan_backs(served, len(blocks))
    # the calls the model runs: a plan's whole-step forecasts run no block (and cost next to nothing)
    pool = [n for n in range(len(calls)) if not step_orders or step_orders[at[n]] < 0]
    glue, full = routed.glue_flops, routed.full_flops

    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    train = _Training(routers, blocks, order)
    opt = torch.optim.Adam(routers.parameters(), lr=lr)
    rng = random.Random(seed)
    losses: list[tuple[float, float]] = []
    try:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("training routers", total=steps)
            for _ in range(steps):
                opt.zero_grad()
                err_sum, fracs = 0.0, []
                loss = torch.zeros(())
                for n in rng.sample(pool, min(minibatch, len(pool))):
                    inputs, ref = calls[n]
                    # a closed gate serves the block's residuals of the steps before (teacher-forced)
                    # at the ages and spacings the runtime serves (up to max_reuse steps back)
                    if served:  # where the plan's computes left the caches
                        forced, backs = dict(served[at[n]]), plan_backs[at[n]]
                    else:
                        age = rng.randint(1, max_reuse)
                        forced, backs = {}, [(age, age + rng.randint(1, max_reuse))] * len(blocks)
                    cached = _served(residuals, prev, n, config.closed, backs, config.forecast_form)
                    rows = int(names.latent_of(inputs).shape[0])
                    if 0 < row_subset < rows:  # the decisions are per row: any rows of a call will do
                        idx = torch.tensor(sorted(rng.sample(range(rows), row_subset)))
                        inputs = gather_rows(inputs, rows, idx)
                        ref = ref.index_select(0, idx)
                        cached = [[r.index_select(0, idx) for r in blk] for blk in cached] if cached else None
                        rows = row_subset
                    t = row_timesteps(names.timestep_of(inputs, 0.0), rows, ref.device)
                    out = train.forward(model, inputs, timestep_embedding(t, scale=config.timestep_scale), cached,
                                        forced)
                    err = (out.float() - ref.float()).pow(2).sum() / ref.float().pow(2).sum().clamp_min(1e-12)
                    loss = loss + err / minibatch
                    err_sum += float(err) / minibatch
                    fracs.append((glue + sum(s.mean() for s in train.spent)) / full)
                frac = torch.stack([torch.as_tensor(f) for f in fracs]).mean() * len(pool) / len(calls)
                loss = loss + penalty * (frac - budget) ** 2
                loss.backward()
                opt.step()
                losses.append((err_sum, float(frac)))
                bar.advance(task)
    finally:
        for p, f in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(f)
    trained = time.perf_counter() - t0
    rounds: list[tuple[float, float]] = []
    if calibrate:
        routers, rounds = _calibrate_offset(routers, routed, calibration, budget)
    report = {"steps": steps, "train_seconds": round(trained, 2), "seconds": round(time.perf_counter() - t0, 2),
              "error": losses[-1][0] if losses else None, "trained_fraction": losses[-1][1] if losses else None,
              "offset_rounds": rounds, "excluded": excluded, "calls": len(calls)}
    routed.use(routers.with_config(report=report))
    return routed


def _calibrate_offset(routers: RouterSet, routed: RoutedTransformer, calibration: Callable[[nn.Module], Any],
                      budget: float) -> tuple[RouterSet, list]:
    """The router set with the gate offset that spends the most of ``budget`` on the calibration,
    and ``(offset, FLOP fraction)`` per calibration run: the offset bracketed by doubling steps
    from 0, then interpolated and bisected in turn until a run lands within
    :data:`OFFSET_TOLERANCE` under the budget, at most :data:`OFFSET_ROUNDS` runs."""
    rounds: list[tuple[float, float]] = []

    def fraction(offset: float) -> float:
        routed.use(routers.with_config(offset=offset))
        calibration(routed)
        frac = routed.stats()["flop_fraction"]
        rounds.append((round(offset, 4), round(frac, 4)))
        return frac

    def done(f: float) -> bool:
        return budget - OFFSET_TOLERANCE <= f <= budget

    f = fraction(0.0)
    under = (0.0, f) if f <= budget else None  # a higher offset closes more gates: spends less
    over = (0.0, f) if f > budget else None
    step = 2.0
    while not done(f) and (under is None or over is None) and abs(step) <= 64 and len(rounds) < OFFSET_ROUNDS:
        x = step if under is None else -step
        f = fraction(x)
        if f <= budget:
            under = (x, f) if under is None or f > under[1] else under
        else:
            over = (x, f) if over is None or f < over[1] else over
        step *= 2
    if under is None:
        raise InfeasibleBudgetError(
            f"budget {budget}: with every gate closed the routed model still spends {rounds[-1][1]:.3f} of the "
            f"FLOPs (the glue outside the blocks, the routers, the first step's computes): give a budget above that")
    while over is not None and not done(under[1]) and len(rounds) < OFFSET_ROUNDS:
        (xo, fo), (xu, fu) = over, under
        w = (fo - (budget - OFFSET_TOLERANCE / 2)) / (fo - fu) if fo > fu else 0.5
        # interpolation and bisection in turn: the fraction is a staircase in the offset (every
        # sample's gates cross together), on which interpolation alone can creep from one side
        x = xo + (min(0.9, max(0.1, w)) if len(rounds) % 2 else 0.5) * (xu - xo)
        f = fraction(x)
        if f <= budget:
            under = (x, f) if f > under[1] or x < under[0] else under
        else:
            over = (x, f)
    return routers.with_config(offset=under[0]), rounds
