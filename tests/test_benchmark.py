"""The peers benchmark's timing: peers compiled against ``torch.compile(model)``, cache-dit reset per generation.

On digits-mmdit (Flux, 2 + 4 blocks) with 4 denoising steps and 2 samples, so that compiling a
peer takes seconds; what is checked is the wiring, not the speed.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from dit_opt import benchmark as bm
from dit_opt import zoo

STEPS = 4
LABELS = [3, 7]


@pytest.fixture(scope="module")
def sampler():
    # one thread while timing (as the benchmark runs), and the suite's own count back afterwards
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield zoo.load("digits-mmdit")
    torch.set_num_threads(threads)


def _images(sampler, module, labels=LABELS):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bm._generate(sampler, module, labels, 0, STEPS)


def test_compile_hooked_blocks_keeps_hooks_eager_and_output_unchanged(sampler):
    model = sampler.transformer
    eager = bm.peer_module(model, "fbc", 0.2, STEPS)
    compiled = bm.peer_module(model, "fbc", 0.2, STEPS, compile=True)
    blocks = [*compiled.model.transformer_blocks, *compiled.model.single_transformer_blocks]
    # FirstBlockCache hooks every block: the forward under each hook is compiled, the hooks are not
    assert all(bm._has_hooks(b) for b in blocks)
    assert all(hasattr(b._diffusers_hook._fn_refs[0].original_forward, "_torchdynamo_orig_callable") for b in blocks)
    assert not any(b._compiled_call_impl for b in blocks)
    with bm.compile_configs("fbc"):
        images = _images(sampler, compiled)
        again = _images(sampler, compiled)  # reset between generations: the same output
    assert torch.allclose(images, _images(sampler, eager), atol=1e-4)
    assert torch.equal(images, again)


def test_compile_hooked_blocks_breaks_graph_at_hooked_submodules(sampler):
    wrapper = bm.peer_module(sampler.transformer, "pab", 2, STEPS, first_t=1000.0)
    n = bm.compile_hooked_blocks(wrapper.model)
    blocks = [*wrapper.model.transformer_blocks, *wrapper.model.single_transformer_blocks]
    # PAB hooks the attention modules: blocks compiled whole, the hooked attention left out of their graph
    assert all(b._compiled_call_impl is not None and not bm._has_hooks(b) for b in blocks)
    assert all(getattr(b.attn.forward, "_torchdynamo_disable", False) for b in blocks)
    assert n == 2 * len(blocks)
    with pytest.raises(ValueError, match="block lists"):
        bm.compile_hooked_blocks(torch.nn.Linear(2, 2))


def test_peer_is_timed_compiled_against_compiled_model(sampler):
    model = sampler.transformer
    build = functools.partial(bm.peer_module, model, "magcache", 0.3, STEPS, [1.0] * STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        speedup, timing, note = bm.time_peer(sampler, model, torch.compile(model), build, "magcache", LABELS, STEPS,
                                             repeats=1)
    assert timing == "compiled" and note == "", (timing, note)
    assert speedup > 0


def test_peer_that_fails_to_compile_is_timed_eager_and_says_so(sampler):
    model = sampler.transformer

    def build(compile: bool):
        if compile:
            raise RuntimeError("no compiler here\nsecond line")
        return bm.peer_module(model, "fbc", 0.2, STEPS)

    speedup, timing, note = bm.time_peer(sampler, model, model, build, "fbc", LABELS, STEPS, repeats=1)
    assert timing == "eager (compile failed)" and speedup > 0
    assert note == "compile failed (RuntimeError: no compiler here); timed eager against the eager model"


def test_compile_configs_are_restored():
    import torch._dynamo.config as dynamo_config

    before = dynamo_config.get_config_copy()
    with bm.compile_configs("fbc"):
        assert dynamo_config.fail_on_recompile_limit_hit and dynamo_config.recompile_limit >= 64
    assert dynamo_config.get_config_copy() == before


def test_cache_dit_context_is_refreshed_between_generations(sampler):
    pytest.importorskip("cache_dit")
    # threshold 1.2 caches every step after the 2 warm-up ones; without the refresh the first call of
    # the next generation read the previous one's residuals (batch 6 vs 4: a RuntimeError)
    module = bm.cache_dit_module(sampler.transformer, "cachedit_dbcache", 1.2, STEPS)
    assert isinstance(module, bm.CacheDitModule)
    first = _images(sampler, module, [1, 2, 3])
    images = _images(sampler, module)
    assert torch.equal(images, _images(sampler, module))
    fresh = bm.cache_dit_module(sampler.transformer, "cachedit_dbcache", 1.2, STEPS)
    assert torch.equal(images, _images(sampler, fresh))
    assert torch.equal(first, _images(sampler, fresh, [1, 2, 3]))


@pytest.mark.parametrize("peer", ["cachedit_taylorseer", "cachedit_foca", "cachedit_dmd"])
def test_cache_dit_calibrators_forecast_what_dbcache_reuses(sampler, peer):
    pytest.importorskip("cache_dit")
    steps = 12  # enough computes before the cached steps for DMD's history

    def images(module):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bm._generate(sampler, module, LABELS, 0, steps)

    plain = images(bm.cache_dit_module(sampler.transformer, "cachedit_dbcache", 0.25, steps))
    module = bm.cache_dit_module(sampler.transformer, peer, 0.25, steps)
    first = images(module)
    assert torch.equal(first, images(module))  # refreshed between generations
    assert not torch.equal(first, plain)  # the calibrator serves the cached steps, not DBCache's reuse


def test_cache_dit_is_timed_compiled(sampler):
    pytest.importorskip("cache_dit")
    import torch._inductor.config as inductor_config

    model = sampler.transformer
    build = functools.partial(bm.cache_dit_module, model, "cachedit_dbcache", 0.5, STEPS)
    fusion = inductor_config.epilogue_fusion
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        speedup, timing, note = bm.time_peer(sampler, model, torch.compile(model), build, "cachedit_dbcache",
                                             LABELS, STEPS, repeats=1)
    assert timing == "compiled" and note == "", (timing, note)
    assert speedup > 0
    assert inductor_config.epilogue_fusion == fusion  # cache-dit's set_compile_configs() did not leak
