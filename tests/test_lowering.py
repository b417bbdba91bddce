"""Lowering: variants trace as one graph (no breaks) and the compiled module matches eager."""

from __future__ import annotations

import typing
import warnings
import zipfile

import pytest
import torch

import dit_opt
from dit_opt.calibration import synthetic_calibration
from dit_opt.testing import tiny_model

STEPS = 6


@pytest.fixture(scope="session")
def compiled_pair():
    """One compiled and one eager optimisation of the tiny DiT from the same profile (compiled once)."""
    model, inputs = tiny_model("dit")
    cal = synthetic_calibration(model, num_inference_steps=STEPS, warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = dit_opt.profile(model, cal, progress=False, probes=0)
        kw = dict(calibration=prof, example_inputs=inputs, progress=False, widths=(0.5,))
        eager = dit_opt.optimize(model, 0.4, compile=False, **kw)
        compiled = dit_opt.optimize(model, 0.4, compile=True, **kw)
    return model, cal, eager, compiled


@pytest.mark.parametrize("name", ["dit", "flux", "pixart"])
def test_no_graph_breaks_in_any_variant(name):
    model, _ = tiny_model(name)
    cal = synthetic_calibration(model, num_inference_steps=STEPS, warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.optimize(model, 0.3, calibration=cal, compile=False, progress=False)
    kinds = set()
    for t in range(STEPS):
        e = opt.explain(t)
        assert e.graph_break_count == 0, f"{name} step {t}: {[str(b.reason) for b in e.break_reasons]}"
        assert e.graph_count == 1
        kinds |= {a.kind for a in opt.plan.actions[t]}
    assert dit_opt.ActionKind.REUSE in kinds


def test_compiled_matches_eager(compiled_pair):
    _, cal, eager, compiled = compiled_pair
    with torch.no_grad():
        a, b = cal(eager), cal(compiled)
    diff = float((a - b).abs().max())
    assert diff <= 1e-3 * max(1.0, float(a.abs().max())), f"compiled differs from eager by {diff}"


def test_blocks_are_compiled_once_and_shared(compiled_pair):
    _, _, _, compiled = compiled_pair
    # one compiled wrapper per distinct block module (originals and narrowed copies), shared by variants
    runner = next(iter(compiled._runners.values()))
    wrappers = {id(m) for v in runner.variants for _, m in v.gm.named_children() if hasattr(m, "_orig_mod")}
    assert wrappers and len(wrappers) == len(compiled._compiled)
    assert len(wrappers) <= len(runner.graph.blocks) * 2


def test_variants_shared_across_modules_on_one_graph_and_compiled_on_copies(compiled_pair):
    from dit_opt.runtime import OptimizedTransformer

    model, cal, eager, _ = compiled_pair
    runner = next(iter(eager._runners.values()))
    with torch.no_grad():
        before = cal(eager)
    kw = dict(profile=eager.profile, graph=runner.graph)
    again = OptimizedTransformer(model, eager.plan, compile=False, **kw)
    lowered = OptimizedTransformer(model, eager.plan, compile=True, **kw)
    # the same plan on the same graph and profile: the eager module's step graphs themselves
    built = next(iter(again._runners.values())).variants
    assert all(a.gm is b.gm for a, b in zip(built, runner.variants, strict=True))
    # the compiled module's blocks go into copies: the shared (eager) graphs keep their blocks
    compiled_vs = next(iter(lowered._runners.values())).variants
    assert not any(a.gm is b.gm for a, b in zip(compiled_vs, runner.variants, strict=True))
    assert any(hasattr(m, "_orig_mod") for v in compiled_vs for _, m in v.gm.named_children())
    assert not any(hasattr(m, "_orig_mod") for v in runner.variants for _, m in v.gm.named_children())
    with torch.no_grad():
        assert torch.equal(cal(eager), before)


def test_export_pt2_replays_the_plan(compiled_pair, tmp_path):
    from dit_opt.export import ExportedPlan

    model, _, eager, _ = compiled_pair
    eager.export(tmp_path)
    served = ExportedPlan(tmp_path)
    assert served.num_steps == STEPS
    assert not served.modules  # checked at opening, deserialised when a step needs it
    runner = next(iter(eager._runners.values()))
    base = runner.graph.example_inputs
    eager.reset()
    with torch.no_grad():
        for step, t in enumerate(eager.plan.timesteps):
            inputs = dict(base, timestep=torch.full_like(base["timestep"], t))
            want = eager(**inputs).sample
            (got,) = served(step, *runner.graph.flat_inputs(**inputs))
            assert float((want - got).abs().max()) <= 1e-5, f"step {step}"
    assert set(served.modules) == {s["file"] for s in served.index["steps"]}
    from torch._export.serde import serialize

    assert serialize.typing is typing  # the deserialiser's hints memoised during a load only
    assert not list(tmp_path.glob("*.pkl"))
    # the weights are written once, beside programs that take them as inputs
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    written = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert written <= 1.5 * model_bytes, (written, model_bytes)
    for f in tmp_path.glob("*.pt2"):
        ep = torch.export.load(str(f))
        assert not ep.state_dict and not ep.constants and ep.example_inputs is None, f.name
    # a damaged export is refused with what to do, whichever part is damaged
    import json
    import shutil

    def damaged(what, harm):
        copy = tmp_path.parent / f"{tmp_path.name}-{what}"
        shutil.copytree(tmp_path, copy)
        harm(copy)
        with pytest.raises(dit_opt.ArtifactError, match="export again"):
            ExportedPlan(copy)

    damaged("weights", lambda d: (d / "weights.safetensors").unlink())
    damaged("variant", lambda d: next(d.glob("*.pt2")).write_bytes(b"not a program"))

    def retouch(d):  # still a sound archive, but not the program the export wrote
        with zipfile.ZipFile(next(d.glob("*.pt2")), "a") as archive:
            archive.writestr("extra.txt", "x")

    damaged("tampered", retouch)
    def edit_index(d, change):
        index = json.loads((d / "index.json").read_text())
        change(index)
        (d / "index.json").write_text(json.dumps(index))

    damaged("version", lambda d: edit_index(d, lambda i: i.update(version=99)))
    damaged("lacks", lambda d: edit_index(d, lambda i: i["steps"][0]["weights"].append("w_missing")))


def test_step_lowering_compiles_each_step_whole_and_matches_eager(compiled_pair):
    from torch._dynamo.utils import counters

    from dit_opt.runtime import OptimizedTransformer

    model, cal, _, _ = compiled_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # FORA's schedule: few distinct steps, so few compiles
        eager = dit_opt.optimize(model, 0.5, solver="fora", calibration=cal, select=False, compile=False,
                                 progress=False)
    whole = OptimizedTransformer(model, eager.plan, profile=eager.profile, compile="step")
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        a, b = cal(eager), cal(whole)
    diff = float((a - b).abs().max())
    assert diff <= 1e-3 * max(1.0, float(a.abs().max())), f"step lowering differs from eager by {diff}"
    runner = next(iter(whole._runners.values()))
    distinct = {id(v.gm) for v in runner.variants}
    assert all(v.call is not None for v in runner.variants)
    # one graph per distinct step (its blocks are nested regions inside it, not graphs of their own)
    assert counters["stats"]["unique_graphs"] - before == len(distinct) < STEPS


def test_an_unknown_lowering_is_refused_before_any_work():
    model, _ = tiny_model("dit")
    with pytest.raises(dit_opt.ConfigError, match="compile='fast' is not a lowering"):
        dit_opt.optimize(model, 0.5, compile="fast", progress=False)
