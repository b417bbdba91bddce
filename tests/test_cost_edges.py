"""Cost-model edge cases: rounding of a PRUNE over few tokens, attention over data-dependent lengths."""

from __future__ import annotations

import warnings

import torch

from dit_opt.capture import capture
from passes.annotate_flops import annotate_flops
from passes.annotate_sensitivity import action_flops


def test_a_prune_over_one_token_costs_a_full_compute():
    """A temporal block attends over the frames: with one frame, PRUNE at any rate recomputes that
    token (``max(1, round(rate * 1))``), so it costs a compute plus its gather and scatter, not
    ``rate`` of one (the solver took it for a 75 % saving and the counted FLOPs stayed at 100 %)."""
    from diffusers import TransformerTemporalModel

    torch.manual_seed(0)
    model = TransformerTemporalModel(num_attention_heads=8, attention_head_dim=4, in_channels=4, norm_num_groups=1,
                                     num_layers=1).eval()
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.full((2,), 500.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture(model, inputs)
    annotate_flops(graph)
    flops = action_flops(graph, prune_rates=(0.25, 0.5), widths=(0.5,))
    compute = flops["flops_compute"][0]
    assert (flops["flops_prune"][0] >= compute).all(), (flops["flops_prune"][0], compute)


def test_attention_over_data_dependent_lengths_is_counted():
    """FramePack packs its history by a mask: the key and value lengths are data-dependent sizes
    written differently (``u0 + 3``, ``u1 + u2``). torch's formula guards on their equality and
    raises; the attention formula counts the same products over the key's length instead."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.utils.flop_counter import sdpa_flop_count

    from dit_opt.flops import _sdpa_cpu_flop

    env = ShapeEnv()
    u0, u1, u2 = (env.create_unbacked_symint() for _ in range(3))
    flops = _sdpa_cpu_flop((1, 2, 4, 8), (1, 2, u0 + 3, 8), (1, 2, u1 + u2, 8))
    assert str(flops) == "256*u0 + 768"  # 2 * (2 * 4 * 8) FLOPs per key token, both products
    assert _sdpa_cpu_flop((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8)) == sdpa_flop_count((1, 2, 4, 8), (1, 2, 5, 8),
                                                                                      (1, 2, 5, 8))
