"""Spend what a plan leaves of its budget: turn cache reads into computes where they cut the modelled error most
(:func:`fill`); or, for a plan over its budget, the reverse (:func:`trim`).

A schedule with one knob (an interval, a warm-up) meets a budget only at the settings the knob
allows, so at most budgets it leaves FLOPs unspent: TaylorSeer at interval 3 spends 0.37 of a
50-step loop's FLOPs, interval 2 already 0.53. :func:`fill` starts from such a plan and, while
the budget allows, makes one more (step, unit) compute, or, where the problem offers ``CFG``,
runs it on one guidance half (a cache read made many times more exact for half a compute): the
change whose modelled error saved per FLOP is largest, counting what it does to that unit's later
cache reads and forecasts (errors add up over units, so each candidate is scored on its own
unit's column). The result keeps the
schedule's rhythm and uses the budget; :mod:`dit_opt.selection` then measures whether it pays.
:func:`fill_tail` spends it the other way: every unit computes at the last steps, as many as
fit, and the rhythm stays regular up to them (the fill's extra computes break its even spacing,
which forecasts of order 2 and 3 pay for).

Example:
    >>> from solvers.fill import fill
    >>> fuller = fill(problem, solve(problem, "uniform"))      # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Any

from dit_opt.plan import COMPUTE, REUSE, ActionKind, Plan, after_step
from solvers.problem import Problem

__all__ = ["fill", "fill_tail", "trim"]


def fill(problem: Problem, plan: Plan, name: str | None = None) -> Plan:
    """``plan`` with extra computes (and ``CFG`` half computes), greedily by modelled error saved
    per FLOP, within the budget.

    Args:
        problem: the problem ``plan`` was made for (its budget is the one filled up to).
        plan: a plan of ``problem`` (forecasts are re-chosen after each change).
        name: the solver name of the result (default ``"<plan's solver>+fill"``).

    Returns:
        The filled plan; ``plan`` itself (same object) when no compute fits or helps.
    """
    start = time.perf_counter()
    T, U = problem.num_steps, len(problem.units)
    columns, saved = _columns(problem, plan)
    slack = saved - problem.need_quanta()
    options = [_options(problem, _Column(problem, u, columns[u])) for u in range(U)]
    changed = False
    while True:
        best = None
        for u in range(U):
            for gain, t, cost, target in options[u]:
                if cost <= slack:
                    if best is None or gain > best[0]:
                        best = (gain, u, t, cost, target)
                    break  # options are sorted by gain: the first that fits is this unit's best
        if best is None or best[0] <= 0:
            break
        _, u, t, cost, target = best
        columns[u][t] = target
        slack -= cost
        options[u] = _options(problem, _Column(problem, u, columns[u]))
        changed = True
    if not changed:
        return plan
    grid = [[columns[u][t] for u in range(U)] for t in range(T)]
    return problem.to_plan(grid, name or f"{plan.solver}+fill", plan.status,
                           plan.wall_time_s + time.perf_counter() - start, plan.gap)


def fill_tail(problem: Problem, plan: Plan, name: str | None = None) -> Plan:
    """``plan`` with every unit computing at its last steps, as many as fit the budget (from the
    last step back), its cache reads' forecasts chosen again for the new spacing.

    On ``digits-mmdit`` at budget 0.7, TaylorSeer's interval 2 (warm-up 3) with its unspent FLOPs
    spent on the last 7 steps measures 61.15 dB on the benchmark's evaluation, against 59.72 for
    the same rhythm filled by :func:`fill` (``examples/rhythm_tails.py``).

    Args:
        problem: the problem ``plan`` was made for (its budget is the one filled up to).
        plan: a plan of ``problem``.
        name: the solver name of the result (default ``"<plan's solver>+tail"``).

    Returns:
        The plan with its full tail; ``plan`` itself (same object) when not one more step fits.
    """
    start = time.perf_counter()
    plain = [[REUSE if a.kind is ActionKind.FORECAST else a for a in row] for row in plan.actions]
    grid, tail = plain, problem.num_steps
    while tail > 1:  # from the last step back, while one more step in full fits
        tail -= 1
        if all(a.kind is ActionKind.COMPUTE for a in grid[tail]):
            continue
        trial = [*grid[:tail], [COMPUTE] * len(problem.units), *grid[tail + 1:]]
        if not problem.is_within_budget(problem.evaluate(problem.with_forecasts(trial))[0]):
            break
        grid = trial
    if grid is plain:
        return plan
    return problem.to_plan(problem.with_forecasts(grid), name or f"{plan.solver}+tail", plan.status,
                           plan.wall_time_s + time.perf_counter() - start, plan.gap)


def _columns(problem: Problem, plan: Plan) -> tuple[list[list], int]:
    """``plan``'s actions per unit, forecasts as plain reuses (:meth:`Problem.column_with_forecasts`
    chooses them again), and the quanta they save against computing everything."""
    U = len(problem.units)
    columns = [[REUSE if row[u].kind is ActionKind.FORECAST else row[u] for row in plan.actions] for u in range(U)]
    saved = sum(int(problem.savings_quanta[t, u, problem.menu_index(a)])
                for u, column in enumerate(columns) for t, a in enumerate(column))
    return columns, saved


class _Column:
    """Unit ``u``'s actions (reuses not yet turned into forecasts) with, per step, its modelled
    error and the unit's computes before it: a change at one step is scored by walking only the
    steps whose compute history it changes (until the history is the same again), not the whole
    column, which fill and trim do thousands of times. Scores match the differences of
    :meth:`Problem.unit_terms` over whole columns up to float summation order."""

    def __init__(self, problem: Problem, u: int, column: list):
        self.problem, self.u, self.column = problem, u, column
        self.history: list[tuple[int, ...]] = []  # computes before each step, newest first
        self.errors: list[float] = []
        computes: tuple[int, ...] = ()
        for t, action in enumerate(column):
            self.history.append(computes)
            self.errors.append(self._term(t, action, computes))
            computes = after_step(t, action, computes)

    def _term(self, t: int, action: Any, computes: tuple[int, ...]) -> float:
        p = self.problem
        return p.step_terms(t, self.u, p.forecast_choice(t, self.u, action, computes), computes)[1]

    def delta(self, t: int, action: Any) -> float:
        """Modelled error added by making step ``t`` ``action`` (negative: saved).

        Raises:
            ValueError: the change breaks a rule (a cache would grow older than ``max_age``).
        """
        T = len(self.column)
        computes, diff, s = self.history[t], 0.0, t
        while s < T:
            a = action if s == t else self.column[s]
            diff += self._term(s, a, computes) - self.errors[s]
            computes = after_step(s, a, computes)
            s += 1
            if s < T and computes == self.history[s]:
                break  # the same history from here on: the same terms
        return diff


def _options(problem: Problem, col: _Column) -> list[tuple[float, int, int, Any]]:
    """Every (error saved per quantum, step, quanta, action) of making one more step of the unit
    compute, or, where the problem offers ``CFG``, run on one guidance half (half the FLOPs of a
    compute, and the error of a cache read many times smaller), best first; only changes that
    save error."""
    targets = [COMPUTE] + [a for a in problem.actions if a.kind is ActionKind.CFG]
    u, column = col.u, col.column
    out = []
    for t in range(1, problem.num_steps):
        if column[t].kind is ActionKind.COMPUTE:
            continue
        now = int(problem.savings_quanta[t, u, problem.menu_index(column[t])])
        for target in targets:
            a = problem.menu_index(target)
            cost = now - int(problem.savings_quanta[t, u, a])
            if target == column[t] or cost <= 0 or not problem.allowed[t, u, a]:
                continue
            try:
                gain = -col.delta(t, target)
            except ValueError:  # a cache would grow older than max_age
                continue
            if gain > 0:
                out.append((gain / cost, t, cost, target))
    out.sort(key=lambda o: -o[0])
    return out


def trim(problem: Problem, plan: Plan, name: str | None = None) -> Plan | None:
    """``plan`` (over ``problem``'s budget) with computes turned into cheaper actions (a cache
    read, or a pruned, narrowed or skipped unit where the problem offers it), greedily by the
    least modelled error added per FLOP saved, until it meets the budget.

    A schedule one notch above the budget (TaylorSeer at interval 2 when the budget is just
    under its 0.5) then comes within it with a few cheaper steps, keeping its rhythm. The
    computes of the last quarter of the steps are kept.

    Args:
        problem: the problem to meet (its budget).
        plan: a plan of the same units and steps, e.g. made at a higher budget.
        name: the solver name of the result (default ``"<plan's solver>+trim"``).

    Returns:
        The trimmed plan (``plan``'s actions re-scored on ``problem`` if it already fits), or
        ``None`` if no sequence of such changes meets the budget.
    """
    start = time.perf_counter()
    T, U = problem.num_steps, len(problem.units)
    columns, saved = _columns(problem, plan)
    need = problem.need_quanta() - saved
    # The computes of the last quarter of the steps stay: measured end to end, dropping one there
    # costs far more than the errors measured one action at a time say (on digits-mmdit, 7 dB
    # for one compute of interval 3's last).
    last = max(2, T - T // 4)
    options = [_cuts(problem, _Column(problem, u, columns[u]), last) for u in range(U)]
    while need > 0:
        # a change that covers the rest of the gap alone counts as if it saved no more than that
        scored = [(added / min(quanta, need), u, t, a, quanta, added)
                  for u in range(U) for added, t, a, quanta in options[u]]
        if not scored:
            return None
        _, u, t, a, quanta, added = min(scored)
        columns[u][t] = problem.actions[a]
        need -= quanta
        options[u] = _cuts(problem, _Column(problem, u, columns[u]), last)
    grid = [[columns[u][t] for u in range(U)] for t in range(T)]
    return problem.to_plan(grid, name or f"{plan.solver}+trim", plan.status,
                           plan.wall_time_s + time.perf_counter() - start, plan.gap)


def _cuts(problem: Problem, col: _Column, last: int) -> list[tuple[float, int, int, int]]:
    """Every (modelled error added, step, menu action, quanta saved) of making one compute of
    the unit before step ``last`` a cheaper action that keeps the plan valid."""
    u, column = col.u, col.column
    out = []
    for t in range(1, last):
        if column[t].kind is not ActionKind.COMPUTE:
            continue
        for a in range(1, len(problem.actions)):
            quanta = int(problem.savings_quanta[t, u, a])
            if quanta <= 0 or not problem.allowed[t, u, a]:
                continue
            try:
                out.append((col.delta(t, problem.actions[a]), t, a, quanta))
            except ValueError:  # a cache would grow older than max_age
                continue
    return out
