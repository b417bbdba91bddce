"""annotate_sensitivity: measure, on real trajectories, the error of every action.

SODA's offline sensitivity modelling, generalised to every action dit-opt can take. The
calibration runs complete denoising loops with the model; hooks on each block observe its
true inputs and outputs at every step and evaluate, on those same inputs, what each
candidate action would have produced:

* ``REUSE`` at age ``n``: input plus the residual cached ``n`` steps earlier (free: the
  residuals of the last ``2 max_age`` steps are kept);
* ``FORECAST`` of order ``k`` at age ``n`` with spacing ``d``: input plus the residual
  extrapolated by the polynomial through the residuals of ``n``, ``n + d``, ..., ``n + k d``
  steps earlier (free as well);
* ``PRUNE(r)`` at age ``n``: the block recomputes the top ``r`` of tokens (by input drift
  since the cache) and the rest comes from the cache (one extra block call on ``r N`` tokens,
  up to age ``BLOCK_PRUNE_MEASURED_AGE``; older ages scale that age's error by the squared miss
  of the cached residual, as module estimates do);
* ``WIDTH(w)``: the block with its MLP narrowed to the ``w`` most important hidden channels
  (importance calibrated in a first, plain pass: ``E|h_j| * ||W_out[:, j]||``);
* ``SKIP``: the block returns its input (free).

For the whole step (``STEP``: the model's output extrapolated from its outputs at earlier steps,
no unit and no glue run), the same forecasts are scored on the model's output (free).

For module-level units (each block's attention, cross-attention and MLP, ``MODULE_ROLES``), the
outputs of the role's sub-modules are recorded during the true block call and the block is
re-run with them replaced:

* ``REUSE`` at age ``n``: by their outputs ``n`` steps earlier;
* ``FORECAST`` of order ``k`` at age ``n`` with spacing ``d``: by the polynomial through their
  outputs ``n``, ``n + d``, ..., ``n + k d`` steps earlier. Not re-run (that would take 48 block
  calls per role and step): the block's error is estimated as the measured ``REUSE`` error
  times the ratio of the forecast's to the reuse's squared error on the sub-modules' own
  outputs, i.e. the block is taken to pass both perturbations on alike;
* ``SKIP``: by zeros (the block's residual add then leaves the stream unchanged);
* ``PRUNE(r)`` at age ``n <= MODULE_PRUNE_MAX_AGE``: by their outputs ``n`` steps earlier,
  except on the top ``r`` of the tokens of their token input (by drift since ``n`` steps
  earlier), on which they are recomputed; only for sub-modules ``passes.rewrite_modules.module_token_input`` accepts
  (MLPs, cross-attention, self-attention with no rotary embeddings or mask).

The error of an action is ``||out_action - out||^2 / ||out||^2`` over the block's output
streams, averaged over samples and generations. Extra block calls run on a subset of the
batch (``probe_rows``: the model call's batch, read from its latent, or the rows it is folded
into) to keep the cost a small multiple of one generation; a block whose streams are
sequence-first ``(tokens, batch, channels)`` runs on all rows, and is not offered ``PRUNE``.

Before that, a first plain pass runs the calibration once with no hooks but the MLP
statistics: its wall time is the unit in which the profile's cost is reported.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from dit_opt import distributed
from dit_opt.errors import ConfigError
from dit_opt.executor import (
    batch_rows,
    bind_inputs,
    gather_tokens,
    halves_diff,
    is_guidance_batch,
    mlp_linears,
    model_sample,
    narrow_block,
    prunable,
    scatter_tokens,
    split_outputs,
    stream_inputs,
    token_layout,
    token_scores,
    topk_tokens,
)
from dit_opt.fingerprint import model_fingerprint
from dit_opt.ir import BlockSpec, DiTGraph
from dit_opt.plan import MAX_FORECAST_ORDER, Unit, forecast_weights
from dit_opt.sensitivity import DEFAULT_MAX_AGE, SensitivityProfile
from dit_opt.steps import StepTracker, timestep_value
from dit_opt.synthetic import call_batch, call_names
from passes.call_costs import CallCosts
from passes.infra import PassResult
from passes.rewrite_modules import module_token_input

__all__ = ["annotate_sensitivity", "measure_channel_order", "action_flops"]

META_SENSITIVITY = "dit_opt.sensitivity"


def measure_channel_order(graph: DiTGraph, calibration: Callable[[torch.nn.Module], Any]) -> tuple[dict, float]:
    """Run the calibration once, plainly; rank each MLP's hidden channels by importance.

    Returns:
        ``(order, seconds)``: per ``"<block>.<mlp>"`` the channels from most to least
        important, and the wall time of the plain run (one calibration, the cost unit).
    """
    model = graph.model
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for spec in graph.blocks:
        block = model.get_submodule(spec.name)
        for name, *_ in mlp_linears(block, spec):
            key = f"{spec.name}.{name}"
            act = block.get_submodule(name).net[0]

            def hook(mod, args, out, key=key):
                # each call's mean in float32, the sum over calls in float64 (the same on any
                # split of the generations over ranks, up to summation order)
                s = out.detach().float().abs().reshape(-1, out.shape[-1]).mean(0).double()
                stats[key] = stats.get(key, 0) + s

            handles.append(act.register_forward_hook(hook))
    seconds = run_hooked(calibration, model, handles)
    group = distributed.active()
    if group is not None:  # each rank saw its share of the generations: the statistics of all of them
        keys = sorted(stats)
        group.agree("the MLPs the calibration ran", keys, "every rank must load the same model")
        sizes = [stats[k].numel() for k in keys]
        total = group.all_sum(np.concatenate([stats[k].cpu().numpy() for k in keys]) if keys else [])
        stats = {k: torch.from_numpy(v) for k, v in zip(keys, np.split(total, np.cumsum(sizes)[:-1]), strict=True)}
    order = {}
    for spec in graph.blocks:
        block = model.get_submodule(spec.name)
        for name, _, last, _ in mlp_linears(block, spec):
            key = f"{spec.name}.{name}"
            if key in stats:
                imp = stats[key].cpu() * last.weight.detach().float().norm(dim=0).cpu()
                order[key] = imp.argsort(descending=True)
    return order, seconds


#: Sub-module roles whose outputs module-level REUSE can serve from a cache (norms are cheap).
MODULE_ROLES = ("attn", "cross_attn", "mlp")

#: Oldest cache at which module ``PRUNE`` is measured (each (age, rate) costs one block call per
#: role and step, most of a profile's time; older ones are left unmeasured, i.e. not offered).
MODULE_PRUNE_MAX_AGE = 2

#: Oldest cache at which a block's ``PRUNE`` is measured (one block call per age, rate and step);
#: at older ages (up to ``max_age``) it is estimated from this age's error (``_Probe._at_age``).
BLOCK_PRUNE_MEASURED_AGE = 4


def _detach(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple | list):
        return type(out)(_detach(o) for o in out)
    return out


def _returning(value: Any) -> Callable:
    """A replacement forward (see ``_Probe._module_actions``) that returns ``value``."""
    return lambda forward, args, kwargs: value


class _Gram:
    """Inner products of one unit's recent values (residuals or sub-module outputs), step by step.

    Every reuse and forecast error is a quadratic form in them: a forecast from steps ``s_i``
    with weights ``w_i`` misses the value at ``t`` by ``sum_ij w_i w_j G[s_i, s_j] - 2 sum_i w_i
    G[s_i, t] + G[t, t]``. Adding a step costs one inner product per step kept (in float64),
    however many (order, age, spacing) triples are then scored.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self.values: dict[int, torch.Tensor] = {}
        self.g: dict[tuple[int, int], float] = {}

    def add(self, t: int, tensors: list[torch.Tensor]) -> None:
        v = torch.cat([x.detach().reshape(-1) for x in tensors]).double()
        for s, w in self.values.items():
            self.g[s, t] = self.g[t, s] = float(torch.dot(v, w.double()))
        self.g[t, t] = float(torch.dot(v, v))
        self.values[t] = v.to(tensors[0].dtype) if tensors[0].is_floating_point() else v
        for s in [s for s in self.values if s < t - self.keep]:
            del self.values[s]
            self.g = {k: x for k, x in self.g.items() if s not in k}

    def miss(self, t: int, steps: list[int], weights: tuple[float, ...] | None = None) -> float | None:
        """Squared distance between the value at ``t`` and ``sum_i weights[i] * value(steps[i])``
        (default weights: 1 for one step, a reuse); ``None`` if a step is not kept."""
        if t not in self.values or any(s not in self.values for s in steps):
            return None
        w = weights or (1.0,) * len(steps)
        q = sum(wi * wj * self.g[si, sj] for wi, si in zip(w, steps, strict=True)
                for wj, sj in zip(w, steps, strict=True))
        return max(0.0, q - 2 * sum(wi * self.g[si, t] for wi, si in zip(w, steps, strict=True)) + self.g[t, t])

    def forecast_misses(self, t: int, n: int, spacings: int, orders: int):
        """``(order k, spacing d, miss)`` of every ``FORECAST`` to ``t`` at age ``n`` from computes at
        ``t - n, t - n - d, ..., t - n - k d`` that are kept (``d`` in ``1 .. spacings``, ``k`` in
        ``1 .. orders``)."""
        for d in range(1, spacings + 1):
            for k in range(1, orders + 1):
                steps = [t - n - i * d for i in range(k + 1)]
                miss = self.miss(t, steps, forecast_weights(t, steps))
                if miss is None:
                    break  # older computes are not kept either
                yield k, d, miss


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a sub-module's output (one, or those of a tuple), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)] if isinstance(out, tuple | list) else []


def _zeros(out: Any) -> Any:
    """``out`` with every tensor replaced by zeros (module ``SKIP``)."""
    if isinstance(out, torch.Tensor):
        return torch.zeros_like(out)
    if isinstance(out, tuple | list):
        return type(out)(_zeros(o) for o in out)
    return out


def _token_input(forward: Callable, args: tuple, kwargs: dict) -> tuple[Any, Callable | None]:
    """A sub-module call's token input (its first argument, ``hidden_states`` for diffusers
    attention and MLPs) and a function rebuilding ``(args, kwargs)`` with it replaced."""
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    name = next(iter(inspect.signature(forward).parameters), None)
    if name in kwargs:
        return kwargs[name], lambda x: (args, {**kwargs, name: x})
    return None, None


def _pruning(rate: float, cached_in: torch.Tensor, cached_out: torch.Tensor) -> Callable:
    """A replacement forward that recomputes the module on the top ``rate`` of its tokens (by
    drift from ``cached_in``) and serves the rest from ``cached_out``: module ``PRUNE`` as
    ``passes.rewrite_modules`` builds it."""

    def run(forward, args, kwargs):
        x, rebuild = _token_input(forward, args, kwargs)
        idx = topk_tokens(token_scores(x, cached_in), max(1, round(rate * x.shape[1])))
        sub_args, sub_kwargs = rebuild(gather_tokens(x, idx))
        return scatter_tokens(cached_out, idx, forward(*sub_args, **sub_kwargs))

    return run


def _module_prune_inputs(graph: DiTGraph, spec: BlockSpec, role: str) -> dict[str, tuple[int, ...]] | None:
    """Per sub-module of ``spec``'s ``role``, the recorded shape of the token input a module
    ``PRUNE`` gathers; ``None`` if the role has none or one of them cannot be pruned."""
    interp = graph.module.get_submodule(spec.name)
    out = {}
    for name in spec.role_modules(role):
        pos, _ = module_token_input(graph, spec, name)
        if pos is None:
            return None
        node = next(n for n in interp.graph.nodes if n.op == "call_module" and n.target == name)
        shape = tuple(node.args[pos].meta["val"].shape)
        if not all(isinstance(d, int) for d in shape):  # a data-dependent length (FramePack's packed tokens)
            return None
        out[name] = shape
    return out or None


def _cut_rows(value: Any, rows: int, sl: slice) -> Any:
    """``value`` with every tensor whose dimension 0 has ``rows`` entries cut to ``sl``, through
    tuples and lists; the rest as it is."""
    if isinstance(value, torch.Tensor):
        return value[sl] if value.dim() and value.shape[0] == rows else value
    if isinstance(value, tuple | list):
        return type(value)(_cut_rows(v, rows, sl) for v in value)
    return value


def _rows(out: Any, sl: slice) -> Any:
    if isinstance(out, torch.Tensor):
        return out[sl] if out.dim() else out
    if isinstance(out, tuple | list):
        return type(out)(_rows(o, sl) for o in out)
    return out


def run_hooked(calibration: Callable[[torch.nn.Module], Any], model: torch.nn.Module, handles: list) -> float:
    """Run ``calibration(model)`` without grad, then remove the hook ``handles``; return the seconds."""
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            calibration(model)
    finally:
        for h in handles:
            h.remove()
    return time.perf_counter() - t0


def _kept_fraction(rate: float, shape: tuple[int, ...] | None) -> float:
    """The fraction of the tokens (dimension 1 of ``shape``) that a ``PRUNE`` at ``rate``
    recomputes: the top ``max(1, round(rate * tokens))``, as the rewrites take them. Not ``rate``
    itself where the rounding matters (a block over 1 to 3 tokens: frames of a temporal block)."""
    if shape is None or len(shape) < 2 or int(shape[1]) < 1:
        return rate
    return max(1, round(rate * int(shape[1]))) / int(shape[1])


def action_flops(graph: DiTGraph, prune_rates: tuple[float, ...], widths: tuple[float, ...]) -> dict[str, np.ndarray]:
    """FLOPs of one call of each block under each action, from the cost model.

    ``REUSE`` costs the residual add and ``PRUNE`` adds the scoring, gather and scatter
    (elementwise work ``FlopCounterMode`` does not count, modelled here all the same so the
    solver never counts them as free).
    """
    costs = graph.costs
    U, K, J = len(graph.blocks), len(prune_rates), len(widths)
    out = {
        "flops_compute": np.zeros(U),
        "flops_reuse": np.zeros(U),
        "flops_prune": np.zeros((U, K)),
        "flops_width": np.zeros((U, J)),
    }
    for u, spec in enumerate(graph.blocks):
        streams = [o.spec.shape for o in spec.outputs if o.spec is not None]
        stream_elems = sum(int(np.prod(shape)) for shape in streams)
        out["flops_compute"][u] = costs.flops(spec.name)
        out["flops_reuse"][u] = stream_elems
        for k, r in enumerate(prune_rates):
            kept = _kept_fraction(r, streams[0] if streams else None)
            out["flops_prune"][u, k] = costs.flops(spec.name, tokens=kept) + 4 * stream_elems
        for j, w in enumerate(widths):
            out["flops_width"][u, j] = costs.flops(spec.name, width=w)
    return out


class _Probe:
    """Hooks that evaluate every candidate action on the true block inputs at every step."""

    #: ``None``: module ``REUSE`` and ``PRUNE`` errors at ages above the youngest, and block ``PRUNE``
    #: errors above ``BLOCK_PRUNE_MEASURED_AGE``, are estimated (``_at_age``). A list (set on the
    #: class, by ``examples/module_reuse_estimate.py``): they are measured by a block call instead,
    #: and ``(role, action, age, measured, estimate)`` appended to it (role ``"block"`` for a block).
    rerun_module_reuse: list | None = None

    def __init__(self, graph: DiTGraph, max_age: int, prune_rates, widths, order, probe_rows: int | None,
                 forecast_orders: int = MAX_FORECAST_ORDER):
        self.graph, self.max_age = graph, max_age
        self.forecast_orders = forecast_orders
        self.prune_rates, self.widths = tuple(prune_rates), tuple(widths)
        self.probe_rows = probe_rows
        self.names = call_names(graph.model)  # what the forward calls the latent and the timestep
        self.tracker = StepTracker(self.names)
        self.step = 0
        self.batch: int | None = None  # the batch of the model call running now (its latent's)
        self.step_measured = False  # whether the model's output could be measured for STEP
        self.busy = False  # extra calls of a block must not be observed again
        U, M, K, J = len(graph.blocks), max_age, len(prune_rates), len(widths)
        self.sums: dict[int, dict[str, np.ndarray]] = {}
        self.counts: dict[int, int] = {}
        R = len(MODULE_ROLES)
        self.shape = {"e_reuse": (U, M + 1), "e_forecast": (U, forecast_orders, M + 1, M + 1),
                      "e_prune": (U, M + 1, K), "e_width": (U, J), "e_skip": (U,),
                      "e_module_reuse": (U, R, M + 1), "e_module_skip": (U, R),
                      "e_module_forecast": (U, R, forecast_orders, M + 1, M + 1),
                      "e_module_prune": (U, R, M + 1, K), "e_cfg": (U, M + 1), "e_module_cfg": (U, R, M + 1),
                      "e_step": (forecast_orders + 1, M + 1, M + 1)}
        # Guidance batches (one call whose two halves of hidden_states are equal): CFG is
        # measured only if every call is one; the derived half is the one the sampler's update
        # weighs less (see _Guidance)
        self.guidance = _Guidance()
        # Module-level actions: the outputs of each role's sub-modules (and, where they can be
        # pruned, their token inputs) are recorded during the true block call, and the block is
        # re-run with the outputs replaced.
        self.role_modules = [
            {role: [(name, graph.model.get_submodule(f"{spec.name}.{name}")) for name in spec.role_modules(role)]
             for role in MODULE_ROLES if spec.role_modules(role)}
            for spec in graph.blocks
        ]
        self.module_prune = [{role: shapes for role in MODULE_ROLES
                              if (shapes := _module_prune_inputs(graph, spec, role)) is not None}
                             for spec in graph.blocks]
        self.unprunable: set[tuple[int, str]] = set()  # token input not as captured: not measured
        #: (unit, role or "block") -> why PRUNE does not run there (it raised on a token subset):
        #: left out of the profile, and named in its report
        self.prune_excluded: dict[tuple[int, str], str] = {}
        self.current: dict[tuple[int, str, str], Any] = {}
        self.current_in: dict[tuple[int, str, str], torch.Tensor] = {}
        self.mod_history: dict[tuple[int, Any], dict[int, dict]] = {}
        self.history: dict[tuple[int, int], dict[int, tuple]] = {}
        self.grams: dict[tuple, _Gram] = {}
        self.timesteps: dict[int, float] = {}
        batch = call_batch(graph)
        self.prunable = [prunable(s, batch) for s in graph.blocks]
        for u, spec in enumerate(graph.blocks):
            # a stream that is not (batch, tokens, channels) (sequence-first blocks): said, where PRUNE is measured
            streams = [o.spec.shape for o in spec.outputs if o.spec is not None]
            layout = token_layout(streams[0], batch) if len(streams) == 1 and self.prune_rates else None
            if layout is not None:
                self.prune_excluded[(u, "block")] = layout
        self.narrow = []
        for spec in graph.blocks:
            block = graph.model.get_submodule(spec.name)
            ok = bool(mlp_linears(block, spec))
            prefix = {k.removeprefix(spec.name + "."): v for k, v in order.items() if k.startswith(spec.name + ".")}
            self.narrow.append([narrow_block(block, spec, w, prefix) for w in widths] if ok else None)

    # -- hooks --------------------------------------------------------------------------------
    def module_hooks(self) -> list:
        """Forward hooks that record each role sub-module's output (and token input, where it can
        be pruned) during true block calls."""
        handles = []
        for u, roles in enumerate(self.role_modules):
            for role, mods in roles.items():
                for name, mod in mods:
                    def hook(m, args, kwargs, out, key=(u, role, name)):
                        if self.busy:
                            return
                        self.current[key] = _detach(out)
                        shape = self.module_prune[key[0]].get(key[1], {}).get(key[2])
                        if shape is not None:
                            x, _ = _token_input(m.forward, args, kwargs)
                            # the first argument must be the input the rewrite gathers (same shape)
                            if isinstance(x, torch.Tensor) and tuple(x.shape[1:]) == shape[1:]:
                                self.current_in[key] = x.detach()
                            else:
                                self.unprunable.add(key[:2])
                    handles.append(mod.register_forward_hook(hook, with_kwargs=True))
        return handles

    def pre_model(self, module, args, kwargs):
        named = self.names.named(args, kwargs)
        t = timestep_value(self.names.timestep_of(named, 0.0))
        step, branch = self.tracker.observe(t)
        self.step, self.branch = step, branch
        self.timesteps.setdefault(step, t)
        self.batch = self.names.batch_of(named)
        self.guidance.before(self.names.latent_of(named), step)

    def post_model(self, module, args, kwargs, output):
        self.guidance.after(output)
        self._observe_output(output)

    def _sums_at(self, t: int) -> dict[str, np.ndarray]:
        """The error sums of step ``t`` (zeros on its first call)."""
        if t not in self.sums:
            self.sums[t] = {k: np.zeros(s) for k, s in self.shape.items()}
        return self.sums[t]

    def _observe_output(self, output) -> None:
        """``STEP`` (the whole step forecast) of every order, age and spacing: the model's output
        extrapolated from its outputs ``n``, ``n + d``, ... steps earlier against the true one,
        relative to it (free: a Gram of the outputs, as for block forecasts). A prediction given as a
        list of one tensor per sample (Z-Image) is taken whole; one with no floating-point tensor is
        not measured (``STEP`` is then not offered: ``step_measured``)."""
        sample = model_sample(output)
        parts = list(sample) if isinstance(sample, list | tuple) else [sample]
        if not parts or not all(isinstance(p, torch.Tensor) and p.is_floating_point() for p in parts):
            return
        self.step_measured = True
        t = self.step
        acc = self._sums_at(t)
        norm = sum(float(p.detach().float().pow(2).sum()) for p in parts) or 1.0
        gram = self.grams.setdefault(("model", self.branch), _Gram((self.forecast_orders + 1) * self.max_age))
        gram.add(t, [p.detach().float() for p in parts])
        for n in range(1, self.max_age + 1):
            reuse = gram.miss(t, [t - n])
            if reuse is None:
                continue
            acc["e_step"][0, n, :] += reuse / norm  # order 0: the output n steps earlier (any spacing)
            for k, d, err in gram.forecast_misses(t, n, self.max_age, self.forecast_orders):
                acc["e_step"][k, n, d] += err / norm

    def block_hook(self, u: int):
        spec = self.graph.blocks[u]

        def hook(module, args, kwargs, output):
            if self.busy:
                return None
            self.busy = True
            try:
                with torch.no_grad():
                    self._observe(u, spec, module, args, kwargs, output)
            finally:
                self.busy = False
            return None

        return hook

    # -- measurement ---------------------------------------------------------------------------
    def _rows(self, args, kwargs, streams):
        """The block's inputs cut to the probe rows, and the slice of its outputs they give.

        The rows are dimension 0 of the block's stream inputs where it runs over the model call's
        samples (its batch, or the batch folded with frames or tokens: :func:`batch_rows`); every
        tensor with that many rows is cut, inside tuples and lists too (a block's modulation).
        A block whose streams are laid out otherwise (sequence-first: ``(tokens, batch, channels)``)
        is probed on all rows: cutting its first dimension would cut tokens."""
        n = self.probe_rows
        rows = {int(x.shape[0]) if x.dim() and batch_rows(tuple(x.shape), self.batch) else None for x in streams}
        batch = rows.pop() if len(rows) == 1 else None
        if n is None or batch is None or n >= batch:
            return args, kwargs, slice(None)
        sl = slice(0, n)
        return _cut_rows(args, batch, sl), {k: _cut_rows(v, batch, sl) for k, v in kwargs.items()}, sl

    def _observe(self, u, spec, module, args, kwargs, output):
        named = bind_inputs(module, args, kwargs)
        ins = stream_inputs(spec, named)
        outs = split_outputs(output)
        pairs = [(i, x, y) for i, (x, y) in enumerate(zip(ins, outs, strict=True)) if x is not None and y is not None]
        if not pairs:
            return
        t, key = self.step, (u, self.branch)
        res = {i: (y - x).float() for i, x, y in pairs}
        norm = sum(float(y.float().pow(2).sum()) for _, _, y in pairs) or 1.0
        acc = self._sums_at(t)
        if u == 0:
            self.counts[t] = self.counts.get(t, 0) + 1
        hist = self.history.setdefault(key, {})
        gram = self.grams.setdefault(key, _Gram((self.forecast_orders + 1) * self.max_age))
        gram.add(t, [res[i] for i, _, _ in pairs])
        for n in range(1, self.max_age + 1):
            # REUSE at age n: the residual cached n steps ago against the true one.
            err = gram.miss(t, [t - n])
            if err is None:
                continue
            acc["e_reuse"][u, n] += err / norm
            # FORECAST of order k from the computes at t - n, t - n - d, ..., t - n - k d
            # (all observed: measured).
            for k, d, err in gram.forecast_misses(t, n, self.max_age, self.forecast_orders):
                acc["e_forecast"][u, k - 1, n, d] += err / norm
        acc["e_skip"][u] += sum(float(r.pow(2).sum()) for r in res.values()) / norm
        if self.guidance.batched:
            # CFG at age n: one half's residual plus the halves' difference of n steps ago, for the
            # other half (the error is the same whichever half is derived)
            for n in range(1, self.max_age + 1):
                old = hist.get(t - n)
                if old is not None:
                    acc["e_cfg"][u, n] += sum(float((halves_diff(res[i]) - halves_diff(old[0][i])).pow(2).sum())
                                              for i in res) / norm
        p_args, p_kwargs, sl = self._rows(args, kwargs, [x for _, x, _ in pairs])
        p_norm = sum(float(y[sl].float().pow(2).sum()) for _, _, y in pairs) or 1.0
        # WIDTH: the narrowed block on the same inputs.
        if self.narrow[u] is not None:
            for j, narrowed in enumerate(self.narrow[u]):
                got = split_outputs(narrowed(*p_args, **p_kwargs))
                err = sum(float((got[i].float() - y[sl].float()).pow(2).sum()) for i, _, y in pairs)
                acc["e_width"][u, j] += err / p_norm
        # PRUNE at every rate: recompute the tokens that drifted most, reuse the rest; measured up to
        # BLOCK_PRUNE_MEASURED_AGE, estimated beyond from the oldest measured age (_at_age).
        if self.prunable[u] and self.prune_rates:
            (i, x, y), = pairs
            name = spec.outputs[i].input_name
            xs = x[sl]
            bases: dict[str, tuple[float, float]] = {}
            for n in range(1, self.max_age + 1):
                old = hist.get(t - n)
                if old is None:
                    continue
                old_res, old_in = old[0][i][sl], old[1][i][sl]
                scores = token_scores(xs, old_in)
                base = xs + old_res.to(xs.dtype)
                for k, r in enumerate(self.prune_rates):
                    def prune_error(r=r, scores=scores, base=base) -> float:
                        idx = topk_tokens(scores, max(1, round(r * xs.shape[1])))
                        sub_named = dict(bind_inputs(module, p_args, p_kwargs))
                        sub_named[name] = gather_tokens(xs, idx)
                        got = split_outputs(module(**sub_named))[i]
                        approx = scatter_tokens(base, idx, got)
                        return float((approx.float() - y[sl].float()).pow(2).sum()) / p_norm

                    err = self._excluding((u, "block"), lambda r=r, n=n, prune_error=prune_error: self._at_age(
                        bases, "block", f"prune {r:g}", n, gram.miss(t, [t - n]), prune_error,
                        measured_up_to=BLOCK_PRUNE_MEASURED_AGE))
                    if err is None:
                        self.prunable[u] = False
                        break
                    acc["e_prune"][u, n, k] += err
                if not self.prunable[u]:
                    break
        self._module_actions(u, t, key, module, p_args, p_kwargs, sl, pairs, p_norm, acc)
        hist[t] = ({i: r for i, r in res.items()}, {i: x.detach() for i, x, _ in pairs})
        for old_t in [s for s in hist if s < t - self.max_age]:  # PRUNE reads age <= max_age
            del hist[old_t]

    def _module_actions(self, u, t, key, module, p_args, p_kwargs, sl, pairs, p_norm, acc) -> None:
        """Module-level actions of each role's sub-modules, by re-running the block with their
        outputs replaced: ``SKIP`` (zeros), ``REUSE`` (outputs from ``t - n``), ``PRUNE`` (outputs
        from ``t - n`` except on the tokens that drifted most since then, recomputed)."""
        roles = self.role_modules[u]
        mhist = self.mod_history.setdefault(key, {})
        mhist[t] = {(role, name): (self.current.get((u, role, name)), self.current_in.get((u, role, name)))
                    for role, mods in roles.items() for name, _ in mods}

        def error(replace: list[tuple[torch.nn.Module, Callable]]) -> float:
            """Re-run the block with each sub-module's forward replaced by ``fn(forward, args, kwargs)``.

            An instance attribute shadows the method (hooks still run), so the outputs being
            replaced are not computed at all: the re-runs cost what the rewritten block costs.
            """
            saved = [(mod, mod.__dict__.get("forward")) for mod, _ in replace]
            for mod, fn in replace:
                mod.forward = lambda *a, _fn=fn, _fwd=mod.forward, **kw: _fn(_fwd, a, kw)
            try:
                got = split_outputs(module(*p_args, **p_kwargs))
            finally:
                for mod, forward in saved:
                    if forward is None:
                        del mod.forward
                    else:
                        mod.forward = forward
            return sum(float((got[i].float() - y[sl].float()).pow(2).sum()) for i, _, y in pairs) / p_norm

        for r, role in enumerate(MODULE_ROLES):
            mods = roles.get(role)
            if not mods:
                continue
            now = mhist[t]
            outputs = [x for name, _ in mods for x in _tensors(now[(role, name)][0])]
            if outputs:
                self.grams.setdefault((u, self.branch, role),
                                      _Gram((self.forecast_orders + 1) * self.max_age)).add(t, outputs)
            if self.guidance.batched:  # what module CFG caches, read back by the steps after
                now[("diff", role)] = [halves_diff(x.float()) for x in outputs]
            if all(now[(role, name)][0] is not None for name, _ in mods):
                acc["e_module_skip"][u, r] += error(
                    [(mod, _returning(_zeros(_rows(now[(role, name)][0], sl)))) for name, mod in mods])
            prune = role in self.module_prune[u] and (u, role) not in self.unprunable
            gram = self.grams.get((u, self.branch, role))
            youngest: dict[str, tuple[float, float]] = {}  # action -> (its measured error, squared miss)
            for n in range(1, self.max_age + 1):
                old = mhist.get(t - n)
                if old is None or any(old[(role, name)][0] is None for name, _ in mods):
                    continue
                sq = gram.miss(t, [t - n]) if gram is not None else None
                reuse_error = self._at_age(youngest, role, "reuse", n, sq, lambda old=old, role=role, mods=mods: error(
                    [(mod, _returning(_rows(old[(role, name)][0], sl))) for name, mod in mods]))
                acc["e_module_reuse"][u, r, n] += reuse_error
                if sq is not None:
                    self._module_forecasts(u, r, role, t, n, reuse_error, sq, acc)
                if self.guidance.batched and ("diff", role) in old:
                    acc["e_module_cfg"][u, r, n] += self._module_cfg(role, now, old, reuse_error, sq)
                if not prune or n > MODULE_PRUNE_MAX_AGE or any(old[(role, name)][1] is None for name, _ in mods):
                    continue
                for k, rate in enumerate(self.prune_rates):
                    def prune_error(old=old, rate=rate, role=role, mods=mods) -> float:
                        return error([(mod, _pruning(rate, _rows(old[(role, name)][1], sl),
                                                     _rows(old[(role, name)][0], sl))) for name, mod in mods])

                    # a self-attention pruned attends among the kept tokens only: its error does not
                    # scale with the cache's miss (the estimate is 1.7 to 3 times off), so it is measured
                    err = self._excluding((u, role), lambda rate=rate, prune_error=prune_error, role=role, sq=sq, n=n,
                                          youngest=youngest: (
                        prune_error() if role == "attn" else
                        self._at_age(youngest, role, f"prune {rate:g}", n, sq, prune_error)))
                    if err is None:
                        self.unprunable.add((u, role))
                        prune = False
                        break
                    acc["e_module_prune"][u, r, n, k] += err
        for old_t in [s for s in mhist if s < t - self.max_age]:  # REUSE and PRUNE read age <= max_age
            del mhist[old_t]

    def _excluding(self, key: tuple[int, str], measure: Callable[[], float]) -> float | None:
        """``measure()``, or ``None`` with ``key`` excluded from ``PRUNE`` if it raises: a block or
        module that reshapes its tokens to the image grid (Sana's Mix-FFN), convolves over them or
        reads a token-indexed side input cannot run on a token subset, and the plan must never
        ask it to. The first error's message is kept as the reason."""
        try:
            return measure()
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.prune_excluded.setdefault(key, f"{type(e).__name__}: {reason[:200]}")
            return None

    def _at_age(self, bases: dict, role: str, action: str, n: int, sq: float | None,
                measure: Callable[[], float], measured_up_to: int = 1) -> float:
        """The error of a cache-reading ``action`` at age ``n``: measured (a block call,
        ``measure``) up to age ``measured_up_to`` (and at the youngest age available), and at older
        ones the oldest measured age's error scaled by the squared miss ``sq`` of the cached value
        (a module's outputs, or a block's residual) against the true one, relative to that age's (as
        forecasts and CFG are scaled; no block call). For a module's ``REUSE`` and for ``PRUNE`` of
        an MLP or cross-attention (measured at the youngest age), within 4 % of the re-run in total
        on the reference models; for a block's ``PRUNE`` (measured up to
        ``BLOCK_PRUNE_MEASURED_AGE``) see ``examples/module_reuse_estimate.py`` and
        ``docs/solvers.md``."""
        base = bases.get(action)
        estimate = (base[0] * sq / base[1] if n > measured_up_to and base is not None and base[1] > 0
                    and sq is not None else None)
        if estimate is not None and self.rerun_module_reuse is None:
            return estimate
        err = measure()
        if estimate is None and sq is not None:
            bases[action] = (err, sq)
        if estimate is not None:
            self.rerun_module_reuse.append((role, action, n, err, estimate))
        return err

    def _module_forecasts(self, u, r, role, t, n, reuse_error, reuse_sq, acc) -> None:
        """``FORECAST`` of ``role``'s outputs at age ``n``, every order and spacing: the measured
        reuse error scaled by the forecast's squared miss on the outputs themselves relative to the
        reuse's (``reuse_sq``)."""
        gram = self.grams[(u, self.branch, role)]
        for k, d, sq in gram.forecast_misses(t, n, self.max_age, self.forecast_orders):
            acc["e_module_forecast"][u, r, k - 1, n, d] += reuse_error * (sq / reuse_sq if reuse_sq > 0 else 1.0)

    def _module_cfg(self, role, now, old, reuse_error, reuse_sq) -> float:
        """``CFG`` of ``role``'s outputs at age ``n``: one guidance half computed, the other that
        half plus the halves' difference of the outputs ``n`` steps ago (``old``). Like the module
        forecasts, the measured reuse error scaled by the derived half's squared miss relative to
        the reuse's (``reuse_sq``) on the outputs themselves (no extra block call)."""
        cfg_sq = sum(float((a - b).pow(2).sum()) for a, b in zip(now[("diff", role)], old[("diff", role)], strict=True))
        if not reuse_sq:
            return 0.0 if not cfg_sq else reuse_error
        return reuse_error * cfg_sq / reuse_sq

    def reduce(self, group: distributed.Group) -> None:
        """Sum what every rank measured on its share of the generations into what one process
        measures on all of them: the error sums and call counts per step, the guidance fits and
        calls, the modules found unprunable.

        Raises:
            DistributedError: the ranks' calibrations ran other steps or timesteps (the same error
                on every rank).
        """
        steps = sorted(self.sums)
        group.agree("the calibration's denoising steps (step, timestep)", [(t, self.timesteps[t]) for t in steps],
                    "every rank's generations must use the same scheduler and number of steps")
        names = list(self.shape)
        flat = [np.asarray([self.counts.get(t, 0) for t in steps], dtype=np.float64)]
        flat += [self.sums[t][name].ravel() for t in steps for name in names]
        total = group.all_sum(np.concatenate(flat))
        self.counts = {t: int(round(c)) for t, c in zip(steps, total[:len(steps)], strict=True)}
        at = len(steps)
        for t in steps:
            for name in names:
                size = self.sums[t][name].size
                self.sums[t][name] = total[at:at + size].reshape(self.shape[name])
                at += size
        g = self.guidance
        merged = group.gather((g.calls, g.batched_calls, [c.tolist() for c in g.coefs], sorted(self.unprunable),
                               sorted(self.prune_excluded.items())))
        g.calls = sum(m[0] for m in merged)
        g.batched_calls = sum(m[1] for m in merged)
        g.coefs = [np.asarray(c) for m in merged for c in m[2]]
        self.unprunable = {tuple(x) for m in merged for x in m[3]}
        for m in merged:
            for key, reason in m[4]:
                self.prune_excluded.setdefault(tuple(key), reason)
        for u, role in self.prune_excluded:
            if role == "block":
                self.prunable[u] = False
            else:
                self.unprunable.add((u, role))

    def arrays(self) -> tuple[list[float], dict[str, np.ndarray]]:
        """Timesteps and the mean errors per step (``e_cfg`` and ``e_module_cfg`` only where every
        call was a guidance batch)."""
        steps = sorted(self.sums)
        out = {}
        for name in self.shape:
            out[name] = np.stack([self.sums[t][name] / max(1, self.counts.get(t, 1)) for t in steps])
        if not self.guidance.all_batched:
            del out["e_cfg"], out["e_module_cfg"]
        else:
            # measured at the block outputs; what counts is how the sampler's guided update sees it
            out["e_cfg"] = out["e_cfg"] * self.guidance.amplification
            out["e_module_cfg"] = out["e_module_cfg"] * self.guidance.amplification
        return [self.timesteps[t] for t in steps], out


class _Guidance:
    """Which calls are classifier-free-guidance batches, and which half the sampler weighs less.

    A call is a guidance batch when its batch is even and the two halves of ``hidden_states``
    are equal (the sampler runs ``cat([x, x])`` with two conditionings). The sampler's next input
    is then a linear map of the current one and of the guided output ``(1 - s) * uncond + s * cond``:
    a least-squares fit of ``x_next = a x + p out_first + q out_second`` per step gives the two
    halves' weights, and the half with the smaller one (the unconditional, for ``s > 1/2``) is
    the one whose derived output changes the trajectory least.
    """

    def __init__(self) -> None:
        self.calls = self.batched_calls = 0
        self.batched = False
        self.coefs: list[np.ndarray] = []  # per fitted step: the signed weights (p, q)
        self.last: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (step, x half, output)

    @property
    def all_batched(self) -> bool:
        return self.calls > 0 and self.batched_calls == self.calls

    @property
    def branch(self) -> int:
        """The derived half: 0 (first) or 1 (second; also when the fit found nothing)."""
        weights = np.abs(np.array(self.coefs)).sum(axis=0) if self.coefs else np.zeros(2)
        return 0 if weights[0] < weights[1] else 1

    @property
    def amplification(self) -> float:
        """How much more an error in the derived half alone moves the sampler than the same
        squared error spread over both halves alike, as the profile's other errors are.

        The update weighs the halves' outputs by ``p`` and ``q`` (for guidance scale ``s``:
        ``1 - s`` and ``s`` times one factor), so an error ``e`` in both halves moves it by
        ``(p + q) e`` (measured as ``2 |e|^2``) and one in the derived half by ``w e`` (measured as
        ``|e|^2``): ``2 w^2 / (p + q)^2``, the mean over the fitted steps; 1 where none was fitted.
        At ``s = 3``: 8.
        """
        d = self.branch
        ratios = [2 * c[d] ** 2 / (c[0] + c[1]) ** 2 for c in self.coefs if abs(c[0] + c[1]) > 1e-12]
        return float(np.mean(ratios)) if ratios else 1.0

    def before(self, x: Any, step: int) -> None:
        self.calls += 1
        self.batched = is_guidance_batch(x)
        self.batched_calls += self.batched
        x_half = x[: x.shape[0] // 2].detach().double() if self.batched else None
        if self.batched and self.last is not None and self.last[2] is not None and step == self.last[0] + 1:
            prev_x, out = self.last[1], self.last[2]
            if out.dim() > 1 and out.shape[1] > prev_x.shape[1]:  # e.g. DiT's learned variance channels
                out = out[:, : prev_x.shape[1]]
            half = out.shape[0] // 2
            nxt = x_half.reshape(-1)
            if prev_x.numel() == nxt.numel() == out[:half].numel():
                cols = torch.stack([prev_x.reshape(-1), out[:half].reshape(-1), out[half:].reshape(-1)], dim=1)
                coef = torch.linalg.lstsq(cols, nxt[:, None]).solution[:, 0]
                self.coefs.append(coef[1:].numpy())
        self.last = (step, x_half, None) if self.batched else None

    def after(self, output: Any) -> None:
        if self.last is None:
            return
        out = model_sample(output)
        if isinstance(out, torch.Tensor):
            self.last = (self.last[0], self.last[1], out.detach().double())
        else:
            self.last = None


def annotate_sensitivity(
    graph: DiTGraph,
    calibration: Callable[[torch.nn.Module], Any],
    *,
    max_age: int = DEFAULT_MAX_AGE,
    prune_rates: tuple[float, ...] = (0.25, 0.5, 0.75),
    widths: tuple[float, ...] = (0.25, 0.5, 0.75),
    probe_rows: int | None = 4,
    forecast_orders: int = MAX_FORECAST_ORDER,
    progress: bool = True,
    fingerprint: dict | None = None,
) -> tuple[PassResult, SensitivityProfile]:
    """Measure the sensitivity profile of ``graph``'s model on calibration trajectories.

    Args:
        graph: a captured graph with FLOPs annotated (``annotate_flops``).
        calibration: runs one or more complete denoising loops with the module it is given.
        max_age: oldest cache measured for ``REUSE``/``PRUNE``.
        prune_rates: fractions of tokens ``PRUNE`` may recompute.
        widths: MLP prefix widths ``WIDTH`` may use.
        probe_rows: batch rows on which the extra block calls (prune, width) run; ``None``
            for all rows.
        forecast_orders: ``FORECAST`` orders measured, ``1 .. forecast_orders``.
        progress: show a progress bar.
        fingerprint: the model's :func:`~dit_opt.fingerprint.model_fingerprint`, when the caller
            has it already (hashing every weight of a large model takes seconds).

    Returns:
        ``(PassResult, profile)``; each block's top-graph node gets
        ``node.meta["dit_opt.sensitivity"]`` (its mean error per action family).
    """
    if graph.costs is None:
        raise ValueError("annotate_sensitivity needs FLOPs: run passes.annotate_flops.annotate_flops(graph) first")
    model = graph.model
    t0 = time.perf_counter()
    order, plain_seconds = measure_channel_order(graph, calibration)
    if isinstance(forecast_orders, bool) or not isinstance(forecast_orders, int) or \
            not 1 <= forecast_orders <= MAX_FORECAST_ORDER:
        raise ConfigError(f"forecast_orders must be an int in 1..{MAX_FORECAST_ORDER}, got {forecast_orders!r}")
    probe = _Probe(graph, max_age, prune_rates, widths, order, probe_rows, forecast_orders)
    handles = [model.register_forward_pre_hook(probe.pre_model, with_kwargs=True),
               model.register_forward_hook(probe.post_model, with_kwargs=True)]
    handles += probe.module_hooks()
    for u, spec in enumerate(graph.blocks):
        handles.append(model.get_submodule(spec.name).register_forward_hook(probe.block_hook(u), with_kwargs=True))
    # captured block by block, a block's inputs can change size from call to call: its FLOPs
    # are the mean over the calibration's calls (passes.call_costs)
    call_costs = CallCosts(graph, ignore=lambda: probe.busy) if graph.blockwise is not None else None
    handles += call_costs.hooks() if call_costs is not None else []
    calls = [0]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("profiling sensitivity", total=None)

        def tick(module, args, kwargs):
            calls[0] += 1
            bar.update(task, advance=1, description=f"profiling sensitivity: step {probe.step}")

        handles.append(model.register_forward_pre_hook(tick, with_kwargs=True))
        run_hooked(calibration, model, handles)
    group = distributed.active()
    if group is not None:
        calls[0] = int(group.all_sum([calls[0]])[0])
        probe.reduce(group)
    if not probe.sums:
        raise ValueError(
            f"{type(model).__name__}: the calibration never called the model; it must run complete "
            f"denoising loops with the module it is given, e.g. lambda m: sample(m, seeds=range(8))"
        )
    timesteps, errs = probe.arrays()
    if not probe.step_measured:  # no prediction tensor to extrapolate: STEP is not offered (not "free of error")
        errs["e_step"][:] = np.nan
    # Ages never observed (e.g. the first steps) stay at 0; the solver's validity rules keep
    # the plan from reading a cache older than the step itself, so they are never used.
    # FORECAST of order k needs k + 1 computes before the step: where the oldest would precede
    # step 0 there is nothing to extrapolate from, marked NaN (not offered to the solver).
    for t in range(len(timesteps)):
        errs["e_step"][t, 0, t + 1:] = np.nan  # order 0 reads the output n steps earlier
        for k in range(1, forecast_orders + 1):
            for n in range(1, max_age + 1):
                for d in range(1, max_age + 1):
                    if t - n - k * d < 0:
                        errs["e_forecast"][t, :, k - 1, n, d] = np.nan
                        errs["e_module_forecast"][t, :, :, k - 1, n, d] = np.nan
                        errs["e_step"][t, k, n, d] = np.nan
    for name in ("e_forecast", "e_module_forecast", "e_step"):
        errs[name][..., 0, :] = np.nan
        errs[name][..., 0] = np.nan
    errs["e_module_prune"][:, :, :, MODULE_PRUNE_MAX_AGE + 1:] = np.nan  # not measured
    U = len(graph.blocks)
    for u in range(U):
        if not probe.prunable[u]:
            errs["e_prune"][:, u] = np.nan
        if probe.narrow[u] is None:
            errs["e_width"][:, u] = np.nan
    flops = action_flops(graph, prune_rates, widths)
    per_call = call_costs.scales(group) if call_costs is not None else np.ones(U)
    flops["flops_module"] = np.full((U, len(MODULE_ROLES)), np.nan)
    flops["flops_module_prune"] = np.full((U, len(MODULE_ROLES), len(prune_rates)), np.nan)
    for u, spec in enumerate(graph.blocks):
        for r, role in enumerate(MODULE_ROLES):
            if not spec.role_modules(role):
                errs["e_module_reuse"][:, u, r] = np.nan
                errs["e_module_skip"][:, u, r] = np.nan
                errs["e_module_forecast"][:, u, r] = np.nan
                if "e_module_cfg" in errs:
                    errs["e_module_cfg"][:, u, r] = np.nan
            else:
                flops["flops_module"][u, r] = graph.costs.flops(spec.name, role)
            shapes = probe.module_prune[u].get(role)
            if shapes is None or (u, role) in probe.unprunable:
                errs["e_module_prune"][:, u, r] = np.nan
                continue
            # like a block PRUNE: scoring, gather and scatter modelled as elementwise work
            elems = sum(int(np.prod(s)) for s in shapes.values())
            for k, rate in enumerate(prune_rates):
                kept = _kept_fraction(rate, next(iter(shapes.values())))
                flops["flops_module_prune"][u, r, k] = graph.costs.flops(spec.name, role, tokens=kept) + 4 * elems
    for name, table in flops.items():
        flops[name] = table * per_call.reshape((U,) + (1,) * (table.ndim - 1))
    prof = SensitivityProfile(
        units=tuple(Unit(s.list_name, s.index) for s in graph.blocks),
        timesteps=tuple(timesteps),
        max_age=max_age,
        prune_rates=tuple(prune_rates),
        widths=tuple(widths),
        flops_fixed=float(graph.costs.outside_blocks),
        channel_order=order,
        model=fingerprint if fingerprint is not None else model_fingerprint(model),
        cfg_branch=probe.guidance.branch if "e_cfg" in errs else None,
        report={
            "calls": calls[0],
            "plain_calibration_seconds": plain_seconds,
            "profile_seconds": time.perf_counter() - t0,
            "cost_in_generations": (time.perf_counter() - t0) / max(plain_seconds, 1e-9),
            "probe_rows": probe_rows,
            # where PRUNE could not run on a token subset, and why ("transformer_blocks.0 mlp": ...)
            "prune_excluded": {f"{graph.blocks[u].name} {role}".replace(" block", ""): reason
                               for (u, role), reason in sorted(probe.prune_excluded.items())},
            **({"cfg_amplification": probe.guidance.amplification} if "e_cfg" in errs else {}),
        },
        **errs,
        **flops,
    )
    index = {spec.name: u for u, spec in enumerate(graph.blocks)}
    for spec, node in graph.block_nodes():
        u = index[spec.name]
        node.meta[META_SENSITIVITY] = {
            "reuse@1": float(errs["e_reuse"][1:, u, 1].mean()) if len(timesteps) > 1 else None,
            "skip": float(errs["e_skip"][:, u].mean()),
        }
    return PassResult(graph.gm, True), prof
