"""Step tracking from timesteps, and calibrations built from pipelines."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import dit_opt
from dit_opt.steps import StepTracker, timestep_value


def test_falling_schedule_with_cfg_branches():
    tr = StepTracker()
    seen = [tr.observe(t) for t in (999, 999, 979, 979, 959)]
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert tr.observe(999) == (0, 0) and tr.generation == 1  # the sequence started over


@given(st.lists(st.floats(0, 1000, allow_nan=False), min_size=2, max_size=30, unique=True))
def test_any_monotone_schedule_counts_steps(ts):
    for schedule in (sorted(ts), sorted(ts, reverse=True)):  # rising (Lumina2, Mochi) and falling
        tr = StepTracker()
        assert [tr.observe(t)[0] for t in schedule] == list(range(len(schedule)))
        assert tr.observe(schedule[0]) == (0, 0)  # a new generation


def test_reset_and_tensor_timesteps():
    tr = StepTracker()
    tr.observe(5.0)
    tr.observe(4.0)
    tr.reset()
    assert tr.observe(4.0) == (0, 0)
    assert timestep_value(torch.tensor([3.0, 3.0])) == 3.0 and timestep_value(7) == 7.0


class _Pipe:
    """The part of a diffusers pipeline a calibration touches: ``transformer`` and ``__call__``."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.used = []

    def __call__(self, **kwargs):
        self.used.append((self.transformer, kwargs))
        return "images"


def test_calibration_from_pipeline_swaps_and_restores():
    original, other = torch.nn.Identity(), torch.nn.Identity()
    pipe = _Pipe(original)
    cal = dit_opt.calibration_from_pipeline(pipe, prompt=["a"], num_inference_steps=3)
    assert cal(other) == "images"
    assert pipe.used == [(other, {"prompt": ["a"], "num_inference_steps": 3})]
    assert pipe.transformer is original


def test_peek_changes_nothing_until_commit():
    tr = StepTracker()
    tr.observe(999)
    before = vars(tr).copy()
    pos = tr.peek(979)
    assert vars(tr) == before and (pos.step, pos.branch) == (1, 0)
    tr.commit(pos)
    assert tr.step == 1


def test_a_repeated_first_timestep_is_told_apart_by_the_inputs():
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    cond = {"hidden_states": x, "labels": torch.tensor([1, 2])}
    uncond = {"hidden_states": x, "labels": torch.tensor([9, 9])}
    tr = StepTracker()
    assert tr.observe(999, cond) == (0, 0)
    assert tr.observe(999, uncond) == (0, 1)  # the same latents, other conditioning: CFG apart
    assert tr.observe(999, cond) == (0, 0) and tr.generation == 1  # the same call again: started over
    assert tr.observe(999, dict(cond, hidden_states=y)) == (0, 0) and tr.generation == 2  # other noise
    assert tr.observe(999) == (0, 1)  # without inputs: another branch, as before
