"""Real diffusers pipelines at toy size, built offline: for tests and demos of dit-opt inside a pipeline.

Each is the diffusers pipeline class itself, with the tiny transformer of
:func:`dit_opt.testing.tiny_model`, a one-level VAE, and, where the pipeline encodes text, tiny
CLIP and T5 text encoders made from configs, with tokenizers written here (CLIP: a character
vocabulary, no merges; T5: a unigram model over characters): nothing is downloaded. Text
encoders need ``transformers`` (in the ``test`` extra).

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
    "pixart": "PixArtSigmaPipeline: a T5 text encoder, DPM-Solver++, guidance batched",
    "flux": "FluxPipeline: CLIP and T5 text encoders, flow matching shifted by the image size, no guidance batch",
    "flux-cfg": "FluxPipeline with true CFG (a negative prompt): the two branches called apart, in cache_context",
    "sana": "SanaPipeline: a Gemma2 text encoder, a DC-AE, flow DPM-Solver++ (shift 3), guidance batched, "
            "a Mix-FFN that reshapes tokens to the image grid",
    "wan": "WanPipeline: a UMT5 text encoder, a video VAE (5 frames), flow matching (shift 3), the two guidance "
           "branches called apart in cache_context(name, step_index=..., num_inference_steps=...)",
    "lumina2": "Lumina2Pipeline: a Gemma2 text encoder, flow matching, the two guidance branches called apart; its "
               "transformer captured block by block (torch.export rejects its forward), prompts of two lengths "
               "(its joint blocks then get a mask, its refiners none)",
    "cogvideox": "CogVideoXPipeline: a T5 text encoder, CogVideoX's DDIM, guidance batched, 9 frames at the "
                 "transformer's configured size (its positional embedding is made for it); latents out (the "
                 "video VAE's decode would cost ten times the transformer)",
}


def tiny_pipeline(name: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A tiny pipeline and the arguments of one call of it (two images or videos of 8 to 64
    pixels, its default step count, a seeded generator, tensors out; CogVideoX latents).

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
    transformer, _ = tiny_model(name.split("-")[0], seed=seed,
                                **({"num_embeds_ada_norm": 1000} if name == "dit" else {}))
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
    elif name == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        tokenizer, encoders = _clip_text_encoders(2, seed)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
            text_encoder_3=None, tokenizer_3=None)
        call = dict(prompt=["a cat", "a dog"], num_inference_steps=28, height=16, width=16, max_sequence_length=8,
                    generator=generator, output_type="pt")
    elif name == "pixart":
        from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

        tokenizer, encoder = _t5_text_encoder(transformer.config.caption_channels, seed)
        pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                                   scheduler=DPMSolverMultistepScheduler())
        call = dict(prompt=["a cat", "a dog"], num_inference_steps=20, height=8, width=8, max_sequence_length=8,
                    clean_caption=False, use_resolution_binning=False, generator=generator, output_type="pt")
    elif name == "sana":
        from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline

        tokenizer, encoder = _gemma2_text_encoder(transformer.config.caption_channels, seed + 21)
        torch.manual_seed(seed)
        dc_ae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
            upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
            scaling_factor=0.41407).eval()
        scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=dc_ae, transformer=transformer,
                            scheduler=scheduler)
        # 32x32 pixels (the least Sana takes): 16x16 latents, 256 tokens, over which the blocks' Mix-FFN
        # convolves on the image grid: no block can run on a token subset
        call = dict(prompt=["a cat", "a dog"], num_inference_steps=20, height=32, width=32, max_sequence_length=8,
                    complex_human_instruction=None, clean_caption=False, use_resolution_binning=False,
                    generator=generator, output_type="pt")
    elif name == "lumina2":
        from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

        # (two layers: the pipeline reads the encoder's second-to-last hidden states)
        tokenizer, encoder = _gemma2_text_encoder(transformer.config.cap_feat_dim, seed + 41, layers=2)
        pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                               vae=vae, text_encoder=encoder, tokenizer=tokenizer)
        # 32x32 pixels: 4x4 latents (the pipeline takes the VAE to downsample 8 times); prompts of two
        # lengths and no system prompt, so that the text masks differ between the samples
        call = dict(prompt=["a cat", "a large dog"], negative_prompt=["blurry", "dark"], height=32, width=32,
                    num_inference_steps=30, max_sequence_length=32, system_prompt="", generator=generator,
                    output_type="pt")
    elif name == "wan":
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
        from transformers import UMT5Config, UMT5EncoderModel

        tokenizer = _character_tokenizer()
        torch.manual_seed(seed + 31)
        encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=tokenizer.vocab_size, d_model=transformer.config.text_dim, d_kv=16,
            d_ff=2 * transformer.config.text_dim, num_layers=1, num_heads=2, relative_attention_num_buckets=8)).eval()
        torch.manual_seed(seed)
        video_vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4).eval()
        pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=video_vae,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)
        # 5 frames of 32x32: 2 latent frames of 4x4, 8 tokens after the (1, 2, 2) patches
        call = dict(prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"], height=32, width=32,
                    num_frames=5, num_inference_steps=50, max_sequence_length=8, generator=generator,
                    output_type="pt")
    elif name == "cogvideox":
        from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

        tokenizer, encoder = _t5_text_encoder(transformer.config.text_embed_dim, seed)
        torch.manual_seed(seed)
        video_vae = AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
            layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4).eval()
        pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=video_vae, transformer=transformer,
                                 scheduler=CogVideoXDDIMScheduler())
        # 64x64 pixels, 9 frames: the transformer's 8x8 latents and 3 latent frames
        call = dict(prompt=["a cat", "a dog"], height=64, width=64, num_frames=9, num_inference_steps=50,
                    max_sequence_length=8, generator=generator, output_type="latent")
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        clip, clip_encoders = _clip_text_encoders(1, seed, hidden=transformer.config.pooled_projection_dim,
                                                  projection=False)
        t5, t5_encoder = _t5_text_encoder(transformer.config.joint_attention_dim, seed)
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip_encoders[0], tokenizer=clip,
                            text_encoder_2=t5_encoder, tokenizer_2=t5, transformer=transformer)
        call = dict(prompt=["a cat", "a dog"], num_inference_steps=28, height=8, width=8, max_sequence_length=8,
                    guidance_scale=1.0, generator=generator, output_type="pt")
        if name == "flux-cfg":
            call.update(negative_prompt=["blurry", "dark"], true_cfg_scale=4.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


def _clip_text_encoders(n: int, seed: int, hidden: int = 16, projection: bool = True) -> tuple[Any, list[Any]]:
    """A CLIP tokenizer over single characters and ``n`` tiny CLIP text encoders (with
    projections of size ``hidden``, or, without, pooling to ``hidden``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARACTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder = Path(tempfile.mkdtemp(prefix="dit_opt_clip_"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    encoders = []
    for i in range(n):
        torch.manual_seed(seed + 1 + i)
        encoders.append((CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval())
    return tokenizer, encoders


def _t5_text_encoder(width: int, seed: int) -> tuple[Any, Any]:
    """A T5 tokenizer (a unigram model over single characters, built with ``tokenizers``) and a
    one-layer T5 encoder of ``width`` channels."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = _character_tokenizer()
    torch.manual_seed(seed + 11)
    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=width, d_kv=16, d_ff=2 * width, num_layers=1,
                      num_heads=2, relative_attention_num_buckets=8)
    return tokenizer, T5EncoderModel(config).eval()


def _gemma2_text_encoder(width: int, seed: int, layers: int = 1) -> tuple[Any, Any]:
    """The character tokenizer and a tiny Gemma2 encoder of hidden size ``width`` (Sana, Lumina2)."""
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = _character_tokenizer()
    torch.manual_seed(seed)
    encoder = Gemma2Model(Gemma2Config(
        vocab_size=tokenizer.vocab_size, hidden_size=width, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0)).eval()
    return tokenizer, encoder


def _character_tokenizer() -> Any:
    """A T5-style tokenizer (a unigram model over single characters, built with ``tokenizers``;
    pad 0, end of sequence 1, unknown 2), for the T5 and Gemma2 encoders alike."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "\u2581" + CHARACTERS]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=64)


#: The characters the tiny tokenizers know.
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
