"""Real diffusers pipelines at toy size, built offline: for tests and demos of dit-opt inside a pipeline.

Each is the diffusers pipeline class itself, with the tiny transformer of
:func:`dit_opt.testing.tiny_model`, a one-level VAE, and, where the pipeline encodes text, tiny
CLIP text encoders made from configs and a CLIP tokenizer written here (a character vocabulary,
no merges): nothing is downloaded. Text encoders need ``transformers`` (in the ``test`` extra).

Example:
    >>> pipe, call = tiny_pipeline("sd3")
    >>> images = pipe(**call).images            # (2, 3, 16, 16), 28 flow-matching steps
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from dit_opt.testing import tiny_model

__all__ = ["PIPELINES", "tiny_pipeline"]

#: name -> what the pipeline is.
PIPELINES = {
    "dit": "DiTPipeline: class-conditional, DDIM, classifier-free guidance batched",
    "sd3": "StableDiffusion3Pipeline: two CLIP text encoders (no T5), shifted flow matching, guidance batched",
}


def tiny_pipeline(name: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A tiny pipeline and the arguments of one call of it (two images, 16x16, its default step
    count, a seeded generator, tensors out).

    Args:
        name: one of :data:`PIPELINES`.
        seed: seed of every weight.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if name not in PIPELINES:
        raise ValueError(f"unknown tiny pipeline {name!r}; choose one of {sorted(PIPELINES)}")
    from diffusers import AutoencoderKL

    # DiTPipeline's unconditional label is class 1000, as in the ImageNet models
    transformer, _ = tiny_model(name, seed=seed, **({"num_embeds_ada_norm": 1000} if name == "dit" else {}))
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, shift_factor=0.0).eval()
    generator = torch.Generator().manual_seed(seed)
    if name == "dit":
        from diffusers import DDIMScheduler, DiTPipeline

        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(),
                           id2label={i: f"class{i}" for i in range(10)})
        call = dict(class_labels=[1, 2], num_inference_steps=50, generator=generator, output_type="np")
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        tokenizer, encoders = _clip_text_encoders(2, seed)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
            text_encoder_3=None, tokenizer_3=None)
        call = dict(prompt=["a cat", "a dog"], num_inference_steps=28, height=16, width=16, max_sequence_length=8,
                    generator=generator, output_type="pt")
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


def _clip_text_encoders(n: int, seed: int) -> tuple[Any, list[Any]]:
    """A CLIP tokenizer over single characters and ``n`` tiny CLIP text encoders with projections."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder = Path(tempfile.mkdtemp(prefix="dit_opt_clip_"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=16, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1)
    encoders = []
    for i in range(n):
        torch.manual_seed(seed + 1 + i)
        encoders.append(CLIPTextModelWithProjection(config).eval())
    return tokenizer, encoders
