"""Synthetic example inputs of the right shapes for known diffusers transformer classes.

Capture needs one forward call's worth of inputs; with no pipeline at hand, these builders
read the model's ``config`` and make inputs of the shapes its pipeline would pass. One
builder per class, registered by class name; :func:`example_inputs` raises a clear error for
an unknown class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dit_opt.errors import InputMismatchError

__all__ = ["example_inputs", "supported_classes", "register"]

_Builder = Callable[[nn.Module, int, int, torch.Generator], dict[str, Any]]
_BUILDERS: dict[str, _Builder] = {}


def register(*class_names: str) -> Callable[[_Builder], _Builder]:
    """Register an input builder for the given model class names."""

    def deco(fn: _Builder) -> _Builder:
        for name in class_names:
            _BUILDERS[name] = fn
        return fn

    return deco


def supported_classes() -> list[str]:
    """Class names :func:`example_inputs` knows how to feed."""
    return sorted(_BUILDERS)


def example_inputs(
    model: nn.Module, batch_size: int = 2, *, text_tokens: int = 8, seed: int = 0, timestep: float = 500.0
) -> dict[str, Any]:
    """Keyword inputs for one forward of ``model`` at its configured sample size.

    Args:
        model: a diffusers transformer of a supported class (see :func:`supported_classes`).
        batch_size: batch of the call (2 = one CFG pair).
        text_tokens: length of the text/context sequence, for models that take one.
        seed: seed of the random inputs.
        timestep: the timestep value passed (all samples get the same).

    Raises:
        InputMismatchError: the class is not known; the message says to pass inputs by hand.
    """
    cls = type(model).__name__
    builder = _BUILDERS.get(cls)
    if builder is None:
        raise InputMismatchError(
            f"{cls}: no built-in example inputs for this class (known: {', '.join(supported_classes())}). "
            f"Pass the inputs of one forward call yourself, e.g. example_inputs={{'hidden_states': x, ...}}, "
            f"or a calibration that runs the model."
        )
    gen = torch.Generator().manual_seed(seed)
    inputs = builder(model, batch_size, text_tokens, gen)
    p = next(model.parameters())
    t = torch.full((batch_size,), float(timestep))
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(p.device)
            if v.is_floating_point():
                v = v.to(p.dtype)
        out[k] = v
    if "timestep" in out and out["timestep"] is None:
        out["timestep"] = t.to(p.device)
    return out


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _hw(cfg: Any) -> tuple[int, int]:
    s = cfg.sample_size
    return (s, s) if isinstance(s, int) else tuple(s)


@register("DiTTransformer2DModel")
def _dit(m: nn.Module, b: int, _: int, g: torch.Generator) -> dict[str, Any]:
    c = m.config
    h, w = _hw(c)
    labels = torch.randint(0, c.num_embeds_ada_norm, (b,), generator=g)
    return {"hidden_states": _randn(g, b, c.in_channels, h, w), "timestep": None, "class_labels": labels}


@register("PixArtTransformer2DModel")
def _pixart(m: nn.Module, b: int, n: int, g: torch.Generator) -> dict[str, Any]:
    c = m.config
    h, w = _hw(c)
    out = {
        "hidden_states": _randn(g, b, c.in_channels, h, w),
        "encoder_hidden_states": _randn(g, b, n, c.caption_channels),
        "timestep": None,
    }
    if getattr(c, "use_additional_conditions", None) or (c.sample_size == 128):
        out["added_cond_kwargs"] = {
            "resolution": torch.tensor([[h * 8.0, w * 8.0]] * b),
            "aspect_ratio": torch.tensor([[1.0]] * b),
        }
    else:
        out["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return out


@register("SD3Transformer2DModel")
def _sd3(m: nn.Module, b: int, n: int, g: torch.Generator) -> dict[str, Any]:
    c = m.config
    h, w = _hw(c)
    return {
        "hidden_states": _randn(g, b, c.in_channels, h, w),
        "encoder_hidden_states": _randn(g, b, n, c.joint_attention_dim),
        "pooled_projections": _randn(g, b, c.pooled_projection_dim),
        "timestep": None,
    }


def _flux_ids(h: int, w: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(h, w, 3)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    return torch.zeros(n, 3), img.reshape(h * w, 3)


@register("FluxTransformer2DModel")
def _flux(m: nn.Module, b: int, n: int, g: torch.Generator) -> dict[str, Any]:
    c = m.config
    side = 8  # packed latent side: 8 x 8 = 64 image tokens
    txt_ids, img_ids = _flux_ids(side, side, n)
    out = {
        "hidden_states": _randn(g, b, side * side, c.in_channels),
        "encoder_hidden_states": _randn(g, b, n, c.joint_attention_dim),
        "pooled_projections": _randn(g, b, c.pooled_projection_dim),
        "timestep": torch.full((b,), 0.5),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }
    if c.guidance_embeds:
        out["guidance"] = torch.full((b,), 3.5)
    return out


@register("SanaTransformer2DModel")
def _sana(m: nn.Module, b: int, n: int, g: torch.Generator) -> dict[str, Any]:
    c = m.config
    h, w = _hw(c)
    return {
        "hidden_states": _randn(g, b, c.in_channels, h, w),
        "encoder_hidden_states": _randn(g, b, n, c.caption_channels),
        "timestep": None,
    }


@register("WanTransformer3DModel")
def _wan(m: nn.Module, b: int, n: int, g: torch.Generator) -> dict[str, Any]:
    c = m.config
    frames, side = 3, 8
    return {
        "hidden_states": _randn(g, b, c.in_channels, frames, side, side),
        "encoder_hidden_states": _randn(g, b, n, c.text_dim),
        "timestep": None,
    }


@register("CogVideoXTransformer3DModel")
def _cogvideox(m: nn.Module, b: int, n: int, g: torch.Generator) -> dict[str, Any]:
    c = m.config
    h, w = c.sample_height, c.sample_width
    return {
        "hidden_states": _randn(g, b, c.sample_frames // c.temporal_compression_ratio + 1, c.in_channels, h, w),
        "encoder_hidden_states": _randn(g, b, c.max_text_seq_length, c.text_embed_dim),
        "timestep": None,
    }
