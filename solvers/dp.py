"""SODA's interval dynamic programme: exact for COMPUTE/REUSE-only problems.

Per unit, a schedule is a sequence of intervals: a ``COMPUTE`` at step ``t`` followed by ``n - 1``
``REUSE`` steps (``n - 1 <= max_age``). With ``E(t, n)`` the summed reuse error of the interval
after a compute at ``t``, SODA's recurrence is ``dp[t][i + 1] = min_n E(t, n) + dp[t + n][i]``:
the least error of the suffix from ``t`` with ``i + 1`` computes. Here the count ``i`` is
generalised to the FLOPs saved (in the integer quanta of :class:`~solvers.problem.Problem`, the
*same* scaling CP-SAT uses): each suffix keeps its Pareto front of (quanta saved, error). When
compute and reuse FLOPs of a unit are the same at every step, as for real models, the front has
one point per number of computes and is exactly SODA's table.

The units are then combined under the budget by an exact knapsack over the same integer quanta:
the Pareto fronts are merged unit by unit, savings above the requirement are clipped (they cannot
help), and points that cannot reach the requirement with the remaining units are dropped. The
result is the least-error plan among all plans that meet the budget under the shared scaling.

Example:
    >>> from solvers import dp
    >>> plan = dp.solve(problem.restrict())      # doctest: +SKIP
"""

from __future__ import annotations

import time

import numpy as np

from dit_opt.errors import ConfigError
from dit_opt.plan import Plan
from solvers.problem import Problem

__all__ = ["solve"]

SOLVER_NAME = "dp"


def solve(problem: Problem) -> Plan:
    """Least-error COMPUTE/REUSE plan within the budget, exactly.

    Args:
        problem: a problem whose only actions are ``COMPUTE`` and ``REUSE`` (see
            :meth:`Problem.restrict`).

    Returns:
        The optimal :class:`Plan` (status ``OPTIMAL``, gap 0).

    Raises:
        ConfigError: the problem enables PRUNE, WIDTH or SKIP (use ``solvers.cpsat``).
        InfeasibleBudgetError: no plan meets the budget; states the smallest feasible budget.
    """
    start = time.perf_counter()
    other = sorted({a.kind.value for a in problem.actions} - {"compute", "reuse"})
    if other:
        raise ConfigError(
            f"solvers.dp handles COMPUTE/REUSE-only problems, but this one enables {other}; "
            "use solvers.cpsat for the joint problem, or problem.restrict() to drop those actions"
        )
    problem.check_feasible()
    need = problem.need_quanta()
    fronts = [_unit_front(problem, u) for u in range(len(problem.units))]
    picks = _combine(fronts, need)
    T, U = problem.num_steps, len(problem.units)
    choice = np.ones((T, U), dtype=np.int64)  # menu index 1 = REUSE
    for u, (front, pick) in enumerate(zip(fronts, picks, strict=True)):
        choice[front.computes[pick], u] = 0
    return problem.to_plan(problem.grid(choice), SOLVER_NAME, "OPTIMAL", time.perf_counter() - start, gap=0.0)


class _Front:
    """Pareto front of one unit: savings (ascending), errors (descending), compute steps."""

    def __init__(self, savings: np.ndarray, errors: np.ndarray, computes: list[list[int]]):
        self.savings, self.errors, self.computes = savings, errors, computes


def _pareto(savings: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points (more savings, less error), by ascending savings."""
    order = np.lexsort((errors, -savings))  # savings descending, then error ascending
    err = errors[order]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(err)[:-1]])
    keep = order[err < best_before]
    return keep[::-1]


def _unit_front(problem: Problem, u: int) -> _Front:
    T, M = problem.num_steps, problem.max_age
    has_reuse = len(problem.actions) > 1
    err = problem.error_table[:, u, 1, :] if has_reuse else None
    save = problem.savings_quanta[:, u, 1] if has_reuse else None
    reuse_ok = problem.allowed[:, u, 1] if has_reuse else np.zeros(T, dtype=bool)
    # suffix[t] = front of the steps t..T-1 given a COMPUTE at t: (savings, errors, links)
    # where links[i] = (n, index into suffix[t + n]) rebuilds the schedule.
    suffix: dict[int, tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]] = {
        T: (np.zeros(1, dtype=np.int64), np.zeros(1), [(0, -1)])
    }
    for t in range(T - 1, -1, -1):
        s_parts, e_parts, links = [], [], []
        interval_err, interval_save = 0.0, 0
        for n in range(1, min(M + 1, T - t) + 1):
            if n > 1:  # step t + n - 1 reuses the cache computed at t, age n - 1
                if not reuse_ok[t + n - 1]:
                    break
                interval_err += err[t + n - 1, n - 1]
                interval_save += int(save[t + n - 1])
            s_next, e_next, _ = suffix[t + n]
            s_parts.append(s_next + interval_save)
            e_parts.append(e_next + interval_err)
            links += [(n, i) for i in range(len(s_next))]
        s_all, e_all = np.concatenate(s_parts), np.concatenate(e_parts)
        keep = _pareto(s_all, e_all)
        suffix[t] = (s_all[keep], e_all[keep], [links[i] for i in keep])
    savings, errors, _ = suffix[0]
    computes = []
    for i in range(len(savings)):
        steps, t, k = [], 0, i
        while t < T:
            steps.append(t)
            n, k = suffix[t][2][k]
            t += n
        computes.append(steps)
    return _Front(savings, errors, computes)


def _combine(fronts: list[_Front], need: int) -> list[int]:
    """Pick one point per unit front: least total error with total savings >= need (exact).

    Two prunings keep the merged front small without losing the optimum: points that cannot
    reach ``need`` even if every later unit saves its most, and points whose error plus a
    Lagrangian lower bound on the later units' error exceeds the error of a known feasible
    choice (:func:`_incumbent`).
    """
    max_save = [int(f.savings[-1]) for f in fronts]
    remaining = np.cumsum(max_save[::-1])[::-1].tolist() + [0]
    upper, lam = _incumbent(fronts, need)
    # later[u]: for the units after u, sum of min(error - lam * savings) and sum of min savings
    reduced = [float(np.min(f.errors - lam * f.savings)) for f in fronts]
    least = [int(f.savings[0]) for f in fronts]
    later_reduced = np.cumsum(reduced[::-1])[::-1].tolist()[1:] + [0.0]
    later_least = np.cumsum(least[::-1])[::-1].tolist()[1:] + [0]
    tolerance = 1e-9 * (abs(upper) + 1.0)
    savings, errors = np.zeros(1, dtype=np.int64), np.zeros(1)
    history: list[tuple[np.ndarray, np.ndarray]] = []  # per unit: (previous index, front index)
    cap = max(need, 0)
    for u, front in enumerate(fronts):
        s = np.minimum((savings[:, None] + front.savings[None, :]).ravel(), cap)
        e = (errors[:, None] + front.errors[None, :]).ravel()
        # later units must save at least need - s (unknown once s is clipped at need)
        still_needed = np.where(s >= need, -np.inf, need - s.astype(np.float64))
        bound = later_reduced[u] + lam * np.maximum(still_needed, later_least[u])
        ok = (s + remaining[u + 1] >= need) & (e + bound <= upper + tolerance)
        idx = np.flatnonzero(ok)
        keep = idx[_pareto(s[idx], e[idx])]
        history.append((keep // len(front.savings), keep % len(front.savings)))
        savings, errors = s[keep], e[keep]
    # the caller checked feasibility and the incumbent survives the pruning, so a point remains
    best = int(np.flatnonzero(savings >= need)[np.argmin(errors[savings >= need])])
    picks = []
    for prev, pick in reversed(history):
        picks.append(int(pick[best]))
        best = int(prev[best])
    return picks[::-1]


def _incumbent(fronts: list[_Front], need: int, iterations: int = 60) -> tuple[float, float]:
    """Error of a feasible choice and a FLOP price, from the Lagrangian relaxation of the fronts.

    For a price ``lam`` each unit takes the front point minimising ``error - lam * savings``;
    ``lam`` is bisected to the threshold where the choice meets ``need``, and units are moved
    from the choice below the threshold to the one above until it does.
    """

    def choose(lam: float) -> np.ndarray:
        # ties go to the larger saving (the last of equal values on an ascending front)
        return np.array([len(f.savings) - 1 - int(np.argmin((f.errors - lam * f.savings)[::-1])) for f in fronts])

    def totals(pick: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([f.savings[i] for f, i in zip(fronts, pick, strict=True)]),
                np.array([f.errors[i] for f, i in zip(fronts, pick, strict=True)]))

    hi = 1.0
    while totals(choose(hi))[0].sum() < need and hi < 1e300:
        hi *= 4.0
    lo = 0.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if totals(choose(mid))[0].sum() >= need else (mid, hi)
    s_lo, e_lo = totals(choose(lo))
    s_hi, e_hi = totals(choose(hi))
    gain = s_hi - s_lo
    order = sorted(np.flatnonzero(gain > 0), key=lambda u: (e_hi[u] - e_lo[u]) / gain[u])
    total, error = int(s_lo.sum()), float(e_lo.sum())
    for u in order:
        if total >= need:
            break
        total += int(gain[u])
        error += float(e_hi[u] - e_lo[u])
    upper = error if total >= need else float(e_hi.sum())
    return min(upper, float(e_hi.sum())), hi
