"""optimize() end to end on tiny models: exactness, FLOP budget, determinism, branches, inspect, save/load."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import dit_opt
from dit_opt.calibration import synthetic_calibration
from dit_opt.flops import count_flops
from dit_opt.testing import tiny_model, tiny_names

STEPS = 10


def _quiet_optimize(model, budget, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dit_opt.optimize(model, budget=budget, compile=False, progress=False, **kw)


@pytest.fixture(scope="session")
def dit_setup():
    model, _ = tiny_model("dit")
    cal = synthetic_calibration(model, num_inference_steps=STEPS, warn=False)
    prof = dit_opt.profile(model, cal, progress=False)
    opts = {b: _quiet_optimize(model, b, calibration=prof) for b in (1.0, 0.5, 0.25)}
    return model, cal, prof, opts


def test_budget_one_is_exact(dit_setup):
    model, cal, _, opts = dit_setup
    with torch.no_grad():
        ref, got = cal(model), cal(opts[1.0])
    diff = float((ref - got).abs().max())
    assert diff <= 1e-5, f"budget 1.0 differs from the model by {diff}"


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_counted_flops_within_budget(dit_setup, budget):
    model, cal, _, opts = dit_setup
    full, got = count_flops(cal, model), count_flops(cal, opts[budget])
    assert got <= (budget + 0.01) * full, f"budget {budget}: counted {got / full:.4f} of the full FLOPs"
    assert opts[budget].plan.flop_fraction <= budget + 1e-9


def test_lower_budget_reuses_more(dit_setup):
    _, _, _, opts = dit_setup
    computes = {b: opts[b].plan.counts()[dit_opt.ActionKind.COMPUTE] for b in opts}
    assert computes[1.0] > computes[0.5] > computes[0.25], computes


def test_same_generation_twice_is_identical(dit_setup):
    _, cal, _, opts = dit_setup
    with torch.no_grad():
        a, b = cal(opts[0.5]), cal(opts[0.5])
    assert torch.equal(a, b)


def test_interleaved_generations_do_not_disturb_each_other(dit_setup):
    """Two loops stepped in lockstep, each named with cache_context, get separate caches."""
    model, _, _, opts = dit_setup
    opt = opts[0.5]
    from diffusers import DDIMScheduler

    def loop_inputs(seed):
        return dit_opt.synthetic.example_inputs(model, seed=seed)

    def run(seeds):
        sched = DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(STEPS)
        ins = [loop_inputs(s) for s in seeds]
        lat = [i["hidden_states"].clone() for i in ins]
        opt.reset()
        for t in sched.timesteps:
            for k, i in enumerate(ins):
                i = dict(i, hidden_states=lat[k], timestep=torch.full((lat[k].shape[0],), float(t)))
                with opt.cache_context(f"loop{k}"):
                    pred = opt(**i).sample[:, : lat[k].shape[1]]
                lat[k] = sched.step(pred, t, lat[k]).prev_sample
        return lat

    with torch.no_grad():
        alone_a, alone_b = run([1])[0], run([2])[0]
        both = run([1, 2])
    assert torch.equal(both[0], alone_a) and torch.equal(both[1], alone_b)


def test_cache_context_branches(dit_setup):
    """A pipeline naming CFG branches with cache_context gets one cache per name."""
    model, _, _, opts = dit_setup
    opt = opts[0.5]
    opt.reset()
    inputs = dit_opt.synthetic.example_inputs(model)
    with torch.no_grad():
        for t in (900.0, 800.0):
            for name in ("cond", "uncond"):
                with opt.cache_context(name):
                    opt(**dict(inputs, timestep=torch.full((2,), t)))
    assert {"cond", "uncond"} <= set(opt._states)
    opt.reset()


def test_graph_shows_the_rewrites(dit_setup):
    _, _, _, opts = dit_setup
    opt = opts[0.25]
    codes = [opt.graph(t).code for t in range(STEPS)]
    assert "self.transformer_blocks_0(" in codes[0]
    assert any("reuse" in c for c in codes), "no step reads the cache"
    with pytest.raises(IndexError):
        opt.graph(STEPS)


def test_stats_after_a_generation(dit_setup):
    _, cal, _, opts = dit_setup
    opt = opts[0.5]
    with torch.no_grad():
        cal(opt)
    st = opt.stats()
    assert len(st["steps"]) == STEPS and st["generations"] >= 1
    assert st["flop_fraction"] == pytest.approx(opt.plan.flop_fraction, rel=1e-6)
    assert st["cache_bytes"] > 0
    assert sum(st["steps"][0]["actions"].values()) == len(opt.plan.units)


def test_batch_size_change_works(dit_setup):
    model, _, _, opts = dit_setup
    opt = opts[1.0]
    opt.reset()
    inputs = dit_opt.synthetic.example_inputs(model, batch_size=3)
    with torch.no_grad():
        got = opt(**inputs).sample
        ref = model(**inputs).sample
    assert got.shape[0] == 3 and float((got - ref).abs().max()) <= 1e-5
    opt.reset()


def test_other_step_count_is_resolved_from_the_profile(dit_setup):
    model, _, prof, opts = dit_setup
    opt = opts[0.5]
    cal5 = synthetic_calibration(model, num_inference_steps=5, warn=False)
    calls = prof.report["calls"]
    with torch.no_grad():
        cal5(opt)
    plans = [p for p in opt._plans.values() if p.num_steps == 5]
    assert plans and plans[0].flop_fraction <= 0.5 + 1e-9
    assert prof.report["calls"] == calls  # nothing was profiled again
    full, got = count_flops(cal5, model), count_flops(cal5, opt)
    assert got <= 0.51 * full


def test_bad_budget():
    model, _ = tiny_model("dit")
    for bad in (0.0, 1.5, float("nan"), "half"):
        with pytest.raises(dit_opt.ConfigError, match="budget"):
            dit_opt.optimize(model, budget=bad)


def test_save_and_load_replays_the_plan(dit_setup, tmp_path):
    model, cal, _, opts = dit_setup
    opt = opts[0.5]
    opt.save(tmp_path / "opt")
    loaded = dit_opt.load(tmp_path / "opt", model, compile=False)
    assert loaded.plan == opt.plan
    # before its first call a loaded module shows its graphs (captured from synthetic inputs)
    assert loaded.graph(STEPS - 1).code == opt.graph(STEPS - 1).code
    with torch.no_grad():
        assert torch.equal(cal(loaded), cal(opt))
    files = {p.name for p in (tmp_path / "opt").iterdir()}
    assert {"plan.json", "profile.json", "profile.safetensors", "dit_opt.json"} <= files
    assert not any(f.endswith((".pt", ".pkl", ".bin")) for f in files)


def test_load_refuses_another_model(dit_setup, tmp_path):
    _, _, _, opts = dit_setup
    opts[0.5].save(tmp_path / "opt")
    other, _ = tiny_model("dit", seed=1)  # same class and config, other weights
    with pytest.raises(dit_opt.ArtifactError, match="other weights"):
        dit_opt.load(tmp_path / "opt", other)
    pixart, _ = tiny_model("pixart")
    with pytest.raises(dit_opt.ArtifactError, match="made for a DiTTransformer2DModel"):
        dit_opt.load(tmp_path / "opt", pixart)


def test_load_refuses_a_model_with_one_weight_changed(dit_setup, tmp_path):
    """The fingerprint hashes every weight: one changed value is caught (the sampled sum saved
    before missed it), and a directory saved with that older fingerprint still loads."""
    from dit_opt.fingerprint import legacy_weights_sum

    model, _, _, opts = dit_setup
    opts[0.5].save(tmp_path / "opt")
    edited, _ = tiny_model("dit")
    name, weight = max(edited.state_dict().items(), key=lambda kv: kv[1].numel())
    before = legacy_weights_sum(edited)
    with torch.no_grad():
        weight.view(-1)[-1] += 0.5
    assert legacy_weights_sum(edited) == before  # the old fingerprint cannot see it
    with pytest.raises(dit_opt.ArtifactError, match="other weights"):
        dit_opt.load(tmp_path / "opt", edited)
    meta = json.loads((tmp_path / "opt" / "dit_opt.json").read_text())
    meta["model"] = {k: v for k, v in meta["model"].items() if k != "weights_sha256"} | {"weights": before}
    (tmp_path / "opt" / "dit_opt.json").write_text(json.dumps(meta))
    assert dit_opt.load(tmp_path / "opt", model, compile=False).plan == opts[0.5].plan


def test_load_refuses_a_corrupt_directory(dit_setup, tmp_path):
    model, _, _, opts = dit_setup
    d = opts[0.5].save(tmp_path / "opt")
    plan = json.loads((d / "plan.json").read_text())
    plan["budget"] = 0.9
    (d / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(dit_opt.ArtifactError, match="checksum"):
        dit_opt.load(d, model)
    with pytest.raises(dit_opt.ArtifactError, match="not a saved dit-opt model"):
        dit_opt.load(tmp_path / "nothing", model)


def test_profile_round_trip(dit_setup, tmp_path):
    _, _, prof, _ = dit_setup
    prof.save(tmp_path)
    back = dit_opt.SensitivityProfile.load(tmp_path)
    assert back.units == prof.units and back.timesteps == prof.timesteps
    assert (back.e_reuse == prof.e_reuse).all() and set(back.channel_order) == set(prof.channel_order)


def test_self_calibration_with_no_arguments():
    """optimize(model, budget) alone works on a known class, and warns that real data is better."""
    model, _ = tiny_model("dit")
    with pytest.warns(UserWarning, match="synthetic inputs"):
        opt = dit_opt.optimize(model, budget=0.5, compile=False, progress=False)
    assert opt.plan.flop_fraction <= 0.5


@pytest.mark.parametrize("name", [n for n in tiny_names() if n != "dit"])
def test_every_tiny_config_optimizes(name):
    model, _ = tiny_model(name)
    cal = synthetic_calibration(model, num_inference_steps=6, warn=False)
    opt = _quiet_optimize(model, 0.5, calibration=cal)
    full, got = count_flops(cal, model), count_flops(cal, opt)
    assert got <= 0.51 * full, f"{name}: counted {got / full:.4f} of the full FLOPs"


def test_recorded_trajectories_as_calibration(dit_setup):
    from dit_opt.calibration import record_trajectories

    model, cal, _, _ = dit_setup
    calls = record_trajectories(model, cal)
    assert len(calls) == STEPS
    opt = _quiet_optimize(model, 0.5, calibration=calls)
    assert opt.plan.num_steps == STEPS and opt.plan.flop_fraction <= 0.5
    with pytest.raises(dit_opt.DitOptError, match="keyword-argument dicts"):
        _quiet_optimize(model, 0.5, calibration=[1, 2])


def _bf16_roundtrip(device: str) -> None:
    model, _ = tiny_model("dit")
    model = model.to(device=device, dtype=torch.bfloat16)
    cal = synthetic_calibration(model, num_inference_steps=6, warn=False)
    for budget in (1.0, 0.5):
        opt = _quiet_optimize(model, budget, calibration=cal)
        with torch.no_grad():
            ref, got = cal(model), cal(opt)
        assert got.dtype == torch.bfloat16 and got.device.type == device
        if budget == 1.0:
            assert torch.equal(ref, got)
        assert opt.plan.flop_fraction <= budget


def test_bfloat16_on_cpu():
    _bf16_roundtrip("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bfloat16_on_cuda():
    _bf16_roundtrip("cuda")


def test_module_level_profile_and_plan(dit_setup):
    """The profile measures REUSE of each block's attention and MLP; the solver plans per module."""
    from solvers import solve

    model, _, prof, _ = dit_setup
    e = prof.e_module_reuse
    assert e.shape == (STEPS, len(prof.units), 3, prof.max_age + 1)
    attn, cross, mlp = e[2:, :, 0, 1], e[2:, :, 1, 1], e[2:, :, 2, 1]
    assert (attn > 0).all() and (mlp > 0).all() and torch.isnan(torch.as_tensor(cross)).all()
    assert (e[4:, :, 0, 3] >= e[4:, :, 0, 1]).mean() > 0.5  # older caches are worse, mostly
    problem = prof.to_problem(0.5, granularity="module")
    assert {u.role.value for u in problem.units} == {"attn", "mlp"}
    plan = solve(problem, "cpsat", relative_gap=0.005, time_limit_s=5)
    assert plan.flop_fraction <= 0.5 and plan.counts()[dit_opt.ActionKind.REUSE] > 0
    # the runtime executes it: counted FLOPs match the plan
    model_cal = dit_setup[1]
    opt = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)
    assert count_flops(model_cal, opt) <= 0.501 * count_flops(model_cal, model)
    assert "cache_transformer_blocks" in opt.graph(STEPS - 1).code or any(
        "cache_" in opt.graph(t).code for t in range(STEPS))


def test_module_level_optimize_is_exact_at_full_budget(dit_setup):
    model, cal, prof, _ = dit_setup
    opt = _quiet_optimize(model, 1.0, calibration=prof, granularity="module")
    assert all(u.role is not None for u in opt.plan.units)
    with torch.no_grad():
        assert float((cal(model) - cal(opt)).abs().max()) <= 1e-5
    half = _quiet_optimize(model, 0.5, calibration=prof, granularity="module")
    assert count_flops(cal, half) <= 0.51 * count_flops(cal, model)
    assert half.explain(STEPS - 1).graph_break_count == 0
