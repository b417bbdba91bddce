"""Which denoising step (and which CFG branch) a transformer call belongs to.

Diffusers pipelines call the transformer once per step (CFG batched together) or twice (CFG
branches batched apart), with the step's timestep. The tracker turns the stream of timestep
values into ``(step, branch)`` pairs: a timestep that moves on in the schedule's direction is
the next step; one that moves back (or, before the direction is known, any change after a full
loop) starts a new generation. Falling schedules (most diffusers models) and rising ones
(Lumina2, Mochi) both work.

A repeated timestep is another branch of the same step, except at the first step, where it may
also be a new generation that started after one stopped at its first step (an interrupted
pipeline, a rejected call). There the call's inputs decide, when given (:func:`call_fingerprint`):
the same latent (``hidden_states``, or whatever the model's forward calls it) as the
generation's first call with other conditioning is another branch (CFG batched apart: the
branches share the latents); the same inputs throughout, or another latent, is a new
generation. Loops stepped in lockstep on one module are therefore told apart by naming each
(``OptimizedTransformer.cache_context``). Without the inputs, a repeated timestep is always
another branch.

:meth:`StepTracker.peek` finds a call's place without changing the tracker and
:meth:`StepTracker.commit` records it, so a caller that rejects the call can leave the tracker
exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from dit_opt.synthetic import DIFFUSERS_NAMES, CallNames

__all__ = ["Position", "StepTracker", "call_fingerprint", "timestep_value"]


def timestep_value(timestep: Any) -> float:
    """The scalar timestep of a call (the first element of a tensor timestep)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0].item()) if timestep.numel() else 0.0
    return float(timestep)


def _tensor_fingerprint(x: torch.Tensor) -> tuple:
    # shape, dtype and two sums in float64: equal inputs give equal fingerprints, and inputs
    # that differ (other noise, other conditioning) differ in them but for a contrived coincidence
    y = x.detach().reshape(-1).to(torch.float64)
    return (tuple(x.shape), str(x.dtype), float(y.sum()), float((y * y).sum())) if y.numel() else (tuple(x.shape),)


def call_fingerprint(inputs: dict[str, Any], names: CallNames) -> tuple[Any, Any]:
    """``(fingerprint of every input but the timestep, fingerprint of the latent)`` of one call
    (what :meth:`StepTracker.peek` compares), the timestep and the latent as ``names`` (the
    model's :func:`dit_opt.synthetic.call_names`) has them: tensors by shape, dtype and two sums,
    other values by ``repr``."""

    def fp(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return _tensor_fingerprint(v)
        if isinstance(v, dict):
            return tuple(sorted((k, fp(x)) for k, x in v.items()))
        if isinstance(v, list | tuple):
            return tuple(fp(x) for x in v)
        return repr(v)

    everything = tuple(sorted((k, fp(v)) for k, v in inputs.items() if k != names.timestep))
    return everything, fp(names.latent_of(inputs))


@dataclass(frozen=True)
class Position:
    """Where a call falls, and the tracker state after it (what :meth:`StepTracker.commit` stores)."""

    step: int
    branch: int
    new_generation: bool
    last: float | None
    direction: float
    generation: int
    first_call: Any


class StepTracker:
    """Map successive timesteps to ``(step, branch)``; see the module docstring.

    Args:
        names: what the model calls its latent and timestep (:func:`dit_opt.synthetic.call_names`),
            for the inputs :meth:`peek` is given; default diffusers' ``hidden_states`` and ``timestep``.

    Example:
        >>> tr = StepTracker()
        >>> [tr.observe(t) for t in (999, 999, 979, 979, 999)]
        [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0)]
    """

    def __init__(self, names: CallNames = DIFFUSERS_NAMES) -> None:
        self.names = names
        self.reset()

    def reset(self) -> None:
        """Forget the current generation: the next call is step 0."""
        self.step = -1
        self.branch = 0
        self.last: float | None = None
        self.direction = 0.0
        self.generation = -1
        self.first_call: Any = None

    def _state(self) -> Position:
        return Position(self.step, self.branch, False, self.last, self.direction, self.generation, self.first_call)

    def peek(self, t: float, inputs: dict[str, Any] | None = None) -> Position:
        """Where a call at timestep ``t`` falls, without changing the tracker.

        Args:
            t: the call's timestep.
            inputs: the call's keyword inputs, if at hand (without them a repeated timestep is
                always another branch); only read at a generation's first step.
        """
        s = self._state()
        if s.last is None:
            return self._start(s, t, inputs)
        if t == s.last:
            if s.step == 0 and inputs is not None and s.first_call is not None:
                call = call_fingerprint(inputs, self.names)
                if call[0] == s.first_call[0] or call[1] != s.first_call[1]:
                    return self._start(s, t, inputs, call)
            return replace(s, branch=s.branch + 1)
        moved = 1.0 if t > s.last else -1.0
        if s.direction != 0.0 and moved != s.direction:
            return self._start(s, t, inputs)
        return replace(s, step=s.step + 1, branch=0, last=t, direction=moved)

    def _start(self, s: Position, t: float, inputs: dict[str, Any] | None, call: Any = None) -> Position:
        if call is None and inputs is not None:
            call = call_fingerprint(inputs, self.names)
        return replace(s, step=0, branch=0, new_generation=True, last=t, direction=0.0,
                       generation=s.generation + 1, first_call=call)

    def commit(self, pos: Position) -> None:
        """Record a call placed by :meth:`peek` (of this tracker, with no commit in between)."""
        self.step, self.branch, self.last, self.direction = pos.step, pos.branch, pos.last, pos.direction
        self.generation, self.first_call = pos.generation, pos.first_call

    def observe(self, t: float, inputs: dict[str, Any] | None = None) -> tuple[int, int]:
        """Register a call at timestep ``t``; return its ``(step, branch)`` (:meth:`peek` then :meth:`commit`)."""
        pos = self.peek(t, inputs)
        self.commit(pos)
        return pos.step, pos.branch
