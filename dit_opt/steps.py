"""Which denoising step (and which CFG branch) a transformer call belongs to.

Diffusers pipelines call the transformer once per step (CFG batched together) or twice (CFG
branches batched apart), with the step's timestep. The tracker turns the stream of timestep
values into ``(step, branch)`` pairs: a repeated timestep is another branch of the same step;
a timestep that moves on in the schedule's direction is the next step; one that moves back
(or, before the direction is known, any change after a full loop) starts a new generation.
Falling schedules (most diffusers models) and rising ones (Lumina2, Mochi) both work.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["StepTracker", "timestep_value"]


def timestep_value(timestep: Any) -> float:
    """The scalar timestep of a call (the first element of a tensor timestep)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0].item()) if timestep.numel() else 0.0
    return float(timestep)


class StepTracker:
    """Map successive timesteps to ``(step, branch)``; see the module docstring.

    Example:
        >>> tr = StepTracker()
        >>> [tr.observe(t) for t in (999, 999, 979, 979, 999)]
        [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0)]
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the current generation: the next call is step 0."""
        self.step = -1
        self.branch = 0
        self.last: float | None = None
        self.direction = 0.0
        self.generation = -1

    def observe(self, t: float) -> tuple[int, int]:
        """Register a call at timestep ``t``; return its ``(step, branch)``."""
        if self.last is None:
            self._start()
        elif t == self.last:
            self.branch += 1
            return self.step, self.branch
        else:
            moved = 1.0 if t > self.last else -1.0
            if self.direction == 0.0:
                self.direction = moved
                self.step, self.branch = self.step + 1, 0
            elif moved == self.direction:
                self.step, self.branch = self.step + 1, 0
            else:
                self._start()
        self.last = t
        return self.step, self.branch

    def _start(self) -> None:
        self.step, self.branch, self.direction = 0, 0, 0.0
        self.generation += 1
