"""Closed-loop plan search (dit_opt.closed_loop): on-policy errors, per-step corrections, re-solves."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dit_opt
from dit_opt import closed_loop
from dit_opt.errors import ConfigError
from dit_opt.plan import ActionKind
from dit_opt.selection import measure_outputs, relative_error
from solvers import solve

STEPS = 8


@pytest.fixture(scope="module")
def tiny(profiled):
    return profiled("dit", STEPS)


def _build(model, prof):
    def build(plan):
        return dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)
    return build


def test_on_policy_run_leaves_the_plan_unchanged_and_measures_its_steps(tiny):
    model, cal, prof = tiny
    problem = prof.to_problem(0.4)
    plan = solve(problem, "cpsat", time_limit_s=5)
    build = _build(model, prof)
    plain = measure_outputs(cal, build(plan))
    run = closed_loop.on_policy_errors(cal, build(plan), model, STEPS)
    # the full model beside it does not move the plan's own outputs
    assert len(run.outputs) == len(plain)
    assert all(torch.equal(a, b) for a, b in zip(run.outputs, plain, strict=True))
    # exact where every unit computes, an error where some unit is served from its cache
    for t, row in enumerate(plan.actions):
        if all(a.kind is ActionKind.COMPUTE for a in row):
            assert run.step_errors[t] <= 1e-10
        else:
            assert run.step_errors[t] > 1e-10
    # the full plan is exact at every step
    full = solve(prof.to_problem(1.0), "cpsat", time_limit_s=5)
    assert np.all(closed_loop.on_policy_errors(cal, build(full), model, STEPS).step_errors <= 1e-10)


def test_step_errors_add_up_to_the_modelled_error(tiny):
    _, _, prof = tiny
    problem = prof.to_problem(0.35)
    for name in ("cpsat", "fora"):
        plan = solve(problem, name)
        per_step = problem.step_errors(plan.actions)
        assert per_step.shape == (STEPS,) and per_step.sum() == pytest.approx(plan.predicted_error, rel=1e-9)
        assert per_step[0] == 0.0  # step 0 computes


@given(st.lists(st.floats(1e-4, 1.0), min_size=STEPS, max_size=STEPS),  # well above the "exact" share
       st.lists(st.floats(1e-4, 1.0), min_size=STEPS, max_size=STEPS),
       st.sets(st.integers(0, STEPS - 1), max_size=STEPS - 1))
def test_corrections_are_measured_over_modelled_damped_and_interpolated_where_exact(measured, modelled, exact):
    measured, modelled = np.array(measured), np.array(modelled)
    modelled[list(exact)] = 0.0
    logs = closed_loop.corrections(measured, modelled)
    kept = np.array([t not in exact for t in range(STEPS)])
    assert np.allclose(logs[kept], np.log(measured[kept] / modelled[kept]))
    assert np.all(np.isnan(logs[~kept]))
    weights = closed_loop.step_weights([logs])
    assert weights.shape == (STEPS,) and np.all(weights > 0)
    assert np.log(weights).mean() == pytest.approx(0.0, abs=1e-9)  # normalised
    # the ratio of two measured steps' weights is their measured ratio
    i, j = np.flatnonzero(kept)[[0, -1]]
    damping = closed_loop.DAMPING
    assert weights[i] / weights[j] == pytest.approx(np.exp(damping * (logs[i] - logs[j])), rel=1e-9)
    # an exact step between two measured ones lies between their weights
    for t in np.flatnonzero(~kept):
        if i < t < j:
            lo, hi = sorted((weights[kept & (np.arange(STEPS) < t)][-1], weights[kept & (np.arange(STEPS) > t)][0]))
            assert lo * (1 - 1e-9) <= weights[t] <= hi * (1 + 1e-9)
    # a step measured in one round and not in another keeps the round that measured it
    other = np.full(STEPS, np.nan)
    other[i] = logs[i] + 2.0
    both = closed_loop.step_weights([logs, other])
    if i != j:
        assert both[i] / both[j] == pytest.approx(np.exp(damping * (logs[i] + 1.0 - logs[j])), rel=1e-9)


def test_corrections_need_a_measured_step():
    assert closed_loop.step_weights([closed_loop.corrections(np.zeros(STEPS), np.ones(STEPS))]) is None


def test_refine_moves_computes_to_where_the_plan_errs(tiny):
    """A run that measures all of the plan's error at its last reused step: the re-solve
    computes there and the loop keeps going only while the measured error falls."""
    _, _, prof = tiny
    problem = prof.to_problem(0.5)
    plan = solve(problem, "cpsat", time_limit_s=5)
    reused = [t for t, row in enumerate(plan.actions) if any(a.kind is not ActionKind.COMPUTE for a in row)]
    last = reused[-1]
    runs = []

    def run(p):
        errs = problem.step_errors(p.actions).copy()
        errs[last] *= 1e6  # the plan's real error: far above the model at this step
        runs.append(p)
        return closed_loop.OnPolicy([torch.tensor([float(errs.sum())])], errs)

    found = closed_loop.refine(plan, problem, lambda q: solve(q, "cpsat", time_limit_s=5), run,
                               lambda out: float(out[0]), rounds=3)
    assert found[0][0] is plan and len(runs) == len(found)
    assert 2 <= len(found) <= 4
    first = found[1][0]
    assert first.solver == "cpsat+closed1" and first.flop_fraction <= 0.5
    assert problem.step_errors(first.actions)[last] < problem.step_errors(plan.actions)[last]
    assert found[1][1] < found[0][1]
    # the loop stops at the first plan that does not improve, or repeats one
    errors = [e for _, e in found]
    assert all(a > b for a, b in zip(errors[:-2], errors[1:-1], strict=True))
    assert len({p.actions for p, _ in found}) == len(found)


def test_optimize_closed_loop_measures_the_re_solved_plans(tiny):
    model, cal, prof = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.optimize(model, budget=0.4, calibration=prof, select=cal, compile=False, progress=False,
                               closed_loop=True)
    names = [c.plan.solver for c in opt.selection]
    assert names.count("cpsat") == 1, names  # the start is measured once, by the closed loop
    assert opt.plan is min(opt.selection, key=lambda c: c.error).plan
    closed = [c for c in opt.selection if "+closed" in c.plan.solver]
    assert len(closed) <= closed_loop.ROUNDS
    # the loop's plans in the report, the start first (on this tiny model the re-solve may give it back)
    loop = opt.report["closed_loop"]
    assert [r["solver"] for r in loop] == ["cpsat"] + [c.plan.solver for c in closed]
    start = next(c for c in opt.selection if c.plan.solver == "cpsat")
    assert loop[0]["error"] == start.error and loop[0]["flop_fraction"] == start.plan.flop_fraction
    assert dit_opt.optimize(model, budget=0.4, calibration=prof, select=cal, compile=False,
                            progress=False).report["closed_loop"] == []  # off by default
    # each measured error is the plan's own, as a plain run measures it
    build = _build(model, prof)
    ref = measure_outputs(cal, model)
    for c in closed:
        assert c.error == pytest.approx(relative_error(measure_outputs(cal, build(c.plan)), ref), rel=1e-6)
        assert c.plan.flop_fraction <= 0.4
    # a run per candidate, one more per closed-loop plan (the full model beside it, the start's too),
    # and the full model's reference (the profile was given)
    assert opt.report["selection_runs"] == len(opt.selection) + len(closed) + 1 + 1


def test_closed_loop_bad_input(tiny):
    model, cal, prof = tiny
    for bad in (-1, 1.5, "yes"):
        with pytest.raises(ConfigError, match="closed_loop must be"):
            dit_opt.optimize(model, budget=0.4, calibration=prof, select=cal, compile=False, progress=False,
                             closed_loop=bad)
    with pytest.raises(ConfigError, match="needs select"):
        dit_opt.optimize(model, budget=0.4, calibration=cal, select=False, compile=False, progress=False,
                         closed_loop=True)
    with pytest.raises(ConfigError, match="needs select"):
        dit_opt.optimize(model, budget=0.4, calibration=cal, solver="fora", compile=False, progress=False,
                         closed_loop=2)
    with pytest.raises(ConfigError, match="closed_loop needs plans measured"):
        dit_opt.optimize(model, budget=0.4, calibration=prof, compile=False, progress=False, closed_loop=True)
    assert closed_loop.check_rounds(True) == closed_loop.ROUNDS and closed_loop.check_rounds(False) == 0


def test_closed_loop_on_a_loop_of_other_length_measures_the_plan_as_it_is(tiny):
    """Plans measured on a calibration of another step count run re-solved plans: the loop's
    per-step errors would not be the plan's, so the search is skipped, with a warning."""
    from dit_opt.calibration import synthetic_calibration

    model, _, prof = tiny
    other = synthetic_calibration(model, num_inference_steps=STEPS - 2, warn=False)
    with pytest.warns(UserWarning, match="no closed-loop search: the calibration ran a loop of another schedule"):
        opt = dit_opt.optimize(model, budget=0.4, calibration=prof, select=other, compile=False, progress=False,
                               closed_loop=True)
    names = [c.plan.solver for c in opt.selection]
    assert names.count("cpsat") == 1 and not any("+closed" in n for n in names), names
    assert opt.report["closed_loop"] == []


def test_closed_loop_inside_a_pipeline():
    """Through ``optimize(pipe, ...)``: the pipeline's own calls (a guidance batch, keyword
    arguments, ``return_dict=False``) run the full model beside the plan."""
    pytest.importorskip("transformers")
    from dit_opt.tiny_pipelines import tiny_pipeline

    pipe, call = tiny_pipeline("pixart")
    calibration = dict(call, num_inference_steps=6, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.optimize(pipe, budget=0.5, calibration=calibration, compile=False, progress=False,
                               closed_loop=1)
    try:
        loop = opt.report["closed_loop"]
        assert loop and loop[0]["solver"] == "cpsat" and all(np.isfinite(r["error"]) for r in loop)
        assert len(loop) <= 2 and all(r["flop_fraction"] <= 0.5 for r in loop)
        measured = {c.plan.solver: c.error for c in opt.selection}
        assert all(measured[r["solver"]] == r["error"] for r in loop)
        assert opt.plan is min(opt.selection, key=lambda c: c.error).plan
    finally:
        dit_opt.restore(pipe)
