"""TaylorSeer's policy and rhythms one notch off the budget: forecast policy, trim, above, join_units."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

import dit_opt
from dit_opt.plan import COMPUTE, REUSE, ActionKind, Unit
from solvers import solve, uniform
from solvers.fill import trim
from solvers.problem import Problem, join_units

T, U, M = 12, 2, 3


def _problem(budget=0.6, forecast_error=2.0, **kw) -> Problem:
    """Forecasts measured everywhere, worse than the reuse (2.0 n against 1.0)."""
    e_forecast = np.full((T, U, 1, M + 1, M + 1), np.inf)
    for t in range(T):
        for n in range(1, M + 1):
            for d in range(1, M + 1):
                if t - n - d >= 0:
                    e_forecast[t, :, 0, n, d] = forecast_error * n
    return Problem(units=tuple(Unit("blocks", i) for i in range(U)), num_steps=T, max_age=M, budget=budget,
                   flops_compute=np.full((T, U), 10.0), e_reuse=np.ones((T, U, M + 1)),
                   flops_reuse=np.zeros((T, U)), e_forecast=e_forecast, **kw)


def test_always_policy_forecasts_where_measured_worse_than_the_reuse():
    p = _problem()
    grid = [[COMPUTE if t % 2 == 0 else REUSE] * U for t in range(T)]
    assert not any(a.kind is ActionKind.FORECAST for row in p.with_forecasts(grid) for a in row)
    always = dataclasses.replace(p, forecast_policy="always")
    out = always.with_forecasts(grid)
    # step 1 has one compute before it: a plain reuse; every later cache read extrapolates
    assert [row[0].kind for row in out][:4] == [ActionKind.COMPUTE, ActionKind.REUSE, ActionKind.COMPUTE,
                                                ActionKind.FORECAST]
    assert sum(a.kind is ActionKind.FORECAST for row in out for a in row) == U * (T // 2 - 1)
    assert always.evaluate(out)[1] > p.evaluate(p.with_forecasts(grid))[1]  # the model says it costs
    with pytest.raises(ValueError, match="forecast_policy must be one of"):
        dataclasses.replace(p, forecast_policy="sometimes")


def test_interval_of_max_age_plus_one_forecasts_with_the_longest_measured_spacing():
    p = dataclasses.replace(_problem(), forecast_policy="always")
    # computes at 0, 4, 8: spacing 4 = max_age + 1, ages up to 3
    plan = solve(p.with_budget(1.0), "uniform", warmup=0, interval=M + 1, phase=0)
    assert plan.actions[9][0].kind is ActionKind.FORECAST
    assert p.forecast_error(9, 0, 1, (8, 4, 0)) == p.e_forecast[9, 0, 0, 1, M]
    assert not np.isfinite(p.forecast_error(9, 0, 1, (8, 3, 0)))  # computes 5 apart: over max_age + 1
    assert not np.isfinite(p.forecast_error(11, 0, 1, (6, 0)))  # an age over max_age


def test_above_gives_the_cheapest_rhythm_over_the_budget_per_interval():
    p = _problem(budget=0.4)
    plans = uniform.above(p, 2)
    assert len(plans) == 2 and len({pl.solver.split("N=")[1][0] for pl in plans}) == 2
    within = [s[0] for s in uniform.settings(p)]
    for pl in plans:
        assert pl.flop_fraction > 0.4
        assert not within or pl.predicted_flops > max(within)
    assert plans[0].predicted_flops <= plans[1].predicted_flops


def test_trim_brings_a_rhythm_within_the_budget_and_keeps_the_last_quarter():
    p = _problem(budget=0.45)
    plan = solve(p.with_budget(1.0), "uniform", warmup=0, interval=2, phase=0)  # 6 of 12 steps: 0.5
    assert plan.flop_fraction > 0.45
    trimmed = trim(p, plan)
    assert trimmed is not None and trimmed.flop_fraction <= 0.45 and trimmed.solver.endswith("+trim")
    last = T - T // 4
    assert trimmed.actions[last:] == plan.actions[last:]
    dropped = [(t, u) for t in range(T) for u in range(U) if plan.actions[t][u].kind is ActionKind.COMPUTE
               and trimmed.actions[t][u].kind is not ActionKind.COMPUTE]
    assert dropped and all(0 < t < last for t, _ in dropped)
    # interval 3 with max_age 3: any dropped compute leaves a cache 5 steps old
    tight = dataclasses.replace(_problem(budget=0.3), max_age=3)
    three = solve(tight.with_budget(1.0), "uniform", warmup=0, interval=3, phase=0)
    assert three.flop_fraction > 0.3 and trim(tight, three) is None


def test_join_units_keeps_each_part_and_disallows_a_missing_family():
    a = _problem(budget=0.5)
    b = Problem(units=(Unit("blocks", 5),), num_steps=T, max_age=M, budget=0.5,
                flops_compute=np.full((T, 1), 4.0), e_reuse=np.ones((T, 1, M + 1)), flops_reuse=np.zeros((T, 1)),
                e_skip=np.full((T, 1), 0.5))
    j = join_units([(a, [1]), (b, [0])], flops_fixed=3.0)
    assert j.units == (Unit("blocks", 1), Unit("blocks", 5))
    assert j.full_flops == pytest.approx(T * 14.0 + 3.0)
    skip = j.menu_index(dit_opt.plan.SKIP)
    assert not j.allowed[:, 0, skip].any() and j.allowed[:, 1, skip].all()
    assert np.isinf(j.e_forecast[:, 1]).all() and np.array_equal(j.e_forecast[:, 0], a.e_forecast[:, 1])
    plan = solve(j, "cpsat", time_limit_s=5)
    assert plan.flop_fraction <= 0.5
    assert all(row[0].kind is not ActionKind.SKIP for row in plan.actions)
    with pytest.raises(ValueError, match="differ in steps"):
        join_units([(a, [0]), (a.with_budget(0.7), [1])], flops_fixed=0.0)


def test_a_block_its_roles_barely_cover_is_planned_whole_among_module_units(profiled):
    model, cal, prof = profiled("flux", 6)
    assert prof.whole_blocks() == set()  # Flux's single blocks: proj_out is in the MLP role
    low = prof.flops_module.copy()
    u = prof.units.index(Unit("single_transformer_blocks", 0))
    low[u, 2] = np.nan  # as if its MLP were no role: the attention alone is far below the coverage
    thin = dataclasses.replace(prof, flops_module=low)
    assert thin.whole_blocks() == {u}
    problem = thin.to_problem(0.6, granularity="module")
    assert Unit("single_transformer_blocks", 0) in problem.units
    assert Unit("single_transformer_blocks", 0, "attn") not in problem.units
    assert problem.full_flops == pytest.approx(prof.to_problem(0.6).full_flops)
    plan = solve(problem, "uniform")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.OptimizedTransformer(model, plan, profile=thin, compile=False)
        cal(opt)
    assert opt.stats()["steps"]
