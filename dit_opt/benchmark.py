"""dit-opt against its baselines and its peers, on the shipped reference models.

``python examples/benchmark.py`` (or ``dit-opt bench``) runs, on the shipped reference models
(``digits-dit``, ``digits-mmdit`` and ``crops-pixart``), with the same seeds and class labels for
every row:

* the full model;
* dit-opt (solver ``cpsat``) at each target FLOP budget;
* dit-opt's baseline schedules (``fora``, ``delta_dit``, ``toca``) at the same budgets, solved from
  the same sensitivity profile (one profile per model, calibrated on other seeds than the
  evaluation);
* diffusers' cache hooks (FirstBlockCache, PyramidAttentionBroadcast, FasterCache, TaylorSeer,
  MagCache), each swept over its threshold or skip parameter so that some settings land near
  each target fraction;
* the optional ``cache-dit`` package (DBCache, DBCache + TaylorSeer, SCM step masks) where it
  applies (Flux, PixArt; not DiT, see :func:`cache_dit_module`), skipped with a note when not installed.

Per row: the FLOP fraction (counted with ``FlopCounterMode`` over the whole generation, eager),
PSNR and SSIM against the full output of the same seeds, class accuracy and Frechet distance of
the classifier features against the model's held-out real images, and optionally a wall-clock ratio:
compiled, alternating, median, every row against the same ``torch.compile(model)``. dit-opt replays
its plan with ``compile=True``; the diffusers hooks run with their blocks compiled around them
(:func:`compile_hooked_blocks`); cache-dit's transformer is compiled whole after
``cache_dit.set_compile_configs()``, as cache-dit documents. A peer that fails to compile is timed
eager against the eager model, and its row says so. It writes a markdown report and a
PSNR-vs-FLOP-fraction figure.

Peers and cache contexts: the diffusers hooks keep their state per *cache context* and raise
"No cache context is set" without one. ``FluxTransformer2DModel`` has ``cache_context``;
``DiTTransformer2DModel`` does not mix in ``CacheMixin`` (no ``enable_cache``), so the hooks are
applied with the ``apply_*`` functions ``enable_cache`` dispatches to, and the context is set
with the same private helper ``cache_context`` uses (``diffusers.hooks.hooks._set_cache_context``).
:class:`PeerModule` does this around every call: the reference samplers batch the conditional and
unconditional halves in one call, as ``DiTPipeline`` does, so every call runs in one context
(``"cond"``) that carries the step index and the timestep.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import datetime
import functools
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_opt.bench import machine, time_alternating, with_transformer
from dit_opt.equal_flops import comparison_table

__all__ = ["BenchConfig", "Row", "PeerModule", "CacheDitModule", "compile_hooked_blocks", "PEERS", "SOLVERS", "run",
           "write_report", "plot_pareto", "main"]

#: dit-opt's own solver and its baseline schedules, all solved from the same profile.
SOLVERS = ("cpsat", "fora", "delta_dit", "toca")
#: Peer names in report order: diffusers hooks, then the optional ``cache-dit`` package.
PEERS = ("fbc", "pab", "fastercache", "taylorseer", "magcache", "cachedit_dbcache", "cachedit_taylorseer",
         "cachedit_scm")
_CACHE_DIT_PEERS = ("cachedit_dbcache", "cachedit_taylorseer", "cachedit_scm")
_PEER_TITLES = {
    "fbc": "diffusers FirstBlockCache",
    "pab": "diffusers PyramidAttentionBroadcast",
    "fastercache": "diffusers FasterCache",
    "taylorseer": "diffusers TaylorSeer",
    "magcache": "diffusers MagCache",
    "cachedit_dbcache": "cache-dit DBCache",
    "cachedit_taylorseer": "cache-dit DBCache + TaylorSeer",
    "cachedit_scm": "cache-dit SCM step mask",
}
#: The swept parameter of each peer (full sweep; ``--quick`` takes every other value). Chosen by
#: trial runs so that the FLOP fractions they reach bracket the target budgets where the method can.
_SWEEPS: dict[str, tuple[float, ...]] = {
    "fbc": (0.05, 0.1, 0.2, 0.3, 0.45, 0.7, 1.0),
    "pab": (2, 3, 4, 6, 10),
    "fastercache": (2, 3, 4, 6),
    # TaylorSeer's three knobs swept together (interval, warm-up, order), as a user tuning it would
    "taylorseer": tuple((n, w, o) for n in (2, 3, 4, 5, 6, 8) for w in (1, 2, 3) for o in (1, 2)),
    "magcache": (0.02, 0.06, 0.15, 0.3, 0.6, 1.0),
    "cachedit_dbcache": (0.1, 0.25, 0.5, 0.8, 1.2, 2.0),
    "cachedit_taylorseer": (0.1, 0.25, 0.5, 0.8, 1.2, 2.0),
    "cachedit_scm": ("slow", "medium", "fast", "ultra"),
}
_SWEEP_PARAM = {"fbc": "threshold", "pab": "skip_range", "fastercache": "skip_range", "taylorseer": "interval,warm-up,order",
                "magcache": "threshold", "cachedit_dbcache": "residual_diff_threshold",
                "cachedit_taylorseer": "residual_diff_threshold", "cachedit_scm": "mask_policy"}
_EVAL_SEED = 0
_CALIBRATION_SEED = 1000


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures.

    Args:
        models: reference model names (``dit_opt.zoo.available()``).
        budgets: target FLOP fractions in (0, 1].
        samples: generated images per row (labels cycle through the model's classes).
        steps: denoising steps (``None``: each model's default).
        solvers: dit-opt solvers to run (a subset of :data:`SOLVERS`).
        peers: peer methods to run (a subset of :data:`PEERS`).
        quick: sweep every other peer setting only.
        timing: measure wall-clock ratios.
        timing_scope: ``"all"`` rows, or ``"dit-opt"`` (only dit-opt's cpsat rows, to save time).
        timing_samples: images per timed generation (smaller than ``samples`` to keep it short).
        timing_repeats: timed runs per side (median taken).
        calibration_samples: images of the calibration generation (seed 1000, other than the evaluation's).
        progress: show rich progress bars.
    """

    models: tuple[str, ...] = ("digits-dit", "digits-mmdit", "crops-pixart")
    budgets: tuple[float, ...] = (0.7, 0.5, 0.35, 0.25)
    samples: int = 20
    steps: int | None = None
    solvers: tuple[str, ...] = SOLVERS
    peers: tuple[str, ...] = PEERS
    quick: bool = False
    timing: bool = True
    timing_scope: str = "all"
    timing_samples: int = 4
    timing_repeats: int = 3
    calibration_samples: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        from dit_opt import zoo

        for m in self.models:
            if m not in zoo.available():
                raise ValueError(f"unknown model {m!r}; choose from {', '.join(zoo.available())}")
        for b in self.budgets:
            if not 0.0 < b <= 1.0:
                raise ValueError(f"budget {b} is outside (0, 1]; a budget is a FLOP fraction such as 0.5")
        bad = [s for s in self.solvers if s not in SOLVERS] + [p for p in self.peers if p not in PEERS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; solvers: {', '.join(SOLVERS)}; peers: {', '.join(PEERS)}")
        if self.timing_scope not in ("all", "dit-opt"):
            raise ValueError(f"timing_scope={self.timing_scope!r}; use 'all' or 'dit-opt'")
        if self.samples < 2:
            raise ValueError(f"samples={self.samples}: the Frechet distance needs at least 2 images")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples={self.calibration_samples}: calibrate on at least 1 image")


@dataclass
class Row:
    """One measured configuration of one model."""

    model: str
    method: str
    setting: str
    target: float | None
    flop_fraction: float
    psnr: float
    ssim: float
    accuracy: float
    frechet: float
    speedup: float | None = None
    timing: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---- peers: diffusers cache hooks ----------------------------------------------------------------
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

        t = float(inputs["timestep"].flatten()[0])
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
            batch = inputs["hidden_states"].shape[0]
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


class CacheDitModule(nn.Module):
    """A transformer accelerated by ``cache-dit``, its cache context refreshed before every generation.

    Used on a transformer alone (no pipeline), cache-dit keeps one persistent cache context and
    refreshes it by itself only when a call starts past ``num_inference_steps``, one call late: the
    first call of the next generation still reads the cached residuals of the previous one (of
    another batch: "The size of tensor a (40) must match the size of tensor b (8)"; of the same
    batch: a different output). :meth:`reset` rebuilds the context with
    ``cache_dit.refresh_context``, cache-dit's API for transformer-only flows.

    Args:
        model: the transformer, after ``cache_dit.enable_cache`` (and ``.compile()``, if compiled).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    def reset(self) -> None:
        """Forget the cached state: the next call starts a generation."""
        import cache_dit

        cache_dit.refresh_context(self.model)

    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)


def cache_dit_module(model: nn.Module, peer: str, value: Any, steps: int, compile: bool = False) -> CacheDitModule:
    """A copy of ``model`` accelerated by the ``cache-dit`` package (DBCache F1B0, 2 warm-up steps).

    ``cachedit_dbcache``: DBCache at residual threshold ``value``; ``cachedit_taylorseer``: the same
    with cache-dit's first-order TaylorSeer calibrator; ``cachedit_scm``: a predefined step
    computation mask (``cache_dit.steps_mask(mask_policy=value)``) with static caching on masked steps.

    With ``compile=True`` the cached transformer is compiled whole, as cache-dit documents
    (``torch.compile(transformer)`` after ``enable_cache``); its cache logic is excluded from the
    graphs by cache-dit itself (``torch.compiler.disable``). Run it under :func:`compile_configs`,
    which applies ``cache_dit.set_compile_configs()`` for the time of the run.

    Raises:
        ImportError: cache-dit is not installed (``pip install cache-dit --no-deps``; its requirements
            are dit-opt's own plus transformers).
        NotImplementedError: the model is a ``DiTTransformer2DModel``: cache-dit replaces its block list
            with a ``CachedBlocks`` wrapper, and DiT's forward reads ``transformer_blocks[0].norm1.emb``
            through the list, which the wrapper does not have (AttributeError).
    """
    import cache_dit

    if type(model).__name__ == "DiTTransformer2DModel":
        raise NotImplementedError(
            "cache-dit wraps transformer_blocks in CachedBlocks, but DiTTransformer2DModel.forward reads "
            "transformer_blocks[0].norm1.emb through the list (AttributeError on the wrapper)")
    copy_ = copy.deepcopy(model)
    common = dict(max_warmup_steps=2, num_inference_steps=steps, Fn_compute_blocks=1, Bn_compute_blocks=0)
    calibrator = None
    if peer == "cachedit_scm":
        mask = cache_dit.steps_mask(mask_policy=str(value), total_steps=steps)
        config = cache_dit.DBCacheConfig(steps_computation_mask=mask, steps_computation_policy="static", **common)
    else:
        config = cache_dit.DBCacheConfig(residual_diff_threshold=float(value), **common)
        if peer == "cachedit_taylorseer":
            calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1)
    with contextlib.redirect_stdout(io.StringIO()):
        cache_dit.enable_cache(copy_, cache_config=config, calibrator_config=calibrator)
    if compile:
        copy_.compile()
    return CacheDitModule(copy_)


@contextlib.contextmanager
def compile_configs(peer: str):
    """The ``torch.compile`` settings to time ``peer`` compiled under; the previous ones come back after.

    cache-dit peers: ``cache_dit.set_compile_configs()``, as cache-dit documents (higher Dynamo
    recompile limits, its Inductor tuning). Every peer: a Dynamo recompile limit of at least 64
    (what dit-opt's runtime sets) and ``fail_on_recompile_limit_hit``, so that a region Dynamo
    gives up on raises instead of running eagerly unnoticed. The settings are global and read when
    a graph is compiled, so they hold only here: the reference ``torch.compile(model)`` (compiled
    before) and dit-opt keep PyTorch's defaults.
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    saved = {config: config.get_config_copy() for config in (dynamo_config, inductor_config)}
    try:
        if peer in _CACHE_DIT_PEERS:
            import cache_dit

            cache_dit.set_compile_configs()
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        dynamo_config.fail_on_recompile_limit_hit = True
        yield
    finally:
        for config, before in saved.items():  # only what changed (setting a deprecated key warns)
            now = config.get_config_copy()
            for key, value in before.items():
                if now.get(key) != value:
                    setattr(config, key, value)


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


# ---- measuring -------------------------------------------------------------------------------------
def _generate(sampler: Any, module: nn.Module, labels: list[int], seed: int, steps: int | None) -> torch.Tensor:
    if hasattr(module, "reset"):
        module.reset()
    return with_transformer(sampler, module, class_labels=labels, seed=seed, num_inference_steps=steps)


def _counted(sampler: Any, module: nn.Module, labels: list[int], steps: int | None) -> tuple[torch.Tensor, int]:
    """Images and FLOPs (``FlopCounterMode``, eager, attention included) of one whole generation."""
    from dit_opt.flops import flop_counter

    with torch.no_grad(), flop_counter() as fc:
        images = _generate(sampler, module, labels, _EVAL_SEED, steps)
    return images, int(fc.get_total_flops())


def _quality(images: torch.Tensor, full: torch.Tensor, labels: list[int], real: torch.Tensor) -> dict[str, float]:
    from dit_opt import metrics

    return {
        "psnr": metrics.psnr(images, full),
        "ssim": metrics.ssim(images, full),
        "accuracy": metrics.class_accuracy(images, labels),
        "frechet": metrics.frechet_distance(images, real),
    }


def _time(sampler: Any, base: nn.Module, other: nn.Module, labels: list[int], steps: int | None,
          repeats: int) -> float:
    """Wall-clock ratio base/other of whole generations, alternating, median (dit_opt.bench)."""
    result = time_alternating(lambda: _generate(sampler, base, labels, _EVAL_SEED, steps),
                              lambda: _generate(sampler, other, labels, _EVAL_SEED, steps),
                              repeats=repeats, warmup=1)
    return result["speedup"]


def _why(e: BaseException, limit: int = 120) -> str:
    """``Type: first line of the message`` of an exception, cut to ``limit`` characters."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def time_peer(sampler: Any, model: nn.Module, compiled_full: nn.Module, build: Callable[[bool], nn.Module],
              peer: str, labels: list[int], steps: int | None, repeats: int,
              eager: nn.Module | None = None) -> tuple[float, str, str]:
    """Wall-clock ratio of a peer, compiled against ``compiled_full`` (``torch.compile(model)``).

    ``build(True)`` makes a fresh compiled module (regional compile around the diffusers hooks,
    or cache-dit's whole-transformer compile), timed under :func:`compile_configs`. If compiling
    or running it fails, the peer is timed eager (``eager``, or ``build(False)``) against the eager
    ``model``, and the label and note say so.

    Returns:
        ``(speedup, timing label, note)``: ``"compiled"`` and ``""``, or ``"eager (compile failed)"``
        and the reason.

    Raises:
        Exception: whatever the eager timing raises (the compiled one's failure is reported).
    """
    try:
        with compile_configs(peer):
            return _time(sampler, compiled_full, build(True), labels, steps, repeats), "compiled", ""
    except Exception as e:  # a peer Dynamo/Inductor cannot compile: timed eager, and the row says so
        reason = _why(e, 100)
    speedup = _time(sampler, model, eager if eager is not None else build(False), labels, steps, repeats)
    return speedup, "eager (compile failed)", f"compile failed ({reason}); timed eager against the eager model"


def _log(progress: Any, row: Row) -> None:
    """One line per measured row, above the progress bar (or alone, with --no-progress)."""
    progress.console.print(f"{row.model} | {row.method} | {row.setting} | FLOPs {row.flop_fraction:.3f} | "
                           f"PSNR {row.psnr:.2f} | speedup {row.speedup} {row.note}", highlight=False, markup=False)


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_fmt(v) for v in value)
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def _bench_model(name: str, cfg: BenchConfig, progress: Any) -> list[Row]:
    import dit_opt
    from dit_opt import zoo
    from dit_opt.errors import DitOptError

    sampler = zoo.load(name)
    model = sampler.transformer
    steps = cfg.steps or sampler.num_inference_steps
    labels = sampler.labels(cfg.samples)
    timing_labels = labels[: cfg.timing_samples]
    real, _ = sampler.reference_images("test")
    peers = {p: _SWEEPS[p][::2] if cfg.quick else _SWEEPS[p] for p in cfg.peers}
    n_rows = 1 + len(cfg.solvers) * len(cfg.budgets) + sum(len(v) for v in peers.values())
    task = progress.add_task(f"{name}: profile", total=n_rows)
    rows: list[Row] = []

    images_full, flops_full = _counted(sampler, model, labels, cfg.steps)
    q = _quality(images_full, images_full, labels, real)
    rows.append(Row(name, "full model", f"{steps} steps", 1.0, 1.0, **q, speedup=1.0 if cfg.timing else None))
    _log(progress, rows[-1])
    progress.advance(task)

    def calibration(module: nn.Module) -> Any:
        cal_labels = sampler.labels(cfg.calibration_samples)
        return _generate(sampler, module, cal_labels, _CALIBRATION_SEED, cfg.steps)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = dit_opt.profile(model, calibration, probes=0, progress=False)
    example = sampler.example_inputs(batch_size=2 * len(labels))
    compiled_full = torch.compile(model) if cfg.timing else None

    for solver in cfg.solvers:
        for budget in cfg.budgets:
            progress.update(task, description=f"{name}: dit-opt {solver} @ {budget}")
            method = "dit-opt (cpsat)" if solver == "cpsat" else f"dit-opt baseline {solver}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # dit-opt's candidate plans are compared on the calibration generation (seed 1000),
                    # never on the evaluation's noise
                    opt = dit_opt.optimize(model, budget, calibration=prof, solver=solver, compile=False,
                                           example_inputs=example, progress=False, select=calibration)
                    images, flops = _counted(sampler, opt, labels, cfg.steps)
            except DitOptError as e:
                rows.append(Row(name, method, f"budget {budget}", budget, float("nan"), float("nan"), float("nan"),
                                float("nan"), float("nan"), note=str(e).splitlines()[0][:160]))
                _log(progress, rows[-1])
                progress.advance(task)
                continue
            row = Row(name, method, f"budget {budget}", budget, flops / flops_full,
                      **_quality(images, images_full, labels, real),
                      extra={"plan": {k.value: n for k, n in opt.plan.counts().items()}},
                      note=f"kept the {opt.plan.solver} plan of {len(opt.selection)} measured" if opt.selection else "")
            if cfg.timing and (cfg.timing_scope == "all" or solver == "cpsat"):
                from dit_opt.runtime import OptimizedTransformer

                # The plan is replayed compiled (no second solve); the reference is torch.compile(model).
                compiled = OptimizedTransformer(model, opt.plan, profile=prof, compile=True, solver=solver)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row.speedup = _time(sampler, compiled_full, compiled, timing_labels, cfg.steps, cfg.timing_repeats)
                row.timing = "compiled"
            rows.append(row)
            _log(progress, rows[-1])
            progress.advance(task)

    first_t = float(sampler.timesteps(steps)[0])
    time_peers = cfg.timing and cfg.timing_scope == "all" and bool(peers)
    if time_peers:  # compiled now, with PyTorch's defaults (a cache-dit peer is timed under other settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _generate(sampler, compiled_full, timing_labels, _EVAL_SEED, cfg.steps)
    for peer, values in peers.items():
        mag_ratios = None
        if peer == "magcache":
            progress.update(task, description=f"{name}: MagCache calibration")
            mag_ratios = _mag_ratios(model, lambda m: calibration(m), steps)
        for value in values:
            progress.update(task, description=f"{name}: {peer} {_SWEEP_PARAM[peer]}={_fmt(value)}")
            setting = f"{_SWEEP_PARAM[peer]}={_fmt(value)}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if peer in _CACHE_DIT_PEERS:
                        build = functools.partial(cache_dit_module, model, peer, value, steps)
                    else:
                        build = functools.partial(peer_module, model, peer, value, steps, mag_ratios, first_t,
                                                  uncond_first=sampler.uncond_first)
                    module = build(False)
                    images, flops = _counted(sampler, module, labels, cfg.steps)
            except Exception as e:  # a peer that does not support this model is reported, not fatal
                unsupported = isinstance(e, ImportError | NotImplementedError)
                rows.append(Row(name, _PEER_TITLES[peer], "-" if unsupported else setting, None, float("nan"),
                                float("nan"), float("nan"), float("nan"), float("nan"),
                                note=_why(e, 160)))
                _log(progress, rows[-1])
                progress.advance(task, advance=len(values) if unsupported else 1)
                if unsupported:  # the same for every setting: one row says it
                    break
                continue
            row = Row(name, _PEER_TITLES[peer], setting, None, flops / flops_full,
                      **_quality(images, images_full, labels, real))
            if time_peers:
                # Compiled against the same torch.compile(model) as dit-opt; FLOPs above were counted eager.
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        row.speedup, row.timing, row.note = time_peer(
                            sampler, model, compiled_full, build, peer, timing_labels, cfg.steps,
                            cfg.timing_repeats, eager=module)
                except Exception as e:  # even the eager timing failed: the row keeps its quality figures
                    row.note = f"not timed: {_why(e)}"
            rows.append(row)
            _log(progress, rows[-1])
            progress.advance(task)
    progress.update(task, description=f"{name}: done")
    return rows


def run(cfg: BenchConfig) -> list[Row]:
    """Measure every row of ``cfg`` on every model.

    Returns:
        The rows, grouped by model, in report order.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rows: list[Row] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not cfg.progress) as progress:
        for name in cfg.models:
            rows += _bench_model(name, cfg, progress)
    return rows


# ---- reporting -------------------------------------------------------------------------------------
def _num(x: float | None, spec: str) -> str:
    if x is None or x != x:  # None or NaN
        return "-"
    return format(x, spec)


def table(rows: Sequence[Row]) -> list[str]:
    """Markdown table lines of one model's rows."""
    out = ["| method | setting | FLOP fraction | PSNR (dB) | SSIM | class acc. | Frechet dist. | speedup | note |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r.speedup:.2f}x ({r.timing})" if r.speedup is not None and r.timing else (
            "1.00x" if r.speedup is not None else "-")
        psnr = "inf" if r.psnr == float("inf") else _num(r.psnr, ".2f")
        out.append(f"| {r.method} | {r.setting} | {_num(r.flop_fraction, '.3f')} | {psnr} | {_num(r.ssim, '.4f')} | "
                   f"{_num(r.accuracy, '.0%')} | {_num(r.frechet, '.2f')} | {speed} | {r.note} |")
    return out


def verdict(rows: Sequence[Row], budget: float = 0.5) -> list[str]:
    """Does dit-opt at ``budget`` beat, in PSNR, every other row at a FLOP fraction <= ``budget``?"""
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model and r.method == "dit-opt (cpsat)" and r.target == budget]
        if not mine or mine[0].psnr != mine[0].psnr:
            lines.append(f"* `{model}`: no dit-opt row at budget {budget} was measured.")
            continue
        me = mine[0]
        # Peers and baselines only: dit-opt's own rows at smaller budgets are not competitors.
        others = [r for r in rows if r.model == model and r.method not in ("full model", me.method)
                  and r.flop_fraction == r.flop_fraction and r.flop_fraction <= budget + 1e-9]
        better = [r for r in others if r.psnr >= me.psnr]
        head = (f"* `{model}`: dit-opt at budget {budget} reaches FLOP fraction {me.flop_fraction:.3f}, "
                f"PSNR {me.psnr:.2f} dB, against {len(others)} other row(s) at a FLOP fraction <= {budget}. ")
        if not others:
            lines.append(head + "No other method landed at or below that fraction, so there is nothing to beat there.")
        elif not better:
            best = max(others, key=lambda r: r.psnr)
            lines.append(head + f"It beats all of them; the best of the others is {best.method} ({best.setting}) "
                         f"at {best.psnr:.2f} dB, FLOP fraction {best.flop_fraction:.3f}.")
        else:
            names = "; ".join(f"{r.method} ({r.setting}): {r.psnr:.2f} dB at {r.flop_fraction:.3f}" for r in better)
            lines.append(head + f"It does NOT beat: {names}.")
    return lines


def plot_pareto(rows: Sequence[Row], path: str | Path) -> Path:
    """PSNR against FLOP fraction, one line per method, one subplot per model (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        methods = [m for m in dict.fromkeys(r.method for r in rows if r.model == model) if m != "full model"]
        # tab20 gives every method its own colour (the default cycle repeats after 10 lines)
        colours = plt.cm.tab20.colors
        for i, method in enumerate(methods):
            pts = sorted((r.flop_fraction, r.psnr) for r in rows if r.model == model and r.method == method
                         and r.flop_fraction == r.flop_fraction and r.psnr == r.psnr and r.psnr != float("inf"))
            if not pts:
                continue
            style = dict(lw=2.5, marker="o", color="black") if method == "dit-opt (cpsat)" else dict(
                lw=1.2, marker=".", color=colours[i % len(colours)])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method, **style)
        ax.set_title(model)
        ax.set_xlabel("FLOP fraction of the full generation (counted)")
        ax.set_ylabel("PSNR vs full output (dB)")
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(rows: Sequence[Row], cfg: BenchConfig, path: str | Path, command: str, seconds: float,
                 figure: str | None = None, discussion: str = "") -> Path:
    """Write the markdown report: machine, date, command, one table per model, the verdict."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        f"Measured {date} on {machine()}; the run took {seconds / 60:.1f} min.",
        "",
        "Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Same class labels ({cfg.samples} samples, the model's classes in turn) and seed ({_EVAL_SEED}) for "
        "every row; "
        f"the dit-opt and baseline rows share one sensitivity profile per model, calibrated on seed "
        f"{_CALIBRATION_SEED} ({cfg.calibration_samples} samples, `probes=0`). FLOP fraction: `FlopCounterMode` "
        "over the whole generation, eager, attention included. PSNR and SSIM: against the full model's output "
        "for the same noise. Class accuracy: the shipped classifier of the model's data (digits or crops) against "
        "the conditioning labels. Frechet distance: classifier features against the held-out real images (450 "
        "digits; 640 crops for crops-pixart; with this few samples it "
        "is biased upwards and noisy; compare rows with each other only). Speedup: median wall-clock ratio of "
        f"whole generations ({cfg.timing_samples} samples, {cfg.timing_repeats} alternating runs per side, after "
        "one warm-up generation each), every row `compiled` against the same `torch.compile(model)`: dit-opt "
        "with `compile=True` (its blocks compiled); the diffusers hooks with each transformer block compiled "
        "around them (regional compilation as `compile_repeated_blocks`; where a hook sits on a block or on an "
        "attention or MLP module, the forward it wraps is compiled and the hook itself runs in Python); cache-dit "
        "with `torch.compile` of the whole cached transformer under `cache_dit.set_compile_configs()`, its cache "
        "context refreshed before every generation. A row marked `eager (compile failed)` could not be compiled "
        "and was timed eager against the eager model (its note says why). The CPU is shared with other jobs; "
        "timings are noisy.",
        "",
    ]
    if not cfg.timing:
        lines += ["Timing was skipped in this run (`--no-timing`).", ""]
    elif cfg.timing_scope != "all":
        lines += ["Only the full model and dit-opt's cpsat rows were timed in this run (`--timing-scope dit-opt`).", ""]
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        lines += [f"## {model}", ""] + table(mine) + [""]
        lines += [f"At equal FLOPs on `{model}`: each dit-opt row against the best any peer or baseline reaches "
                  "at the same FLOP fraction (each one's points joined linearly, a cheaper better point counted "
                  "as it is, no extrapolation below its cheapest; `dit_opt.equal_flops`):", ""]
        lines += comparison_table(mine) + [""]
    if figure:
        lines += [f"![PSNR against FLOP fraction]({figure})", ""]
    lines += ["## Does dit-opt at budget 0.5 beat every method at a FLOP fraction <= 0.5?", ""]
    lines += verdict(rows, 0.5) + [""]
    if discussion:
        lines += [discussion.rstrip(), ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None, prog: str = "benchmark.py") -> list[Row]:
    """Command-line entry point (``python examples/benchmark.py --help``, ``dit-opt bench --help``)."""
    import argparse
    import shlex
    import sys
    import time

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits-dit", "digits-mmdit", "crops-pixart"],
                        help="reference models")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.35, 0.25],
                        help="target FLOP fractions of the dit-opt and baseline rows")
    parser.add_argument("--samples", type=int, default=None, help="images per row (default 20, --quick 10)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS,
                        help="dit-opt's solver and baseline schedules to run")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS,
                        help="peer methods to sweep (none: --peers with no value)")
    parser.add_argument("--quick", action="store_true", help="10 samples and every other peer setting")
    parser.add_argument("--no-timing", action="store_true", help="skip the wall-clock measurements")
    parser.add_argument("--timing-scope", choices=["all", "dit-opt"], default="all",
                        help="time every row, or only dit-opt's cpsat rows")
    parser.add_argument("--timing-samples", type=int, default=4, help="images per timed generation")
    parser.add_argument("--timing-repeats", type=int, default=3, help="timed runs per side (median)")
    parser.add_argument("--calibration-samples", type=int, default=10,
                        help="images of the calibration generation (seed 1000) that profiles and selects plans")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing shared CPUs)")
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown report to write")
    parser.add_argument("--figure", default="docs/pareto.png", help="PSNR-vs-FLOP figure to write")
    parser.add_argument("--discussion", default=None, help="markdown file appended to the report (analysis)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (one line per row still)")
    parser.add_argument("--json", default=None, help="also write the measured rows as JSON (for --merge)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="measure nothing: write the report from rows saved by earlier runs' --json "
                             "(e.g. one run per model, in parallel)")
    parser.add_argument("--commands", default=None,
                        help="with --merge: the commands that measured the rows, for the report")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        cfg = BenchConfig(models=tuple(args.models), budgets=tuple(args.budgets),
                          samples=args.samples or (10 if args.quick else 20), steps=args.steps,
                          solvers=tuple(args.solvers), peers=tuple(args.peers), quick=args.quick,
                          timing=not args.no_timing, timing_scope=args.timing_scope, timing_samples=args.timing_samples,
                          timing_repeats=args.timing_repeats, calibration_samples=args.calibration_samples,
                          progress=not args.no_progress)
    except ValueError as e:
        parser.error(str(e))
    start = time.time()
    if args.merge:
        rows, seconds = [], 0.0
        for f in args.merge:
            data = json.loads(Path(f).read_text())
            rows += [Row(**r) for r in data["rows"]]
            seconds = max(seconds, data["seconds"])
    else:
        rows = run(cfg)
        seconds = time.time() - start
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": seconds, "rows": [asdict(r) for r in rows]}, indent=1,
                                              default=str))
    figure = plot_pareto(rows, args.figure)
    try:
        rel = os.path.relpath(figure, Path(args.out).resolve().parent)
    except ValueError:
        rel = str(figure)
    command = "python examples/benchmark.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:]))
    if args.merge and args.commands:
        command = Path(args.commands).read_text().strip() + "\n" + command
    discussion = Path(args.discussion).read_text() if args.discussion else ""
    write_report(rows, cfg, args.out, command.strip(), seconds, figure=rel, discussion=discussion)
    for model in dict.fromkeys(r.model for r in rows):
        print(f"\n{model}")
        print("\n".join(table([r for r in rows if r.model == model])))
    print("\n".join(verdict(rows, 0.5)))
    print(f"wrote {args.out} and {figure}")
    return rows
