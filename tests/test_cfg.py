"""CFG: one half of a classifier-free-guidance batch derived from the other (profile, problem, rewrite, runtime)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import dit_opt
from dit_opt.errors import ConfigError
from dit_opt.executor import cfg_merge
from dit_opt.flops import flop_counter
from dit_opt.plan import COMPUTE, ActionKind, cfg_action
from dit_opt.testing import record_inputs, tiny_model, unbudgeted_plan
from solvers import solve

STEPS = 6
NULL = 10  # the tiny DiT's null class (num_embeds_ada_norm=11)


def guided(uncond_first: bool = False, same: bool = False, scale: float = 3.0, batched: bool = True):
    """A DDIM loop with guidance, both halves in one call (``same``: both halves conditioned alike;
    ``batched=False``: the two branches in two calls)."""

    def run(m):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 8, 8, generator=gen)
        cond = torch.tensor([1, 2])
        null = cond.clone() if same else torch.full((2,), NULL)
        labels = torch.cat([null, cond] if uncond_first else [cond, null])
        sched = DDIMScheduler()
        sched.set_timesteps(STEPS)
        for t in sched.timesteps:
            if batched:
                out = m(hidden_states=torch.cat([x, x]), timestep=t.expand(4), class_labels=labels).sample[:, :4]
                a, b = out.chunk(2)
            else:
                a, b = (m(hidden_states=x, timestep=t.expand(2), class_labels=lab).sample[:, :4]
                        for lab in labels.chunk(2))
            c, u = (b, a) if uncond_first else (a, b)
            x = sched.step(u + scale * (c - u), t, x).prev_sample
        return x

    return run


@pytest.fixture(scope="module")
def tiny():
    model, _ = tiny_model("dit")
    cal = guided()
    return model, cal, dit_opt.profile(model, cal, progress=False)


def test_profile_measures_cfg_and_finds_the_unconditional_half(tiny):
    model, _, prof = tiny
    assert prof.e_cfg is not None and prof.e_cfg.shape == prof.e_reuse.shape
    assert prof.cfg_branch == 1  # the unconditional half is second here
    # guidance 3: an error in the unconditional half moves the update (1 - 3) times, twice squared
    # against an error common to both halves (DDIM's x0 clipping makes the fitted update inexact)
    assert prof.report["cfg_amplification"] == pytest.approx(2 * (3.0 - 1) ** 2, rel=0.25)
    # deriving one half from the other plus the cached difference beats reusing both halves
    assert prof.e_cfg[2:, :, 1].mean() / prof.report["cfg_amplification"] < prof.e_reuse[2:, :, 1].mean()
    first = dit_opt.profile(model, guided(uncond_first=True), progress=False)
    assert first.cfg_branch == 0
    menu = [str(a) for a in prof.to_problem(0.5).actions]
    assert "G1" in menu and "G1" not in [str(a) for a in prof.to_problem(0.5, actions=("reuse",)).actions]


def test_no_guidance_batch_no_cfg_and_asking_for_it_is_an_error(tiny):
    model, _, _ = tiny
    prof = dit_opt.profile(model, guided(batched=False), progress=False)
    assert prof.e_cfg is None and prof.cfg_branch is None
    assert all(a.kind is not ActionKind.CFG for a in prof.to_problem(0.5).actions)
    with pytest.raises(ConfigError, match="drop 'cfg'.*valid here: reuse"):
        dit_opt.optimize(model, 0.5, calibration=prof, compile=False, progress=False, actions=("reuse", "cfg"))


def test_merge_is_exact_when_the_halves_are_equal():
    x = torch.randn(4, 5, 3)
    x[2:] = x[:2]
    res = torch.randn(4, 5, 3)
    res[2:] = res[:2]
    y = x[:2] + torch.randn(2, 5, 3)
    for branch in (0, 1):
        out = cfg_merge(x, y, res, branch)
        assert torch.equal(out[:2], out[2:]) and torch.equal(out[2:] if branch == 0 else out[:2], y)


def test_cfg_gives_the_full_output_when_the_branches_are_equal(tiny):
    model, _, prof = tiny
    cal = guided(same=True)
    grid = [[COMPUTE if t in (0, 3) else cfg_action(1)] * len(prof.units) for t in range(STEPS)]
    opt = dit_opt.OptimizedTransformer(model, unbudgeted_plan(prof, grid), profile=prof, compile=False)
    with torch.no_grad():
        ref, got = cal(model), cal(opt)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert "cfg_merge" in opt.graph(1).code
    # guidance off (one branch per call): the CFG blocks compute, and the plan here is then all compute
    unguided = guided(batched=False)
    with torch.no_grad(), pytest.warns(UserWarning, match="not guidance batches"):
        assert torch.allclose(unguided(opt), unguided(model), atol=1e-5, rtol=1e-5)
    # a batch of the guidance shape whose halves differ: no half can be derived, the blocks compute
    opt.reset()
    x = torch.randn(4, 4, 8, 8)
    labels = torch.tensor([1, 2, NULL, NULL])
    args = {"timestep": torch.full((4,), 800.0), "class_labels": labels}
    with torch.no_grad(), pytest.warns(UserWarning, match="not guidance batches"):
        opt(hidden_states=torch.cat([x[:2], x[:2]]), timestep=torch.full((4,), 999.0), class_labels=labels)
        got = opt(hidden_states=x, **args).sample
    assert torch.allclose(got, model(hidden_states=x, **args).sample, atol=1e-5, rtol=1e-5)
    assert opt.stats()["steps"][1]["actions"] == {"compute": len(prof.units)}


def test_runtime_error_matches_the_profile(tiny):
    """One block derives the unconditional half at the last step: the error of its output, seen
    as the next block's input, is what the profile measured."""
    model, cal, prof = tiny
    u, t = 1, STEPS - 1
    grid = [[COMPUTE] * len(prof.units) for _ in range(STEPS)]
    grid[t][u] = cfg_action(prof.cfg_branch)
    opt = dit_opt.OptimizedTransformer(model, unbudgeted_plan(prof, grid), profile=prof, compile=False)
    with torch.no_grad():
        cal(opt)
    nxt = model.transformer_blocks[u + 1]
    ref, got = record_inputs(cal, model, nxt), record_inputs(cal, opt, nxt)
    errs = [float((g - r).pow(2).sum() / r.pow(2).sum()) for k, (g, r) in enumerate(zip(got, ref, strict=True))
            if k % STEPS == t]
    assert np.mean(errs) == pytest.approx(prof.e_cfg[t, u, 1] / prof.report["cfg_amplification"], rel=1e-3)
    assert all(float((g - r).abs().max()) == 0 for k, (g, r) in enumerate(zip(got, ref, strict=True))
               if k % STEPS != t)


def test_solver_uses_cfg_within_budget_and_exact_at_one(tiny):
    model, cal, prof = tiny
    # make CFG clearly the cheapest error per FLOP, so the plan must use it
    cheap = dataclasses.replace(prof, e_cfg=prof.e_cfg * 1e-3)
    opt = dit_opt.optimize(model, 0.6, calibration=cheap, compile=False, progress=False, select=False)
    assert opt.plan.counts()[ActionKind.CFG] > 0
    with torch.no_grad(), flop_counter() as fc_full:
        cal(model)
    with torch.no_grad(), flop_counter() as fc:
        cal(opt)
    assert fc.get_total_flops() <= (0.6 + 0.01) * fc_full.get_total_flops()
    assert solve(cheap.to_problem(1.0), "cpsat").counts()[ActionKind.CFG] == 0


def test_module_cfg_profiled_exact_when_branches_equal_and_counted(tiny):
    """CFG of single attention and MLP modules: measured per role, offered at module granularity,
    exact when the two halves are conditioned alike, and within budget when the solver takes it."""
    model, cal, prof = tiny
    assert prof.e_module_cfg is not None and prof.e_module_cfg.shape == prof.e_module_reuse.shape
    roles = ~np.isnan(prof.e_module_reuse[2:, :, :, 1]).all(axis=(0, 1))
    amplified = prof.report["cfg_amplification"]
    assert prof.e_module_cfg[2:, :, roles, 1].mean() / amplified < prof.e_module_reuse[2:, :, roles, 1].mean()
    problem = prof.to_problem(1.0, granularity="module")
    assert "G1" in [str(a) for a in problem.actions]
    assert all(u.role is not None for u in problem.units)
    # every module derives the second half at every step between two computes
    grid = [[COMPUTE if t in (0, 3) else cfg_action(1)] * len(problem.units) for t in range(STEPS)]
    opt = dit_opt.OptimizedTransformer(model, unbudgeted_plan(prof, grid, "module"), profile=prof, compile=False)
    same = guided(same=True)
    with torch.no_grad():
        assert torch.allclose(same(opt), same(model), atol=1e-5, rtol=1e-5)
    assert any("cfg_merge_output" in getattr(m, "code", "") for m in opt.graph(1).children())
    with torch.no_grad():  # a real guidance batch: the derived halves differ from the full model's
        assert not torch.allclose(cal(opt), cal(model), atol=1e-5, rtol=1e-5)
    unguided = guided(batched=False)
    opt.reset()
    with torch.no_grad(), pytest.warns(UserWarning, match="not guidance batches"):
        assert torch.allclose(unguided(opt), unguided(model), atol=1e-5, rtol=1e-5)
    cheap = dataclasses.replace(prof, e_module_cfg=prof.e_module_cfg * 1e-3)
    opt = dit_opt.optimize(model, 0.7, calibration=cheap, compile=False, progress=False, select=False,
                           granularity="module")
    assert opt.plan.counts()[ActionKind.CFG] > 0
    with torch.no_grad(), flop_counter() as fc_full:
        cal(model)
    with torch.no_grad(), flop_counter() as fc:
        cal(opt)
    assert fc.get_total_flops() <= (0.7 + 0.01) * fc_full.get_total_flops()


def test_module_cfg_on_flux_whose_text_is_as_long_as_the_batch():
    """Flux's ``txt_ids`` have one row per text token: with as many tokens as samples they look
    batch-major, and the capture at half the batch must keep them whole."""
    from dit_opt.synthetic import example_inputs

    model, _ = tiny_model("flux")
    inputs = example_inputs(model, batch_size=4, text_tokens=4, seed=0)
    assert inputs["txt_ids"].shape[0] == 4
    for k in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        inputs[k][2:] = inputs[k][:2]  # a guidance batch whose two branches are conditioned alike

    def cal(m):
        return torch.stack([m(**{**inputs, "timestep": inputs["timestep"] * f}).sample for f in (1.0, 0.7, 0.4)])

    prof = dit_opt.profile(model, cal, progress=False, probes=0, max_age=2, prune_rates=(0.5,), widths=(0.5,))
    problem = prof.to_problem(1.0, granularity="module")
    grid = [[COMPUTE if t == 0 else cfg_action(1)] * len(problem.units) for t in range(3)]
    opt = dit_opt.OptimizedTransformer(model, unbudgeted_plan(prof, grid, "module"), profile=prof, compile=False)
    with torch.no_grad():
        assert torch.allclose(cal(opt), cal(model), atol=1e-5, rtol=1e-4)
    assert any("cfg_merge_output" in getattr(m, "code", "") for m in opt.graph(1).children())
