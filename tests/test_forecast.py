"""FORECAST: reuse extrapolated from the last computes, orders 1..3 (profile, solver tables, rewrite, runtime)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dit_opt
from dit_opt.executor import forecast
from dit_opt.plan import COMPUTE, FORECAST, MAX_FORECAST_ORDER, REUSE, Action, ActionKind, Plan, Unit, forecast_weights
from dit_opt.testing import assert_export_replays, record_inputs, unbudgeted_plan
from passes.rewrite_plan import cache_needs, forecast_plan_weights
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


def test_higher_orders_where_measured_better_and_evenly_spaced():
    p = _problem(T=12, U=1, M=3)
    e = np.array(p.e_forecast)  # (T, U, 1, M + 1, M + 1): order 1 only
    e3 = np.concatenate([e, e * 0.5, e * 0.25], axis=2)  # order 3 best wherever measured
    for t in range(12):
        for k in (2, 3):
            for n in range(1, 4):
                for d in range(1, 4):
                    if t - n - k * d < 0:
                        e3[t, :, k - 1, n, d] = np.inf
    p = dataclasses.replace(p, e_forecast=e3)
    assert p.forecast_orders == 3
    # computes at 0, 2, 4, 6, 8, 9: at step 7 (computes 6, 4, 2, 0) order 3 is measured; at
    # step 5 (4, 2, 0) order 2; at step 3 (2, 0) order 1; at step 10 the spacing 9 - 8 = 1
    # differs from 8 - 6, so only order 1 is measured there
    computes = {0, 2, 4, 6, 8, 9}
    grid = [[COMPUTE if t in computes else REUSE] for t in range(12)]
    out = [row[0] for row in p.with_forecasts(grid)]
    assert out[3] == FORECAST and out[5] == Action(ActionKind.FORECAST, order=2)
    assert out[7] == Action(ActionKind.FORECAST, order=3) and out[10] == FORECAST
    flops, error = p.evaluate(p.with_forecasts(grid))
    # step 1 reuses (one compute before it), steps 3, 5, 7 forecast at orders 1, 2, 3, 10 and 11 at order 1
    assert error == pytest.approx(1.0 + 0.1 + 0.1 * 0.5 + 0.1 * 0.25 + 0.1 + 0.1 * 2)
    with pytest.raises(ValueError, match="no measured forecast of order 3"):
        bad = [list(row) for row in grid]
        bad[10][0] = Action(ActionKind.FORECAST, order=3)
        p.evaluate(bad)


@settings(deadline=None, max_examples=40)
@given(order=st.integers(1, MAX_FORECAST_ORDER), data=st.data())
def test_forecast_is_exact_on_polynomials_of_its_order(order, data):
    """A unit whose residual is a polynomial of degree k in the step index, at any spacing of its
    computes, is forecast exactly by order k (and the runtime op adds it to the input)."""
    gaps = data.draw(st.lists(st.integers(1, 4), min_size=order, max_size=order))
    n = data.draw(st.integers(1, 4))
    computes = [0]
    for g in gaps:
        computes.append(computes[-1] + g)
    computes = computes[::-1]  # newest first
    t = computes[0] + n
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    coeffs = torch.randn(order + 1, 3, 5, generator=gen, dtype=torch.float64)
    value = lambda s: sum(c * float(s) ** i for i, c in enumerate(coeffs))  # noqa: E731
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    got = forecast(x, tuple(value(c) for c in computes), forecast_weights(t, computes))
    torch.testing.assert_close(got, x + value(t), rtol=1e-9, atol=1e-9)
    # as a step graph runs it: the weights a tensor input
    weights = torch.tensor(forecast_weights(t, computes), dtype=torch.float64)
    torch.testing.assert_close(forecast(x, tuple(value(c) for c in computes), weights), x + value(t),
                               rtol=1e-9, atol=1e-9)


def test_plan_rejects_forecast_without_enough_computes():
    units = (Unit("blocks", 0),)
    with pytest.raises(ValueError, match="last 2 COMPUTE"):
        Plan(num_steps=3, units=units, actions=[[COMPUTE], [REUSE], [FORECAST]], budget=1.0, full_flops=3.0,
             flops_fixed=0.0, predicted_flops=1.0, step_flops=[1.0, 0.0, 0.0], predicted_error=0.0, max_age=4,
             solver="test", status="HEURISTIC", wall_time_s=0.0)
    f3 = Action(ActionKind.FORECAST, order=3)
    with pytest.raises(ValueError, match="last 4 COMPUTE"):
        Plan(num_steps=4, units=units, actions=[[COMPUTE], [COMPUTE], [COMPUTE], [f3]], budget=1.0,
             full_flops=4.0, flops_fixed=0.0, predicted_flops=3.0, step_flops=[1.0, 1.0, 1.0, 0.0],
             predicted_error=0.0, max_age=4, solver="test", status="HEURISTIC", wall_time_s=0.0)
    assert Action.parse("F") == FORECAST and str(FORECAST) == "F" and FORECAST.order == 1
    assert Action.parse("F3") == f3 and str(f3) == "F3"
    for bad in ("F4", "F0", "Fx"):
        with pytest.raises(ValueError, match="order"):
            Action.parse(bad)
    with pytest.raises(ValueError, match="takes no order"):
        Action(ActionKind.REUSE, order=2)


def test_cache_needs_and_weights():
    units = (Unit("blocks", 0),)
    acts = [[COMPUTE], [REUSE], [COMPUTE], [REUSE], [FORECAST], [COMPUTE]]
    plan = Plan(num_steps=6, units=units, actions=acts, budget=1.0, full_flops=6.0, flops_fixed=0.0,
                predicted_flops=3.0, step_flops=[1, 0, 1, 0, 0, 1], predicted_error=0.0, max_age=4,
                solver="test", status="HEURISTIC", wall_time_s=0.0)
    needs = cache_needs(plan)
    assert needs[2][0] == (True, False, 1)  # the compute before the forecast keeps the old residual
    assert needs[0][0][0]  # ... which step 0 wrote
    assert needs[5][0] == (False, False, 0)
    assert forecast_plan_weights(plan)[4][0] == pytest.approx((2.0, -1.0))  # n = 2, d = 2
    f3 = Action(ActionKind.FORECAST, order=3)
    acts = [[COMPUTE], [COMPUTE], [COMPUTE], [COMPUTE], [f3], [COMPUTE]]
    plan = dataclasses.replace(plan, actions=acts, predicted_flops=5.0, step_flops=[1, 1, 1, 1, 0, 1])
    assert [cache_needs(plan)[t][0][2] for t in range(6)] == [0, 1, 2, 3, 0, 0]


@pytest.fixture(scope="module")
def tiny_dit(profiled):
    return profiled("dit", STEPS)


@pytest.mark.parametrize("action", [FORECAST, Action(ActionKind.FORECAST, order=2),
                                    Action(ActionKind.FORECAST, order=3), REUSE], ids=str)
def test_runtime_error_matches_the_profile(tiny_dit, action):
    """One block forecasts (or reuses) at the last step, all else computes: the error of its output,
    seen as the next block's input, is what the profile measured for that action."""
    model, cal, prof = tiny_dit
    kind = action.kind
    ages = prof.max_age + 1
    assert prof.e_forecast is not None and prof.e_forecast.shape == (STEPS, len(prof.units), 3, ages, ages)
    u, t = 1, STEPS - 1
    grid = [[COMPUTE] * len(prof.units) for _ in range(STEPS)]
    grid[t][u] = action
    opt = dit_opt.OptimizedTransformer(model, unbudgeted_plan(prof, grid), profile=prof, compile=False)
    with torch.no_grad():
        cal(opt)  # the first call captures the model (which runs its blocks): not observed
    nxt = model.transformer_blocks[u + 1]
    ref, got = record_inputs(cal, model, nxt), record_inputs(cal, opt, nxt)
    errs = [float((g - r).pow(2).sum() / r.pow(2).sum()) for k, (g, r) in enumerate(zip(got, ref, strict=True))
            if k % STEPS == t]
    expected = prof.e_forecast[t, u, action.order - 1, 1, 1] if kind is ActionKind.FORECAST else prof.e_reuse[t, u, 1]
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


def test_plans_read_older_caches_at_low_budgets_only(tiny_dit):
    from dit_opt.errors import ConfigError
    from dit_opt.sensitivity import DEFAULT_MAX_AGE, LONG_CACHE_BUDGET, SHORT_MAX_AGE

    _, _, prof = tiny_dit
    assert prof.max_age == DEFAULT_MAX_AGE > SHORT_MAX_AGE
    for granularity in ("block", "module"):
        high = prof.to_problem(LONG_CACHE_BUDGET, granularity=granularity)
        low = prof.to_problem(LONG_CACHE_BUDGET - 0.05, granularity=granularity)
        assert (high.max_age, low.max_age) == (SHORT_MAX_AGE, DEFAULT_MAX_AGE)
        assert high.e_reuse.shape[-1] == SHORT_MAX_AGE + 1 and low.e_reuse.shape[-1] == DEFAULT_MAX_AGE + 1
        assert np.array_equal(high.e_reuse, low.e_reuse[..., :SHORT_MAX_AGE + 1])
        assert prof.to_problem(0.2, granularity=granularity, max_age=2).max_age == 2
    # a plan at a low budget is made with every age the profile measured
    plan = solve(prof.to_problem(0.2), "fora")
    assert plan.max_age == DEFAULT_MAX_AGE
    with pytest.raises(ConfigError, match="profile measured caches up to"):
        prof.to_problem(0.5, max_age=DEFAULT_MAX_AGE + 1)


def test_steps_that_differ_only_in_forecast_weights_share_one_graph(tiny_dit, tmp_path):
    """Forecast weights are inputs of a step's graph: forecasts at other spacings (steps 2 and
    5 below: from computes at 1, 0 and at 4, 3) run one graph, each with its own weights, and
    the export replays them."""
    from dit_opt.export import ExportedPlan

    model, cal, prof = tiny_dit
    U = len(prof.units)
    rows = {0: COMPUTE, 1: COMPUTE, 2: FORECAST, 3: REUSE, 4: COMPUTE, 5: FORECAST, 6: COMPUTE, 7: COMPUTE}
    grid = [[rows[t]] * U for t in range(STEPS)]
    grid[3] = [COMPUTE] * U  # steps 2 and 5 then write and read the same cache entries
    plan = unbudgeted_plan(prof, grid)
    opt = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)
    with torch.no_grad():
        cal(opt)
    runner = next(iter(opt._runners.values()))
    assert runner.variants[2].gm is runner.variants[5].gm
    w2, w5 = (runner.step_inputs(plan, t) for t in (2, 5))
    assert w2.keys() == w5.keys() and w2
    assert next(iter(w2.values())).tolist() == pytest.approx(forecast_weights(2, [1, 0]))
    assert next(iter(w5.values())).tolist() == pytest.approx(forecast_weights(5, [4, 3]))
    # the export keeps one program per distinct graph and feeds each step its weights
    opt.export(tmp_path)
    served = ExportedPlan(tmp_path)
    index = served.index
    assert index["steps"][2]["file"] == index["steps"][5]["file"]
    assert index["steps"][5]["forecast_weights"]
    assert_export_replays(opt, served, prof.timesteps)


@settings(deadline=None, max_examples=40)
@given(order=st.integers(1, MAX_FORECAST_ORDER), data=st.data())
def test_taylor_form_is_diffusers_taylorseer(order, data):
    """``forecast_weights(..., "taylor")`` predicts what diffusers' TaylorSeer state predicts from
    the same outputs at the same steps (its divided differences, its expansion), at any spacing;
    exact on straight lines, and the same as the polynomial at order 1."""
    from diffusers.hooks.taylorseer_cache import TaylorSeerState

    gaps = data.draw(st.lists(st.integers(1, 4), min_size=order, max_size=order))
    n = data.draw(st.integers(1, 5))
    steps = [0]
    for g in gaps:
        steps.append(steps[-1] + g)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    values = {s: torch.randn(3, 4, generator=gen, dtype=torch.float64) for s in steps}
    state = TaylorSeerState(taylor_factors_dtype=torch.float64, max_order=order)
    for s in steps:  # oldest first, as the hook updates
        state.current_step = s
        state.update((values[s],))
    state.current_step = steps[-1] + n
    (want,) = state.predict()
    computes = steps[::-1]
    weights = forecast_weights(steps[-1] + n, computes, "taylor")
    torch.testing.assert_close(sum(w * values[c] for w, c in zip(weights, computes, strict=True)), want,
                               rtol=1e-9, atol=1e-9)
    line = {s: 0.5 + 2.0 * s for s in steps}
    assert sum(w * line[c] for w, c in zip(weights, computes, strict=True)) == pytest.approx(line[steps[-1]] + 2.0 * n)
    if order == 1:
        assert weights == pytest.approx(forecast_weights(steps[-1] + n, computes))
    with pytest.raises(ValueError, match="lagrange, taylor"):
        forecast_weights(steps[-1] + n, computes, "hermite")


def test_taylor_form_plan_runs_diffusers_taylorseer_exactly(profiled):
    """At module granularity, TaylorSeer's rhythm with a forecast of the highest order its computes
    allow at every cache read, in the Taylor form, is diffusers' TaylorSeer hook at that order: the
    same outputs at every step (orders 2 and 3, where the polynomial differs from it)."""
    from dit_opt.benchmark import peer_module
    from dit_opt.plan import after_step
    from dit_opt.testing import record_outputs
    from solvers import uniform

    model, cal, prof = profiled("flux", 10)
    problem = prof.to_problem(1.0, granularity="module")
    T, U = problem.num_steps, len(problem.units)
    interval, warmup = 3, 1
    rhythm = uniform.schedule(T, warmup, interval, phase=1)  # diffusers' compute steps
    for order in (2, 3):
        columns = []
        for _ in range(U):
            column, computes = [], ()
            for t in range(T):
                k = min(order, len(computes) - 1)
                action = COMPUTE if rhythm[t] else (Action(ActionKind.FORECAST, order=k) if k >= 1 else REUSE)
                column.append(action)
                computes = after_step(t, action, computes)
            columns.append(column)
        grid = [[columns[u][t] for u in range(U)] for t in range(T)]
        plan = unbudgeted_plan(prof, grid, granularity="module")
        hook = peer_module(model, "taylorseer", (interval, warmup, order), T)
        want = record_outputs(cal, hook)
        got = {form: record_outputs(cal, dit_opt.OptimizedTransformer(
            model, dataclasses.replace(plan, forecast_form=form), profile=prof, compile=False))
            for form in ("taylor", "lagrange")}
        for t in range(T):
            torch.testing.assert_close(got["taylor"][t], want[t], rtol=1e-4, atol=1e-5, msg=f"order {order}, step {t}")
        assert max(float((g - w).abs().max()) for g, w in zip(got["lagrange"], want, strict=True)) > 1e-3
