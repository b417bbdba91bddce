"""What each action needs is checked before the plan may use it: a block that cannot run on a
token subset is left out of PRUNE (with the reason in ``opt.report``), and families not in
``actions`` are not measured at all."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import dit_opt
from dit_opt.plan import ActionKind
from dit_opt.testing import tiny_model


@pytest.fixture(scope="module")
def sana_small():
    """Sana at 16 tokens: its Mix-FFN reshapes the tokens to the image grid, so a block run on a
    token subset raises (the capture's token count no longer equals the channel count, which
    would hide the block from PRUNE on its own)."""
    model, inputs = tiny_model("sana")
    inputs["hidden_states"] = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    return model, inputs


def test_a_block_that_cannot_run_on_a_token_subset_is_left_out_of_prune(sana_small):
    model, inputs = sana_small
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dit_opt.optimize(model, budget=0.5, example_inputs=inputs, compile=False, progress=False,
                               select=False)
    excluded = opt.report["prune_excluded"]
    assert sorted(excluded) == [f"transformer_blocks.{i}" for i in range(3)]
    assert all("unflatten" in reason for reason in excluded.values())
    assert np.isnan(opt.profile.e_prune).all()
    assert opt.plan.counts()[ActionKind.PRUNE] == 0
    assert opt.plan.flop_fraction <= 0.5 + 1e-9


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
