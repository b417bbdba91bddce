"""Families not in ``actions`` are not measured at all. (A block that cannot run on a token
subset is left out of PRUNE: ``tests/test_pipelines.py``, Sana inside its pipeline.)"""

from __future__ import annotations

import warnings

import pytest
import torch

import dit_opt
from dit_opt.plan import ActionKind
from dit_opt.testing import tiny_model


@pytest.fixture(scope="module")
def sana_small():
    """Sana at 16 tokens: its Mix-FFN reshapes the tokens to the image grid, so a block run on a
    token subset raises: the profile crashed when it measured PRUNE, asked for or not."""
    model, inputs = tiny_model("sana")
    inputs["hidden_states"] = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    return model, inputs


def test_families_not_in_actions_are_not_measured(sana_small):
    model, inputs = sana_small
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.optimize(model, budget=0.5, example_inputs=inputs, compile=False, progress=False,
                               select=False, actions=("reuse", "forecast", "skip"))
    assert opt.profile.prune_rates == () and opt.profile.widths == ()
    assert opt.report["prune_excluded"] == {}  # never tried
    counts = opt.plan.counts()
    assert counts[ActionKind.PRUNE] == 0 and counts[ActionKind.WIDTH] == 0
