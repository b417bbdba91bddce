"""Synthetic inputs derived from the model (signature, config, embedding layer), for any class."""

from __future__ import annotations

import warnings

import pytest
import torch

import dit_opt
from dit_opt import synthetic
from dit_opt.calibration import schedule_family, synthetic_calibration
from dit_opt.testing import counted_flops, tiny_model


def _shapes(inputs: dict) -> dict:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("name, expected", [
    # an image through a Conv2d patch embedding
    ("dit", {"hidden_states": (2, 4, 8, 8), "timestep": (2,), "class_labels": (2,)}),
    # packed tokens with their positional ids, timesteps in [0, 1]
    ("chroma", {"hidden_states": (2, 64, 4), "encoder_hidden_states": (2, 8, 32), "timestep": (2,),
                "img_ids": (64, 3), "txt_ids": (8, 3)}),
    # packed tokens with the grid as a list of shapes
    ("qwenimage", {"hidden_states": (2, 64, 16), "encoder_hidden_states": (2, 8, 16), "timestep": (2,),
                   "img_shapes": [(1, 8, 8), (1, 8, 8)]}),
    # a video of images (frames before channels) into a Conv2d
    ("cogvideox", {"hidden_states": (2, 3, 4, 8, 8), "encoder_hidden_states": (2, 8, 48), "timestep": (2,)}),
    # a video (channels before frames) into a Conv2d, as many frames as its frame table
    ("latte", {"hidden_states": (2, 4, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 8, 8)}),
    # packed video tokens, the grid as three integers, a required text mask
    ("ltx", {"hidden_states": (2, 192, 4), "encoder_hidden_states": (2, 8, 16), "timestep": (2,),
             "encoder_attention_mask": (2, 8), "num_frames": 3, "height": 8, "width": 8}),
])
def test_inputs_are_derived_from_the_model(name, expected):
    model, _ = tiny_model(name)
    inputs = synthetic.example_inputs(model)
    assert _shapes(inputs) == expected
    with torch.no_grad():
        model(**inputs)


def test_unit_timesteps_and_schedule_family_are_read_from_the_model():
    chroma, _ = tiny_model("chroma")  # forward multiplies the timestep by 1000
    auraflow, _ = tiny_model("auraflow")  # its sinusoidal embedding scales by 1000
    sd3, _ = tiny_model("sd3")
    latte, _ = tiny_model("latte")  # a learned variance: twice the input channels out
    assert synthetic.unit_timesteps(chroma) and synthetic.unit_timesteps(auraflow)
    assert not synthetic.unit_timesteps(sd3)
    assert float(synthetic.example_inputs(chroma)["timestep"][0]) == 0.5
    assert [schedule_family(m) for m in (chroma, auraflow, sd3, latte)] == ["flow_unit", "flow_unit", "flow", "ddim"]


def test_optimize_with_nothing_but_the_model_and_a_budget():
    """No calibration and no inputs: a class without any hand-written inputs self-calibrates."""
    model, _ = tiny_model("ltx")
    with pytest.warns(UserWarning, match="synthetic inputs"):
        opt = dit_opt.optimize(model, budget=0.5, compile=False, progress=False)
    cal = synthetic_calibration(model, warn=False)  # the loop optimize ran
    with counted_flops(model) as full, torch.no_grad():
        cal(model)
    with counted_flops(model) as got, torch.no_grad():
        cal(opt)
    assert got[0] <= 0.51 * full[0]
    assert opt.plan.num_steps == 28  # flow matching's default loop


def test_a_required_argument_without_a_rule_is_named():
    from diffusers import LuminaNextDiT2DModel

    model = LuminaNextDiT2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2,
                                 num_attention_heads=3, num_kv_heads=1, multiple_of=16, cross_attention_dim=32)
    with pytest.raises(dit_opt.InputMismatchError, match=r"'image_rotary_emb'.*example_inputs="):
        synthetic.example_inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(dit_opt.InputMismatchError, match="image_rotary_emb"):
            dit_opt.optimize(model, budget=0.5, compile=False, progress=False)


def test_a_model_that_runs_on_no_layout_gets_the_layouts_tried():
    model, _ = tiny_model("dit")
    model.pos_embed.proj = torch.nn.Conv2d(7, 64, 2, 2)  # takes no latent this config describes
    with pytest.raises(dit_opt.InputMismatchError, match=r"runs on none.*latent image \(4, 8, 8\)"):
        synthetic.example_inputs(model)


def test_a_registered_builder_wins(monkeypatch):
    model, _ = tiny_model("dit")
    monkeypatch.setitem(synthetic._BUILDERS, type(model).__name__, lambda m, b, n, g: {
        "hidden_states": torch.zeros(b, 4, 8, 8), "timestep": None, "class_labels": torch.zeros(b, dtype=torch.long)})
    inputs = synthetic.example_inputs(model, batch_size=3)
    assert inputs["hidden_states"].abs().sum() == 0 and inputs["timestep"].tolist() == [500.0] * 3


def test_conditioning_channels_after_the_noisy_ones_are_held():
    """An image-to-video model takes its conditioning concatenated to the noisy channels (Motif:
    33 in, 16 out): the synthetic loop steps the first 16 and leaves the rest as they are."""
    from diffusers import MotifVideoTransformer3DModel

    torch.manual_seed(0)
    model = MotifVideoTransformer3DModel(
        in_channels=33, out_channels=16, num_layers=1, num_single_layers=1, num_decoder_layers=0,
        num_attention_heads=2, attention_head_dim=12, patch_size=1, patch_size_t=1, text_embed_dim=32,
        image_embed_dim=4, rope_axes_dim=[4, 4, 4], qk_norm="rms_norm", norm_type="layer_norm",
        enable_text_cross_attention_dual=False, enable_text_cross_attention_single=False).eval()
    latent = synthetic.example_inputs(model)["hidden_states"]
    out = synthetic_calibration(model, num_inference_steps=3, warn=False)(model)
    assert out.shape == latent.shape
    assert torch.equal(out[:, 16:], latent[:, 16:])
    assert not torch.allclose(out[:, :16], latent[:, :16])


def test_a_control_video_is_sized_by_the_config():
    """VACE's blocks read a control video beside the latent (``vace_in_channels`` wide): without it
    the model does not run."""
    from diffusers import WanVACETransformer3DModel

    model = WanVACETransformer3DModel(
        patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, vace_layers=[0], vace_in_channels=48).eval()
    inputs = synthetic.example_inputs(model)
    assert inputs["control_hidden_states"].shape == (2, 48, *inputs["hidden_states"].shape[2:])


def test_two_text_encoders_and_size_conditioning():
    """HunyuanDiT: a CLIP and a T5 sequence, each of its configured length and width with its own
    mask, the size conditioning and the style; its one small block is still found as the block list."""
    from diffusers import HunyuanDiT2DModel

    from dit_opt.capture import capture

    model = HunyuanDiT2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                              num_attention_heads=2, cross_attention_dim=8, cross_attention_dim_t5=16,
                              hidden_size=16, pooled_projection_dim=4, text_len=4, text_len_t5=6,
                              activation_fn="gelu-approximate").eval()
    inputs = synthetic.example_inputs(model)
    assert _shapes(inputs) == {"hidden_states": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 4, 8),
                               "text_embedding_mask": (2, 4), "encoder_hidden_states_t5": (2, 6, 16),
                               "text_embedding_mask_t5": (2, 6), "image_meta_size": (2, 6), "style": (2,)}
    assert [b.name for b in capture(model, inputs).blocks] == ["blocks.0"]


def test_text_width_from_the_context_projection():
    from diffusers import PRXTransformer2DModel

    model = PRXTransformer2DModel(in_channels=4, patch_size=2, context_in_dim=24, hidden_size=32, mlp_ratio=2.0,
                                  num_heads=2, depth=1, axes_dim=[8, 8]).eval()
    assert synthetic.example_inputs(model)["encoder_hidden_states"].shape == (2, 8, 24)
