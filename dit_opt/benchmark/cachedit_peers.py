"""The optional ``cache-dit`` package as benchmark peers: :func:`cache_dit_module` accelerates a copy
of a transformer (DBCache, DBCache + TaylorSeer, SCM step masks) and wraps it in a
:class:`CacheDitModule`, which refreshes cache-dit's context before every generation;
:func:`compile_configs` holds the ``torch.compile`` settings every peer is timed under (cache-dit's
own for its peers). cache-dit is imported inside the functions, so it is needed only when one of
its peers runs.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

from torch import nn

from dit_opt.benchmark.config import _CACHE_DIT_PEERS


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
    with cache-dit's first-order TaylorSeer calibrator; ``cachedit_foca`` and ``cachedit_dmd``: the
    same with its FoCa (BDF2 predictor, Heun corrector) or DMD (dynamic mode decomposition)
    calibrator at their defaults, where the installed cache-dit has them; ``cachedit_scm``: a predefined step
    computation mask (``cache_dit.steps_mask(mask_policy=value)``) with static caching on masked steps.

    With ``compile=True`` the cached transformer is compiled whole, as cache-dit documents
    (``torch.compile(transformer)`` after ``enable_cache``); its cache logic is excluded from the
    graphs by cache-dit itself (``torch.compiler.disable``). Run it under :func:`compile_configs`,
    which applies ``cache_dit.set_compile_configs()`` for the time of the run.

    Raises:
        ImportError: cache-dit is not installed (``pip install cache-dit --no-deps``; its requirements
            are dit-opt's own plus transformers), or the installed version has no calibrator asked for.
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
        elif peer in ("cachedit_foca", "cachedit_dmd"):
            calibrator = _calibrator_config(cache_dit, peer)
    with contextlib.redirect_stdout(io.StringIO()):
        cache_dit.enable_cache(copy_, cache_config=config, calibrator_config=calibrator)
    if compile:
        copy_.compile()
    return CacheDitModule(copy_)


def _calibrator_config(cache_dit: Any, peer: str) -> Any:
    """cache-dit's config of ``peer``'s calibrator (FoCa, DMD: newer than TaylorSeer's in cache-dit)."""
    name = {"cachedit_foca": "FoCaCalibratorConfig", "cachedit_dmd": "DMDCalibratorConfig"}[peer]
    config = getattr(cache_dit, name, None)
    if config is None:
        raise ImportError(f"the installed cache-dit ({getattr(cache_dit, '__version__', '?')}) has no {name}; "
                          f"{peer} needs a cache-dit with it (pip install --no-deps -U cache-dit)")
    return config()


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
