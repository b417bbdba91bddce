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
    with counted_flops(opt) as got, torch.no_grad():
        cal(opt)
    assert got[0] <= 0.51 * full[0]
    assert opt.plan.num_steps == 28  # flow matching's default loop


def _lumina_next():
    """LuminaNext: its forward requires the rotary table that its pipeline builds (no rule derives it)."""
    from diffusers import LuminaNextDiT2DModel

    torch.manual_seed(0)
    model = LuminaNextDiT2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2,
                                 num_attention_heads=3, num_kv_heads=1, multiple_of=16, cross_attention_dim=32).eval()
    gen = torch.Generator().manual_seed(0)
    # the dummy inputs of diffusers' own test of the class
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.rand(2, generator=gen),
              "encoder_hidden_states": torch.randn(2, 4, 32, generator=gen), "encoder_mask": torch.ones(2, 4),
              "image_rotary_emb": torch.randn(384, 384, 4, generator=gen), "cross_attention_kwargs": {}}
    return model, inputs


def test_a_required_argument_without_a_rule_is_named():
    model, _ = _lumina_next()
    with pytest.raises(dit_opt.InputMismatchError,
                       match=r"'image_rotary_emb'.*optimize\(model, budget, example_inputs=\{'hidden_states'"):
        synthetic.example_inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(dit_opt.InputMismatchError, match="image_rotary_emb"):
            dit_opt.optimize(model, budget=0.5, compile=False, progress=False)


def test_optimize_self_calibrates_on_the_example_inputs_it_is_given():
    """What the error above advises works: with one forward's inputs and no calibration, optimize
    runs its synthetic loop around them (before, it tried to derive them again and raised)."""
    model, inputs = _lumina_next()
    with pytest.warns(UserWarning, match="the given conditioning"):
        opt = dit_opt.optimize(model, budget=0.5, example_inputs=inputs, compile=False, progress=False,
                               actions=("reuse",), select=False)
    assert opt.plan.num_steps == 28  # flow matching's default loop
    cal = synthetic_calibration(model, example_inputs=inputs, warn=False)
    with counted_flops(model) as full, torch.no_grad():
        cal(model)
    with counted_flops(opt) as got, torch.no_grad():
        cal(opt)
    assert got[0] <= 0.51 * full[0], f"counted {got[0] / full[0]:.3f} of the full FLOPs"


def test_the_synthetic_loop_is_built_around_given_inputs():
    """The latent is seeded noise of the given shape (the same every run), the timestep is set at
    each step in the given one's shape and dtype, everything else is passed as given."""
    model, _ = tiny_model("dit")
    labels, latent = torch.tensor([1, 2, 3]), torch.zeros(3, 4, 8, 8)
    given = {"hidden_states": latent, "timestep": torch.zeros(3, dtype=torch.long), "class_labels": labels}
    cal = synthetic_calibration(model, num_inference_steps=3, example_inputs=given, warn=False)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        with torch.no_grad():
            first, second = cal(model), cal(model)
    finally:
        handle.remove()
    assert torch.equal(first, second) and first.shape == latent.shape
    assert len(calls) == 6 and all(c["class_labels"] is labels for c in calls)
    noise = [c["hidden_states"] for c in calls]
    assert noise[0].abs().sum() > 0 and torch.equal(noise[0], noise[3])  # not the given zeros; each run alike
    steps = [c["timestep"] for c in calls[:3]]
    assert all(t.shape == (3,) and t.dtype == torch.long for t in steps)
    assert steps[0][0] > steps[1][0] > steps[2][0], [t.tolist() for t in steps]


def test_given_inputs_without_the_latent_are_named():
    model, inputs = tiny_model("dit")
    with pytest.raises(dit_opt.InputMismatchError, match=r"no floating-point tensor 'hidden_states'"):
        synthetic_calibration(model, example_inputs={k: v for k, v in inputs.items() if k != "hidden_states"})


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


def test_a_prediction_under_another_name_is_stepped():
    """PriorTransformer returns ``predicted_image_embedding``, not ``sample``: the loop steps it
    all the same (the first field of a diffusers output)."""
    from diffusers import PriorTransformer

    torch.manual_seed(0)
    model = PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=2, embedding_dim=8,
                             num_embeddings=7, additional_embeddings=4).eval()
    inputs = {"hidden_states": torch.randn(4, 8), "timestep": torch.tensor(2.0), "proj_embedding": torch.randn(4, 8),
              "encoder_hidden_states": torch.randn(4, 7, 8)}
    with torch.no_grad():
        out = synthetic_calibration(model, num_inference_steps=3, example_inputs=inputs, warn=False)(model)
    assert out.shape == (4, 8) and torch.isfinite(out).all()


def test_a_latent_given_as_a_list_is_stepped_sample_by_sample():
    """Z-Image takes (and returns) one latent per sample, in a list: each is noised and stepped
    on its own, in its own shape."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=16, n_layers=1,
                                     n_refiner_layers=1, n_heads=1, n_kv_heads=2, qk_norm=True, cap_feat_dim=16,
                                     rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
                                     axes_lens=[256, 32, 32]).eval()
    inputs = {"x": [torch.randn(16, 1, 8, 8), torch.randn(16, 1, 4, 8)], "t": torch.tensor([0.0, 0.0]),
              "cap_feats": [torch.randn(6, 16), torch.randn(6, 16)]}
    with torch.no_grad():
        out = synthetic_calibration(model, num_inference_steps=2, example_inputs=inputs, warn=False)(model)
    assert [tuple(x.shape) for x in out] == [(16, 1, 8, 8), (16, 1, 4, 8)]
    assert schedule_family(model) == "flow_unit"  # its forward scales t by its config's t_scale of 1000
