"""TaylorSeer's rule as a solver (solvers.uniform) and filling a plan's unspent budget (solvers.fill)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_opt.errors import ConfigError, InfeasibleBudgetError
from dit_opt.plan import COMPUTE, REUSE, ActionKind, Unit
from solvers import solve
from solvers.fill import _Column, fill, fill_tail
from solvers.problem import Problem
from solvers.uniform import dearest, schedule


def _problem(T=12, U=3, M=4, budget=0.5, seed=0) -> Problem:
    """Reuse errors growing with the age, forecasts (orders 1-3) better than reuse, units unlike."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.0, size=(T, U, 1))
    e_reuse = scale * np.arange(M + 1)[None, None, :] ** 2
    e_forecast = np.full((T, U, 3, M + 1, M + 1), np.inf)
    for t in range(T):
        for k in range(1, 4):
            for n in range(1, M + 1):
                for d in range(1, M + 1):
                    if t - n - k * d >= 0:
                        e_forecast[t, :, k - 1, n, d] = scale[t, :, 0] * n * d / (k + 1)
    return Problem(units=tuple(Unit("blocks", i) for i in range(U)), num_steps=T, max_age=M, budget=budget,
                   flops_compute=np.full((T, U), 10.0), e_reuse=e_reuse, flops_reuse=np.zeros((T, U)),
                   e_forecast=e_forecast)


def test_schedule_is_warmup_then_interval():
    assert schedule(10, 3, 4).nonzero()[0].tolist() == [0, 1, 2, 3, 7]
    assert schedule(5, 0, 2).nonzero()[0].tolist() == [0, 2, 4]
    with pytest.raises(ConfigError, match="interval >= 1"):
        schedule(5, 1, 0)


@pytest.mark.parametrize("budget", [0.7, 0.5, 0.3])
def test_uniform_is_the_best_feasible_warmup_and_interval(budget):
    p = _problem(budget=budget)
    plan = solve(p, "uniform")
    assert plan.predicted_flops <= budget * p.full_flops
    # every unit computes at the same steps: a warm-up, then one interval
    computes = [{t for t in range(p.num_steps) if plan.actions[t][u].kind is ActionKind.COMPUTE}
                for u in range(len(p.units))]
    assert all(c == computes[0] for c in computes)
    # no other (warm-up, interval) pair within the budget has a smaller modelled error
    best = min(solve(p, "uniform", warmup=w, interval=n).predicted_error
               for w in range(5) for n in range(1, 6)
               if _feasible(p, w, n))
    assert plan.predicted_error == pytest.approx(best)
    assert plan.counts()[ActionKind.FORECAST] > 0


def _feasible(p, w, n) -> bool:
    try:
        solve(p, "uniform", warmup=w, interval=n)
        return True
    except InfeasibleBudgetError:
        return False


def test_uniform_refuses_bad_knobs_and_impossible_budgets():
    p = _problem()
    with pytest.raises(ConfigError, match="interval must be in 1..max_age"):
        solve(p, "uniform", interval=9)
    with pytest.raises(ConfigError, match="max_warmup"):
        solve(p, "uniform", max_warmup=-1)
    with pytest.raises(InfeasibleBudgetError, match="No uniform plan"):
        solve(p.with_budget(0.05), "uniform")


@pytest.mark.parametrize("budget", [0.45, 0.6, 0.8])
def test_fill_spends_the_budget_and_only_lowers_the_error(budget):
    p = _problem(budget=budget, T=16)
    start = solve(p, "uniform", warmup=1, interval=5)  # spends much less than the budget
    filled = fill(p, start)
    assert start.predicted_flops < filled.predicted_flops <= budget * p.full_flops
    assert filled.predicted_error < start.predicted_error
    assert filled.solver == start.solver + "+fill"
    # nothing left to add: no cheaper-than-slack compute would lower the error
    slack = budget * p.full_flops - filled.predicted_flops
    assert slack < 10.0 or filled.counts()[ActionKind.COMPUTE] == p.num_steps * len(p.units)
    # every compute the filler added is within the rules (the plan validated on construction)
    assert fill(p, filled) is filled


def test_fill_leaves_a_full_plan_alone():
    p = _problem(budget=1.0)
    plan = solve(p, "uniform", warmup=0, interval=1)
    assert fill(p, plan) is plan


@pytest.mark.parametrize("budget", [0.45, 0.6, 0.8])
def test_fill_tail_computes_the_last_steps_in_full_and_keeps_the_rhythm_before(budget):
    p = _problem(budget=budget, T=16)
    start = solve(p, "uniform", warmup=1, interval=4)
    tailed = fill_tail(p, start)
    assert tailed.solver == start.solver + "+tail"
    assert start.predicted_flops < tailed.predicted_flops <= budget * p.full_flops
    full = [all(a.kind is ActionKind.COMPUTE for a in row) for row in tailed.actions]
    first = next(t for t in range(p.num_steps) if all(full[t:]))
    # every step from the tail's first on computes; before it, the rhythm's computes as they were
    assert first < p.num_steps - 1
    for t in range(first):
        assert [a.kind is ActionKind.COMPUTE for a in tailed.actions[t]] == \
            [a.kind is ActionKind.COMPUTE for a in start.actions[t]]
    # one more step in full would not fit the budget
    if first > 1 and not full[first - 1]:
        more = [list(r) for r in tailed.actions]
        more[first - 1] = [COMPUTE] * len(p.units)
        assert p.evaluate(p.with_forecasts([[REUSE if a.kind is ActionKind.FORECAST else a for a in r]
                                            for r in more]))[0] > budget * p.full_flops
    assert fill_tail(p, tailed) is tailed


def test_fill_tail_leaves_a_full_plan_alone():
    p = _problem(budget=1.0)
    plan = solve(p, "uniform", warmup=0, interval=1)
    assert fill_tail(p, plan) is plan


def test_dearest_rhythms_spend_the_most_one_per_interval():
    p = _problem(budget=0.45, T=16)
    plans = dearest(p, 3)
    intervals = [int(pl.solver.split("N=")[1].split(",")[0]) for pl in plans]
    assert len(plans) == 3 and len(set(intervals)) == 3
    flops = [pl.predicted_flops for pl in plans]
    assert flops == sorted(flops, reverse=True) and flops[0] <= 0.45 * p.full_flops
    assert schedule(8, 1, 3, phase=1).nonzero()[0].tolist() == [0, 2, 5]  # diffusers' TaylorSeer rhythm


def test_fill_runs_units_on_one_guidance_half_where_that_saves_more_per_flop():
    """With CFG at half a compute's FLOPs and a tenth of the reuse's error, the filler spends the
    budget on CFG steps (which keep the cache's age) before computes, and the plan is valid."""
    base = _problem(budget=0.6, T=16)
    p = Problem(units=base.units, num_steps=base.num_steps, max_age=base.max_age, budget=0.6,
                flops_compute=base.flops_compute, e_reuse=base.e_reuse, flops_reuse=base.flops_reuse,
                e_forecast=base.e_forecast, e_cfg=base.e_reuse / 10, flops_cfg=base.flops_compute / 2)
    start = solve(p, "uniform", warmup=1, interval=5)
    filled = fill(p, start)
    assert start.counts()[ActionKind.CFG] == 0 < filled.counts()[ActionKind.CFG]
    assert filled.predicted_error < fill(base, solve(base, "uniform", warmup=1, interval=5)).predicted_error
    assert filled.predicted_flops <= 0.6 * p.full_flops


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), policy=st.sampled_from(["measured", "always"]), data=st.data())
def test_a_change_scored_on_its_window_equals_the_whole_column_difference(seed, policy, data):
    """fill and trim score one change by walking only the steps whose compute history it changes;
    that must be the difference of the whole column's modelled error (or reject the same changes)."""
    p = dataclasses.replace(_problem(T=14, U=1, seed=seed), forecast_policy=policy)
    rng = np.random.default_rng(seed)
    # a valid column: step 0 computes, no cache older than max_age
    column, age = [COMPUTE], 0
    for _ in range(1, p.num_steps):
        compute = age == p.max_age or rng.random() < 0.35
        column.append(COMPUTE if compute else REUSE)
        age = 0 if compute else age + 1

    def whole(col):
        return math.fsum(p.unit_terms(0, p.column_with_forecasts(0, col))[1])

    col = _Column(p, 0, column)
    assert math.fsum(col.errors) == pytest.approx(whole(column))
    t = data.draw(st.integers(1, p.num_steps - 1))
    target = REUSE if column[t].kind is ActionKind.COMPUTE else COMPUTE
    trial = list(column)
    trial[t] = target
    try:
        expected = whole(trial) - whole(column)
    except ValueError:
        with pytest.raises(ValueError):
            col.delta(t, target)
        return
    assert col.delta(t, target) == pytest.approx(expected, rel=1e-9, abs=1e-9)
