"""FORECAST: reuse extrapolated from the last two computes (profile, solver tables, rewrite, runtime)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import dit_opt
from dit_opt.plan import COMPUTE, FORECAST, REUSE, Action, ActionKind, Plan, Unit
from dit_opt.testing import record_inputs
from passes.rewrite_plan import cache_needs, forecast_slopes
from solvers import solve
from solvers.problem import Problem

STEPS = 8


def _problem(T=8, U=2, M=3, forecast_error=0.1, budget=0.5) -> Problem:
    e_forecast = np.full((T, U, M + 1, M + 1), np.inf)
    for t in range(T):
        for n in range(1, M + 1):
            for d in range(1, M + 1):
                if t - n - d >= 0:
                    e_forecast[t, :, n, d] = forecast_error * n
    return Problem(units=tuple(Unit("blocks", i) for i in range(U)), num_steps=T, max_age=M, budget=budget,
                   flops_compute=np.full((T, U), 10.0), e_reuse=np.ones((T, U, M + 1)),
                   flops_reuse=np.zeros((T, U)), e_forecast=e_forecast)


def test_reuse_becomes_forecast_where_measured_better():
    p = _problem()
    grid = [[COMPUTE if t % 2 == 0 else REUSE, COMPUTE if t % 3 == 0 else REUSE] for t in range(8)]
    out = p.with_forecasts(grid)
    # unit 0 computes at 0, 2, 4, 6: the reuse at step 1 has one compute before it (plain),
    # later ones extrapolate (0.1 n < 1)
    assert [row[0] for row in out] == [COMPUTE, REUSE, COMPUTE, FORECAST, COMPUTE, FORECAST, COMPUTE, FORECAST]
    # unit 1 computes at 0, 3, 6
    assert [row[1] for row in out] == [COMPUTE, REUSE, REUSE, COMPUTE, FORECAST, FORECAST, COMPUTE, FORECAST]
    flops, error = p.evaluate(out)
    assert error == pytest.approx((1 + 3 * 0.1) + (2 + 0.1 + 0.2 + 0.1))
    assert flops == p.evaluate(grid)[0]


def test_forecast_is_not_taken_where_it_is_worse():
    p = _problem(forecast_error=2.0)
    grid = [[COMPUTE, COMPUTE] if t % 2 == 0 else [REUSE, REUSE] for t in range(8)]
    assert all(a.kind is not ActionKind.FORECAST for row in p.with_forecasts(grid) for a in row)


def test_solver_plans_forecast_and_baselines_do_not():
    p = _problem(budget=0.5)
    plan = solve(p, "cpsat", time_limit_s=5)
    assert plan.counts()[ActionKind.FORECAST] > 0
    assert plan.predicted_error == pytest.approx(p.evaluate(plan.actions)[1])
    fora = solve(p, "fora")
    assert fora.counts()[ActionKind.FORECAST] == 0
    dp = solve(p, "dp")
    assert dp.counts()[ActionKind.FORECAST] > 0 and dp.predicted_error <= fora.predicted_error
    # without forecasts the same budget costs more modelled error
    assert plan.predicted_error < solve(p.without_forecasts(), "cpsat", time_limit_s=5).predicted_error


def test_plan_rejects_forecast_without_two_computes():
    units = (Unit("blocks", 0),)
    with pytest.raises(ValueError, match="last two COMPUTE"):
        Plan(num_steps=3, units=units, actions=[[COMPUTE], [REUSE], [FORECAST]], budget=1.0, full_flops=3.0,
             flops_fixed=0.0, predicted_flops=1.0, step_flops=[1.0, 0.0, 0.0], predicted_error=0.0, max_age=4,
             solver="test", status="HEURISTIC", wall_time_s=0.0)
    assert Action.parse("F") == FORECAST and str(FORECAST) == "F"


def test_cache_needs_and_slopes():
    units = (Unit("blocks", 0),)
    acts = [[COMPUTE], [REUSE], [COMPUTE], [REUSE], [FORECAST], [COMPUTE]]
    plan = Plan(num_steps=6, units=units, actions=acts, budget=1.0, full_flops=6.0, flops_fixed=0.0,
                predicted_flops=3.0, step_flops=[1, 0, 1, 0, 0, 1], predicted_error=0.0, max_age=4,
                solver="test", status="HEURISTIC", wall_time_s=0.0)
    needs = cache_needs(plan)
    assert needs[2][0] == (True, False, True)  # the compute before the forecast keeps the old residual
    assert needs[0][0][0]  # ... which step 0 wrote
    assert needs[5][0] == (False, False, False)
    assert forecast_slopes(plan)[4][0] == pytest.approx(2 / 2)


@pytest.fixture(scope="module")
def tiny_dit(profiled):
    return profiled("dit", STEPS)


@pytest.mark.parametrize("kind", [ActionKind.FORECAST, ActionKind.REUSE])
def test_runtime_error_matches_the_profile(tiny_dit, kind):
    """One block forecasts (or reuses) at the last step, all else computes: the error of its output,
    seen as the next block's input, is what the profile measured for that action."""
    model, cal, prof = tiny_dit
    assert prof.e_forecast is not None and prof.e_forecast.shape == (STEPS, len(prof.units), 5, 5)
    u, t = 1, STEPS - 1
    grid = [[COMPUTE] * len(prof.units) for _ in range(STEPS)]
    grid[t][u] = Action(kind)
    problem = prof.to_problem(1.0)
    plan = Plan(num_steps=STEPS, units=prof.units, actions=grid, budget=1.0, full_flops=problem.full_flops,
                flops_fixed=problem.flops_fixed, predicted_flops=problem.full_flops,
                step_flops=[float(problem.flops_compute[s].sum()) for s in range(STEPS)], predicted_error=0.0,
                max_age=prof.max_age, solver="test", status="HEURISTIC", wall_time_s=0.0)
    opt = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)
    with torch.no_grad():
        cal(opt)  # the first call captures the model (which runs its blocks): not observed
    nxt = model.transformer_blocks[u + 1]
    ref, got = record_inputs(cal, model, nxt), record_inputs(cal, opt, nxt)
    errs = [float((g - r).pow(2).sum() / r.pow(2).sum()) for k, (g, r) in enumerate(zip(got, ref, strict=True))
            if k % STEPS == t]
    expected = prof.e_forecast[t, u, 1, 1] if kind is ActionKind.FORECAST else prof.e_reuse[t, u, 1]
    assert np.mean(errs) == pytest.approx(expected, rel=1e-3)
    assert all(float((g - r).abs().max()) == 0 for k, (g, r) in enumerate(zip(got, ref, strict=True))
               if k % STEPS != t)
    if kind is ActionKind.FORECAST:
        assert "forecast" in opt.graph(t).code


def test_optimize_uses_forecasts_and_saves_them(tiny_dit, tmp_path):
    model, cal, prof = tiny_dit
    # The random tiny model's trajectory bends too fast for forecasts to pay off everywhere; make
    # them clearly better so that the plan must use them.
    prof = dataclasses.replace(prof, e_forecast=prof.e_forecast * 0.1)
    opt = dit_opt.optimize(model, budget=0.4, calibration=prof, compile=False, progress=False)
    assert opt.plan.counts()[ActionKind.FORECAST] > 0
    plain = dit_opt.optimize(model, budget=0.4, calibration=prof, compile=False, progress=False,
                             actions=("reuse", "prune", "width", "skip"))
    assert plain.plan.counts()[ActionKind.FORECAST] == 0
    assert opt.plan.predicted_error <= plain.plan.predicted_error * 1.01
    opt.save(tmp_path / "opt")
    back = dit_opt.load(tmp_path / "opt", model, compile=False)
    assert back.plan.actions == opt.plan.actions
    with torch.no_grad():
        assert torch.equal(cal(back), cal(opt))
