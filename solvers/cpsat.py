"""The joint problem with OR-Tools CP-SAT: one action per (step, unit) under the FLOP budget.

Formulation (sections as in the OR-Tools samples):

* ``x[t, u, a] = 1`` if unit ``u`` takes the cache-free action ``a`` (COMPUTE, WIDTH, SKIP) at
  step ``t``;
* ``z[t, u, a, n] = 1`` if unit ``u`` takes the cache action ``a`` (REUSE, PRUNE) at step ``t``
  reading the cache computed at ``t - n`` (``1 <= n <= max_age``); ``y[t, u, n] = sum_a
  z[t, u, a, n]`` is the age indicator of the brief;
* exactly one action per (step, unit); ``y[t, u, n] <= x[t - n, u, COMPUTE]`` (the cache was
  written at ``t - n``) and ``x[t - k, u, COMPUTE] + sum_{n > k} y[t, u, n] <= 1`` for
  ``0 < k < max_age`` (no COMPUTE in between; the aggregated form of ``y[t, u, n] +
  x[t - k, u, COMPUTE] <= 1``, tighter in the LP relaxation);
* budget, in the integer quanta shared with :mod:`solvers.dp` (FLOPs rounded so that every
  integer-feasible plan is feasible in floats, see :mod:`solvers.problem`):
  ``sum savings[t, u, a] * x[t, u, a] >= need``; the float budget is re-checked after solving;
* objective: ``sum round(error * scale) * x`` with ``scale = error_resolution / max error``
  (default ``1e9``: rounding changes the objective by at most ``0.5 / scale`` per term).

A warm start comes from a Lagrangian relaxation of the budget: for a price ``lam`` on FLOPs the
problem splits into one shortest path per unit (:func:`solvers.problem.min_cost_sequences`);
bisection on ``lam`` gives a feasible plan that is passed to CP-SAT with ``AddHint``.

Example:
    >>> from solvers import cpsat
    >>> plan = cpsat.solve(problem, time_limit_s=5.0)    # doctest: +SKIP
    >>> plan.status, plan.gap                             # doctest: +SKIP
    ('OPTIMAL', 0.0)
"""

from __future__ import annotations

import os
import time

import numpy as np
from ortools.sat.python import cp_model

from dit_opt.errors import DitOptError
from dit_opt.plan import Plan
from solvers.problem import Problem, infeasible_error, min_cost_sequences

__all__ = ["solve", "lagrangian_plan"]

SOLVER_NAME = "cpsat"


def solve(
    problem: Problem,
    time_limit_s: float = 10.0,
    seed: int = 0,
    num_workers: int | None = None,
    relative_gap: float = 0.0,
    error_resolution: float = 1e9,
    warm_start: bool = True,
) -> Plan:
    """Least-error plan over all enabled actions within the FLOP budget.

    Args:
        problem: the problem (any action families).
        time_limit_s: wall-clock limit of the CP-SAT search.
        seed: CP-SAT random seed (fixed for reproducible plans).
        num_workers: parallel search workers; default: the CPU count, at most 8.
        relative_gap: stop once ``(objective - bound) / objective`` is below this.
        error_resolution: integer value of the largest error in the objective.
        warm_start: pass the Lagrangian plan to CP-SAT as a hint.

    Returns:
        The plan; ``status`` is ``OPTIMAL`` or ``FEASIBLE`` and ``gap`` the relative gap.

    Raises:
        InfeasibleBudgetError: no plan meets the budget; states the smallest feasible budget.
        DitOptError: CP-SAT found no plan within the time limit (raise ``time_limit_s``).
    """
    start = time.perf_counter()
    problem.check_feasible()  # infeasible budgets fail here, without calling the solver

    # Data -------------------------------------------------------------------------------
    T, U, M = problem.num_steps, len(problem.units), problem.max_age
    menu, allowed, cache = problem.actions, problem.allowed, problem.needs_cache
    savings, need = problem.savings_quanta, problem.need_quanta()
    errors = problem.error_table
    finite = errors[np.isfinite(errors)]
    scale = error_resolution / max(float(finite.max(initial=0.0)), 1e-300)
    int_errors = np.rint(np.nan_to_num(errors, nan=0.0) * scale).astype(np.int64)
    compute = 0  # menu index of COMPUTE

    # Variables ---------------------------------------------------------------------------
    model = cp_model.CpModel()
    # x[t, u, a] = 1 if unit u takes the cache-free action a at step t
    x: dict[tuple[int, int, int], cp_model.IntVar] = {}
    # z[t, u, a, n] = 1 if unit u takes cache action a at step t reading the cache of step t - n
    z: dict[tuple[int, int, int, int], cp_model.IntVar] = {}
    for t in range(T):
        for u in range(U):
            for a in range(len(menu)):
                if not allowed[t, u, a] or (t == 0 and a != compute):
                    continue
                if cache[a]:
                    for n in range(1, min(M, t) + 1):
                        z[t, u, a, n] = model.NewBoolVar(f"z[{t},{u},{a},{n}]")
                else:
                    x[t, u, a] = model.NewBoolVar(f"x[{t},{u},{a}]")
    # y[t, u, n] = 1 if unit u reads at step t the cache computed at step t - n (a sum of z)
    y: dict[tuple[int, int, int], list[cp_model.IntVar]] = {}
    for (t, u, _, n), var in z.items():
        y.setdefault((t, u, n), []).append(var)

    # Constraints -------------------------------------------------------------------------
    per_cell: dict[tuple[int, int], list[cp_model.IntVar]] = {}
    for (t, u, *_), var in [*x.items(), *z.items()]:
        per_cell.setdefault((t, u), []).append(var)
    for cell_vars in per_cell.values():
        model.AddExactlyOne(cell_vars)
    for (t, u, n), ys in y.items():
        model.Add(sum(ys) <= x[t - n, u, compute])  # the cache was written at t - n ...
    for t in range(1, T):
        for u in range(U):
            for k in range(1, min(M, t)):  # ... and not overwritten since
                older = [v for n in range(k + 1, min(M, t) + 1) for v in y.get((t, u, n), [])]
                if older:
                    model.Add(x[t - k, u, compute] + sum(older) <= 1)
    terms = [(int(savings[t, u, a]), v) for (t, u, a), v in x.items()]
    terms += [(int(savings[t, u, a]), v) for (t, u, a, _), v in z.items()]
    model.Add(sum(c * v for c, v in terms if c != 0) >= need)

    # Objective ---------------------------------------------------------------------------
    objective = [(int(int_errors[t, u, a, 0]), v) for (t, u, a), v in x.items()]
    objective += [(int(int_errors[t, u, a, n]), v) for (t, u, a, n), v in z.items()]
    model.Minimize(sum(c * v for c, v in objective if c != 0))

    if warm_start:
        choice, ages = lagrangian_plan(problem)
        for (t, u, a), var in x.items():
            model.AddHint(var, int(choice[t, u] == a))
        for (t, u, a, n), var in z.items():
            model.AddHint(var, int(choice[t, u] == a and ages[t, u] == n))

    # Solve -------------------------------------------------------------------------------
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.random_seed = int(seed)
    solver.parameters.num_workers = int(num_workers or min(8, os.cpu_count() or 1))
    solver.parameters.relative_gap_limit = float(relative_gap)
    status = solver.Solve(model)
    if status == cp_model.INFEASIBLE:
        raise infeasible_error(problem, problem.budget, "CP-SAT proved that no plan")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise DitOptError(
            f"CP-SAT found no plan for budget {problem.budget!r} within time_limit_s={time_limit_s} "
            f"(status {solver.StatusName(status)}, {T} steps x {U} units); raise time_limit_s"
        )
    chosen = np.zeros((T, U), dtype=np.int64)
    for (t, u, a), var in x.items():
        if solver.BooleanValue(var):
            chosen[t, u] = a
    for (t, u, a, _), var in z.items():
        if solver.BooleanValue(var):
            chosen[t, u] = a
    obj, bound = solver.ObjectiveValue(), solver.BestObjectiveBound()
    gap = 0.0 if status == cp_model.OPTIMAL else abs(obj - bound) / max(1.0, abs(obj))
    grid = problem.grid(chosen)
    flops, _ = problem.evaluate(grid)
    if not problem.is_within_budget(flops):  # the integer scaling rules this out; check anyway
        raise DitOptError(
            f"CP-SAT plan uses {flops!r} FLOPs > budget {problem.budget!r} x {problem.full_flops!r}; "
            "this is a bug in the integer FLOP scaling of solvers.problem"
        )
    return problem.to_plan(grid, SOLVER_NAME, solver.StatusName(status), time.perf_counter() - start, gap=gap)


def lagrangian_plan(problem: Problem, iterations: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A feasible plan from the Lagrangian relaxation of the budget (the CP-SAT warm start).

    With a price ``lam`` per saved quantum the problem splits into one shortest path per unit;
    ``lam`` is bisected to the smallest price whose plan meets the budget.

    Args:
        problem: the problem (its budget must be feasible).
        iterations: bisection steps.

    Returns:
        ``(choice, ages)``: ``(T, U)`` menu indices and the cache age read at each step (0 where
        no cache is read).

    Raises:
        InfeasibleBudgetError: even the cheapest plan misses the budget.
    """
    need = problem.need_quanta()
    errors = np.nan_to_num(problem.error_table, nan=0.0)
    savings = problem.savings_quanta[:, :, :, None].astype(np.float64)

    def plan_at(lam: float) -> tuple[np.ndarray, int]:
        _, choice = min_cost_sequences(problem, errors - lam * savings)
        total = int(np.take_along_axis(problem.savings_quanta, choice[:, :, None], axis=2).sum())
        return choice, total

    choice, total = plan_at(0.0)
    if total < need:
        # Price so high that FLOPs dominate any error; the error term only breaks ties.
        hi = 2.0 * (float(errors.max(initial=0.0)) * errors[..., 0].size + 1.0)
        choice, total = plan_at(hi)
        if total < need:
            raise infeasible_error(problem, problem.budget)
        lo = 0.0
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            c, s = plan_at(mid)
            if s >= need:
                hi, choice = mid, c
            else:
                lo = mid
    ages = np.zeros(choice.shape, dtype=np.int64)
    last = np.zeros(choice.shape[1], dtype=np.int64)
    for t in range(choice.shape[0]):
        reads = problem.needs_cache[choice[t]]
        ages[t, reads] = t - last[reads]
        last[choice[t] == 0] = t
    return choice, ages

