"""Shared fixtures: tiny models captured once per session (capture costs seconds)."""

from __future__ import annotations

import warnings

import pytest

from dit_opt.testing import tiny_model


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

