"""optimize() on the trained reference models: FLOPs within budget, determinism, CFG, fidelity."""

from __future__ import annotations

import warnings

import pytest
import torch

import dit_opt
from dit_opt import zoo
from dit_opt.bench import flop_fraction, with_transformer
from dit_opt.metrics import psnr

MODELS = ["digits-dit", "digits-mmdit"]
EVAL = {"class_labels": [4, 7], "seed": 0}


@pytest.fixture(scope="session")
def digits():
    """name -> (sampler, original transformer, {budget: optimised module}), one profile per model."""
    out = {}

    def get(name):
        if name not in out:
            sampler = zoo.load(name)
            model = sampler.transformer

            def calibration(m):
                return with_transformer(sampler, m, class_labels=[0], seed=1)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # one prune rate and width, ages up to 3 (half the profile's cost; the defaults'
                # plans are the benchmark's to judge)
                prof = dit_opt.profile(model, calibration, progress=False, probes=0, max_age=3, prune_rates=(0.5,),
                                       widths=(0.5,))
                opts = {
                    b: dit_opt.optimize(model, b, calibration=prof, example_inputs=sampler.example_inputs(),
                                        compile=False, progress=False)
                    for b in (0.5, 0.25)
                }
            out[name] = (sampler, model, opts)
        return out[name]

    return get


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_counted_flops_within_budget(digits, name, budget):
    sampler, model, opts = digits(name)

    def generate(m):
        return with_transformer(sampler, m, **EVAL)

    frac = flop_fraction(generate, model, opts[budget])
    assert frac <= budget + 0.01, f"{name} at budget {budget}: counted FLOP fraction {frac:.4f}"


@pytest.mark.parametrize("name", MODELS)
def test_same_generation_twice_and_generations_independent(digits, name):
    sampler, _, opts = digits(name)
    opt = opts[0.5]
    a1 = with_transformer(sampler, opt, **EVAL)
    b = with_transformer(sampler, opt, class_labels=[1, 2, 3], seed=5)
    a2 = with_transformer(sampler, opt, **EVAL)
    assert torch.equal(a1, a2), "the same generation twice differs"
    assert b.shape[0] == 3


@pytest.mark.parametrize("name", MODELS)
def test_fidelity_and_cfg(digits, name):
    sampler, model, opts = digits(name)
    full = with_transformer(sampler, model, **EVAL)
    half = with_transformer(sampler, opts[0.5], **EVAL)
    quarter = with_transformer(sampler, opts[0.25], **EVAL)
    p_half, p_quarter = psnr(half, full), psnr(quarter, full)
    assert p_half >= 25.0, f"{name}: PSNR at budget 0.5 is {p_half:.2f} dB"
    assert p_half >= p_quarter - 0.5, f"{name}: budget 0.5 ({p_half:.2f} dB) worse than 0.25 ({p_quarter:.2f} dB)"
    # without guidance the batch halves: the module captures the new shapes and still follows the plan
    full_nocfg = with_transformer(sampler, model, guidance_scale=1.0, **EVAL)
    opt_nocfg = with_transformer(sampler, opts[0.5], guidance_scale=1.0, **EVAL)
    assert psnr(opt_nocfg, full_nocfg) >= 20.0
