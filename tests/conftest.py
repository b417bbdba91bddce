"""Shared fixtures: tiny models captured and profiled once per session (each costs seconds)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from dit_opt.testing import tiny_model

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one core per worker: the tiny models are Python-bound, so workers side by side beat threads
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Each test leaves torch's thread count as it found it (the CLI's ``--threads 1``, run in
    process, would otherwise leave every later test on one core)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def captured():
    """name -> (model, inputs, DiTGraph with FLOPs annotated), built lazily and shared."""
    from dit_opt.capture import capture
    from passes.annotate_flops import annotate_flops

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model, inputs = tiny_model(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = capture(model, inputs)
                annotate_flops(graph)
            cache[name] = (model, inputs, graph)
        return cache[name]

    return get



@pytest.fixture(scope="session")
def profiled():
    """(name, steps) -> (model, synthetic calibration of ``steps`` steps, its profile), shared."""
    import dit_opt
    from dit_opt.calibration import synthetic_calibration

    cache: dict = {}

    def get(name: str, steps: int):
        if (name, steps) not in cache:
            model, _ = tiny_model(name)
            cal = synthetic_calibration(model, num_inference_steps=steps, warn=False)
            cache[name, steps] = (model, cal, dit_opt.profile(model, cal, progress=False))
        return cache[name, steps]

    return get
