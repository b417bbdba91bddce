"""diffusers' cache hooks as benchmark peers: :func:`peer_module` applies one (FirstBlockCache,
PyramidAttentionBroadcast, FasterCache, TaylorSeer, MagCache) to a copy of a transformer and wraps
it in a :class:`PeerModule`, which sets the cache context the hooks need around every call;
:func:`compile_hooked_blocks` compiles the transformer's blocks around the hooks, and
:func:`_mag_ratios` runs MagCache's calibration. diffusers is imported inside the functions.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dit_opt.benchmark.config import PEERS
from dit_opt.steps import timestep_value
from dit_opt.synthetic import call_names


class PeerModule(nn.Module):
    """A transformer with diffusers cache hooks, called inside a cache context.

    The hooks need ``model.cache_context(name)`` around each denoiser call; the reference samplers
    (like ``DiTPipeline``) do not set one, so this module does: one context ``"cond"`` (the two
    guidance halves are one batched call), with the step index and timestep of the call. A call
    whose timestep is not below the previous one starts a new generation and resets the hooks' state.

    Args:
        model: a copy of the transformer, with the hooks applied.
        num_inference_steps: loop length (some hooks read it from the context).
        uncond_first: swap the two guidance halves of every batched input before the call and of
            the output after it. The reference samplers put the conditional half first (as
            ``DiTPipeline``); FasterCache takes the *second* half as the conditional one.
    """

    def __init__(self, model: nn.Module, num_inference_steps: int, uncond_first: bool = False) -> None:
        super().__init__()
        self.model = model
        self.names = call_names(model)  # the model's own names for its latent and timestep (before any hook)
        self.num_inference_steps = num_inference_steps
        self.uncond_first = uncond_first
        self.step = -1
        self.current_timestep = 0.0
        self._last_t: float | None = None

    @property
    def config(self) -> Any:
        return self.model.config

    def reset(self) -> None:
        """Forget the hooks' state: the next call starts a generation."""
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)
        self.step, self._last_t = -1, None

    def forward(self, **inputs: Any) -> Any:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        names = self.names
        t = timestep_value(names.timestep_of(inputs, 0.0))
        # The Flux reference sampler passes sigma in [0, 1]; the hooks' timestep ranges are on the
        # 0..1000 scale the DiT sampler uses, so both are reported on that scale.
        t = t * 1000.0 if self.model.__class__.__name__.startswith("Flux") else t
        if self._last_t is None or t >= self._last_t:
            self.reset()
        self._last_t, self.current_timestep = t, t
        self.step += 1
        _set_cache_context(self.model, CacheContext("cond", step_index=self.step,
                                                    num_inference_steps=self.num_inference_steps, timestep=t))
        if self.uncond_first:
            batch = names.batch_of(inputs)
            inputs = {k: _swap_halves(v) if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v
                      for k, v in inputs.items()}
        try:
            out = self.model(**inputs)
        finally:
            _set_cache_context(self.model, None)
        if self.uncond_first:
            out.sample = _swap_halves(out.sample)
        return out


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2)
    return torch.cat([b, a])


def _peer_config(peer: str, value: float, peer_module: PeerModule, steps: int, mag_ratios: list[float] | None,
                 first_t: float = 1000.0):
    """The diffusers config of ``peer`` with its swept parameter set to ``value``.

    ``first_t`` is the loop's first timestep (0..1000 scale): FasterCache's attention hook must
    compute there, since with the CFG cache off it would otherwise read an empty cache at step 0.
    """
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    def now() -> float:
        return peer_module.current_timestep

    # Timestep ranges cover the whole loop (-1 .. 1001): the budget is set by the swept parameter only.
    everywhere = (-1, 1001)
    if peer == "fbc":
        return FirstBlockCacheConfig(threshold=float(value))
    if peer == "pab":
        # Cross-attention (PixArt's attn2) is broadcast at the same range; DiT and Flux have none.
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(value),
                                               spatial_attention_timestep_skip_range=everywhere,
                                               cross_attention_block_skip_range=int(value),
                                               cross_attention_timestep_skip_range=everywhere,
                                               current_timestep_callback=now)
    if peer == "fastercache":
        # FasterCache's CFG cache splits the output into frequency bands with a 2-D FFT, which needs
        # image-shaped outputs; Flux returns packed tokens (B, N, C), so there only its attention
        # reuse runs (is_guidance_distilled=True turns the CFG cache off).
        tokens_out = peer_module.model.__class__.__name__.startswith("Flux")
        return FasterCacheConfig(is_guidance_distilled=tokens_out,
                                 spatial_attention_block_skip_range=int(value),
                                 spatial_attention_timestep_skip_range=(-1, first_t - 1e-3),
                                 unconditional_batch_skip_range=int(value) + 1,
                                 unconditional_batch_timestep_skip_range=everywhere,
                                 tensor_format="BCHW", current_timestep_callback=now,
                                 # class labels and pooled prompts are batched per guidance half too
                                 _unconditional_conditional_input_kwargs_identifiers=[
                                     "hidden_states", "encoder_hidden_states", "timestep", "class_labels",
                                     "pooled_projections"])
    if peer == "taylorseer":
        # The default patterns ("^transformer_blocks.*attn", fullmatch) miss DiT's "attn1" and match
        # nothing there, silently; name the attention and MLP modules of both block kinds instead.
        interval, warmup, order = value
        return TaylorSeerCacheConfig(cache_interval=int(interval), disable_cache_before_step=int(warmup),
                                     max_order=int(order),
                                     taylor_factors_dtype=torch.float32,
                                     cache_identifiers=[r"(single_)?transformer_blocks\.\d+\.(attn[12]?|ff|ff_context|proj_mlp|proj_out)"])
    if peer == "magcache":
        return MagCacheConfig(threshold=float(value), max_skip_steps=4, retention_ratio=0.1,
                              num_inference_steps=steps, mag_ratios=mag_ratios)
    raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")


def _apply_peer(model: nn.Module, config: Any) -> None:
    """What ``CacheMixin.enable_cache`` does, also for classes without the mixin (DiT)."""
    from diffusers import hooks

    appliers = {
        "FirstBlockCacheConfig": hooks.apply_first_block_cache,
        "PyramidAttentionBroadcastConfig": hooks.apply_pyramid_attention_broadcast,
        "FasterCacheConfig": hooks.apply_faster_cache,
        "TaylorSeerCacheConfig": hooks.apply_taylorseer_cache,
        "MagCacheConfig": hooks.apply_mag_cache,
    }
    if hasattr(model, "enable_cache"):
        model.enable_cache(config)
    else:
        appliers[type(config).__name__](model, config)


def peer_module(model: nn.Module, peer: str, value: float, steps: int,
                mag_ratios: list[float] | None = None, first_t: float = 1000.0, compile: bool = False,
                uncond_first: bool = False) -> PeerModule:
    """A hooked copy of ``model`` (the original is left untouched) wrapped in a :class:`PeerModule`.

    With ``compile=True`` its blocks are compiled around the hooks (:func:`compile_hooked_blocks`).
    ``uncond_first`` says how the caller batches the guidance halves (``sampler.uncond_first``):
    FasterCache takes the second half as the conditional one, so cond-first batches are swapped
    around its call.
    """
    wrapper = PeerModule(copy.deepcopy(model), steps, uncond_first=peer == "fastercache" and not uncond_first)
    _apply_peer(wrapper.model, _peer_config(peer, value, wrapper, steps, mag_ratios, first_t))
    if compile:
        compile_hooked_blocks(wrapper.model)
    return wrapper


_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def _has_hooks(module: nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and bool(registry.hooks)


def _compile_under_hooks(module: nn.Module) -> None:
    """Compile the forward that the innermost diffusers hook of ``module`` calls to compute."""
    ref = module._diffusers_hook._fn_refs[0]
    if ref.original_forward is not None:  # a hook with its own new_forward calls fn_ref.original_forward
        ref.original_forward = torch.compile(ref.original_forward)
    else:  # pre/post-forward hooks only: the registry calls fn_ref.forward
        ref.forward = torch.compile(ref.forward)


def compile_hooked_blocks(model: nn.Module) -> int:
    """Regional ``torch.compile`` of a transformer carrying diffusers cache hooks; the hooks stay in Python.

    This is diffusers' regional compilation (``compile_repeated_blocks``: each repeated block is
    compiled) arranged around the hooks. The hooks keep Python state (step counters, cached
    tensors, skip decisions); traced by Dynamo they would be specialised on and recompiled at
    every step, so Dynamo never sees them:

    * a block with no hook on it or below it is compiled whole (``block.compile()``);
    * on a hooked module (a block for FirstBlockCache and MagCache, an attention or MLP module for
      PyramidAttentionBroadcast, FasterCache and TaylorSeer) the forward that the innermost hook
      calls to compute is compiled, and the hooks around it run eagerly;
    * a block with hooked modules inside is compiled with those modules left out of its graph
      (``torch.compiler.disable`` on their hooked forward: a graph break there).

    Hooks on the transformer itself (FasterCache's guidance hook) and the code outside the
    blocks (embeddings, final norm) stay eager.

    Args:
        model: the hooked transformer (compiled in place).

    Returns:
        The number of compiled regions.

    Raises:
        ValueError: the model has no ``transformer_blocks`` / ``single_transformer_blocks`` list.
    """
    blocks = [b for name in _BLOCK_LISTS for b in getattr(model, name, None) or ()]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has none of the block lists {_BLOCK_LISTS}")
    regions = 0
    for block in blocks:
        hooked = [m for m in block.modules() if _has_hooks(m)]
        for m in hooked:
            _compile_under_hooks(m)
            if m is not block:  # inside a compiled region: keep Dynamo out of the hook
                m.forward = torch.compiler.disable(m.forward)
        if not _has_hooks(block):
            block.compile()
            regions += 1
        regions += len(hooked)
    return regions


def _mag_ratios(model: nn.Module, generate: Callable[[nn.Module], Any], steps: int) -> list[float]:
    """MagCache's per-step magnitude ratios for this model, from its calibration mode.

    diffusers prints them at the end of a calibrated generation (and keeps no copy), so the print
    is captured and parsed.
    """
    from diffusers.hooks import MagCacheConfig

    wrapper = PeerModule(copy.deepcopy(model), steps)
    _apply_peer(wrapper.model, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        generate(wrapper)
    lists = [line for line in buf.getvalue().splitlines() if line.strip().startswith("[")]
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios; the diffusers version may have changed how "
                           "it reports them")
    return [float(x) for x in ast.literal_eval(lists[-1].strip())]
