"""Routers on a static plan (``optimize(..., dynamic=...)``): the plan's schedule runs as the plan
would, the routers gate only its computes, the budget holds, artifacts and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import dit_opt
from dit_opt.calibration import synthetic_calibration
from dit_opt.errors import ConfigError, InputMismatchError
from dit_opt.plan import Action
from dit_opt.routed import RoutedTransformer, routed_blocks
from dit_opt.routers import RouterConfig, RouterSet, plan_served, plan_steps
from dit_opt.testing import unbudgeted_plan

STEPS = 6


def _flat(out):
    return torch.cat([o.flatten() for o in out]) if isinstance(out, list | tuple) else out.flatten()


def _grid(units: int, rows: list[str]) -> list[list[Action]]:
    """One string per step; ``"C"``/``"F"``/``"R"`` for every unit, or one letter per unit."""
    return [[Action.parse(a) for a in (row.split() if " " in row else [row] * units)] for row in rows]


@pytest.fixture(scope="module")
def schedule(profiled, captured):
    """The tiny DiT, its synthetic calibration and profile, a plan of computes, reuses, block
    forecasts of orders 1 and 3 and a whole-step forecast, and full-capacity routers under it
    (every gate the router's stays open)."""
    model, cal, prof = profiled("dit", STEPS)
    U = len(prof.units)
    last = " ".join(["F3", "F", "R"][u % 3] for u in range(U))  # orders 3, 1 and a reuse
    plan = unbudgeted_plan(prof, _grid(U, ["C", "C", "C", "T2", "C", last]))  # a whole-step forecast at 3
    graph = captured("dit")[2]
    blocks, _ = routed_blocks(graph, (1.0,))
    shapes = [dict(b.spec.inputs)[b.x_name].shape for b in blocks]
    names = tuple(b.spec.name for b in blocks)
    step_orders, fulls = plan_steps(plan)
    config = RouterConfig(blocks=names, dims=tuple(s[-1] for s in shapes), tokens=tuple(s[1] for s in shapes),
                          widths=(1.0,), served=plan_served(plan, names), step_orders=step_orders, full_steps=fulls)
    return model, cal, prof, plan, RoutedTransformer.from_graph(graph, RouterSet(config), plan=plan), graph


def test_routers_left_open_run_the_plans_schedule(schedule):
    """Where the routers keep every gate open, the routed module is the plan: its served blocks
    forecast from the same computes, to the same outputs as the plan's own runtime."""
    model, cal, prof, plan, routed, _ = schedule
    opt = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)
    routed.reset()
    routed.clear_stats()
    with torch.no_grad():
        want, got = _flat(cal(opt)), _flat(cal(routed))
        plain = _flat(cal(model))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)  # the plan did serve blocks
    decisions = routed.stats()["decisions"]
    rows = routed.stats()["samples"] * (2 if routed._guidance else 1)
    assert decisions.pop("model") == {"plan step forecast": rows}  # step 3 ran no block
    served = sum(k.get("plan forecast", 0) + k.get("plan reuse", 0) for k in decisions.values())
    blocks = routed.routers.config.blocks
    assert [bool(decisions[n].get("plan reuse")) for n in blocks] == [u % 3 == 2 for u in range(len(blocks))]
    assert served == rows * len(blocks)  # at step 5 (step 3's are the whole-step forecast's)
    assert not any("forecast" in k or "reuse" in k for d in decisions.values() for k in d if not k.startswith("plan"))


def test_compiled_routers_on_a_plan_match_eager(schedule):
    """``compiled()`` (what ``optimize(..., dynamic=..., compile=True)`` returns): the plan's
    schedule and the routers' decisions as in eager, with decisions per step too."""
    model, cal, prof, plan, routed, graph = schedule
    routers = RouterSet(routed.routers.config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # gates that differ from sample to sample and step to step
        for r in routers.routers.values():
            r.gate.weight.copy_(torch.randn(r.gate.weight.shape, generator=g) * 3)
            r.gate.bias.zero_()
            r.ada[1].weight.copy_(torch.randn(r.ada[1].weight.shape, generator=g) * 0.05)
    for decide in ("block", "step"):
        eager = RoutedTransformer.from_graph(graph, routers.with_config(decide=decide), plan=plan)
        fast = eager.compiled()
        with torch.no_grad():
            assert torch.allclose(_flat(cal(fast)), _flat(cal(eager)), atol=1e-4)
        assert fast.stats() == eager.stats() and fast.plan is plan
        assert any(k == "forecast" for d in eager.stats()["decisions"].values() for k in d)  # routers closed some


@pytest.fixture(scope="module")
def dynamic(profiled):
    model, cal, _ = profiled("dit", STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.optimize(model, 0.5, calibration=cal, dynamic=0.4, compile=False, progress=False)
    return model, cal, opt


def test_optimize_dynamic_gates_the_plans_computes_down_to_the_budget(dynamic, tmp_path):
    model, cal, opt = dynamic
    assert isinstance(opt, RoutedTransformer) and opt.plan is not None
    report = opt.report
    assert report is opt.routers.config.report and report["plan_generations"] > 0
    # the plan at the budget plus headroom, less what the routers cost
    share = sum(opt._router_flops) / opt.full_flops
    assert 0 < share < 0.1  # (a tiny model: its blocks are small beside the routers)
    assert opt.plan.budget == pytest.approx(report["plan_budget"]) == pytest.approx(0.7 - share)
    assert report["plan_flop_fraction"] > 0.5
    assert len(opt.routers.config.served) == STEPS == opt.plan.num_steps
    opt.reset()
    opt.clear_stats()
    with torch.no_grad():
        out = _flat(cal(opt))
    st = opt.stats()
    assert st["flop_fraction"] <= 0.5 + 1e-9
    kinds = {k for d in st["decisions"].values() for k in d}
    assert "plan forecast" in kinds or "plan reuse" in kinds  # the plan serves its blocks
    assert "forecast" in kinds  # and the routers closed some of its computes
    # saved and loaded with its plan: the same schedule, the same images
    again = dit_opt.load(opt.save(tmp_path / "routers.safetensors"), model, compile=False)
    assert isinstance(again, RoutedTransformer)
    assert again.plan == opt.plan and again.routers.config == opt.routers.config
    with torch.no_grad():
        assert torch.equal(_flat(cal(again)), out)
    with pytest.raises(ConfigError, match="opt.save"):
        opt.export(tmp_path / "pt2")


def test_dynamic_bad_input(dynamic, schedule):
    model, cal, opt = dynamic
    for bad in ("yes", 1.5, -0.1):
        with pytest.raises(ConfigError, match="dynamic"):
            dit_opt.optimize(model, 0.5, calibration=cal, dynamic=bad, progress=False)
    with pytest.raises(ConfigError, match="callable"):
        dit_opt.optimize(model, 0.5, calibration=None, dynamic=True, progress=False)
    # a plan that prunes cannot be gated; a plan for another loop is not trained on
    _, _, prof, plan, routed, _ = schedule
    pruned = unbudgeted_plan(prof, _grid(len(prof.units), ["C", "C", "P0.5", "C", "C", "C"]))
    with pytest.raises(ConfigError, match="reuse"):
        plan_served(pruned, routed.routers.config.blocks)
    shorter = synthetic_calibration(model, num_inference_steps=4, warn=False)
    with pytest.raises(ConfigError, match="6 steps, the calibration's loop 4"):
        dit_opt.train_routers(model, shorter, budget=0.5, steps=0, plan=plan, progress=False)
    # a loop longer than the plan's, declared by a pipeline's scheduler or met at its first extra step
    with pytest.raises(InputMismatchError, match="made for 6"):
        opt.set_schedule(list(range(8)))
    opt.set_schedule(list(range(STEPS)))
    x = opt.latent_shape
    opt.reset()
    with torch.no_grad():
        for t in range(STEPS):
            opt(hidden_states=torch.zeros(1, *x), timestep=torch.tensor([900 - 100 * t]),
                class_labels=torch.tensor([0]))
        with pytest.raises(InputMismatchError, match="made for 6 steps"):
            opt(hidden_states=torch.zeros(1, *x), timestep=torch.tensor([250]), class_labels=torch.tensor([0]))


def test_dynamic_inside_a_pipeline():
    """``optimize(pipe, ..., dynamic=...)``: trained on the pipeline's own calls and attached; its
    generations meet the budget per sample, and a loop of another step count is refused when the
    scheduler declares it, before any call."""
    pytest.importorskip("transformers")
    from dit_opt.tiny_pipelines import tiny_pipeline

    pipe, call = tiny_pipeline("pixart")
    transformer = pipe.transformer
    call = dict(call, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.optimize(pipe, 0.6, calibration=call, dynamic=True, compile=False, progress=False)
        assert pipe.transformer is opt and isinstance(opt, RoutedTransformer)
        for seed, slack in ((1, 1e-9), (2, 0.05)):  # the calibration's own seed, then another
            opt.clear_stats()
            images = pipe(**dict(call, generator=torch.Generator().manual_seed(seed))).images
            assert images is not None
            st = opt.stats()
            assert st["samples"] == 2 and st["flop_fraction"] <= 0.6 + slack
        with pytest.raises(InputMismatchError, match="made for 6"):
            pipe(**dict(call, num_inference_steps=STEPS + 2))
    assert dit_opt.restore(pipe) is transformer and pipe.transformer is transformer
