"""The FLOP cost model against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dit_opt.flops import count_flops
from dit_opt.testing import tiny_names

TINY = tiny_names()


def test_cpu_attention_is_counted():
    q = torch.randn(2, 4, 16, 8)
    flops = count_flops(F.scaled_dot_product_attention, q, q, q)
    # QK^T and AV: 2 * (2 * B * H * N * N * d)
    assert flops == 4 * 2 * 4 * 16 * 16 * 8, flops


def _dead_flops(name: str, model: torch.nn.Module, inputs: dict) -> int:
    """FLOPs of the model's forward that its captured graph does not compute: ``torch.export``
    removes ops whose results the model discards. The last joint block's text stream is such a
    result, so the Linear that ends its text MLP is gone (the model returns the image tokens only)."""
    tail = {"qwenimage": "txt_mlp.net.2", "cogview4": "ff.net.2"}.get(name)
    if tail is None:
        return 0
    linear = model.transformer_blocks[-1].get_submodule(tail)
    text_tokens = inputs["encoder_hidden_states"].shape[:-1].numel()
    return 2 * text_tokens * linear.in_features * linear.out_features


@pytest.mark.parametrize("name", TINY)
def test_total_matches_flop_counter(captured, name):
    """The cost model counts exactly what the captured graph computes, and that is the model's
    forward less only the dead code export removed."""
    model, inputs, g = captured(name)
    with torch.no_grad():
        ran = count_flops(g, **inputs)
    assert ran > 0
    assert g.flops == ran, f"{name}: cost model {g.flops} vs FlopCounterMode over the graph {ran}"
    ref = count_flops(model, **inputs)
    assert ref - ran == _dead_flops(name, model, inputs), f"{name}: the model's forward {ref}, its graph {ran}"


@pytest.mark.parametrize("name", TINY)
def test_per_block_figures_add_up(captured, name):
    _, _, g = captured(name)
    costs = g.costs
    blocks = costs.block_flops()
    assert set(blocks) == {b.name for b in g.blocks}
    assert all(v > 0 for v in blocks.values())
    assert costs.outside_blocks >= 0
    assert sum(blocks.values()) + costs.outside_blocks == g.flops
    # role sub-modules are part of their block
    for b in g.blocks:
        inside = sum(costs.role_cost(b.name, r).total for r in b.roles)
        assert inside <= blocks[b.name] + 1


@pytest.mark.parametrize("name", TINY)
def test_block_cost_matches_counter_on_block(captured, name):
    """Each block's figure equals FlopCounterMode on that block alone (eager, recorded inputs)."""
    model, inputs, g = captured(name)
    block = g.blocks[0]
    rec = {}
    mod = model.get_submodule(block.name)
    h = mod.register_forward_pre_hook(lambda m, a, k: rec.setdefault("x", (a, k)), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    h.remove()
    args, kwargs = rec["x"]
    ref = count_flops(mod, *args, **kwargs)
    assert abs(g.costs.block_flops()[block.name] - ref) <= 0.02 * ref


def test_token_and_width_scaling(captured):
    _, _, g = captured("dit")
    c = g.costs
    b = g.blocks[0].name
    attn = c.role_cost(b, "attn")
    mlp = c.role_cost(b, "mlp")
    assert attn.c2 > 0, "self-attention must grow quadratically with tokens"
    assert mlp.c2 == 0 and mlp.c1 > 0, "the MLP is linear in tokens"
    assert c.flops(b, tokens=0.5) < c.flops(b)
    assert c.flops(b, "attn", tokens=0.5) == pytest.approx(attn.c0 + attn.c1 / 2 + attn.c2 / 4)
    assert c.flops(b, "mlp", width=0.5) == pytest.approx(mlp.total / 2)
    assert c.flops(b, width=0.5) == pytest.approx(c.blocks[b].total - mlp.total / 2)
    with pytest.raises(ValueError, match="tokens must be"):
        c.flops(b, tokens=1.5)


def test_cross_attention_is_linear_in_image_tokens(captured):
    _, _, g = captured("pixart")
    cross = g.costs.role_cost(g.blocks[0].name, "cross_attn")
    assert cross.c2 == 0 and cross.c1 > 0
