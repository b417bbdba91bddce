"""Module-level SKIP and PRUNE: profile, solver problem, rewrite, runtime, FLOPs, lowering, save/load."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import dit_opt
from dit_opt.calibration import synthetic_calibration
from dit_opt.flops import count_flops
from dit_opt.plan import COMPUTE, REUSE, SKIP, Action, ActionKind, Unit
from dit_opt.sensitivity import MODULE_ROLES, SensitivityProfile
from dit_opt.testing import record_inputs
from passes.rewrite_modules import module_token_input

STEPS = 6
P25, P50 = Action(ActionKind.PRUNE, rate=0.25), Action(ActionKind.PRUNE, rate=0.5)


@pytest.fixture(scope="module")
def tiny(profiled):
    """name -> (model, calibration, profile), profiled once per model on first use."""
    return lambda name: profiled(name, STEPS)


def _plan(prof, actions: dict[tuple[int, Unit], Action]):
    """A module-level plan computing everything except ``actions`` ((step, unit) -> action)."""
    problem = prof.to_problem(1.0, granularity="module")
    grid = [[actions.get((t, u), COMPUTE) for u in problem.units] for t in range(STEPS)]
    return problem.to_plan(grid, "test", "HEURISTIC", 0.0)


def test_profile_measures_module_skip_and_prune(tiny):
    _, _, dit = tiny("dit")
    _, _, pixart = tiny("pixart")
    M, K = dit.max_age, len(dit.prune_rates)
    assert dit.e_module_skip.shape == (STEPS, len(dit.units), 3)
    assert dit.e_module_prune.shape == (STEPS, len(dit.units), 3, M + 1, K)
    assert dit.flops_module_prune.shape == (len(dit.units), 3, K)
    cross = MODULE_ROLES.index("cross_attn")
    assert np.isnan(dit.e_module_skip[:, :, cross]).all() and np.isnan(dit.e_module_prune[:, :, cross]).all()
    assert (pixart.e_module_skip > 0).all()
    # every role of these blocks can be pruned (no rotary embeddings, no masks); recomputing more
    # tokens costs more and errs less
    prune = pixart.e_module_prune[2:, :, :, 1]
    assert (prune > 0).all() and (np.diff(prune, axis=-1) <= 0).mean() > 0.9
    assert (np.diff(pixart.flops_module_prune, axis=-1) > 0).all()
    assert (pixart.flops_module_prune[..., -1] < pixart.flops_module).all()
    problem = pixart.to_problem(0.5, granularity="module")
    names = [str(a) for a in problem.actions]
    assert "S" in names and "P0.5" in names
    assert problem.allowed[:, :, names.index("P0.5")].all()
    # errors are weighted by how much each step's error grows, like the block problem's
    doubled = dataclasses.replace(pixart, step_gain=np.full(STEPS, 2.0)).to_problem(0.5, granularity="module")
    np.testing.assert_allclose(doubled.e_skip, 2 * problem.e_skip)
    np.testing.assert_allclose(doubled.e_prune[:, :, 1:], 2 * problem.e_prune[:, :, 1:])


def test_module_token_input_refuses_rotary_and_joint_attention(captured):
    _, _, g = captured("flux")
    double, single = g.blocks[0], g.blocks[-1]
    assert module_token_input(g, double, "ff")[0] is not None
    assert module_token_input(g, double, "ff_context")[0] is not None
    assert module_token_input(g, double, "attn")[0] is None  # joint attention over both streams
    pos, why = module_token_input(g, single, "attn")
    assert pos is None and "rotary" in why
    _, _, p = captured("pixart")
    assert module_token_input(g, single, "proj_mlp")[0] is not None
    assert module_token_input(p, p.blocks[0], "attn2")[0] is not None


@pytest.mark.parametrize("name, role, action", [
    ("dit", "attn", SKIP), ("dit", "mlp", P50), ("dit", "attn", P25),
    ("pixart", "cross_attn", SKIP), ("pixart", "cross_attn", P50), ("pixart", "mlp", P25),
])
def test_runtime_error_matches_the_profile(tiny, name, role, action):
    """One module skips (or prunes) at the last step, all else computes: the error of its block's
    output, seen as the next block's input, is what the profile measured for that action."""
    model, cal, prof = tiny(name)
    t, u = STEPS - 1, 0
    unit = Unit("transformer_blocks", u, role)
    opt = dit_opt.OptimizedTransformer(model, _plan(prof, {(t, unit): action}), profile=prof, compile=False)
    with torch.no_grad():
        cal(opt)  # the first call captures the model (which runs its blocks): not observed
    # Module-level variants run each block as a rewritten copy of its captured graph, which calls
    # the captured sub-modules: the next block's input is what its first norm receives.
    captured = next(iter(opt._runners.values())).graph.module
    ref = record_inputs(cal, model, model.transformer_blocks[u + 1].norm1)
    got = record_inputs(cal, opt, captured.get_submodule(f"transformer_blocks.{u + 1}.norm1"))
    errs = [float((g - r).pow(2).sum() / r.pow(2).sum()) for k, (g, r) in enumerate(zip(got, ref, strict=True))
            if k % STEPS == t]
    r = MODULE_ROLES.index(role)
    if action.kind is ActionKind.SKIP:
        expected = prof.e_module_skip[t, u, r]
    else:
        expected = prof.e_module_prune[t, u, r, 1, prof.prune_rates.index(action.rate)]
    assert expected > 0
    assert np.mean(errs) == pytest.approx(expected, rel=1e-3)
    assert all(float((g - r).abs().max()) == 0 for k, (g, r) in enumerate(zip(got, ref, strict=True))
               if k % STEPS != t)


@pytest.mark.parametrize("unit, action, norms", [
    # a single-stream block whose MLP role is two chained modules (proj_mlp, act_mlp)
    (Unit("single_transformer_blocks", 0, "mlp"), P50, ("norm",)),
    # a two-stream block: ff and ff_context each prune their own stream; the error covers both
    (Unit("transformer_blocks", 0, "mlp"), P25, ("norm1", "norm1_context")),
])
def test_flux_module_prune_matches_the_profile(tiny, unit, action, norms):
    model, cal, prof = tiny("flux")
    t, u = STEPS - 1, prof.units.index(Unit(unit.list_name, unit.index))
    opt = dit_opt.OptimizedTransformer(model, _plan(prof, {(t, unit): action}), profile=prof, compile=False)
    with torch.no_grad():
        cal(opt)
    captured = next(iter(opt._runners.values())).graph.module
    num = den = 0.0
    for norm in norms:
        name = f"{unit.list_name}.{unit.index + 1}.{norm}"
        ref = record_inputs(cal, model, model.get_submodule(name))[t]
        got = record_inputs(cal, opt, captured.get_submodule(name))[t]
        num, den = num + float((got - ref).pow(2).sum()), den + float(ref.pow(2).sum())
    expected = prof.e_module_prune[t, u, MODULE_ROLES.index("mlp"), 1, prof.prune_rates.index(action.rate)]
    assert expected > 0 and num / den == pytest.approx(expected, rel=1e-3)


def test_rewritten_graph_shows_the_actions_and_lowers_as_one_graph(tiny):
    model, cal, prof = tiny("pixart")
    t = STEPS - 1
    plan = _plan(prof, {(t, Unit("transformer_blocks", 0, "attn")): SKIP,
                        (t, Unit("transformer_blocks", 0, "cross_attn")): P50,
                        (t, Unit("transformer_blocks", 1, "mlp")): P25,
                        (t, Unit("transformer_blocks", 1, "attn")): REUSE})
    opt = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=True)
    with torch.no_grad():
        cal(opt)
    code = opt.graph(t).print_readable(print_output=False)
    for name in ("new_zeros", "token_scores", "topk_tokens", "gather_tokens", "scatter_tokens"):
        assert name in code, name
    # PRUNE reads the modules' cached inputs and outputs, written at the step before
    assert {"transformer_blocks.0.attn2/in", "transformer_blocks.0.attn2/out",
            "transformer_blocks.1.ff/in"} <= set(opt._runners[next(iter(opt._runners))].variants[t].reads)
    assert "gather_tokens" not in opt.graph(t - 1).print_readable(print_output=False)
    assert opt.explain(t).graph_break_count == 0


@pytest.mark.parametrize("name, skip_scale", [("dit", 0.1), ("pixart", 0.1)])
def test_counted_flops_of_a_module_plan_within_budget(tiny, name, skip_scale):
    model, cal, prof = tiny(name)
    # make module PRUNE and SKIP clearly worth it (over reuses as old as 7 steps too), so that
    # the plan must use both
    prof = dataclasses.replace(prof, e_module_skip=prof.e_module_skip * skip_scale,
                               e_module_prune=prof.e_module_prune * 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.optimize(model, budget=0.3, calibration=prof, granularity="module", compile=False,
                               progress=False)
    counts = opt.plan.counts()
    assert counts[ActionKind.SKIP] > 0 and counts[ActionKind.PRUNE] > 0, counts
    assert count_flops(cal, opt) <= 0.3 * count_flops(cal, model)
    assert opt.plan.flop_fraction <= 0.3


def test_module_plan_and_profile_save_and_load(tiny, tmp_path):
    model, cal, prof = tiny("pixart")
    t = STEPS - 1
    plan = _plan(prof, {(t, Unit("transformer_blocks", 0, "cross_attn")): P50,
                        (t - 1, Unit("transformer_blocks", 1, "mlp")): SKIP})
    opt = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)
    opt.save(tmp_path / "opt")
    back = dit_opt.load(tmp_path / "opt", model, compile=False)
    assert back.plan.actions == plan.actions
    for name in ("e_module_skip", "e_module_prune", "flops_module_prune"):
        np.testing.assert_array_equal(getattr(back.profile, name), getattr(prof, name))
    with torch.no_grad():
        assert torch.equal(cal(back), cal(opt))


def test_profile_without_module_skip_and_prune_still_plans(tiny, tmp_path):
    """Profiles saved before module SKIP/PRUNE existed load and plan with REUSE and WIDTH only."""
    model, cal, prof = tiny("dit")
    old = dataclasses.replace(prof, e_module_skip=None, e_module_prune=None, flops_module_prune=None)
    old.save(tmp_path / "profile")
    back = SensitivityProfile.load(tmp_path / "profile")
    assert back.e_module_skip is None and back.e_module_prune is None
    problem = back.to_problem(0.5, granularity="module")
    assert {a.kind for a in problem.actions} == {ActionKind.COMPUTE, ActionKind.REUSE, ActionKind.WIDTH}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.optimize(model, budget=0.5, calibration=back, granularity="module", compile=False,
                               progress=False)
    assert opt.plan.counts()[ActionKind.SKIP] == opt.plan.counts()[ActionKind.PRUNE] == 0
    assert count_flops(cal, opt) <= 0.5 * count_flops(cal, model)


def test_module_plan_is_resolved_at_module_granularity_for_another_step_count(tiny):
    """A loop with more steps than calibrated gets a module-level plan re-solved from the profile."""
    model, _, prof = tiny("dit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.optimize(model, budget=0.6, calibration=prof, granularity="module", compile=False,
                               progress=False)
        longer = synthetic_calibration(model, num_inference_steps=STEPS + 2, warn=False)
        with torch.no_grad():
            out = longer(opt)
    assert torch.isfinite(out).all()
    resolved = [p for p in opt._plans.values() if p.num_steps == STEPS + 2]
    assert resolved and all(u.role is not None for u in resolved[0].units)


@pytest.mark.parametrize("name, role", [("dit", "mlp"), ("dit", "attn"), ("pixart", "cross_attn")])
@pytest.mark.parametrize("order", [1, 2])
def test_module_forecast_extrapolates_the_outputs_and_tracks_the_estimate(tiny, name, role, order):
    """One module forecasts at the last step from its outputs at the computes before: the graph
    reads those outputs, the block's error is near the profile's estimate (a reuse error scaled
    by the outputs' own forecast/reuse ratio), and every other step is exact."""
    model, cal, prof = tiny(name)
    t, u = STEPS - 1, 0
    unit = Unit("transformer_blocks", u, role)
    action = Action(ActionKind.FORECAST, order=order)
    plan = _plan(prof, {(t, unit): action})
    assert plan.action(t, unit) == action
    opt = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)
    with torch.no_grad():
        cal(opt)
    runner = next(iter(opt._runners.values()))
    module = {"mlp": "ff", "attn": "attn1", "cross_attn": "attn2"}[role]
    kinds = ["out", "prev", "hist2"][:order + 1]
    assert {f"transformer_blocks.{u}.{module}/{k}" for k in kinds} <= set(runner.variants[t].reads)
    assert "combine" in opt.graph(t).print_readable(print_output=False)
    captured = runner.graph.module
    ref = record_inputs(cal, model, model.transformer_blocks[u + 1].norm1)
    got = record_inputs(cal, opt, captured.get_submodule(f"transformer_blocks.{u + 1}.norm1"))
    errs = [float((g - r).pow(2).sum() / r.pow(2).sum()) for k, (g, r) in enumerate(zip(got, ref, strict=True))
            if k % STEPS == t]
    estimate = prof.e_module_forecast[t, u, MODULE_ROLES.index(role), order - 1, 1, 1]
    assert estimate > 0 and 0.2 * estimate < np.mean(errs) < 5 * estimate
    assert all(float((g - r).abs().max()) == 0 for k, (g, r) in enumerate(zip(got, ref, strict=True))
               if k % STEPS != t)


def test_module_forecasts_of_every_order_are_planned_and_counted_within_budget(tiny):
    from solvers import solve

    model, cal, measured = tiny("dit")
    # higher orders made clearly better where measured, so that the plan must use them
    scale = np.array([1.0, 0.1, 0.01])[None, None, None, :, None, None]
    prof = dataclasses.replace(measured, e_module_forecast=measured.e_module_forecast * 1e-3 * scale)
    problem = prof.to_problem(0.7, granularity="module")
    # TaylorSeer's rule: steps 0..3 compute, 4 and 5 forecast from four evenly spaced computes
    plan = solve(problem, "uniform", warmup=3, interval=4)
    orders = {a.order for row in plan.actions for a in row if a.kind is ActionKind.FORECAST}
    assert orders <= {1, 2, 3} and max(orders) >= 2, plan.summary()  # the best measured order per unit
    opt = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)
    assert count_flops(cal, opt) <= 0.7 * count_flops(cal, model)
    exact = dit_opt.optimize(model, budget=1.0, calibration=measured, granularity="module", compile=False,
                             progress=False)
    with torch.no_grad():
        assert torch.equal(cal(exact), cal(model))


def test_block_prune_is_estimated_beyond_the_measured_age(monkeypatch):
    """A block's ``PRUNE`` is measured up to ``BLOCK_PRUNE_MEASURED_AGE`` and estimated beyond it
    (that age's error scaled by the cached residual's squared miss): the estimates are recorded
    against a real block call when asked, and are near it."""
    from passes import annotate_sensitivity

    monkeypatch.setattr(annotate_sensitivity, "BLOCK_PRUNE_MEASURED_AGE", 2)
    model, _ = dit_opt.testing.tiny_model("dit")
    cal = synthetic_calibration(model, num_inference_steps=8, warn=False)
    rows: list = []
    monkeypatch.setattr(annotate_sensitivity._Probe, "rerun_module_reuse", rows)
    measured = dit_opt.profile(model, cal, progress=False, max_age=4)
    block = [(age, err, est) for role, _, age, err, est in rows if role == "block"]
    assert {age for age, _, _ in block} == {3, 4}
    err, est = np.array([r[1:] for r in block]).sum(axis=0)
    assert 0.5 < est / err < 2
    monkeypatch.setattr(annotate_sensitivity._Probe, "rerun_module_reuse", None)
    estimated = dit_opt.profile(model, cal, progress=False, max_age=4)
    # the measured ages agree to float noise; the estimated ones differ from the re-runs
    np.testing.assert_allclose(estimated.e_prune[:, :, :3], measured.e_prune[:, :, :3], rtol=1e-4, atol=1e-12)
    old = estimated.e_prune[4:, :, 3:]  # step t reads caches up to age t
    assert np.isfinite(old).all() and (old > 0).all() and not np.allclose(old, measured.e_prune[4:, :, 3:])
