"""Tiny randomly initialised diffusers transformers, for structure tests and quick demos.

Each is a real diffusers class at a toy size (hidden size <= 128, 2-4 blocks), built from a
config, so nothing is downloaded. Random weights do not behave like trained ones across
denoising steps: use the reference models in :mod:`dit_opt.zoo` for fidelity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dit_opt.synthetic import call_names, example_inputs

__all__ = ["TINY_CONFIGS", "assert_export_replays", "build_model", "counted_flops", "record_inputs", "record_outputs",
           "tiny_model", "tiny_names", "unbudgeted_plan"]

#: name -> (diffusers class name, config kwargs, expected block counts per list)
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any], dict[str, int]]] = {
    "dit": (
        "DiTTransformer2DModel",
        dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=3,
             sample_size=8, patch_size=2, num_embeds_ada_norm=11, norm_num_groups=32),
        {"transformer_blocks": 3},
    ),
    "pixart": (
        "PixArtTransformer2DModel",
        dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
             sample_size=8, patch_size=2, cross_attention_dim=64, caption_channels=48, norm_num_groups=32,
             use_additional_conditions=False),
        {"transformer_blocks": 2},
    ),
    "sd3": (
        "SD3Transformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
             num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=64,
             pooled_projection_dim=32, pos_embed_max_size=16),
        {"transformer_blocks": 2},
    ),
    "flux": (
        "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
             num_attention_heads=4, joint_attention_dim=48, pooled_projection_dim=32, guidance_embeds=False,
             axes_dims_rope=(4, 6, 6)),
        {"transformer_blocks": 2, "single_transformer_blocks": 3},
    ),
    "sana": (
        "SanaTransformer2DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=3,
             num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
             caption_channels=48, mlp_ratio=2.0, sample_size=8, patch_size=1),
        {"transformer_blocks": 3},
    ),
    "wan": (
        "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
             text_dim=48, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=32),
        {"blocks": 2},
    ),
    "cogvideox": (
        "CogVideoXTransformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=64,
             text_embed_dim=48, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
             temporal_compression_ratio=4, max_text_seq_length=8),
        {"transformer_blocks": 2},
    ),
    # the next five have no hand-written inputs anywhere: dit_opt.synthetic derives them
    "qwenimage": (
        "QwenImageTransformer2DModel",
        dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
             num_attention_heads=4, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
        {"transformer_blocks": 2},
    ),
    "auraflow": (
        "AuraFlowTransformer2DModel",
        dict(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=2,
             attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
             out_channels=4, pos_embed_max_size=256),
        {"joint_transformer_blocks": 1, "single_transformer_blocks": 2},
    ),
    "chroma": (
        "ChromaTransformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
             approximator_hidden_dim=16, approximator_layers=1),
        {"transformer_blocks": 1, "single_transformer_blocks": 2},
    ),
    "ltx": (
        "LTXVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
             num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16),
        {"transformer_blocks": 2},
    ),
    "latte": (
        "LatteTransformer3DModel",
        dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
             caption_channels=8, in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True,
             activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
             norm_elementwise_affine=False, norm_eps=1e-6, video_length=4),
        {"transformer_blocks": 2, "temporal_transformer_blocks": 2},
    ),
    # its blocks call their ``ff`` twice (image tokens, then text tokens)
    "cogview4": (
        "CogView4Transformer2DModel",
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
             num_attention_heads=2, text_embed_dim=16, time_embed_dim=16, condition_dim=4, sample_size=8),
        {"transformer_blocks": 2},
    ),
    # its last block passes the text stream through; attention over the valid text tokens only
    # (data-dependent sizes in the graph)
    "mochi": (
        "MochiTransformer3DModel",
        dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
             in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
             activation_fn="swiglu", max_sequence_length=16),
        {"transformer_blocks": 2},
    ),
    # diffusers' test config: one block, so the glue (text, size and style embeddings) is over
    # half the FLOPs and only whole step forecasts (no glue run) meet budget 0.5
    "hunyuandit": (
        "HunyuanDiT2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
             cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16,
             text_len=4, text_len_t5=4, activation_fn="gelu-approximate"),
        {"blocks": 1},
    ),
    # torch.export rejects its forward (Python sets of symbolic sequence lengths): captured block
    # by block (dit_opt.blockwise); three block lists, a mask passed as None to some blocks
    "lumina2": (
        "Lumina2Transformer2DModel",
        dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
             num_attention_heads=3, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
             scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=32),
        {"noise_refiner": 1, "context_refiner": 1, "layers": 2},
    ),
}


def tiny_names() -> list[str]:
    """Names accepted by :func:`tiny_model`."""
    return list(TINY_CONFIGS)


def tiny_model(name: str, seed: int = 0, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A tiny randomly initialised model and example inputs for one forward (batch 2).

    Args:
        name: one of :func:`tiny_names` (``"dit"``, ``"pixart"``, ``"sd3"``, ``"flux"``, ...).
        seed: seed of the weights and the inputs.
        overrides: config entries to change (e.g. ``num_embeds_ada_norm=1000``).

    Returns:
        ``(model in eval mode, example inputs)``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {tiny_names()}")
    cls_name, cfg, _ = TINY_CONFIGS[name]
    model = build_model(cls_name, {**cfg, **overrides}, seed)
    return model, example_inputs(model, batch_size=2, seed=seed)


def build_model(class_name: str, config: dict[str, Any], seed: int = 0) -> nn.Module:
    """The diffusers class ``class_name`` built from ``config`` with seeded random weights, in eval
    mode, zero-initialised weights perturbed: adaLN-Zero initialises the gates to zero, which makes
    a fresh block an identity and hides every bug, so each block really computes something."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, class_name)(**config).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 1 and float(p.abs().max()) == 0.0:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def unbudgeted_plan(profile: Any, grid: Any, granularity: str = "block") -> Any:
    """A budget-1 :class:`~dit_opt.plan.Plan` of ``grid``'s actions over the units and steps of
    ``profile``'s problem at ``granularity``, every step costed as computing everything: for
    tests of what an action does to the outputs, not of what it saves."""
    from dit_opt.plan import Plan, step_action

    problem = profile.to_problem(1.0, granularity=granularity)
    T = problem.num_steps
    step_flops = [float(problem.flops_compute[s].sum()) for s in range(T)]
    glue = sum(step_action(row) is None for row in grid)  # a whole-step forecast runs no glue
    return Plan(num_steps=T, units=problem.units, actions=grid, budget=1.0, full_flops=problem.full_flops,
                flops_fixed=problem.flops_fixed, predicted_flops=sum(step_flops) + problem.flops_fixed * glue / T,
                step_flops=step_flops, predicted_error=0.0,
                max_age=profile.max_age, solver="test", status="HEURISTIC", wall_time_s=0.0)


def _recorded(calibration: Any, module: Any, hooked: Any, register: str, grab: Any) -> list:
    """Run ``calibration(module)`` without grad with ``grab`` hooked on ``hooked`` (by
    ``register``, e.g. ``"register_forward_hook"``); what ``grab`` appended."""
    seen: list = []
    handle = getattr(hooked, register)(lambda *a, **kw: seen.append(grab(*a, **kw)), with_kwargs=True)
    try:
        with torch.no_grad():
            calibration(module)
    finally:
        handle.remove()
    return seen


def record_outputs(calibration: Any, module: Any) -> list:
    """The output ``sample`` of ``module`` at every call, over one run of ``calibration(module)``."""
    return _recorded(calibration, module, module, "register_forward_hook",
                     lambda m, args, kwargs, out: out.sample.detach().clone())


def assert_export_replays(opt: Any, served: Any, timesteps: Any, atol: float = 1e-5) -> None:
    """``served`` (an :class:`dit_opt.export.ExportedPlan` of ``opt``) gives ``opt``'s outputs at
    every step of a generation on the captured example inputs at ``timesteps``."""
    runner = opt.captured()
    base = runner.graph.example_inputs
    name = call_names(opt.model).timestep
    opt.reset()
    with torch.no_grad():
        for step, t in enumerate(timesteps):
            inputs = dict(base, **{name: torch.full_like(base[name], t)})
            want = opt(**inputs).sample
            (out,) = served(step, *runner.graph.flat_inputs(**inputs))
            assert float((want - out).abs().max()) <= atol, f"step {step}"


def record_inputs(calibration: Any, module: Any, hooked: Any) -> list:
    """The first 3-D tensor input (batch, tokens, channels) of ``hooked`` at every call, over one
    run of ``calibration(module)``: what a block (or its first norm) received, for comparing a
    rewritten run with the original one."""
    return _recorded(calibration, module, hooked, "register_forward_pre_hook", lambda m, args, kwargs: next(
        a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() == 3).clone())


@contextlib.contextmanager
def counted_flops(module: nn.Module) -> Iterator[list[int]]:
    """Count the FLOPs of ``module``'s own calls (``torch.utils.flop_counter``, attention
    included) while the block runs, e.g. a transformer's inside a whole pipeline call (its text
    encoders and VAE not counted): yields a one-element list holding the running total.

    Example:
        >>> with counted_flops(pipe.transformer) as flops:
        ...     pipe(**call)
        >>> flops[0]
    """
    from dit_opt.flops import flop_counter

    total, active = [0], []

    def enter(mod: nn.Module, args: Any, kwargs: Any) -> None:
        counter = flop_counter()
        counter.__enter__()
        active.append(counter)

    def leave(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        counter = active.pop()
        counter.__exit__(None, None, None)
        total[0] += int(counter.get_total_flops())

    handles = [module.register_forward_pre_hook(enter, with_kwargs=True),
               module.register_forward_hook(leave, with_kwargs=True)]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()
        while active:  # a call that raised never reached its forward hook
            active.pop().__exit__(None, None, None)
