"""An exception raised by the user's calibration reaches the user as itself; dit-opt's own stay dit-opt's."""

from __future__ import annotations

import warnings

import pytest
import torch

import dit_opt
from dit_opt.calibration import raised_by_calibration, synthetic_calibration
from dit_opt.testing import tiny_model


class PromptError(Exception):
    """What a user's sampler might raise."""


def _optimize(model, cal, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dit_opt.optimize(model, budget=0.5, calibration=cal, compile=False, progress=False, **kw)


def test_a_calibration_that_raises_at_once_raises_its_own_exception():
    model, _ = tiny_model("dit")

    def cal(m):
        raise PromptError("no such prompt")

    with pytest.raises(PromptError, match="no such prompt") as info:
        _optimize(model, cal)
    assert raised_by_calibration(info.value)
    assert any("calibration" in n and "'capture'" in n for n in info.value.__notes__)


def test_a_calibration_that_raises_later_names_the_step_it_surfaced_in():
    model, _ = tiny_model("dit")
    inner = synthetic_calibration(model, num_inference_steps=4, warn=False)
    runs = []

    def cal(m):
        runs.append(1)
        if len(runs) == 3:  # the first run gives capture its inputs; the profile runs it next
            raise PromptError("out of prompts")
        return inner(m)

    with pytest.raises(PromptError) as info:
        _optimize(model, cal)
    assert any("'profile'" in n for n in info.value.__notes__), info.value.__notes__


def test_an_error_of_dit_opt_inside_the_calibration_stays_dit_opt_s():
    """The calibration calls the module; what the module raises is dit-opt's (here: bad inputs)."""
    model, _ = tiny_model("dit")
    inner = synthetic_calibration(model, num_inference_steps=4, warn=False)
    runs = []

    def cal(m):
        runs.append(1)
        if isinstance(m, dit_opt.OptimizedTransformer):
            x, labels = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])  # 3 channels: the model takes 4
            m(hidden_states=x, timestep=torch.full((2,), 900.0), class_labels=labels)
        return inner(m)

    with pytest.raises(dit_opt.DitOptError, match="step 'select'") as info:
        _optimize(model, cal)
    assert not raised_by_calibration(info.value)
