"""Periodic schedules per unit: each unit computes every ``N_u`` steps, ``N_u`` chosen under the budget.

The free plans of :mod:`solvers.cpsat` are optimal for the *modelled* error, the sum of each
action's error measured alone. At low budgets that model is optimistic about long runs of
consecutive reuses in many units at once (their errors compound), so a plan that refreshes every
unit at a regular rhythm can be better in the real output although it is worse in the model
(FORA's and TaylorSeer's uniform intervals are the extreme case). This solver searches that
family: per unit, the interval ``N`` in ``1 .. max_age + 1`` (compute at ``t % N == 0``,
``REUSE``/``FORECAST`` in between), one Pareto point (FLOPs saved, modelled error) each; the
units are then combined under the budget by the exact knapsack of :mod:`solvers.dp`, which gives
sensitive units short intervals and robust ones long intervals.

``dit_opt.optimize`` offers this plan next to the main solver's and keeps the one whose measured
output error is smaller (:mod:`dit_opt.selection`).

Example:
    >>> from solvers import periodic
    >>> plan = periodic.solve(problem)        # doctest: +SKIP
"""

from __future__ import annotations

import time

import numpy as np

from dit_opt.errors import ConfigError
from dit_opt.plan import REUSE, Plan
from solvers.dp import _combine, _Front, _pareto
from solvers.problem import Problem, infeasible_error

__all__ = ["solve"]

SOLVER_NAME = "periodic"


def solve(problem: Problem) -> Plan:
    """The least-modelled-error plan in which every unit computes at a fixed interval.

    Args:
        problem: needs the REUSE family (``FORECAST`` is used where the problem has it).

    Returns:
        The plan (status ``HEURISTIC``: optimal within the periodic family).

    Raises:
        InfeasibleBudgetError: even the longest intervals miss the budget.
    """
    start = time.perf_counter()
    if problem.e_reuse is None:
        raise ConfigError("solvers.periodic needs the REUSE action family; profile it or use solvers.cpsat")
    reuse = problem.menu_index(REUSE)
    T, U, M = problem.num_steps, len(problem.units), problem.max_age
    steps = np.arange(T)
    fronts, columns = [], []
    for u in range(U):
        savings, errors, cols = [], [], []
        for n in range(1, M + 2):
            col = np.where(steps % n == 0, 0, reuse)
            col[~problem.allowed[:, u, reuse]] = 0
            choice = np.zeros((T, U), dtype=np.int64)
            choice[:, u] = col
            _, error = problem.evaluate(problem.with_forecasts(problem.grid(choice)))
            savings.append(int(problem.savings_quanta[col == reuse, u, reuse].sum()))
            errors.append(error)
            cols.append(col)
        s, e = np.array(savings, dtype=np.int64), np.array(errors)
        keep = _pareto(s, e)
        fronts.append(_Front(s[keep], e[keep], [[]] * len(keep)))
        columns.append([cols[i] for i in keep])
    need = problem.need_quanta()
    if need > sum(int(f.savings[-1]) for f in fronts):
        raise infeasible_error(problem, problem.budget, "No periodic plan (one interval per unit)")
    picks = _combine(fronts, need)
    choice = np.stack([columns[u][p] for u, p in enumerate(picks)], axis=1)
    return problem.to_plan(problem.grid(choice), SOLVER_NAME, "HEURISTIC", time.perf_counter() - start)
