"""Models whose forward breaks diffusers' usual argument conventions, built from the tiny configs and
input recipes of ``examples/coverage_configs.json`` (diffusers' own tests):

* Z-Image names its latent ``x`` and its timestep ``t``, and takes and returns one latent per
  sample as a list: the profile, the selection and the runtime read both by the model's names;
* Ernie-Image's blocks take sequence-first tensors ``(tokens, batch, channels)``: the profile's
  probe rows are cut along the batch only, and token ``PRUNE`` is refused there with a reason;
* PriorTransformer takes a Python-number timestep: it is no part of the input signature, and
  the graph serves every step's value.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

import dit_opt
from dit_opt.calibration import synthetic_calibration
from dit_opt.plan import ActionKind
from dit_opt.synthetic import call_names
from dit_opt.testing import build_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _build_inputs(recipe: dict) -> dict:
    spec = importlib.util.spec_from_file_location("_coverage", EXAMPLES / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_inputs(recipe)


def _coverage_model(name: str, **inputs_override) -> tuple[torch.nn.Module, dict]:
    """The class's tiny config (zero-initialised weights perturbed, as ``tiny_model`` does) and the
    inputs its recipe builds."""
    entry = json.loads((EXAMPLES / "coverage_configs.json").read_text())[name]
    return build_model(name, entry["config"]), _build_inputs({**entry["inputs"], **inputs_override})


def _optimize(model, inputs, budget, cal, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dit_opt.optimize(model, budget=budget, calibration=cal, example_inputs=inputs, compile=False,
                                progress=False, **kw)


def _flat(result) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in result]) if isinstance(result, list) else result


# ---- Z-Image: latent `x` (a list, one per sample) and timestep `t` --------------------------------
def test_zimage_names_its_latent_x_and_its_timestep_t():
    model, _ = _coverage_model("ZImageTransformer2DModel")
    names = call_names(model)
    assert (names.latent, names.timestep) == ("x", "t")
    assert names.batch_of({"x": [torch.zeros(16, 1, 4, 4)] * 3}) == 3  # one latent per sample


def test_zimage_optimizes_and_runs_its_steps_by_t():
    """The profile read the timestep from "timestep" (TypeError) and the selection took the list
    prediction for one tensor (AttributeError): both by the model's own names now."""
    model, inputs = _coverage_model("ZImageTransformer2DModel")
    cal = synthetic_calibration(model, num_inference_steps=4, warn=False, example_inputs=inputs)
    opt = _optimize(model, inputs, 0.5, cal)
    assert len(opt.profile.timesteps) == 4  # four steps told apart by `t`
    exact = _optimize(model, inputs, 1.0, cal, select=False)
    with torch.no_grad():
        ref, got = _flat(cal(model)), _flat(cal(exact))
    assert len(exact.stats()["steps"]) == 4
    diff = float((got - ref).abs().max())
    assert diff <= 1e-4, f"budget 1.0 differs from the model by {diff:.3g}"


# ---- Ernie-Image: sequence-first blocks -----------------------------------------------------------
def _ernie_batch2():
    return _coverage_model("ErnieImageTransformer2DModel", hidden_states={"shape": [2, 16, 4, 4]},
                           text_bth={"shape": [2, 4, 16]}, text_lens={"value": [4, 3], "dtype": "int64"})


def test_token_layout_reads_the_batch_of_the_model_call():
    from dit_opt.executor import token_layout

    assert token_layout((2, 16, 8), 2) is None  # (batch, tokens, channels)
    assert token_layout((2 * 64, 3, 8), 2) is None  # the batch folded with the tokens: a temporal block's frames
    assert "sequence-first" in token_layout((272, 1, 16), 1)  # Ernie-Image's (tokens, batch, channels)
    assert "sequence-first" in token_layout((20, 2, 16), 2)
    assert "not (batch, tokens, channels)" in token_layout((2, 16), 2)


def test_ernie_profile_probes_along_the_batch_not_the_tokens():
    """Its blocks take (tokens, batch, channels): the probe took the tokens for the batch and cut
    them to the probe rows (a size mismatch); with one probe row of a batch of two it must
    probe every row of a sequence-first block, and refuse PRUNE with the reason."""
    model, inputs = _ernie_batch2()
    cal = synthetic_calibration(model, num_inference_steps=3, warn=False, example_inputs=inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = dit_opt.profile(model, cal, example_inputs=inputs, probe_rows=1, progress=False)
    excluded = prof.report["prune_excluded"]
    assert list(excluded) == ["layers.0"] and "sequence-first" in excluded["layers.0"], excluded
    assert torch.isnan(torch.as_tensor(prof.e_prune)).all()  # not offered to the solver


def test_ernie_mlp_is_not_a_module_prune_candidate():
    from passes.rewrite_modules import module_token_input

    model, inputs = _ernie_batch2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = dit_opt.capture(model, inputs)
    (spec,) = graph.blocks
    pos, why = module_token_input(graph, spec, "mlp")
    assert pos is None and "batch" in why, why


def test_ernie_optimizes_with_prune_asked():
    model, inputs = _coverage_model("ErnieImageTransformer2DModel")
    cal = synthetic_calibration(model, num_inference_steps=4, warn=False, example_inputs=inputs)
    opt = _optimize(model, inputs, 0.5, cal, select=False)
    assert "layers.0" in opt.report["prune_excluded"]
    with torch.no_grad():
        cal(opt)
    assert opt.stats()["flop_fraction"] <= 0.51


# ---- PriorTransformer: a Python-number timestep ---------------------------------------------------
def _number_loop(inputs: dict, timesteps: list):
    """A denoising loop that passes the timestep as a Python number, as diffusers' test does."""

    def run(module):
        x = inputs["hidden_states"].clone()
        for t in timesteps:
            pred = module(**{**inputs, "hidden_states": x, "timestep": t}).predicted_image_embedding
            x = x - 0.1 * pred
        return x

    return run


@pytest.mark.parametrize("timesteps", [[999, 800, 600, 400, 200, 100], [999.0, 812.5, 600.25, 400.5, 200.75, 99.5]],
                         ids=["ints", "fractional floats"])
def test_prior_number_timesteps_keep_the_generation_caches(timesteps):
    """A number timestep made every step a new input signature: a capture per step and the
    caches dropped (step 1 could not read what step 0 wrote). Ints run on one graph, the
    timestep passed to it as a tensor; fractional floats, which the model truncates itself
    (a tensor would not be), get a graph per value, and the caches still carry over."""
    model, inputs = _coverage_model("PriorTransformer")
    inputs["timestep"] = timesteps[0]
    cal = _number_loop(inputs, timesteps)
    with torch.no_grad():
        ref = cal(model)
    exact = _optimize(model, inputs, 1.0, cal, select=False)
    opt = _optimize(model, inputs, 0.5, cal, select=False)
    assert opt.plan.counts()[ActionKind.COMPUTE] < 2 * len(timesteps)  # something reads a cache
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got, _ = cal(exact), cal(opt)
    diff = float((got - ref).abs().max())
    assert diff <= 1e-5, f"budget 1.0 with number timesteps differs from the model by {diff:.3g}"
    per_value = any("computes otherwise" in str(w.message) for w in caught)
    assert per_value == isinstance(timesteps[1], float), [str(w.message) for w in caught]
    assert opt.stats()["flop_fraction"] <= 0.51
