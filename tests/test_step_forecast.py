"""STEP, the whole step forecast: plan rules, FLOPs, the profile's error, the runtime and artifacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dit_opt
from dit_opt.executor import combine
from dit_opt.flops import count_flops
from dit_opt.plan import COMPUTE, MAX_FORECAST_ORDER, REUSE, Action, ActionKind, Plan, Unit, forecast_weights
from dit_opt.testing import assert_export_replays, record_outputs
from passes.rewrite_plan import output_needs, step_weights
from passes.rewrite_step import OUTPUT
from passes.step_graph import weights_key
from solvers import uniform

STEPS = 8


def T(order: int = 1) -> Action:
    return Action(ActionKind.STEP, order=order)


def _plan(actions, flops_fixed=8.0, max_age=4) -> Plan:
    steps = len(actions)
    step_flops = [10.0 * sum(a.kind is ActionKind.COMPUTE for a in row) for row in actions]
    glue = sum(row[0].kind is not ActionKind.STEP for row in actions)
    return Plan(num_steps=steps, units=(Unit("blocks", 0), Unit("blocks", 1)), actions=actions, budget=1.0,
                full_flops=20.0 * steps + flops_fixed, flops_fixed=flops_fixed,
                predicted_flops=sum(step_flops) + flops_fixed * glue / steps, step_flops=step_flops,
                predicted_error=0.0, max_age=max_age, solver="test", status="HEURISTIC", wall_time_s=0.0)


def test_parse_and_print():
    assert [str(T(k)) for k in range(4)] == ["T0", "T", "T2", "T3"]
    assert all(Action.parse(str(T(k))) == T(k) for k in range(4))
    assert Action.parse("T") == T(1)
    for bad in ("T4", "Tx"):
        with pytest.raises(ValueError, match="order"):
            Action.parse(bad)


def test_plan_rules_and_glue():
    C = [COMPUTE, COMPUTE]
    plan = _plan([C, [T(0)] * 2, C, [T(1)] * 2])
    # the glue (8 FLOPs over 4 steps) is not spent at the two STEP steps
    assert plan.glue_steps == 2 and plan.predicted_flops == 40.0 + 4.0
    assert plan.glue_flops(1) == 0.0 and plan.glue_flops(2) == 2.0
    assert plan.counts()[ActionKind.STEP] == 4
    with pytest.raises(ValueError, match="every unit's action"):
        _plan([C, [T(0), REUSE], C])
    with pytest.raises(ValueError, match="every unit's action"):
        _plan([C, C, [T(0), T(1)]])
    with pytest.raises(ValueError, match="last 2 full steps"):
        _plan([C, [T(1)] * 2])  # order 1 needs two full steps
    with pytest.raises(ValueError, match="step 0 must COMPUTE"):
        _plan([[T(0)] * 2, C])
    with pytest.raises(ValueError, match="max_age"):
        _plan([C, [REUSE, REUSE], [T(0)] * 2], max_age=1)  # the last full step is 2 steps old
    bad = _plan([C, [T(0)] * 2]).to_dict()
    bad["predicted_flops"] = 28.0  # as if the glue ran at every step
    with pytest.raises(Exception, match="glue"):
        Plan.from_dict(bad)


def test_output_needs_and_weights():
    C = [COMPUTE, COMPUTE]
    plan = _plan([C, C, C, [T(2)] * 2, C, [T(0)] * 2])
    assert output_needs(plan) == [0, 1, 2, None, 0, None]  # step 2 keeps the outputs of 1 and 0
    weights = step_weights(plan)
    assert weights[3][weights_key(OUTPUT)].tolist() == pytest.approx(forecast_weights(3, [2, 1, 0]))
    assert weights[5][weights_key(OUTPUT)].tolist() == [1.0]


@settings(deadline=None, max_examples=40)
@given(order=st.integers(0, MAX_FORECAST_ORDER), data=st.data())
def test_exact_on_polynomials_of_its_order(order, data):
    """A model output that is a polynomial of degree k in the step index, at any spacing of the
    full steps, is forecast exactly by a STEP of order k (as the step graph computes it)."""
    gaps = data.draw(st.lists(st.integers(1, 4), min_size=order, max_size=order))
    full = [0]
    for g in gaps:
        full.append(full[-1] + g)
    full = full[::-1]
    t = full[0] + data.draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    coeffs = torch.randn(order + 1, 2, 4, 4, generator=gen, dtype=torch.float64)
    value = lambda s: sum(c * float(s) ** i for i, c in enumerate(coeffs))  # noqa: E731
    weights = torch.tensor(forecast_weights(t, full), dtype=torch.float64)
    torch.testing.assert_close(combine(tuple(value(c) for c in full), weights), value(t), rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def tiny_dit(profiled):
    return profiled("dit", STEPS)


@pytest.mark.parametrize("order", range(MAX_FORECAST_ORDER + 1))
def test_runtime_error_matches_the_profile(tiny_dit, order):
    """Every step computes but the last, a STEP of ``order``: its output's error against the full
    model's is what the profile measured, and no block runs there."""
    model, cal, prof = tiny_dit
    U = len(prof.units)
    assert prof.e_step is not None and prof.e_step.shape == (STEPS, MAX_FORECAST_ORDER + 1, prof.max_age + 1,
                                                             prof.max_age + 1)
    grid = [[COMPUTE] * U for _ in range(STEPS - 1)] + [[T(order)] * U]
    plan = prof.to_problem(1.0).to_plan(grid, "test", "HEURISTIC", 0.0)
    assert plan.is_step_forecast(STEPS - 1) and plan.flop_fraction < 1.0
    opt = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)
    with torch.no_grad():
        cal(opt)  # captures
    ref, got = record_outputs(cal, model), record_outputs(cal, opt)
    last = [k for k in range(len(ref)) if k % STEPS == STEPS - 1]
    assert all(torch.equal(got[k], ref[k]) for k in range(len(ref)) if k % STEPS != STEPS - 1)
    errs = [float((got[k] - ref[k]).pow(2).sum() / ref[k].pow(2).sum()) for k in last]
    assert np.mean(errs) == pytest.approx(prof.e_step[STEPS - 1, order, 1, 1], rel=1e-3)
    code = opt.graph(STEPS - 1).code
    assert "transformer_blocks" not in code and "combine" in code


def test_rhythms_with_step_forecasts_are_counted_within_budget(tiny_dit, tmp_path):
    """A uniform rhythm with STEPs between its computes: counted FLOPs at its modelled fraction
    (no glue at a STEP), and it saves, loads and exports as any plan."""
    from dit_opt.export import ExportedPlan

    model, cal, prof = tiny_dit
    problem = prof.to_problem(0.5)
    (plan,) = uniform.dearest(problem, 1, whole=True, order=1)
    assert plan.counts()[ActionKind.STEP] > 0 and plan.predicted_flops <= 0.5 * plan.full_flops
    opt = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)
    counted = count_flops(cal, opt) / count_flops(cal, model)
    assert counted <= 0.5 + 0.01 and counted == pytest.approx(plan.flop_fraction, abs=0.01)
    assert opt.stats()["flop_fraction"] == pytest.approx(plan.flop_fraction)
    opt.save(tmp_path / "opt")
    back = dit_opt.load(tmp_path / "opt", model, compile=False)
    assert back.plan.actions == plan.actions
    with torch.no_grad():
        want = cal(opt)
        assert torch.equal(cal(back), want)
    opt.export(tmp_path / "export")
    assert_export_replays(opt, ExportedPlan(tmp_path / "export"), prof.timesteps)


def test_optimize_measures_step_candidates(tiny_dit):
    model, cal, prof = tiny_dit
    from dit_opt.selection import candidate_plans
    from solvers import solve

    problem = prof.to_problem(0.5)
    plans = candidate_plans(problem, solve(problem, "cpsat", time_limit_s=5))
    steps = [p for p in plans if p.counts()[ActionKind.STEP]]
    assert steps and all("+step" in p.solver for p in steps)
    assert all(p.predicted_flops <= 0.5 * p.full_flops for p in plans)
    # one order per plan (lower only where fewer full steps precede)
    for p in steps:
        k = int(p.solver.split("+step")[1][0])
        orders = [row[0].order for row in p.actions if row[0].kind is ActionKind.STEP]
        assert max(orders) == k and orders[-1] == k, p.solver


def test_a_budget_only_step_forecasts_meet_is_met_with_them():
    """HunyuanDiT's test config has one block: its glue is over half of the FLOPs, so no plan of
    the blocks meets 0.5, but rhythms with STEPs between computes (no glue run there) do. Counted,
    a STEP runs none of the glue (export's shape assertions kept part of it alive: 0.77)."""
    import warnings

    from dit_opt.calibration import synthetic_calibration
    from dit_opt.errors import InfeasibleBudgetError
    from dit_opt.testing import tiny_model

    model, _ = tiny_model("hunyuandit")
    cal = synthetic_calibration(model, num_inference_steps=STEPS, warn=False)
    prof = dit_opt.profile(model, cal, progress=False)
    with pytest.raises(InfeasibleBudgetError):
        prof.to_problem(0.5).check_feasible()
    with pytest.warns(UserWarning, match="whole step forecasts"):
        opt = dit_opt.optimize(model, 0.5, calibration=cal, compile=False, progress=False, select=False)
    assert opt.plan.counts()[ActionKind.STEP] > 0
    assert count_flops(cal, opt) <= 0.51 * count_flops(cal, model)
    with warnings.catch_warnings(), pytest.raises(InfeasibleBudgetError):  # a baseline keeps its own rule
        warnings.simplefilter("ignore")
        dit_opt.optimize(model, 0.5, calibration=prof, solver="fora", compile=False, progress=False,
                         example_inputs=opt.captured().graph.example_inputs)
