"""crops-pixart, the deeper reference model: its data, its judge, and optimize() on it.

Kept to seconds: 2 samples, 6 denoising steps, one profile shared by the tests (session fixture).
Sample quality at the default sampler is measured by examples/evaluate_reference_models.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import dit_opt
from dit_opt import metrics, zoo
from dit_opt.bench import flop_fraction, with_transformer
from dit_opt.zoo import crops

STEPS = 6
EVAL = {"class_labels": [2, 5], "seed": 0, "num_inference_steps": STEPS}


def test_split_is_spatial_and_disjoint():
    """No training crop can touch a held-out row: the test crops come from the bottom rows only."""
    gen = torch.Generator().manual_seed(0)
    for c, img in enumerate(crops.source_images()):
        assert min(img.shape[1:]) == crops.SHORT_SIDE and img.shape[0] == 3
        train, _ = crops.random_crops(64, gen, "train", torch.full((64,), c))
        test, _ = crops.random_crops(64, gen, "test", torch.full((64,), c))
        bottom = img[:, -crops.TEST_ROWS:]
        # every test crop is a window of the held-out band, no train crop is
        windows = bottom.unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3, 32, 32)
        assert all((windows == t).flatten(1).all(1).any() for t in test[:8])
        assert not any((windows == t).flatten(1).all(1).any() for t in train[:8])
    a, _ = crops.real_crops("test")
    b, _ = crops.real_crops("test")
    assert torch.equal(a, b), "the fixed test crops changed between calls"


def test_classifier_accuracy_on_held_out_crops():
    images, labels = crops.real_crops("test")
    acc = metrics.class_accuracy(images, labels)
    # The held-out rows are another part of each picture (the astronaut's suit below her face, the
    # ground below the rocket), so this is a test under spatial shift; recorded: 89.4 %.
    assert acc >= 0.85, f"crops classifier accuracy on held-out crops is {acc:.3f}, expected >= 0.85"
    assert metrics.classifier_info("crops-classifier")["test_accuracy"] == pytest.approx(acc, abs=1e-3)


def test_frechet_distance_separates_real_from_noise():
    real, _ = crops.real_crops("test")
    train, _ = crops.real_crops("train")
    noise = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance(real, real) < 1e-3
    assert metrics.frechet_distance(real, train) < metrics.frechet_distance(real, noise)
    with pytest.raises(ValueError, match="different shapes"):
        metrics.frechet_distance(real, metrics.real_digits("test")[0])


def test_wrong_image_shape_names_both_judges():
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\) for crops-classifier"):
        metrics.class_accuracy(torch.rand(2, 3, 16, 16), [0, 1])


def test_model_is_a_deep_pixart():
    sampler = zoo.load("crops-pixart")
    model = sampler.transformer
    assert type(model).__name__ == "PixArtTransformer2DModel"
    assert len(model.transformer_blocks) >= 12 and model.config.sample_size // model.config.patch_size == 16
    assert type(sampler.scheduler).__name__ == "DPMSolverMultistepScheduler"


@pytest.fixture(scope="session")
def pixart_opt():
    sampler = zoo.load("crops-pixart")
    model = sampler.transformer

    def calibration(m):
        return with_transformer(sampler, m, class_labels=[0], seed=1, num_inference_steps=STEPS)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # one class, one prune rate and width, ages up to 2: the structure is what is tested, not
        # the plan's quality (and the profile is the suite's slowest setup)
        prof = dit_opt.profile(model, calibration, progress=False, probes=0, max_age=2, prune_rates=(0.5,),
                               widths=(0.5,))
        opt = dit_opt.optimize(model, 0.5, calibration=prof, example_inputs=sampler.example_inputs(),
                               compile=False, progress=False)
    return sampler, model, opt


def test_optimize_within_budget_and_close(pixart_opt):
    sampler, model, opt = pixart_opt

    def generate(m):
        return with_transformer(sampler, m, **EVAL)

    frac = flop_fraction(generate, model, opt)
    assert frac <= 0.51, f"crops-pixart at budget 0.5: counted FLOP fraction {frac:.4f}"
    full, fast = generate(model), generate(opt)
    assert torch.equal(fast, generate(opt)), "the same generation twice differs"
    assert metrics.psnr(fast, full) >= 20.0, f"PSNR at budget 0.5 is {metrics.psnr(fast, full):.2f} dB"
