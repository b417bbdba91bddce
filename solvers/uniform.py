"""TaylorSeer's rule as a solver: every unit computes the first ``w`` steps, then every ``N`` steps.

The rhythm after the warm-up starts ``p`` steps late (its phase): diffusers' ``TaylorSeerCacheConfig``
computes at ``t < w`` and at ``(t - w - 1) % N == 0``, which is phase 1.

Between computes each unit is served from its cache, extrapolated (``FORECAST``, the order
measured best at that spacing) where the profile says that beats a plain reuse. TaylorSeer
(Liu et al., 2025) and diffusers' ``TaylorSeerCacheConfig`` follow this rule with a warm-up
(``disable_cache_before_step``) and an interval (``cache_interval``) the user tunes; this solver
tries every triple (``w`` in ``0 .. max_warmup``, ``N`` in ``1 .. max_age + 1``, ``p`` in
``0 .. N - 1``) and keeps the feasible one of least modelled error. At module granularity (units are attention and MLP
outputs) the plan is TaylorSeer's own policy. ``dit_opt.optimize`` offers it, and the same plan
with its unspent budget filled (:mod:`solvers.fill`), next to the main solver's
(:mod:`dit_opt.selection`).

Example:
    >>> from solvers import solve
    >>> plan = solve(problem, "uniform", max_warmup=3)       # doctest: +SKIP
"""

from __future__ import annotations

import time

import numpy as np

from dit_opt.errors import ConfigError
from dit_opt.plan import COMPUTE, REUSE, Plan
from solvers.problem import Problem, infeasible_error

__all__ = ["solve", "schedule", "settings", "dearest", "above"]

SOLVER_NAME = "uniform"


def schedule(num_steps: int, warmup: int, interval: int, phase: int = 0) -> np.ndarray:
    """``(T,)`` booleans: the steps at which every unit computes (``t < warmup``, step 0, or
    ``t >= warmup`` and ``(t - warmup - phase) % interval == 0``).

    Example:
        >>> schedule(8, 2, 3).nonzero()[0].tolist()
        [0, 1, 2, 5]
        >>> schedule(8, 1, 3, phase=1).nonzero()[0].tolist()   # diffusers' TaylorSeer, warm-up 1
        [0, 2, 5]
    """
    if interval < 1 or warmup < 0 or not 0 <= phase < interval:
        raise ConfigError(f"need interval >= 1, warmup >= 0 and 0 <= phase < interval, got interval={interval!r}, "
                          f"warmup={warmup!r}, phase={phase!r}")
    t = np.arange(num_steps)
    return (t < warmup) | ((t >= warmup) & ((t - warmup - phase) % interval == 0)) | (t == 0)


def solve(problem: Problem, max_warmup: int = 4, warmup: int | None = None, interval: int | None = None,
          phase: int | None = None) -> Plan:
    """The least-modelled-error plan of the rule "compute the first ``w`` steps, then every ``N``".

    Args:
        problem: needs the REUSE family (``FORECAST`` is used where the problem has it).
        max_warmup: the largest warm-up tried.
        warmup, interval, phase: fix the knob instead of searching it.

    Returns:
        The plan (status ``HEURISTIC``: optimal within the rule, in modelled error).

    Raises:
        ConfigError: the problem has no REUSE family, or a knob is out of range.
        InfeasibleBudgetError: no setting meets the budget.
    """
    start = time.perf_counter()
    if problem.e_reuse is None:
        raise ConfigError("solvers.uniform needs the REUSE action family; profile it or use solvers.cpsat")
    if isinstance(max_warmup, bool) or not isinstance(max_warmup, int) or max_warmup < 0:
        raise ConfigError(f"max_warmup must be an int >= 0, got {max_warmup!r}")
    M = problem.max_age
    warmups = [warmup] if warmup is not None else range(0, max_warmup + 1)
    intervals = [interval] if interval is not None else range(1, M + 2)
    if interval is not None and not 1 <= interval <= M + 1:
        raise ConfigError(f"interval must be in 1..max_age + 1 = {M + 1}, got {interval!r}")
    scored = settings(problem, warmups, intervals, phase)
    if not scored:
        raise infeasible_error(problem, problem.budget, "No uniform plan (warm-up w, then every N steps)")
    _, error, grid, (w, n, p) = min(scored, key=lambda s: s[1])
    return problem.to_plan(grid, f"{SOLVER_NAME}(w={w},N={n},p={p})", "HEURISTIC", time.perf_counter() - start)


def settings(problem: Problem, warmups=range(0, 5), intervals=None, phase: int | None = None, whole: bool = False,
             order: int | None = None) -> list[tuple[float, float, tuple, tuple[int, int, int]]]:
    """Every feasible ``(w, N, p)`` of the rule: ``(FLOPs, modelled error, action grid, (w, N, p))``.

    ``dit_opt.selection`` measures the ones that spend the most of the budget: the modelled error
    ranks these schedules poorly (it adds up errors measured one at a time), the calibration
    does not. With ``whole``, every step between computes that can be is a whole step forecast
    (``STEP``: no unit and no glue runs; :meth:`Problem.with_step_forecasts`, of ``order`` or
    the order measured best at each step), the others as without.
    """
    reuse = problem.menu_index(REUSE)
    intervals = range(1, problem.max_age + 2) if intervals is None else intervals
    out = []
    for w, n in ((w, n) for w in warmups for n in intervals):
        for p in [phase] if phase is not None else range(n):
            if not 0 <= p < n:
                raise ConfigError(f"phase must be in 0..interval - 1 = {n - 1}, got {p!r}")
            computes = schedule(problem.num_steps, w, n, p)
            grid = [[COMPUTE if computes[t] or not problem.allowed[t, u, reuse] else REUSE
                     for u in range(len(problem.units))] for t in range(problem.num_steps)]
            grid = problem.with_forecasts(grid)
            if whole:
                grid = problem.with_step_forecasts(grid, order)
            flops, error = problem.evaluate(grid)
            if problem.is_within_budget(flops):
                out.append((flops, error, grid, (w, n, p)))
    return out


def dearest(problem: Problem, k: int, whole: bool = False, order: int | None = None) -> list[Plan]:
    """Plans of the ``k`` feasible settings that spend the most FLOPs, one per interval ``N`` (ties:
    least modelled error): the rhythms worth measuring at this budget (``whole``: with whole
    step forecasts of ``order`` between computes, see :func:`settings`; named
    ``uniform+step<order>(...)``)."""
    scored = sorted(settings(problem, whole=whole, order=order), key=lambda s: (-s[0], s[1]))
    name = f"{SOLVER_NAME}+step{'' if order is None else order}" if whole else SOLVER_NAME
    return _per_interval(problem, scored, k, name)


def above(problem: Problem, k: int) -> list[Plan]:
    """Plans of the ``k`` cheapest settings over ``problem``'s budget, one per interval ``N``:
    the rhythms one notch too dear, for :func:`solvers.fill.trim` to bring within it. They are
    plans of ``problem`` at budget 1."""
    full = problem.with_budget(1.0)
    over = [s for s in settings(full) if not problem.is_within_budget(s[0])]
    return _per_interval(full, sorted(over, key=lambda s: (s[0], s[1])), k)


def _per_interval(problem: Problem, scored: list, k: int, name: str = SOLVER_NAME) -> list[Plan]:
    """Plans of the first ``k`` of ``scored`` (:func:`settings` rows, in order) with distinct intervals."""
    start = time.perf_counter()
    out: list[Plan] = []
    taken: set[int] = set()
    for _, _, grid, (w, n, p) in scored:
        if n in taken or len(out) == k:
            continue
        taken.add(n)
        out.append(problem.to_plan(grid, f"{name}(w={w},N={n},p={p})", "HEURISTIC", time.perf_counter() - start))
    return out
