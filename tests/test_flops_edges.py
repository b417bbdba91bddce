"""Cost-model edge cases on diffusers classes outside the tiny suite (configs and inputs of their
diffusers tests, as in ``examples/coverage_configs.json``): a sub-graph that ``torch.export.unflatten``
shares between two parent calls, ops export removes as dead, sizes that depend on the data."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from dit_opt.capture import capture
from dit_opt.flops import count_flops, flop_counter
from passes.annotate_flops import _concrete, _ExampleSizes, annotate_flops

GLM = {
    "attention_head_dim": 8, "condition_dim": 8, "in_channels": 4, "num_attention_heads": 2, "num_layers": 1,
    "out_channels": 4, "patch_size": 2, "prior_vq_quantizer_codebook_size": 64, "text_embed_dim": 32,
    "time_embed_dim": 16,
}
JOY_PLUS = {
    "hidden_size": 32, "in_channels": 16, "num_attention_heads": 2, "num_layers": 2, "patch_size": [1, 2, 2],
    "rope_dim_list": [4, 6, 6], "text_dim": 16, "theta": 256,
}
FRAMEPACK = {
    "attention_head_dim": 10, "guidance_embeds": True, "has_clean_x_embedder": True, "has_image_proj": True,
    "image_condition_type": None, "image_proj_dim": 16, "in_channels": 4, "num_attention_heads": 2,
    "num_layers": 1, "num_refiner_layers": 1, "num_single_layers": 1, "out_channels": 4, "patch_size": 2,
    "patch_size_t": 1, "pooled_projection_dim": 8, "rope_axes_dim": [2, 4, 4], "text_embed_dim": 16,
}


def _model(cls_name: str, config: dict) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    model = getattr(diffusers, cls_name)(**config).eval()
    with torch.no_grad():  # zero-initialised layers perturbed, as the coverage run does
        for p in model.parameters():
            if p.dim() >= 1 and float(p.abs().max()) == 0.0:
                p.copy_(0.02 * torch.randn(p.shape))
    return model


def _glm_inputs() -> dict:
    return {"hidden_states": torch.randn(1, 4, 8, 8), "encoder_hidden_states": torch.randn(1, 12, 32),
            "prior_token_id": torch.tensor([3]), "prior_token_drop": torch.tensor([False]),
            "timestep": torch.tensor([500]), "target_size": torch.tensor([[8.0, 8.0]]),
            "crop_coords": torch.tensor([[0.0, 0.0]])}


def _joy_plus_inputs() -> dict:
    return {"hidden_states": torch.randn(1, 2, 16, 1, 2, 2), "encoder_hidden_states": torch.randn(1, 12, 16),
            "timestep": torch.tensor([1.0]), "shape_list": [[[1, 1, 1], [1, 1, 1]]]}


def _framepack_inputs() -> dict:
    def latents(frames: int) -> torch.Tensor:
        return torch.randn(1, 4, frames, 4, 4)

    return {"hidden_states": latents(3), "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 12, 16), "pooled_projections": torch.randn(1, 8),
            "encoder_attention_mask": torch.ones(1, 12), "guidance": torch.tensor([300]),
            "image_embeds": torch.randn(1, 12, 16), "indices_latents": torch.ones(3),
            "latents_clean": latents(2), "indices_latents_clean": torch.ones(2),
            "latents_history_2x": latents(2), "indices_latents_history_2x": torch.ones(2),
            "latents_history_4x": latents(8), "indices_latents_history_4x": torch.ones(8)}


def _captured(model: torch.nn.Module, inputs: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture(model, inputs)
        annotate_flops(graph)
    return graph


@pytest.mark.parametrize(("cls_name", "config", "inputs", "text_tail"), [
    ("GlmImageTransformer2DModel", GLM, _glm_inputs, "transformer_blocks.0.ff.net.2"),
    ("JoyImageEditPlusTransformer3DModel", JOY_PLUS, _joy_plus_inputs, "double_blocks.1.txt_mlp.net.2"),
])
def test_graph_flops_are_exact_where_export_drops_dead_code(cls_name, config, inputs, text_tail):
    """Both classes' last block runs its MLP on the text tokens too, and the model discards that
    stream: export removes the MLP's last Linear there, so the graph computes one Linear less than
    the model's forward. GLM-Image's ``ff@1`` (the text call, Linear gone) then calls the image
    call's ``ff.net.0``, one sub-graph unflatten shares between two parents: counted at the image
    call's 16 tokens, not the text call's 12, it was 8,192 FLOPs over the graph."""
    model, example = _model(cls_name, config), inputs()
    graph = _captured(model, example)
    with torch.no_grad():
        ran = count_flops(graph, **example)
    assert graph.flops == ran, f"{cls_name}: cost model {graph.flops} vs FlopCounterMode over the graph {ran}"
    linear = model.get_submodule(text_tail)
    dead = 2 * example["encoder_hidden_states"].shape[1] * linear.in_features * linear.out_features
    assert count_flops(model, **example) - ran == dead


def test_data_dependent_sizes_count_at_their_capture_values():
    """FramePack packs its text and history by masks: its sizes are unbacked SymInts, whose upper
    bounds (u1 <= 24, u9 <= 94) counted it 76 % over; their values in the capture run count it exactly."""
    model, example = _model("HunyuanVideoFramepackTransformer3DModel", FRAMEPACK), _framepack_inputs()
    graph = _captured(model, example)
    ref = count_flops(model, **example)
    assert graph.flops == ref, f"cost model {graph.flops} vs FlopCounterMode {ref} ({graph.flops / ref - 1:+.1%})"


class _Masked(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(x[:, mask])  # as many tokens as the mask keeps: a data-dependent size


def test_a_data_dependent_size_falls_back_to_its_upper_bound_with_a_warning():
    x, mask = torch.randn(1, 8, 4), torch.tensor([True, False, True, False, False, True, False, False])
    exported = torch.export.export(_Masked(), (x, mask), strict=False)
    node = next(n for n in exported.graph.nodes if n.target == torch.ops.aten.linear.default)
    args = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in node.args]
    fake = args[0].fake_mode
    with fake, flop_counter() as fc:
        node.target(*args)
    flops = fc.get_total_flops()
    assert isinstance(flops, torch.SymInt)

    sizes = _ExampleSizes.of(SimpleNamespace(exported=exported))
    assert sizes.missing is None and sorted(sizes.values.values()) == [3]
    assert _concrete(flops, fake, sizes) == 2 * 3 * 4 * 4
    with pytest.warns(UserWarning, match="upper bounds"):
        assert _concrete(flops, fake, _ExampleSizes(missing="no example inputs")) == 2 * 8 * 4 * 4
