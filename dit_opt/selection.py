"""Choose among candidate plans by the error they cause, measured on the calibration.

The solver's objective is a model: the sum of each action's error measured alone. Where that model
is optimistic (low budgets, long runs of reuse in many blocks at once), a plan that is worse in
the model can be better in the real output. So ``dit_opt.optimize`` makes more than one candidate
at the same budget (:func:`candidate_plans`: the main solver's plan, the same solver's plans with
the errors of late steps weighted more, TaylorSeer's rule of :mod:`solvers.uniform` (a warm-up,
then one interval for every unit, with forecasts) at the rhythms that spend the most of the
budget, and FORA's uniform interval, the schedules with their unspent budget filled
(:mod:`solvers.fill`), and, given a module-level problem, its solver plan and uniform plan in
place of the block-level rhythms; then TaylorSeer's own policy, a forecast at every cache read
(``Problem.forecast_policy="always"``, of the order measured best), at the rhythms just within
the budget (filled and as they are), at module granularity where offered; and the
dearest rhythms with a whole step forecast (``STEP``) at every step between their computes, one
order per plan, :data:`STEP_RHYTHMS`), runs each through the calibration next to the full model,
and keeps the one whose outputs are closest to the full model's. The modelled error ranks the
uniform rhythms poorly (on ``digits-mmdit``, of interval 3 with warm-up 2 or 3, both at 0.394 of
the FLOPs, it ranks first the one that measures 5.3 dB worse: 43.9 against 49.2 dB), which is
why several are measured. The best candidate is measured once more with its forecasts in the
other form (:func:`taylor_twin`).

What is compared: the calibration's return value when it is a tensor (or a tuple/list of
tensors, or an object with an ``images`` tensor), e.g. the images a sampler returns: the
closed-loop error of whole generations. Otherwise the transformer's outputs at every call are
compared (for replayed trajectories this is open loop: each call sees the recorded inputs).
How: the pooled relative squared error (:func:`relative_error`). The per-sample one
(:func:`sample_error`, the mean of the samples' errors in dB, what a per-image PSNR averages)
was measured as the ranking too (``examples/selection_metric.py``, ``docs/solvers.md``): it
orders the candidates as well as or more like the evaluation at 14 of the 15 reference-model
budgets, yet changed two kept plans, one by +0.21 dB and one by -2.02 dB; it is not the default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from dit_opt import distributed
from dit_opt.calibration import returned_tensors
from dit_opt.executor import model_sample
from dit_opt.plan import ActionKind, Plan
from dit_opt.sensitivity import SHORT_MAX_AGE

__all__ = ["REPEAT_TOLERANCE", "Candidate", "candidate_plans", "is_repeatable", "measure_outputs", "relative_error",
           "repeat_error", "sample_error", "select_plan", "step_rhythm_plans", "taylor_twin"]

#: Largest relative error between two runs of the full model through a calibration for its
#: comparisons of plans to be trusted (a repeatable calibration gives 0, or float noise; the
#: candidates' errors are 1e-6 and up).
REPEAT_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Candidate:
    """One candidate plan and its measured error (relative squared error against the full model)."""

    plan: Plan
    error: float

    def describe(self) -> str:
        return f"{self.plan.solver}: FLOP fraction {self.plan.flop_fraction:.3f}, measured error {self.error:.3e}"


#: Step weightings of the extra solver candidates: the errors of step ``t`` weigh
#: ``k ** (t / (T - 1))`` (1 at the first step, ``k`` at the last). Late errors have fewer steps
#: left to be corrected, which errors measured one action at a time do not see; how much more
#: they count depends on the model and schedule, so ``k`` are tried and measured (one: every
#: candidate costs a calibration run, and 4 was never the kept one on the reference models).
LATE_WEIGHTS = (16.0,)

#: How many rhythms of TaylorSeer's rule (:func:`solvers.uniform.dearest`) are measured.
UNIFORM_RHYTHMS = 3
#: How many of them are measured again under TaylorSeer's policy (a forecast at every cache read).
ALWAYS_RHYTHMS = 2
#: How many of those are measured with their unspent budget on a full tail (:func:`solvers.fill.fill_tail`)
#: in place of as they are, where one more step in full fits the budget.
TAIL_RHYTHMS = 1
#: How many rhythms are measured with whole step forecasts (``STEP``) between their computes, per
#: order (one order throughout a plan: the calibration ranks the orders, the modelled error not).
STEP_RHYTHMS = {1: 1, 2: 1, 3: 1}


def candidate_plans(problem: Any, main: Plan, solve_main: Callable[[Any], Plan] | None = None,
                    module_problem: Any = None, solve_module: Callable[[Any], Plan] | None = None) -> list[Plan]:
    """``main`` and the other plans worth measuring at ``problem``'s budget, without duplicates.

    The others: the main solver's plans with late steps weighted more (:data:`LATE_WEIGHTS`, if
    ``solve_main`` is given and ``module_problem`` is not), TaylorSeer's rule
    (:mod:`solvers.uniform`: a warm-up, then one interval) at the :data:`UNIFORM_RHYTHMS` intervals
    that spend the most of the budget, and FORA's uniform interval with forecasts where measured
    better; each with its unspent budget filled (:func:`solvers.fill.fill`). Given
    ``module_problem`` (the same profile at module granularity), also its solver plan
    (``solve_module``) and its uniform plan, filled (and then no block-level rhythm). Where
    the problem allows caches older than :data:`~dit_opt.sensitivity.SHORT_MAX_AGE` (budgets below
    :data:`~dit_opt.sensitivity.LONG_CACHE_BUDGET`), the finest uniform plan is also made at that
    age limit. Then, on ``module_problem`` if given (else ``problem``), under the forecast policy
    ``"always"``: the :data:`ALWAYS_RHYTHMS` dearest rhythms within the budget, filled and as they
    are (the :data:`TAIL_RHYTHMS` dearest with a full tail instead, where one fits:
    :func:`solvers.fill.fill_tail`);
    and where the problem has ``STEP`` errors, the dearest rhythms with ``STEP`` between
    their computes (:data:`STEP_RHYTHMS` per order). A family that cannot meet the budget is left out. Every
    plan's predicted error is that of its own problem (unweighted).
    """
    from dit_opt.errors import DitOptError
    from solvers import solve, uniform
    from solvers.fill import fill, fill_tail

    plans = [main]
    makers: list[Callable[[], Plan | list[Plan]]] = []
    # (block-level granularity only: with module-level candidates to measure as well, the
    # late-weighted plan was the kept one at none of the 15 reference-model budgets of
    # BENCHMARKS.md, and its solve and calibration run are a tenth of optimize's cost)
    if solve_main is not None and module_problem is None:
        for k in LATE_WEIGHTS:
            def weighted(k: float = k) -> Plan:
                w = k ** (np.arange(problem.num_steps) / max(1, problem.num_steps - 1))
                p = solve_main(problem.weighted(w))
                return problem.to_plan(p.actions, f"{main.solver}+late{k:g}", p.status, p.wall_time_s)
            makers.append(weighted)
    # TaylorSeer's rule at the rhythms that spend the most of the budget, measured rather than
    # ranked by the model (which ranks them poorly), each with its unspent budget filled (at
    # block granularity only when no module-level candidates follow: with them, the block-level
    # rhythms were the kept plan at none of the 45 reference-model budgets of BENCHMARKS.md steps
    # 3b, 3d and 3e, and every candidate costs a calibration run)
    if module_problem is None:
        makers.append(lambda: [fill(problem, p) for p in uniform.dearest(problem, UNIFORM_RHYTHMS)])
    makers.append(lambda: solve(problem, "fora"))
    if module_problem is not None:
        if solve_module is not None:
            makers.append(lambda: _renamed(solve_module(module_problem), "module"))
        makers.append(lambda: _renamed(fill(module_problem, solve(module_problem, "uniform")), "module"))
    finest = module_problem if module_problem is not None else problem
    if finest.max_age > SHORT_MAX_AGE:
        # Below LONG_CACHE_BUDGET caches may be older; TaylorSeer's rule chosen (and filled) within
        # the high budgets' age limit as well, since the model's pick among the longer intervals can
        # be the worse one (crops-pixart at 0.25: interval 6 kept, 3 dB under interval 5's plan)
        short = finest.with_max_age(SHORT_MAX_AGE)
        prefix = "module:short" if module_problem is not None else "short"
        makers.append(lambda short=short, prefix=prefix: _renamed(fill(short, solve(short, "uniform")), prefix))
    # TaylorSeer's own policy: every cache read between computes a forecast (at the finest
    # granularity offered, of the order measured best), at the rhythms just within the budget,
    # each filled and as it is: the fill's extra computes break the rhythm's even spacing, which
    # can cost more than they save (digits-mmdit at 0.2: interval 6 measured 35.63 dB at 0.200 of
    # the FLOPs filled, 36.29 at 0.186 as it is; BENCHMARKS.md). (With order 1 only, as
    # TaylorSeer's default, it was kept once in 15 reference-model budgets, and then measured
    # worse on the evaluation. The rhythms just over the budget, trimmed by solvers.fill.trim,
    # were measured too until the kept plan was one of them at none of the 45 reference-model
    # budgets of BENCHMARKS.md steps 3b, 3d and 3e: an irregular gap costs these models more
    # than the modelled trim says, and each was a calibration run.)
    rhythms = module_problem if module_problem is not None else problem
    always = replace(rhythms, forecast_policy="always")
    prefix = "module:always" if module_problem is not None else "always"
    if rhythms.e_forecast is not None:
        # the dearest TAIL_RHYTHMS of them with their unspent FLOPs on a full tail in place of
        # the plan as it is, where one more step in full fits (solvers.fill.fill_tail: the rhythm
        # stays regular; digits-mmdit at 0.7: 60.88 dB against 59.72 for the plan kept without
        # it, BENCHMARKS.md step 3g; as they were, these rhythms were kept only where no step
        # more fits, and each candidate costs a calibration run)
        makers.append(lambda: [_renamed(q, prefix) for i, p in enumerate(uniform.dearest(always, ALWAYS_RHYTHMS))
                               for q in (fill(always, p), fill_tail(always, p) if i < TAIL_RHYTHMS else p)])
    if rhythms.e_step is not None:
        # the same rhythms with the whole step forecast between computes (no unit and no glue
        # runs there: the model's output extrapolated), whose saved glue buys denser rhythms
        makers.append(lambda: [_renamed(p, prefix) for p in step_rhythm_plans(always)])
    for make in makers:
        try:
            made = make()
        except DitOptError:
            continue
        plans += made if isinstance(made, list) else [made]
    fora = next((p for p in plans if p.solver == "fora"), None)
    if fora is not None and problem.e_forecast is not None:
        # FORA's interval with forecasts, filled, in place of FORA as published
        plans[plans.index(fora)] = fill(problem, problem.to_plan(fora.actions, "fora+forecast", "HEURISTIC", 0.0))
    unique: dict[tuple, Plan] = {}
    for plan in plans:
        unique.setdefault((plan.units, plan.actions), plan)
    return list(unique.values())


def step_rhythm_plans(problem: Any) -> list[Plan]:
    """TaylorSeer's rhythms with the whole step forecast (``STEP``) between their computes, the
    :data:`STEP_RHYTHMS` dearest within ``problem``'s budget per order; none where the problem has
    no ``STEP`` errors. They meet budgets no plan of the blocks alone meets (the glue is not run
    at a ``STEP``): :func:`dit_opt.optimize` falls back to them there."""
    from dit_opt.errors import DitOptError
    from solvers import uniform

    if problem.e_step is None:
        return []
    plans: list[Plan] = []
    for k, n in STEP_RHYTHMS.items():
        try:
            plans += uniform.dearest(problem, n, True, k)
        except DitOptError:
            continue
    return plans


def _renamed(plan: Plan, prefix: str) -> Plan:
    """``plan`` with its solver named ``<prefix>:<solver>`` (the candidate's origin in reports)."""
    return replace(plan, solver=f"{prefix}:{plan.solver}")


def measure_outputs(calibration: Callable[[nn.Module], Any], module: nn.Module,
                    each_call: Callable[[nn.Module, tuple, dict, Any], None] | None = None) -> list[torch.Tensor]:
    """Run ``calibration(module)`` once without grad; the tensors to compare (see the module
    docstring). ``each_call(module, args, kwargs, output)`` runs after every call of ``module``."""
    calls: list[torch.Tensor] = []

    def hook(mod, args, kwargs, out):
        # a prediction per sample as a list (Z-Image takes and returns one latent per sample): each
        calls.extend(returned_tensors(model_sample(out)))
        if each_call is not None:
            each_call(mod, args, kwargs, out)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            result = calibration(module)
    finally:
        handle.remove()
    returned = returned_tensors(result)
    return returned if returned else calls


def relative_error(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """``sum ||got - ref||^2 / sum ||ref||^2`` over matching tensors (and over the ranks of the
    active process group, :func:`dit_opt.distributed.active`, each with its share of them).

    Raises:
        ValueError: the two runs produced different numbers or shapes of outputs.
    """
    _check_matching(got, ref)
    num = sum(float((g.float() - r.float()).pow(2).sum()) for g, r in zip(got, ref, strict=True))
    den = sum(float(r.float().pow(2).sum()) for r in ref)
    group = distributed.active()
    if group is not None:  # each rank ran its share of the generations: the error of all of them
        num, den = group.all_sum([num, den]).tolist()
    return num / max(den, 1e-30)


def _check_matching(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``got`` and ``ref`` are as many tensors of the same shapes."""
    if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref, strict=False)):
        raise ValueError(f"the calibration returned {len(got)} outputs for the candidate and {len(ref)} for the "
                         "full model (or other shapes); it must be deterministic to compare plans")


def sample_error(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """The geometric mean over samples of ``||got_i - ref_i||^2 / ||ref_i||^2``, a sample being a
    row (along the first dimension) of one of the matching tensors, over the ranks of the active
    process group (each with its share of them) as well. Its ``10 log10`` is the mean of the
    samples' errors in dB, what a per-image PSNR averages; an exact sample counts as ``1e-30``.

    Raises:
        ValueError: the two runs produced different numbers or shapes of outputs.
    """
    _check_matching(got, ref)
    logs, count = 0.0, 0
    for g, r in zip(got, ref, strict=True):
        rows = max(1, r.shape[0]) if r.dim() else 1
        num = (g.float() - r.float()).pow(2).reshape(rows, -1).sum(1).double()
        den = r.float().pow(2).reshape(rows, -1).sum(1).double().clamp_min(1e-30)
        logs += float((num / den).clamp_min(1e-30).log().sum())
        count += rows
    group = distributed.active()
    if group is not None:  # each rank ran its share of the generations: the mean over all of them
        logs, count = group.all_sum([logs, count]).tolist()
    return float(np.exp(logs / max(count, 1)))


def repeat_error(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """The relative error of a second run of the full model against the first (:func:`relative_error`),
    ``inf`` when the two runs returned different numbers or shapes of outputs."""
    try:
        return relative_error(got, ref)
    except ValueError:
        return float("inf")


def is_repeatable(error: float | None) -> bool:
    """Whether a calibration whose two full-model runs differ by ``error`` (``None``: not
    measured) can rank plans."""
    return error is None or error <= REPEAT_TOLERANCE


def select_plan(
    model: nn.Module,
    plans: Sequence[Plan],
    calibration: Callable[[nn.Module], Any],
    build: Callable[[Plan], nn.Module],
    reference: list[torch.Tensor] | None = None,
    refine: Callable[[list[torch.Tensor], Callable[[Plan], Candidate]], list[Candidate]] | None = None,
) -> tuple[Plan, list[Candidate]]:
    """The plan among ``plans`` whose outputs on ``calibration`` are closest to ``model``'s
    (least :func:`relative_error`).

    Args:
        model: the full model (the reference).
        plans: candidates at the same budget (the first one wins ties).
        calibration: runs complete denoising loops with the module it is given (deterministic).
        build: makes the module that runs a plan (eager, so measuring costs no compile).
        reference: ``measure_outputs(calibration, model)`` if already known (``optimize`` keeps
            it from the profile's plain run), else measured here.
        refine: given the reference and the scoring of a plan (one calibration run), more
            candidates, measured (the closed-loop search, :func:`dit_opt.closed_loop.refine`,
            from a plan it measures itself: leave that plan out of ``plans``); they join the
            others before the best is chosen.

    Returns:
        ``(best plan, every candidate with its error)``.
    """
    ref = measure_outputs(calibration, model) if reference is None else reference

    def score(plan: Plan) -> Candidate:
        return Candidate(plan, relative_error(measure_outputs(calibration, build(plan)), ref))

    scored = [score(plan) for plan in plans]
    if refine is not None:
        scored += refine(ref, score)
    best = min(scored, key=lambda c: c.error)
    twin = taylor_twin(best.plan)
    if twin is not None:  # one more run: the best plan with TaylorSeer's expansion in its forecasts
        scored.append(score(twin))
        best = min(scored, key=lambda c: c.error)
    return best.plan, scored


def taylor_twin(plan: Plan) -> Plan | None:
    """``plan`` with its forecasts in TaylorSeer's form (:func:`dit_opt.plan.forecast_weights`),
    or ``None`` where that changes nothing (no forecast of order 2 or more, or already that form).

    The same actions and graphs, other weights: over a gap of several steps the Taylor form's
    higher terms are smaller than the interpolating polynomial's, which measures better end to
    end on some models and rhythms and worse on others (``digits-mmdit``: TaylorSeer's rhythm of
    interval 3, 49.91 -> 50.81 dB; of interval 2, lower), so it is measured, not modelled.
    """
    if plan.forecast_form == "taylor":
        return None
    if not any(a.kind in (ActionKind.FORECAST, ActionKind.STEP) and (a.order or 0) >= 2
               for row in plan.actions for a in row):
        return None
    return replace(plan, forecast_form="taylor", solver=f"{plan.solver}+taylor")
