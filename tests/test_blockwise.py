"""Block-by-block capture (dit_opt.blockwise): the fallback where torch.export rejects a model's
forward. The same plans must give the same outputs as on a whole capture, every action family
included, and a model that only captures block by block must optimise, load and explain."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from diffusers import DDIMScheduler

import dit_opt
from dit_opt.calibration import synthetic_calibration
from dit_opt.capture import capture
from dit_opt.errors import CaptureError, ConfigError, DitOptError
from dit_opt.flops import count_flops
from dit_opt.plan import Action
from dit_opt.testing import tiny_model, unbudgeted_plan

STEPS = 6


@pytest.fixture(scope="module")
def lumina():
    """The tiny Lumina2, its 6-step synthetic calibration and an optimised module at 0.5."""
    model, inputs = tiny_model("lumina2")
    cal = synthetic_calibration(model, num_inference_steps=STEPS, warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.optimize(model, budget=0.5, calibration=cal, compile=False, progress=False)
    return model, inputs, cal, opt


def _grid(prof, rows: list[str]) -> list[list[Action]]:
    """A plan grid from one string per step, one action per unit (``"C R F"``)."""
    grid = [[Action.parse(a) for a in row.split()] for row in rows]
    assert all(len(row) == len(prof.units) for row in grid), [len(r) for r in grid]
    return grid


def _both(model, plan, prof, cal):
    """The calibration's outputs through the plan on a whole and on a block-by-block capture."""
    outs = []
    for mode in ("whole", "blocks"):
        opt = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False, capture_mode=mode)
        with torch.no_grad():
            outs.append(cal(opt))
        assert opt.captured().graph.capture_mode == mode
    return outs


def _assert_close(whole, blocks):
    diff = float((whole - blocks).abs().max())
    assert diff <= 1e-5, f"block by block differs from whole by {diff}"


def test_export_failure_falls_back_to_blocks(lumina):
    model, inputs, _, _ = lumina
    g = capture(model, inputs)
    assert g.capture_mode == "blocks" and "SymInt" in g.blockwise.reason
    assert "block by block" in g.summary()
    with torch.no_grad():  # the model's glue with each block run by its captured graph
        ref, got = model(**inputs).sample, g(**inputs).sample
    assert float((ref - got).abs().max()) <= 1e-5
    from passes.annotate_flops import annotate_flops

    annotate_flops(g)
    assert g.flops == count_flops(model, **inputs) and g.costs.outside_blocks > 0
    with pytest.raises(CaptureError, match="mode='auto'"):
        capture(model, inputs, mode="whole")
    with pytest.raises(ConfigError, match="capture mode 'parts' does not exist"):
        capture(model, inputs, mode="parts")


def test_optimize_within_budget_exact_at_one_and_deterministic(lumina):
    model, _, cal, opt = lumina
    assert opt.report["capture_mode"] == "blocks" and "block by block" in opt.report["capture"]
    full, got = count_flops(cal, model), count_flops(cal, opt)
    assert got <= 0.51 * full, f"counted {got / full:.4f} of the full FLOPs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = dit_opt.optimize(model, budget=1.0, calibration=cal, compile=False, progress=False)
        again = dit_opt.optimize(model, budget=0.5, calibration=cal, compile=False, progress=False)
    with torch.no_grad():
        ref, out = cal(model), cal(opt)
        assert torch.equal(cal(exact), ref)
        assert again.plan.actions == opt.plan.actions and torch.equal(cal(again), out)


def test_save_load_graph_explain_and_export(lumina, tmp_path):
    model, _, cal, opt = lumina
    with torch.no_grad():
        out = cal(opt)
    opt.save(tmp_path / "plan")
    loaded = dit_opt.load(tmp_path / "plan", model, compile=False)
    with torch.no_grad():
        assert torch.equal(cal(loaded), out)
    assert loaded.captured().graph.capture_mode == "blocks"
    # every block's rewritten graph, side by side
    rows = ["C C C C", "C C C C", "R F S R", "C C C C", "R R R R", "F R F R"]
    served = dit_opt.OptimizedTransformer(model, unbudgeted_plan(opt.profile, _grid(opt.profile, rows)),
                                          profile=opt.profile, compile=False)
    code = served.graph(2).code
    assert "layers_1" in code and "noise_refiner_0" in code and "cache_layers_1_res0" in code
    explained = served.explain(2)
    assert set(explained) == {b.name for b in served.captured().graph.blocks}
    assert all(e.graph_count <= 1 for e in explained.values())  # one graph (none for a skipped block)
    with pytest.raises(ConfigError, match="block by block.*opt.save"):
        opt.export(tmp_path / "pt2")


def test_every_block_action_matches_a_whole_capture(profiled):
    model, cal, prof = profiled("dit", STEPS)
    grid = _grid(prof, ["C C C", "C C C", "C R P0.5", "F2 W0.5 S", "F R C", "T1 T1 T1"])
    plan = prof.to_problem(1.0).to_plan(grid, "test", "HEURISTIC", 0.0)
    assert plan.is_step_forecast(STEPS - 1)
    _assert_close(*_both(model, plan, prof, cal))


def test_tuple_blocks_in_two_lists_match_a_whole_capture(profiled):
    model, cal, prof = profiled("flux", STEPS)
    grid = _grid(prof, ["C C C C C", "C C C C C", "C C C C C", "R F S F2 R", "F R C F S", "T0 T0 T0 T0 T0"])
    _assert_close(*_both(model, prof.to_problem(1.0).to_plan(grid, "test", "HEURISTIC", 0.0), prof, cal))


def test_module_actions_match_a_whole_capture(profiled):
    model, cal, prof = profiled("pixart", STEPS)
    problem = prof.to_problem(1.0, granularity="module")
    by_role = {"attn": ["C", "C", "R", "C", "F", "P0.5"], "cross_attn": ["C", "C", "S", "C", "R", "C"],
               "mlp": ["C", "C", "W0.5", "C", "S", "R"]}
    grid = [[Action.parse(by_role[u.role.value][t]) for u in problem.units] for t in range(STEPS)]
    plan = unbudgeted_plan(prof, grid, "module")
    _assert_close(*_both(model, plan, prof, cal))


def test_cfg_matches_a_whole_capture(profiled):
    model, _, prof = profiled("dit", STEPS)

    def guided(m):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 8, 8, generator=gen)
        labels = torch.tensor([1, 2, 10, 10])
        sched = DDIMScheduler()
        sched.set_timesteps(STEPS)
        for t in sched.timesteps:
            c, u = m(hidden_states=torch.cat([x, x]), timestep=t.expand(4), class_labels=labels).sample[:, :4].chunk(2)
            x = sched.step(u + 3.0 * (c - u), t, x).prev_sample
        return x

    grid = _grid(prof, ["C C C", "G1 G1 C", "C G1 G1", "G1 C G1", "C C C", "G1 G1 G1"])
    _assert_close(*_both(model, unbudgeted_plan(prof, grid), prof, guided))


def test_compiled_blocks_match_eager(profiled):
    model, cal, prof = profiled("dit", STEPS)
    plan = unbudgeted_plan(prof, _grid(prof, ["C C C", "C C C", "R R C", "F F R", "C C C", "R F R"]))
    outs = []
    for compile in (False, True):
        opt = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=compile, capture_mode="blocks")
        with torch.no_grad():
            outs.append(cal(opt))
    _assert_close(*outs)


def test_a_block_called_with_other_arguments_is_refused(lumina):
    """The block graphs are specialised to the non-tensor arguments they were captured with."""
    model, inputs, cal, opt = lumina
    graph = opt.captured().graph
    call = graph.blockwise.calls["context_refiner.0"]
    with torch.no_grad():
        cal(opt)
    args = [torch.zeros(1)] * 3
    with pytest.raises(DitOptError, match="context_refiner.0.*another structure"):
        call.leaves(tuple(args), {"extra": 1})


def _unexportable(model):
    """``model`` with every block branching on a tensor value (as a mixture of experts that routes
    through ``.numpy()`` does): torch.export rejects the blocks as well as the forward."""
    for block in model.transformer_blocks:
        inner = block.forward

        @functools.wraps(inner)  # the block's own signature
        def forward(*args, _inner=inner, **kwargs):
            out = _inner(*args, **kwargs)
            if float(out.abs().sum()) >= 0.0:  # always true: the values are the block's own
                return out
            return -out

        block.forward = forward
    return model


def test_blocks_that_do_not_export_are_planned_whole(profiled):
    """Opaque blocks: costed by FlopCounterMode on their call, run as they are; the same block-level
    plan gives the same outputs as on a whole capture of the unchanged model, and optimize keeps
    its budget and is exact at 1.0."""
    model, cal, prof = profiled("dit", STEPS)
    opaque_model = _unexportable(tiny_model("dit")[0])
    graph = capture(opaque_model, tiny_model("dit")[1])
    assert sorted(graph.blockwise.opaque) == [f"transformer_blocks.{i}" for i in range(3)]
    # (no WIDTH: an opaque block has no MLP sub-module to narrow)
    grid = _grid(prof, ["C C C", "C C C", "C R P0.5", "F2 R S", "F R C", "T1 T1 T1"])
    plan = prof.to_problem(1.0).to_plan(grid, "test", "HEURISTIC", 0.0)
    whole = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)
    opaque = dit_opt.OptimizedTransformer(opaque_model, plan, profile=prof, compile=False)
    with torch.no_grad():
        _assert_close(cal(whole), cal(opaque))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.optimize(opaque_model, budget=0.5, calibration=cal, compile=False, progress=False)
        exact = dit_opt.optimize(opaque_model, budget=1.0, calibration=cal, compile=False, progress=False)
    assert opt.report["capture_mode"] == "blocks" and "run as they are" in opt.report["capture"]
    assert count_flops(cal, opt) <= 0.51 * count_flops(cal, opaque_model)
    with torch.no_grad():
        assert torch.equal(cal(exact), cal(opaque_model))
