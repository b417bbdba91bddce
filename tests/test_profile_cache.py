"""optimize() profiles a model once per calibration: other budgets reuse it, in the process and on disk."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import dit_opt
from dit_opt import profile_cache
from dit_opt.calibration import synthetic_calibration
from dit_opt.testing import tiny_model


def _optimize(model, cal, budget=0.5, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dit_opt.optimize(model, budget=budget, calibration=cal, compile=False, progress=False, **kw)


class Counting:
    """A calibration that counts its runs."""

    def __init__(self, model):
        self.inner = synthetic_calibration(model, num_inference_steps=4, warn=False)
        self.runs = 0

    def __call__(self, m):
        self.runs += 1
        return self.inner(m)


@pytest.fixture
def fresh_cache():
    profile_cache.clear()
    yield
    profile_cache.clear()


def test_another_budget_reuses_the_profile_in_the_process(fresh_cache):
    model, _ = tiny_model("dit")
    cal = Counting(model)
    first = _optimize(model, cal, 0.5)
    runs = cal.runs
    second = _optimize(model, cal, 0.3)
    assert first.report["profile_cached"] is None and second.report["profile_cached"] == "memory"
    assert second.profile is first.profile
    assert second.report["profile_generations"] == 0.0
    # no profile runs: the first call's inputs and one run per candidate (the reference is kept)
    assert cal.runs - runs == 1 + second.report["selection_runs"]
    assert second.plan.flop_fraction <= 0.3 + 1e-9


def test_other_weights_or_another_calibration_are_profiled_again(fresh_cache):
    model, _ = tiny_model("dit")
    cal = Counting(model)
    _optimize(model, cal, select=False)
    other = Counting(model)
    assert _optimize(model, other, select=False).report["profile_cached"] is None
    with torch.no_grad():
        model.pos_embed.proj.weight.view(-1)[0] += 0.1  # one weight
    assert _optimize(model, cal, select=False).report["profile_cached"] is None


def test_a_profile_cache_directory_serves_another_process(fresh_cache, tmp_path):
    model, _ = tiny_model("dit")
    first = _optimize(model, synthetic_calibration(model, num_inference_steps=4, warn=False), select=False,
                      profile_cache=tmp_path)
    (entry,) = [p for p in tmp_path.iterdir()]
    assert not entry.name.endswith(".partial")
    profile_cache.clear()  # as in a new process
    again = _optimize(model, synthetic_calibration(model, num_inference_steps=4, warn=False), 0.3, select=False,
                      profile_cache=tmp_path)
    assert again.report["profile_cached"] == "disk"
    assert np.array_equal(again.profile.e_reuse, first.profile.e_reuse)
    (entry / "profile.safetensors").write_bytes(b"not a profile")
    profile_cache.clear()
    with pytest.raises(dit_opt.ArtifactError, match="profile_cache entry"):
        _optimize(model, synthetic_calibration(model, num_inference_steps=4, warn=False), select=False,
                  profile_cache=tmp_path)
