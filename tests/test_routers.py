"""Elastic routers (E-DiT): exactness at full capacity, per-sample decisions, training to a
budget, artifacts and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import dit_opt
from dit_opt.errors import ArtifactError, ConfigError, InputMismatchError
from dit_opt.routed import RoutedTransformer
from dit_opt.routers import DEFAULT_WIDTHS, RouterConfig, RouterSet
from dit_opt.testing import tiny_model

STEPS = 6


def _loop(module, x, labels, steps=STEPS):
    """A small denoising loop (falling integer timesteps, a fixed step size), outputs per step."""
    outs = []
    for t in torch.linspace(900, 100, steps).round():
        out = module(hidden_states=x, timestep=t.expand(x.shape[0]), class_labels=labels).sample
        outs.append(out)
        x = x - 0.1 * out[:, : x.shape[1]]
    return torch.stack(outs)


def _routers(graph, widths=DEFAULT_WIDTHS, **changes) -> RouterSet:
    from dit_opt.routed import routed_blocks

    blocks, _ = routed_blocks(graph, widths)
    shapes = [dict(b.spec.inputs)[b.x_name].shape for b in blocks]
    config = RouterConfig(blocks=tuple(b.spec.name for b in blocks), dims=tuple(s[-1] for s in shapes),
                          tokens=tuple(s[1] for s in shapes), widths=widths, **changes)
    return RouterSet(config)


def _randomise(routers: RouterSet, seed: int = 0) -> None:
    """Gates and widths that differ from sample to sample (and from step to step)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in routers.routers.values():
            r.gate.weight.copy_(torch.randn(r.gate.weight.shape, generator=g) * 3)
            r.gate.bias.zero_()
            r.width.weight.copy_(torch.randn(r.width.weight.shape, generator=g) * 3)
            r.width.bias.zero_()
            r.ada[1].weight.copy_(torch.randn(r.ada[1].weight.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def dit(captured):
    model, inputs, graph = captured("dit")
    g = torch.Generator().manual_seed(3)
    x = torch.randn((4, *inputs["hidden_states"].shape[1:]), generator=g)
    labels = torch.tensor([0, 1, 2, 3]) % model.config.num_embeds_ada_norm
    return model, graph, x, labels


def test_full_capacity_routers_reproduce_the_model_exactly(dit):
    model, graph, x, labels = dit
    for decide in ("block", "step"):
        routed = RoutedTransformer.from_graph(graph, _routers(graph, decide=decide))
        with torch.no_grad():
            assert torch.equal(_loop(routed, x, labels), _loop(model, x, labels))
        st = routed.stats()
        assert st["samples"] == 4 and st["flop_fraction"] == pytest.approx(1.0 + sum(routed._router_flops)
                                                                           / routed.full_flops)
        assert all(set(kinds) == {"width 1"} for kinds in st["decisions"].values())


@pytest.mark.parametrize("closed", ["forecast", "reuse", "skip"])
def test_per_sample_decisions_give_the_samples_run_one_by_one(dit, closed):
    model, graph, x, labels = dit
    routers = _routers(graph, closed=closed, margin=0.1 if closed == "skip" else 0.0, reuse_from=0.0)
    _randomise(routers)
    routed = RoutedTransformer.from_graph(graph, routers)
    with torch.no_grad():
        batch = _loop(routed, x, labels)
        kinds = {k for d in routed.stats()["decisions"].values() for k in d}
        alone = torch.cat([_loop(routed, x[i:i + 1], labels[i:i + 1]) for i in range(4)], dim=1)
    assert len(kinds) >= 3, kinds  # the rows of one call were routed differently
    assert torch.allclose(batch, alone, atol=1e-5)
    # and not the full model's: the decisions changed the outputs
    with torch.no_grad():
        assert not torch.allclose(batch, _loop(model, x, labels), atol=1e-3)
    fractions = routed.stats()
    assert fractions["samples"] == 8 and fractions["per_sample"]["min"] < fractions["per_sample"]["max"]


def test_a_hard_cap_holds_for_every_sample(dit):
    model, graph, x, labels = dit
    routed = RoutedTransformer.from_graph(graph, _routers(graph), cap=0.5)
    with torch.no_grad():
        _loop(routed, x, labels)
    block = max(b.flops[-1] for b in routed.blocks) / routed.full_flops
    st = routed.stats()
    assert st["per_sample"]["max"] <= 0.5 + 1e-9 and st["per_sample"]["min"] > 0.5 - block - 0.05


@pytest.fixture(scope="module")
def trained():
    from dit_opt.calibration import synthetic_calibration

    model, _ = tiny_model("dit")
    cal = synthetic_calibration(model, num_inference_steps=STEPS, warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        routed = dit_opt.train_routers(model, cal, budget=0.5, steps=60, progress=False)
    return model, cal, routed


def test_training_moves_the_flops_to_the_budget_and_the_offset_meets_it(trained):
    model, cal, routed = trained
    report = routed.routers.config.report
    assert report["trained_fraction"] == pytest.approx(0.5, abs=0.08)
    assert report["offset_rounds"] and report["calls"] > 0
    routed.reset()
    routed.clear_stats()
    cal(routed)
    st = routed.stats()
    assert st["flop_fraction"] <= 0.5 + 1e-9
    assert st["flop_fraction"] >= 0.3  # the budget is spent, not thrown away
    # the backbone was left frozen and unchanged
    fresh, _ = tiny_model("dit")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(),
                                                  strict=True))
    assert all(p.requires_grad == q.requires_grad for p, q in zip(model.parameters(), fresh.parameters(),
                                                                  strict=True))


def test_save_and_load_round_trip(trained, tmp_path):
    model, cal, routed = trained
    path = routed.save(tmp_path / "routers.safetensors")
    again = RoutedTransformer.load(path, model)
    assert again.routers.config == routed.routers.config
    for a in (routed, again):
        a.reset()
        a.clear_stats()
    with torch.no_grad():
        out_a, out_b = cal(routed), cal(again)
    assert all(torch.equal(p, q) for p, q in zip(out_a, out_b, strict=True)) if isinstance(out_a, list | tuple) \
        else torch.equal(out_a, out_b)
    assert routed.stats() == again.stats()


def test_bad_router_files_raise_artifact_errors(trained, tmp_path):
    from safetensors.torch import save_file

    model, _, routed = trained
    with pytest.raises(ArtifactError, match="no such router file"):
        RoutedTransformer.load(tmp_path / "missing.safetensors", model)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        RoutedTransformer.load(junk, model)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ArtifactError, match="not a dit-opt router file"):
        RoutedTransformer.load(other, model)
    path = routed.save(tmp_path / "routers.safetensors")
    different, _ = tiny_model("dit", seed=1)
    with pytest.raises(ArtifactError, match="other weights"):
        RoutedTransformer.load(path, different)
    with pytest.raises(ArtifactError, match="other weights"):
        RouterSet.load(path, different)


def test_bad_options_and_inputs(trained, dit):
    model, cal, routed = trained
    for budget in (0, 1.5, "half"):
        with pytest.raises(ConfigError, match="budget"):
            dit_opt.train_routers(model, cal, budget=budget, progress=False)
    with pytest.raises(ConfigError, match="decide"):
        dit_opt.train_routers(model, cal, budget=0.5, decide="sample", steps=0, progress=False)
    with pytest.raises(ConfigError, match="closed"):
        routed.routers.with_config(closed="drop")
    with pytest.raises(ConfigError, match="widths"):
        routed.routers.with_config(widths=(0.5, 0.75))
    with pytest.raises(ConfigError, match="cap"):
        RoutedTransformer.from_graph(dit[1], _routers(dit[1]), cap=1.5)
    # a resolution the routers were not made for, and a batch that changes mid-generation
    x = routed.latent_shape
    with pytest.raises(InputMismatchError, match="resolution"):
        routed(hidden_states=torch.zeros(2, x[0], x[1] * 2, x[2] * 2), timestep=torch.tensor([900, 900]),
               class_labels=torch.tensor([0, 1]))
    routed.reset()
    routed(hidden_states=torch.zeros(2, *x), timestep=torch.tensor([900, 900]), class_labels=torch.tensor([0, 1]))
    with pytest.raises(InputMismatchError, match="middle of a generation"):
        routed(hidden_states=torch.zeros(3, *x), timestep=torch.tensor([800] * 3), class_labels=torch.tensor([0] * 3))


def test_routers_inside_a_pipeline():
    """Trained on a diffusers PixArt pipeline's own calls (a guidance batch), then run as its
    transformer: the FLOPs are counted per sample (the two guidance halves of a sample together)."""
    pytest.importorskip("transformers")
    from dit_opt.tiny_pipelines import tiny_pipeline

    pipe, call = tiny_pipeline("pixart")
    call = dict(call, num_inference_steps=6, generator=torch.Generator().manual_seed(1))
    cal = dit_opt.calibration_from_pipeline(pipe, **call)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        routed = dit_opt.train_routers(pipe.transformer, cal, budget=0.6, steps=10, row_subset=1, progress=False)
    routed.reset()
    routed.clear_stats()
    images = cal(routed)
    assert images is not None
    st = routed.stats()
    prompts = call["prompt"] if isinstance(call["prompt"], list) else [call["prompt"]]
    assert st["samples"] == len(prompts) * call.get("num_images_per_prompt", 1)
    assert st["flop_fraction"] <= 0.6 + 1e-9


def test_compiled_routed_module_matches_eager(dit):
    """``compile=True``: each block at each width and each router compiled with a dynamic batch;
    the same decisions and outputs as eager, on sub-batches of changing size."""
    model, graph, x, labels = dit
    routers = _routers(graph)
    _randomise(routers, seed=1)
    eager = RoutedTransformer.from_graph(graph, routers)
    compiled = RoutedTransformer.from_graph(graph, routers, compile=True)
    with torch.no_grad():
        a, b = _loop(eager, x, labels), _loop(compiled, x, labels)
    assert torch.allclose(a, b, atol=1e-4)
    assert eager.stats() == compiled.stats()


def test_training_serves_forecasts_exact_for_residuals_linear_in_the_step():
    """What a closed gate serves in training, at any age and spacing: the first-order forecast
    from the recorded residuals, exact where they are linear in the step."""
    from dit_opt.router_training import _served

    steps = 8
    prev = [None] + list(range(steps - 1))  # one loop, one branch: call n follows call n - 1
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    residuals = [[[a + b * t]] for t in range(steps)]  # one block, one stream
    for age in (1, 2, 3):
        for spacing in (1, 2, 3):
            got = _served(residuals, prev, 7, "forecast", [(age, age + spacing)])[0][0]
            assert torch.allclose(got, a + b * 7, atol=1e-5)
            assert torch.equal(_served(residuals, prev, 7, "reuse", [(age, age + spacing)])[0][0], a + b * (7 - age))
    assert _served(residuals, prev, 0, "forecast", [(1, 2)]) is None  # a first step serves nothing
    # as far back as the loop goes: at call 2, age 3 reaches call 0, and a forecast needs two calls
    assert torch.equal(_served(residuals, prev, 2, "forecast", [(3, 4)])[0][0], a)
    # a plan's higher orders through its computes at their steps: exact on a cubic in the step
    c, d = torch.randn(3, 5), torch.randn(3, 5)
    cubic = [[[a + b * t + c * t**2 + d * t**3]] for t in range(steps)]
    got = _served(cubic, prev, 7, "forecast", [(1, 2, 4, 6)])[0][0]
    assert torch.allclose(got, cubic[7][0][0], atol=1e-3, rtol=1e-4)
    assert not torch.allclose(_served(cubic, prev, 7, "forecast", [(1, 2)])[0][0], cubic[7][0][0], atol=1e-2)


def test_a_call_that_raises_leaves_the_routed_module_as_it_was(dit):
    """A call that fails inside the model (here: a class label out of range) counts nothing and
    moves no step: the generation retried after it gives what a fresh module gives."""
    model, graph, x, labels = dit
    routers = _routers(graph)
    _randomise(routers, seed=2)
    fresh = RoutedTransformer.from_graph(graph, routers)
    tried = RoutedTransformer.from_graph(graph, routers)
    bad = torch.full_like(labels, 10_000)
    with torch.no_grad():
        want = _loop(fresh, x, labels)
        for steps in (1, 3):  # fails at the first call, and after three good steps
            if steps > 1:
                _loop(tried, x, labels, steps=steps)  # a generation stopped part-way
            with pytest.raises(IndexError):
                _loop(tried, x, bad)
        got = _loop(tried, x, labels)
    assert torch.equal(got, want)
    # only finished or running generations are counted, not the failed calls
    assert tried.stats()["samples"] == 8 and fresh.stats()["samples"] == 4
