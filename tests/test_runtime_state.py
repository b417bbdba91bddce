"""The runtime's state: no rejected, interrupted or reordered call changes a later generation.

Every generation an ``OptimizedTransformer`` runs must equal what a fresh module gives on the
same inputs, whatever calls came before it: rejected ones (wrong dtype, channel count or
keyword), generations stopped part-way (at their first step too), guidance batched or apart,
guidance off, other batch sizes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dit_opt
from dit_opt.runtime import OptimizedTransformer

STEPS = 10
#: how a generation calls the model: guidance batched (one call of 2 x samples), guidance apart
#: (two calls per step, the same latents), or no guidance
MODES = ("batched", "batched2", "apart", "single")


@pytest.fixture(scope="module")
def setup(profiled):
    model, _, prof = profiled("dit", STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # at 0.25 the second step reuses the first one's cache: a stale cache would show
        opt = dit_opt.optimize(model, budget=0.25, calibration=prof, compile=False, progress=False)
    assert opt.plan.actions[1][0].kind is dit_opt.ActionKind.REUSE
    references: dict = {}

    def reference(seed: int, mode: str) -> torch.Tensor:
        """A fresh module's generation (captures shared with ``opt``: they hold no state)."""
        if (seed, mode) not in references:
            fresh = OptimizedTransformer(model, opt.plan, profile=prof, compile=False)
            fresh._runners = opt._runners
            references[seed, mode] = generate(fresh, seed, mode)
        return references[seed, mode]

    return model, opt, reference


def _call(m, lat, labels, t):
    return m(hidden_states=lat, timestep=torch.full((lat.shape[0],), float(t)), class_labels=labels).sample[:, :4]


def generate(m, seed: int, mode: str, stop: int | None = None) -> torch.Tensor | None:
    """A DDIM loop of ``STEPS`` steps calling ``m`` as ``mode`` says; ``stop``: stop before that step."""
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(seed)
    n = 2 if mode == "batched2" else 1
    lat = torch.randn(n, 4, 8, 8, generator=g)
    cond, uncond = torch.randint(0, 10, (n,), generator=g), torch.full((n,), 10)
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            if stop is not None and k == stop:
                return None
            if mode == "single":
                pred = _call(m, lat, cond, t)
            else:
                if mode == "apart":
                    c, u = _call(m, lat, cond, t), _call(m, lat, uncond, t)
                else:
                    c, u = _call(m, torch.cat([lat, lat]), torch.cat([cond, uncond]), t).chunk(2)
                pred = u + 3.0 * (c - u)
            lat = sched.step(pred, t, lat).prev_sample
    return lat


def _bad_call(m, kind: str, t: float) -> None:
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([1, 10])
    ts = torch.full((2,), float(t))
    if kind == "float64":
        m(hidden_states=x.double(), timestep=ts, class_labels=labels)
    elif kind == "channels":
        m(hidden_states=torch.randn(2, 3, 8, 8), timestep=ts, class_labels=labels)
    else:
        m(hidden_states=x, timestep=ts, class_labels=labels, not_an_input=1)


def _state(opt):
    return (vars(opt._tracker).copy(), {k: (v.signature, dict(v.cache)) for k, v in opt._states.items()},
            opt._stats.generations, list(opt._stats.steps), opt._active, opt._first_t)


@pytest.mark.parametrize("kind", ["float64", "channels", "keyword"])
def test_a_rejected_call_leaves_the_module_as_it_was(setup, kind):
    model, opt, reference = setup
    opt.reset()
    generate(opt, 3, "batched", stop=4)
    before = _state(opt)
    with pytest.raises(dit_opt.InputMismatchError, match="unchanged"):
        _bad_call(opt, kind, 900.0)
    after = _state(opt)
    assert before[0] == after[0] and before[2:] == after[2:]
    assert before[1].keys() == after[1].keys()
    for k in before[1]:
        assert before[1][k][0] == after[1][k][0]
        assert all(before[1][k][1][n] is after[1][k][1][n] for n in before[1][k][1])
    assert torch.equal(generate(opt, 1, "batched"), reference(1, "batched"))


@pytest.mark.parametrize("mode", ["batched", "apart"])
@pytest.mark.parametrize("stop", [1, 4])
def test_a_generation_after_an_interrupted_one_is_a_fresh_one(setup, mode, stop):
    _, opt, reference = setup
    opt.reset()
    generate(opt, 5, mode, stop=stop)  # other noise, stopped after `stop` steps
    assert torch.equal(generate(opt, 1, mode), reference(1, mode))
    generate(opt, 1, mode, stop=stop)  # the same noise, stopped
    assert torch.equal(generate(opt, 1, mode), reference(1, mode))


def test_guidance_apart_stopped_between_its_two_calls(setup):
    model, opt, reference = setup
    opt.reset()
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(STEPS)
    with torch.no_grad():  # the conditional call of the first step only, then stopped
        _call(opt, torch.randn(1, 4, 8, 8), torch.tensor([1]), sched.timesteps[0])
    assert torch.equal(generate(opt, 2, "apart"), reference(2, "apart"))


def test_pipeline_step_index_in_cache_context(setup):
    """Pipelines that pass the step index (and more) to cache_context: the index decides the step."""
    _, opt, reference = setup
    opt.reset()
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(4)
    lat = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randint(0, 10, (1,), generator=g)
    uncond = torch.full((1,), 10)

    def run(stop=None):
        x = lat
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                if i == stop:
                    return None
                with opt.cache_context("cond", step_index=i, sigma=0.5, num_inference_steps=STEPS):
                    c = _call(opt, x, cond, t)
                with opt.cache_context("uncond", step_index=i):
                    u = _call(opt, x, uncond, t)
                x = sched.step(u + 3.0 * (c - u), t, x).prev_sample
        return x

    full = run()
    assert set(opt._states) == {"cond", "uncond"}
    run(stop=1)
    assert torch.equal(run(), full)
    opt.reset()
    with torch.no_grad():
        x = lat
        for t in sched.timesteps:  # the same loop without names: one guidance pair per step
            c, u = _call(opt, x, cond, t), _call(opt, x, uncond, t)
            x = sched.step(u + 3.0 * (c - u), t, x).prev_sample
    assert torch.equal(x, full)


_ops = st.one_of(
    st.tuples(st.just("gen"), st.integers(0, 2), st.sampled_from(MODES), st.none() | st.integers(1, STEPS - 1)),
    st.tuples(st.just("bad"), st.sampled_from(["float64", "channels", "keyword"]), st.sampled_from([900.0, 500.0])),
    st.tuples(st.just("reset")),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_ops, min_size=1, max_size=6))
def test_any_sequence_of_calls_leaves_every_generation_as_a_fresh_module_gives_it(setup, ops):
    """Property: after any sequence of good, bad and interrupted calls, each complete generation
    equals a fresh module's on the same inputs."""
    _, opt, reference = setup
    for op in ops:
        if op[0] == "gen":
            _, seed, mode, stop = op
            out = generate(opt, seed, mode, stop=stop)
            if stop is None:
                assert torch.equal(out, reference(seed, mode)), (ops, op)
        elif op[0] == "bad":
            with pytest.raises(dit_opt.InputMismatchError):
                _bad_call(opt, op[1], op[2])
        else:
            opt.reset()
