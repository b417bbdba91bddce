"""Periodic plans (solvers.periodic) and choosing among candidate plans by measured error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import dit_opt
from dit_opt.errors import ConfigError
from dit_opt.plan import ActionKind
from dit_opt.selection import relative_error, sample_error, select_plan
from solvers import solve

STEPS = 8


@pytest.fixture(scope="module")
def tiny(profiled):
    return profiled("dit", STEPS)


@pytest.mark.parametrize("budget", [0.7, 0.5, 0.35])
def test_periodic_plans_are_periodic_within_budget_and_beat_fora(tiny, budget):
    _, _, prof = tiny
    problem = prof.to_problem(budget)
    plan = solve(problem, "periodic")
    assert plan.flop_fraction <= budget
    for u in range(len(plan.units)):
        computes = [t for t in range(STEPS) if plan.actions[t][u].kind is ActionKind.COMPUTE]
        gaps = set(np.diff(computes + [STEPS]).tolist()[:-1])
        assert len(gaps) <= 1, f"unit {u} computes at {computes}: not periodic"
    # FORA (one interval for all units, plain reuse) is in the family without forecasts
    plain = solve(problem.without_forecasts(), "periodic")
    assert plain.predicted_error <= solve(problem, "fora").predicted_error + 1e-12


def test_select_plan_keeps_the_measured_best(tiny):
    model, cal, prof = tiny
    low = solve(prof.to_problem(0.35), "fora")
    full = solve(prof.to_problem(1.0), "cpsat", time_limit_s=5)

    def build(plan):
        return dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)

    best, scored = select_plan(model, [low, full], cal, build)
    assert best is full and scored[1].error <= 1e-10 < scored[0].error


def test_optimize_compares_candidates_on_a_callable_calibration(tiny):
    model, cal, prof = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.optimize(model, budget=0.4, calibration=cal, compile=False, progress=False,
                               granularity="auto")
    solvers = {c.plan.solver for c in opt.selection}
    assert "cpsat" in solvers and any(s.startswith("fora") for s in solvers)
    assert not any(s.startswith("cpsat+late") for s in solvers)  # block-level granularity only
    assert sum(s.startswith("uniform(") for s in solvers) <= 1  # one block-level rhythm: module ones follow
    # granularity "auto": module-level candidates are measured too
    assert "module:cpsat" in solvers and any(s.startswith("module:uniform(") for s in solvers)
    # TaylorSeer's policy (a forecast at every cache read), at module granularity
    assert any(s.startswith("module:always:") for s in solvers), solvers
    assert any(u.role is not None for c in opt.selection for u in c.plan.units)
    assert len({(c.plan.units, c.plan.actions) for c in opt.selection}) == len(opt.selection)  # none twice
    assert opt.plan is min(opt.selection, key=lambda c: c.error).plan
    assert "select" in opt.step_times
    # the cost, in plain calibration generations: the profile's and one run per candidate (the
    # profile's plain run is the full model's reference)
    report = opt.report
    assert report["selection_runs"] == len(opt.selection)
    assert report["profile_generations"] > 1 and report["selection_generations"] > 0
    # all of optimize: the profile, the selection and the rest (capture, solving, lowering)
    assert report["other_generations"] > 0
    assert report["generations"] == pytest.approx(report["profile_generations"] + report["selection_generations"]
                                                  + report["other_generations"])
    assert report["generations"] == pytest.approx(report["seconds"] / report["plain_calibration_seconds"])
    block = dit_opt.optimize(model, budget=0.4, calibration=prof, compile=False, progress=False, select=cal)
    assert all(u.role is None for c in block.selection for u in c.plan.units)  # the default: block
    block_solvers = [c.plan.solver for c in block.selection]
    assert sum(s.startswith("uniform(") for s in block_solvers) >= 2  # several rhythms of TaylorSeer's rule
    assert any(s.startswith("cpsat+late") for s in block_solvers)
    assert any(s.startswith("always:") for s in block_solvers), block_solvers
    assert block.report["profile_generations"] == 0  # the profile was given, not measured
    assert block.report["selection_runs"] == len(block.selection) + 1  # ... so the full model runs once more
    # a saved profile alone cannot measure; select= names the calibration to measure on
    again = dit_opt.optimize(model, budget=0.4, calibration=prof, compile=False, progress=False)
    assert again.selection == []
    measured = dit_opt.optimize(model, budget=0.4, calibration=prof, compile=False, progress=False, select=cal)
    assert len(measured.selection) >= 2
    with pytest.raises(ConfigError, match="select=True needs a calibration callable"):
        dit_opt.optimize(model, budget=0.4, calibration=prof, compile=False, progress=False, select=True)
    # baselines keep their own schedule
    fora = dit_opt.optimize(model, budget=0.4, calibration=prof, compile=False, progress=False, solver="fora",
                            select=cal)
    assert fora.plan.solver == "fora" and fora.selection == []


def test_optimize_refuses_unknown_options_before_profiling(tiny):
    model, cal, _ = tiny
    calls = []

    def counting(m):
        calls.append(1)
        return cal(m)

    with pytest.raises(ConfigError, match="unknown action families \\['cache'\\]; valid ones are reuse, forecast"):
        dit_opt.optimize(model, budget=0.4, calibration=counting, actions=("reuse", "cache"), progress=False)
    with pytest.raises(ConfigError, match="'forecast' without 'reuse'"):
        dit_opt.optimize(model, budget=0.4, calibration=counting, actions=("forecast",), progress=False)
    with pytest.raises(ConfigError, match="granularity must be 'auto', 'block' or 'module'"):
        dit_opt.optimize(model, budget=0.4, calibration=counting, granularity="layer", progress=False)
    assert calls == []  # nothing was run


def test_relative_error_needs_matching_outputs():
    a = [torch.ones(2, 3)]
    assert relative_error(a, a) == 0.0
    assert relative_error([torch.zeros(2, 3)], a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="deterministic"):
        relative_error(a, [torch.ones(2, 4)])


def test_sample_error_is_the_geometric_mean_of_the_samples_errors():
    ref = [torch.ones(4, 3)]
    # one sample far off, the others a little: pooled, the far one decides; per sample, all count
    one_bad = [torch.ones(4, 3) + torch.tensor([[1.0], [0.0], [0.0], [0.0]])]
    all_a_little = [torch.ones(4, 3) + 0.1]
    assert relative_error(one_bad, ref) > relative_error(all_a_little, ref)
    assert sample_error(one_bad, ref) < sample_error(all_a_little, ref)
    assert sample_error(all_a_little, ref) == pytest.approx(0.01)
    # rows of every tensor are samples; an exact sample counts as 1e-30, not as zero
    got = [torch.ones(2, 3) * 1.1, torch.ones(2, 5)]
    assert sample_error(got, [torch.ones(2, 3), torch.ones(2, 5)]) == pytest.approx((0.01 ** 2 * 1e-30 ** 2) ** 0.25)
    assert sample_error(ref, ref) == pytest.approx(1e-30)
    with pytest.raises(ValueError, match="deterministic"):
        sample_error(ref, [torch.ones(4, 4)])


def test_weighted_problem_scales_errors_per_step(tiny):
    _, _, prof = tiny
    problem = prof.to_problem(0.5)
    w = np.linspace(1.0, 3.0, STEPS)
    heavy = problem.weighted(w)
    assert np.allclose(heavy.e_reuse[:, :, 1:], problem.e_reuse[:, :, 1:] * w[:, None, None])
    assert np.array_equal(np.isinf(heavy.e_forecast), np.isinf(problem.e_forecast))
    plan = solve(heavy, "cpsat", time_limit_s=5)
    assert plan.flop_fraction <= 0.5
    with pytest.raises(ValueError, match="positive finite"):
        problem.weighted(np.zeros(STEPS))


def _oldest_cache(plan) -> int:
    """The oldest cache any step of ``plan`` reads (steps since the unit's last compute)."""
    oldest = 0
    for u in range(len(plan.units)):
        last = 0
        for t, row in enumerate(plan.actions):
            if row[u].kind is ActionKind.COMPUTE:
                last = t
            else:
                oldest = max(oldest, t - last)
    return oldest


def test_low_budgets_also_measure_the_uniform_rule_within_the_short_age_limit(tiny):
    """Below LONG_CACHE_BUDGET plans may read caches up to the profile's max_age; the finest
    uniform plan made within SHORT_MAX_AGE is a candidate as well (and only there)."""
    from dit_opt.selection import candidate_plans
    from dit_opt.sensitivity import LONG_CACHE_BUDGET, SHORT_MAX_AGE
    from solvers.fill import fill

    _, _, prof = tiny
    assert prof.max_age > SHORT_MAX_AGE
    low = prof.to_problem(0.35, granularity="module")
    main = solve(prof.to_problem(0.35), "fora")
    short = low.with_max_age(SHORT_MAX_AGE)
    expected = fill(short, solve(short, "uniform"))
    assert _oldest_cache(expected) <= SHORT_MAX_AGE
    plans = candidate_plans(prof.to_problem(0.35), main, module_problem=low)
    named = {(p.units, p.actions): p.solver for p in plans}
    assert named[expected.units, expected.actions].startswith("module:short:uniform(")
    high = prof.to_problem(LONG_CACHE_BUDGET, granularity="module")
    plans = candidate_plans(prof.to_problem(LONG_CACHE_BUDGET), solve(prof.to_problem(LONG_CACHE_BUDGET), "fora"),
                            module_problem=high)
    assert not any("short" in p.solver for p in plans)


def test_the_dearest_always_rhythms_are_measured_as_they_are_and_filled(tiny):
    """TaylorSeer's policy at the dearest rhythms within the budget: candidates both as they are
    (even spacing) and filled, the dearest with a full tail in place of as it is where one
    fits; with module-level candidates no block-level rhythm is made."""
    import dataclasses

    from dit_opt.selection import ALWAYS_RHYTHMS, candidate_plans
    from solvers import uniform
    from solvers.fill import fill, fill_tail

    _, _, prof = tiny
    problem, module = prof.to_problem(0.35), prof.to_problem(0.35, granularity="module")
    always = dataclasses.replace(module, forecast_policy="always")
    dearest = uniform.dearest(always, ALWAYS_RHYTHMS)
    assert len(dearest) == ALWAYS_RHYTHMS
    assert fill(always, dearest[0]).actions != dearest[0].actions  # the fill changes it here
    plans = candidate_plans(problem, solve(problem, "fora"), module_problem=module)
    named = {(p.units, p.actions): p.solver for p in plans}
    for p in dearest:
        filled = fill(always, p)
        assert named[p.units, p.actions].startswith("module:")
        assert named[filled.units, filled.actions].startswith("module:")
    assert named[dearest[0].units, dearest[0].actions] == f"module:always:{dearest[0].solver}"
    # the dearest one with a full tail in place of as it is, where one more step in full fits (on
    # these 8 steps: above the dearest interval-2 rhythm, with warm-up 4, at 0.77)
    tailed_at = []
    for budget in (0.9, 0.95):
        at = dataclasses.replace(prof.to_problem(budget, granularity="module"), forecast_policy="always")
        first = uniform.dearest(at, ALWAYS_RHYTHMS)[0]
        tailed = fill_tail(at, first)
        if tailed is not first:
            found = candidate_plans(prof.to_problem(budget), solve(prof.to_problem(budget), "fora"),
                                    module_problem=prof.to_problem(budget, granularity="module"))
            named = {(p.units, p.actions): p.solver for p in found}
            assert named[tailed.units, tailed.actions] == f"module:always:{first.solver}+tail"
            assert (first.units, first.actions) not in named  # in place of the rhythm as it is
            tailed_at.append(budget)
    assert tailed_at
    assert not any(p.solver.startswith("uniform(") for p in plans)
    block = candidate_plans(problem, solve(problem, "fora"))
    assert any(p.solver.startswith("uniform(") for p in block)


def test_a_calibration_that_does_not_repeat_itself_ranks_no_plans():
    """Two full-model runs through the calibration are compared before plans are (the profile's
    second run is one, at no cost): fresh noise every run, as an unseeded generator gives, would
    rank the candidates by noise. The solver's plan is kept, with a warning naming the fix; a
    repeatable calibration measures the candidates."""
    from dit_opt.testing import tiny_model

    model, _ = tiny_model("dit")

    def loop(seed):
        def run(module):
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            x = torch.randn(2, 4, 8, 8, generator=g)
            with torch.no_grad():
                for t in (900, 700, 500, 300, 100):
                    out = module(hidden_states=x, timestep=torch.tensor([t, t]), class_labels=torch.tensor([1, 2]))
                    x = x - 0.1 * out.sample[:, :4]
            return x
        return run

    with pytest.warns(UserWarning, match="seed its generator") as caught:
        noisy = dit_opt.optimize(model, 0.7, calibration=loop(None), compile=False, progress=False)
    assert noisy.selection == [] and noisy.plan.solver.startswith("cpsat")
    assert any(w.filename == __file__ for w in caught if "dit-opt" in str(w.message))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seeded = dit_opt.optimize(model, 0.7, calibration=loop(0), compile=False, progress=False)
    assert len(seeded.selection) >= 2


def test_the_best_plan_is_also_measured_in_taylor_form():
    """``select_plan`` measures one more run, the best plan with TaylorSeer's expansion in its
    forecasts (``taylor_twin``), and keeps it where it measures better; a plan without forecasts of
    order 2 or more has no twin."""
    from dit_opt.plan import COMPUTE, FORECAST, Action, ActionKind, Plan, Unit
    from dit_opt.selection import select_plan, taylor_twin

    def plan(actions, solver):
        T = len(actions)
        return Plan(num_steps=T, units=(Unit("blocks", 0),), actions=actions, budget=1.0, full_flops=float(T),
                    flops_fixed=0.0, predicted_flops=float(T), step_flops=[1.0] * T, predicted_error=0.0,
                    max_age=3, solver=solver, status="HEURISTIC", wall_time_s=0.0)

    second = plan([[COMPUTE], [COMPUTE], [COMPUTE], [Action(ActionKind.FORECAST, order=2)]], "second")
    first = plan([[COMPUTE], [COMPUTE], [FORECAST], [FORECAST]], "first")
    assert taylor_twin(first) is None and taylor_twin(plan(first.actions, "x")) is None
    twin = taylor_twin(second)
    assert twin.forecast_form == "taylor" and twin.actions == second.actions and taylor_twin(twin) is None

    ref = torch.ones(3)
    errors = {("second", "lagrange"): 0.1, ("first", "lagrange"): 0.2, ("second+taylor", "taylor"): 0.05}

    class Runs(torch.nn.Module):
        def __init__(self, p=None):
            super().__init__()
            self.p = p

        def forward(self, x):
            return x if self.p is None else x + errors[self.p.solver, self.p.forecast_form]

    kept, scored = select_plan(Runs(), [first, second], lambda m: m(ref), Runs)
    assert kept.solver == "second+taylor" and kept.forecast_form == "taylor"
    assert [c.plan.solver for c in scored] == ["first", "second", "second+taylor"]
    errors["second+taylor", "taylor"] = 0.3
    kept, scored = select_plan(Runs(), [first, second], lambda m: m(ref), Runs)
    assert kept is second and len(scored) == 3
