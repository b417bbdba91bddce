"""Which schedule a denoising loop runs: declared by whoever knows it, or guessed from its first timesteps.

A plan is made for one schedule, the timesteps of the calibration's loop. A loop at another step
count or schedule shape needs its own plan, re-solved from the stored profile
(``OptimizedTransformer.plan_for_schedule``), and for that its timesteps, all of them, before it
runs: a plan spends its budget over the whole loop.

The loop's schedule is known exactly when it is declared: ``OptimizedTransformer.set_schedule``
(which :func:`dit_opt.attach` calls whenever the pipeline's scheduler sets its timesteps) gives
the scheduler's timesteps, and :func:`locate` finds the loop in them from its first call's
timestep. Pipelines pass the transformer their scheduler's timestep as it is (DiT, PixArt, SD3,
Wan, ...), divided by 1000 (Flux) or as ``1 - t / 1000`` (Lumina2): :data:`TIMESTEP_MAPS`. A
pipeline that gives only the step count (``cache_context(..., num_inference_steps=N)``) and an
undeclared loop are guessed (:func:`guess`): the calibrated schedule's shape, stretched to the
loop's first timestep and resampled at the step count that matches its second. That is exact for
schedules whose shape and last step do not change with the step count (DDIM's default spacing,
uniform grids); where the last step moves with the count (DPM-Solver's spacing, shifted flow
matching) the count can be off by a step or two, and the runtime says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["TIMESTEP_MAPS", "guess", "locate", "resample", "same_schedule"]

#: How pipelines turn their scheduler's timestep into the transformer's: as it is, divided by
#: 1000 (Flux), or ``1 - t / 1000`` (Lumina2).
TIMESTEP_MAPS: tuple[Callable[[np.ndarray], np.ndarray], ...] = (
    lambda t: t,
    lambda t: t / 1000.0,
    lambda t: 1.0 - t / 1000.0,
)

#: Largest step count :func:`guess` considers.
MAX_GUESSED_STEPS = 1000


def _tolerance(values: np.ndarray) -> float:
    # timesteps are float32 in most schedulers: agree to a part in 1e5 of the schedule's range
    return 1e-5 * max(float(np.abs(values).max(initial=0.0)), 1e-3)


def same_schedule(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two schedules have the same length and values (to float32 rounding)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return x.shape == y.shape and bool(np.all(np.abs(x - y) <= _tolerance(x)))


def locate(declared: Sequence[float], t0: float) -> tuple[float, ...] | None:
    """The part of the ``declared`` schedule (a scheduler's timesteps) that a loop whose first
    transformer call is at ``t0`` runs, in the transformer's values: from the first entry that
    one of :data:`TIMESTEP_MAPS` takes to ``t0`` on (a loop may start inside its schedule, as
    image-to-image pipelines do). ``None`` when no entry maps to ``t0``.

    Example:
        >>> locate([1000.0, 750.0, 500.0], 0.75)   # a Flux pipeline: t / 1000, from the second step
        (0.75, 0.5)
    """
    values = np.asarray([float(t) for t in declared], dtype=np.float64)
    if values.size == 0:
        return None
    for mapping in TIMESTEP_MAPS:
        mapped = mapping(values)
        hits = np.flatnonzero(np.abs(mapped - t0) <= _tolerance(mapped))
        if hits.size:
            return tuple(float(t) for t in mapped[hits[0]:])
    return None


def resample(calibrated: Sequence[float], num_steps: int, first: float | None = None) -> tuple[float, ...]:
    """The calibrated schedule's shape at ``num_steps`` steps: its values interpolated at evenly
    spaced positions from its first step to its last, then, given ``first``, stretched to start
    there and still end where it ends.

    Example:
        >>> resample([900.0, 500.0, 100.0], 5)
        (900.0, 700.0, 500.0, 300.0, 100.0)
    """
    cal = np.asarray([float(t) for t in calibrated], dtype=np.float64)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if cal.size == 1 or num_steps == 1:
        out = np.full(num_steps, cal[0])
    else:
        out = np.interp(np.linspace(0.0, cal.size - 1, num_steps), np.arange(cal.size), cal)
    if first is not None and cal.size > 1 and cal[0] != cal[-1]:
        out = cal[-1] + (out - cal[-1]) * (first - cal[-1]) / (cal[0] - cal[-1])
    elif first is not None:
        out = out - out[0] + first
    return tuple(float(t) for t in out)


def guess(t0: float, t1: float, calibrated: Sequence[float], num_steps: int | None = None) -> tuple[float, ...]:
    """A loop's schedule from its first two timesteps ``t0``, ``t1`` (and its step count, when a
    pipeline gives it): the calibrated schedule's shape (:func:`resample`, from ``t0`` to where
    the calibrated one ends) at ``num_steps`` steps or, without it, at the step count whose
    second timestep comes closest to ``t1``.

    Example:
        >>> guess(961.0, 921.0, [901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0])[:3]
        (961.0, 921.0, 881.0)
    """
    if num_steps is not None:
        return resample(calibrated, num_steps, first=t0)
    best, best_gap = resample(calibrated, 2, first=t0), np.inf
    for n in range(2, MAX_GUESSED_STEPS + 1):
        candidate = resample(calibrated, n, first=t0)
        gap = abs(candidate[1] - t1)
        if gap < best_gap:
            best, best_gap = candidate, gap
        elif gap > best_gap:
            break  # the second timestep moves monotonically towards t0: only further away from here
    return best
