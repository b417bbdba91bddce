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


@pytest.mark.parametrize("name", TINY)
def test_total_matches_flop_counter(captured, name):
    model, inputs, g = captured(name)
    ref = count_flops(model, **inputs)
    assert ref > 0
    rel = abs(g.flops - ref) / ref
    assert rel <= 0.02, f"{name}: cost model {g.flops} vs FlopCounterMode {ref} ({100 * rel:.2f} % off)"


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
