"""TaylorSeer's rule as a solver: every unit computes the first ``w`` steps, then every ``N`` steps.

Between computes each unit is served from its cache, extrapolated (``FORECAST``, the order
measured best at that spacing) where the profile says that beats a plain reuse. TaylorSeer
(Liu et al., 2025) and diffusers' ``TaylorSeerCacheConfig`` follow this rule with a warm-up
(``disable_cache_before_step``) and an interval (``cache_interval``) the user tunes; this solver
tries every pair (``w`` in ``0 .. max_warmup``, ``N`` in ``1 .. max_age + 1``) and keeps the
feasible one of least modelled error. At module granularity (units are attention and MLP
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

__all__ = ["solve", "schedule"]

SOLVER_NAME = "uniform"


def schedule(num_steps: int, warmup: int, interval: int) -> np.ndarray:
    """``(T,)`` booleans: the steps at which every unit computes (``t < warmup`` or ``(t - warmup) %
    interval == 0``).

    Example:
        >>> schedule(8, 2, 3).nonzero()[0].tolist()
        [0, 1, 2, 5]
    """
    if interval < 1 or warmup < 0:
        raise ConfigError(f"need interval >= 1 and warmup >= 0, got interval={interval!r}, warmup={warmup!r}")
    t = np.arange(num_steps)
    return (t < warmup) | ((t - warmup) % interval == 0) | (t == 0)


def solve(problem: Problem, max_warmup: int = 4, warmup: int | None = None, interval: int | None = None) -> Plan:
    """The least-modelled-error plan of the rule "compute the first ``w`` steps, then every ``N``".

    Args:
        problem: needs the REUSE family (``FORECAST`` is used where the problem has it).
        max_warmup: the largest warm-up tried.
        warmup, interval: fix the knob instead of searching it.

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
    reuse = problem.menu_index(REUSE)
    best = None
    for w in warmups:
        for n in intervals:
            computes = schedule(problem.num_steps, w, n)
            grid = [[COMPUTE if computes[t] or not problem.allowed[t, u, reuse] else REUSE
                     for u in range(len(problem.units))] for t in range(problem.num_steps)]
            grid = problem.with_forecasts(grid)
            flops, error = problem.evaluate(grid)
            if problem.is_within_budget(flops) and (best is None or error < best[0]):
                best = (error, grid, (w, n))
    if best is None:
        raise infeasible_error(problem, problem.budget, "No uniform plan (warm-up w, then every N steps)")
    return problem.to_plan(best[1], f"{SOLVER_NAME}(w={best[2][0]},N={best[2][1]})", "HEURISTIC",
                           time.perf_counter() - start)
