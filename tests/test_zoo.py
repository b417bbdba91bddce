"""The shipped reference models: loading, deterministic sampling, transformer swapping, errors.

Few steps and few samples keep this fast; the quality of the default samplers is measured by
examples/evaluate_reference_models.py, not here (tests never retrain or run full loops).
"""

from __future__ import annotations

import pytest
import torch

from dit_opt import zoo
from dit_opt.zoo.models import image_ids, pack_images, unpack_tokens

NAMES = ["crops-pixart", "digits-dit", "digits-mmdit"]
GEOMETRY = {"digits-dit": (1, 16, 16), "digits-mmdit": (1, 16, 16), "crops-pixart": (3, 32, 32)}


@pytest.fixture(scope="module", params=NAMES)
def sampler(request):
    return zoo.load(request.param)


class CountingWrapper(torch.nn.Module):
    """Forwards to a transformer and counts calls and batch sizes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batch_sizes: list[int] = []

    def forward(self, **kwargs):
        self.batch_sizes.append(kwargs["hidden_states"].shape[0])
        return self.inner(**kwargs)


def test_available_lists_every_model():
    assert zoo.available() == NAMES


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="digits-dit") as info:
        zoo.load("digits-unet")
    assert "digits-unet" in str(info.value) and "digits-mmdit" in str(info.value)


def test_metadata_records_training(sampler):
    meta = zoo.info(sampler.name)
    training = meta["training"]
    for key in ("seed", "steps", "wall_time_s", "command"):
        assert key in training, f"{sampler.name}.json lacks training.{key}"
    assert "train_reference_models.py" in training["command"]
    assert sampler.num_inference_steps == meta["sampler_defaults"]["num_inference_steps"]


def test_shapes_and_range(sampler):
    images = sampler([0, 7, sampler.num_classes - 1], seed=1, num_inference_steps=3)
    assert images.shape == (3, *GEOMETRY[sampler.name]) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_deterministic_for_a_seed(sampler):
    a = sampler([1, 2], seed=3, num_inference_steps=3)
    b = sampler([1, 2], seed=3, num_inference_steps=3)
    c = sampler([1, 2], seed=4, num_inference_steps=3)
    assert torch.equal(a, b), "same seed gave different samples"
    assert not torch.equal(a, c), "different seeds gave identical samples"


def test_swapped_transformer_is_called_once_per_step_with_cfg_batch(sampler):
    original = sampler.transformer
    counter = CountingWrapper(original)
    sampler.transformer = counter
    try:
        guided = sampler([4, 5, 6], seed=0, num_inference_steps=4)
        assert counter.batch_sizes == [6] * 4, f"expected 4 calls of batch 6 (cond + uncond), got {counter.batch_sizes}"
        counter.batch_sizes.clear()
        sampler([4, 5, 6], seed=0, num_inference_steps=4, guidance_scale=1.0)
        assert counter.batch_sizes == [3] * 4, f"scale 1.0 should skip the uncond half: {counter.batch_sizes}"
    finally:
        sampler.transformer = original
    assert torch.equal(guided, sampler([4, 5, 6], seed=0, num_inference_steps=4)), \
        "a forwarding wrapper changed the samples"


def test_example_inputs_run_the_transformer(sampler):
    inputs = sampler.example_inputs(batch_size=4)
    assert inputs["hidden_states"].shape[0] == 4
    with torch.no_grad():
        out = sampler.transformer(**inputs).sample
    assert out.shape == inputs["hidden_states"].shape


def test_timesteps_match_the_loop(sampler):
    steps = sampler.timesteps(5)
    assert len(steps) == 5 and bool((steps[:-1] > steps[1:]).all()), f"timesteps not decreasing: {steps}"


def test_invalid_labels_are_rejected(sampler):
    last = sampler.num_classes - 1
    with pytest.raises(ValueError, match=f"classes 0..{last}"):
        sampler([sampler.num_classes], num_inference_steps=1)
    with pytest.raises(ValueError, match=f"classes 0..{last}"):
        sampler([], num_inference_steps=1)


def test_reference_images_match_the_samples(sampler):
    real, labels = sampler.reference_images("test")
    assert tuple(real.shape[1:]) == GEOMETRY[sampler.name]
    assert sorted(set(labels.tolist())) == list(range(sampler.num_classes))
    assert sampler.labels(sampler.num_classes + 1) == [*range(sampler.num_classes), 0]


def test_guidance_halves_in_the_pipeline_order():
    """crops-pixart batches [null; conditional] as PixArtAlphaPipeline, the digits models the other way."""

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.seen = inner, None

        def forward(self, **kwargs):
            key = "encoder_hidden_states" if "encoder_hidden_states" in kwargs else "class_labels"
            self.seen = kwargs[key]
            return self.inner(**kwargs)

    pixart, dit = zoo.load("crops-pixart"), zoo.load("digits-dit")
    for s in (pixart, dit):
        s.transformer = Spy(s.transformer)
        s([0], seed=0, num_inference_steps=1)
    null_tokens, _ = pixart.prompt_encoder(torch.tensor([pixart.null_class]))
    assert torch.equal(pixart.transformer.seen[0], null_tokens[0]), "the first half of a PixArt batch is not null"
    assert dit.transformer.seen.tolist() == [0, dit.null_class]


def test_flux_packing_round_trip():
    x = torch.randn(2, 1, 16, 16)
    tokens = pack_images(x)
    assert tokens.shape == (2, 64, 4)
    assert torch.equal(unpack_tokens(tokens), x)
    ids = image_ids()
    assert ids.shape == (64, 3) and ids[9].tolist() == [0.0, 1.0, 1.0]
