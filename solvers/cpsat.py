"""The joint problem with OR-Tools CP-SAT: one action per (step, unit) under the FLOP budget.

Formulation (sections as in the OR-Tools samples):

* ``x[t, u, a] = 1`` if unit ``u`` takes the cache-free action ``a`` (COMPUTE, WIDTH, SKIP) at
  step ``t``;
* ``z[t, u, a, n] = 1`` if unit ``u`` takes the cache action ``a`` (REUSE, PRUNE) at step ``t``
  reading the cache computed at ``t - n`` (``1 <= n <= max_age``); ``y[t, u, n] = sum_a
  z[t, u, a, n]`` says that unit ``u`` reads at step ``t`` the cache of step ``t - n``;
* exactly one action per (step, unit); ``y[t, u, n] <= x[t - n, u, COMPUTE]`` (the cache was
  written at ``t - n``) and ``x[t - k, u, COMPUTE] + sum_{n > k} y[t, u, n] <= 1`` for
  ``0 < k < max_age`` (no COMPUTE in between; the aggregated form of ``y[t, u, n] +
  x[t - k, u, COMPUTE] <= 1``, tighter in the LP relaxation);
* budget, in the integer quanta shared with :mod:`solvers.dp` (FLOPs rounded so that every
  integer-feasible plan is feasible in floats, see :mod:`solvers.problem`):
  ``sum savings[t, u, a] * x[t, u, a] >= need``; the float budget is re-checked after solving;
* objective: ``sum round(error * scale) * x`` with ``scale = error_resolution / largest allowed
  error`` (default ``1e9``: rounding moves the objective by at most ``0.5 / scale`` per term).

Warm start and bound: for a price ``lam`` per saved FLOP quantum the problem splits into one
shortest path per unit (:func:`solvers.problem.min_cost_sequences`). Bisection on ``lam`` and a
repair give a feasible plan, passed to CP-SAT as its solution hint (on COMPUTE/REUSE-only problems
the exact optimum of :mod:`solvers.dp` is passed instead), and the dual values give a proven lower
bound, written into the objective's domain so that CP-SAT can stop at ``relative_gap`` at once.
``Plan.status`` is ``OPTIMAL`` only when the gap is closed, else ``FEASIBLE``; ``Plan.gap`` is
measured against the better of CP-SAT's and the Lagrangian bound. On large models (> 20k
variables) presolve, probing and symmetry detection are off: they cost seconds and find little.

Example:
    >>> from solvers import cpsat
    >>> plan = cpsat.solve(problem, time_limit_s=5.0)    # doctest: +SKIP
    >>> plan.status, plan.gap                             # doctest: +SKIP
    ('OPTIMAL', 0.0)
"""

from __future__ import annotations

import math
import os
import time
import warnings

import numpy as np
from ortools.sat.python import cp_model

from dit_opt.errors import DitOptError
from dit_opt.plan import ActionKind, Plan
from solvers import dp
from solvers.problem import Problem, infeasible_error, min_cost_sequences

__all__ = ["solve", "lagrangian_plan"]

SOLVER_NAME = "cpsat"
#: With ``deterministic=True``, the wall-clock stop, in multiples of ``time_limit_s`` (which is
#: then deterministic time): a safeguard that a normal solve does not reach (on 2 shared cores
#: the reference models' solves ran up to about 7 wall seconds per deterministic second, and over
#: 30 with three benchmarks beside them); reaching it warns.
WALL_CLOCK_FACTOR = 100.0
#: Problems of at most this many Booleans are first searched by one worker for
#: ``SINGLE_WORKER_TIME`` deterministic seconds, kept where it proves the optimum or reaches the
#: gap (see ``solve``); the reference models' problems are larger, and solved as before.
SINGLE_WORKER_VARIABLES = 5_000
SINGLE_WORKER_TIME = 0.25


def solve(
    problem: Problem,
    time_limit_s: float = 2.0,
    seed: int = 0,
    num_workers: int | None = None,
    relative_gap: float = 0.0,
    error_resolution: float = 1e9,
    warm_start: bool = True,
    deterministic: bool = True,
) -> Plan:
    """Least-error plan over all enabled actions within the FLOP budget.

    Args:
        problem: the problem (any action families).
        time_limit_s: limit of the CP-SAT search: deterministic seconds (see ``deterministic``),
            or wall-clock seconds with ``deterministic=False``.
        seed: CP-SAT random seed (fixed for reproducible plans).
        num_workers: parallel search workers; default: the CPU count, at most 8.
        relative_gap: stop once ``(objective - bound) / objective`` is below this. With the default
            0 CP-SAT tries to prove optimality; on a 50 x 84 problem that runs to the time limit,
            while ``relative_gap=0.01`` returns in 2-3 s with gaps below 0.1 % (docs/solvers.md).
        error_resolution: integer value of the largest error in the objective.
        warm_start: pass a plan to CP-SAT as a hint: the Lagrangian one, or on COMPUTE/REUSE-only
            problems the optimum of :mod:`solvers.dp`. The Lagrangian bound is used either way.
        deterministic: the same plan in every process and on every machine: the workers'
            search interleaved in fixed batches (CP-SAT's ``interleave_search``) and
            ``time_limit_s`` counted in CP-SAT's deterministic time (work done, not seconds: on
            2 shared cores one deterministic second took 0.2 to 7 wall seconds), with a
            wall-clock stop at ``WALL_CLOCK_FACTOR`` times it as a safeguard only. ``False``:
            parallel portfolio workers under a wall-clock limit (what stops them depends on the
            machine's load).

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
    errors = np.nan_to_num(problem.error_table, nan=0.0)
    # Scale by the largest error of an *allowed* action: callers may park huge placeholder errors
    # on disallowed ones, which must not eat the objective's resolution.
    largest = float(np.where(allowed[..., None], errors, 0.0).max(initial=0.0))
    scale = error_resolution / largest if largest > 0 else 1.0  # all errors 0: any scale is exact
    int_errors = np.rint(np.where(allowed[..., None], errors, 0.0) * scale).astype(np.int64)
    slack = 0.5 * T * U / scale  # |float error - integer objective / scale| of any plan
    compute = 0  # menu index of COMPUTE
    hint, hint_ages, lower_bound = lagrangian_plan(problem)
    if warm_start and all(a.kind in (ActionKind.COMPUTE, ActionKind.REUSE) for a in menu):
        # SODA's exact DP solves this restriction in well under a second: start from its optimum.
        optimum = dp.solve(problem)
        hint = np.array([[problem.menu_index(a) for a in row] for row in optimum.actions], dtype=np.int64)
        hint_ages = _ages(problem, hint)

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
                        z[t, u, a, n] = model.new_bool_var(f"z[{t},{u},{a},{n}]")
                else:
                    x[t, u, a] = model.new_bool_var(f"x[{t},{u},{a}]")
    # y[t, u, n] = 1 if unit u reads at step t the cache computed at step t - n (a sum of z)
    y: dict[tuple[int, int, int], list[cp_model.IntVar]] = {}
    for (t, u, _, n), var in z.items():
        y.setdefault((t, u, n), []).append(var)
    keys = [*x, *z]
    variables = [*x.values(), *z.values()]

    # Constraints -------------------------------------------------------------------------
    per_cell: dict[tuple[int, int], list[cp_model.IntVar]] = {}
    for key, var in zip(keys, variables, strict=True):
        per_cell.setdefault(key[:2], []).append(var)
    for cell_vars in per_cell.values():
        model.add_exactly_one(cell_vars)
    for (t, u, n), ys in y.items():
        model.add(cp_model.LinearExpr.sum(ys) <= x[t - n, u, compute])  # cache written at t - n ...
    for t in range(1, T):
        for u in range(U):
            for k in range(1, min(M, t)):  # ... and not overwritten since
                older = [v for n in range(k + 1, min(M, t) + 1) for v in y.get((t, u, n), [])]
                if older:
                    model.add(cp_model.LinearExpr.sum([x[t - k, u, compute], *older]) <= 1)
    saved = [int(savings[k[0], k[1], k[2]]) for k in keys]
    model.add(cp_model.LinearExpr.weighted_sum(variables, saved) >= need)

    # Objective ---------------------------------------------------------------------------
    costs = [int(int_errors[k[0], k[1], k[2], k[3] if len(k) == 4 else 0]) for k in keys]
    model.minimize(cp_model.LinearExpr.weighted_sum(variables, costs))
    # The Lagrangian bound holds for every plan, so it bounds the objective's domain: CP-SAT then
    # starts from it and can stop at relative_gap without proving a bound itself.
    floor = math.floor((lower_bound - slack) * scale * (1 - 1e-9))
    model.proto.objective.domain.extend([max(floor, 0), int(sum(max(c, 0) for c in costs)) + 1])
    if warm_start:
        hinted = [int(hint[k[0], k[1]] == k[2] and (len(k) == 3 or hint_ages[k[0], k[1]] == k[3])) for k in keys]
        model.proto.solution_hint.vars.extend(v.index for v in variables)
        model.proto.solution_hint.values.extend(hinted)

    # Solve -------------------------------------------------------------------------------
    large = len(variables) > 20_000
    solver = None
    if deterministic and num_workers is None and len(variables) <= SINGLE_WORKER_VARIABLES:
        # Interleaved workers run to the deterministic limit even where one of them proved the
        # optimum at once (docs/solvers.md); one worker stops at its proof or gap. It keeps its
        # plan only when it stops so: otherwise the portfolio runs as it would have.
        solver, status = _search(model, min(SINGLE_WORKER_TIME, time_limit_s), seed, 1, relative_gap, large,
                                 deterministic)
        if status != cp_model.OPTIMAL:
            solver = None
    if solver is None:
        solver, status = _search(model, time_limit_s, seed, num_workers or min(8, os.cpu_count() or 1),
                                 relative_gap, large, deterministic)
    params = solver.parameters
    if deterministic and solver.wall_time >= params.max_time_in_seconds * 0.99 and status != cp_model.OPTIMAL:
        warnings.warn(f"CP-SAT reached its wall-clock safeguard ({params.max_time_in_seconds:g} s) before its "
                      f"deterministic limit of {time_limit_s:g}: the machine is loaded, and this plan may differ "
                      f"from another run's; solve with a lower time_limit_s, or on a quieter machine, to reproduce it",
                      stacklevel=2)
    if status == cp_model.INFEASIBLE:
        raise infeasible_error(problem, problem.budget, "CP-SAT proved that no plan")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise DitOptError(
            f"CP-SAT found no plan for budget {problem.budget!r} within time_limit_s={time_limit_s} "
            f"(status {solver.status_name(status)}, {T} steps x {U} units); raise time_limit_s"
        )
    values = solver.response_proto.solution
    chosen = np.zeros((T, U), dtype=np.int64)
    for key, var in zip(keys, variables, strict=True):
        if values[var.index]:
            chosen[key[0], key[1]] = key[2]
    grid = problem.grid(chosen)
    flops, error = problem.evaluate(grid)
    if not problem.is_within_budget(flops):  # the integer scaling rules this out; check anyway
        raise DitOptError(
            f"CP-SAT plan uses {flops!r} FLOPs > budget {problem.budget!r} x {problem.full_flops!r}; "
            "this is a bug in the integer FLOP scaling of solvers.problem"
        )
    # With relative_gap > 0 CP-SAT also says OPTIMAL when it stops at the gap: only a closed gap
    # is reported as OPTIMAL here.
    proven = status == cp_model.OPTIMAL and solver.objective_value <= solver.best_objective_bound
    if proven:
        label, gap = "OPTIMAL", 0.0
    else:
        bound = max(lower_bound, solver.best_objective_bound / scale - slack)
        label, gap = "FEASIBLE", max(0.0, error - bound) / max(error, 1e-300)
    return problem.to_plan(grid, SOLVER_NAME, label, time.perf_counter() - start, gap=gap)


def _search(model: cp_model.CpModel, time_limit_s: float, seed: int, num_workers: int, relative_gap: float,
            large: bool, deterministic: bool) -> tuple[cp_model.CpSolver, int]:
    """One CP-SAT search of ``model`` with dit-opt's parameters: ``(solver, status)``."""
    solver = cp_model.CpSolver()
    params = solver.parameters
    if deterministic:
        params.interleave_search = True
        params.max_deterministic_time = float(time_limit_s)
        params.max_time_in_seconds = WALL_CLOCK_FACTOR * float(time_limit_s)
    else:
        params.max_time_in_seconds = float(time_limit_s)
    params.random_seed = int(seed)
    params.num_workers = int(num_workers)
    params.relative_gap_limit = float(relative_gap)
    # Presolve, probing and symmetry detection take seconds on ~10^5 Booleans and find little
    # in this model (its constraints are already clique-like); keep them for small models.
    # (deterministic: presolve spends most of a short deterministic time limit and the search
    # then finds no plan on the reference models; without it every budget solves)
    params.cp_model_presolve = not large and not deterministic
    params.cp_model_probing_level = 0 if large else 2
    params.symmetry_level = 0 if large else 2
    return solver, solver.solve(model)


def lagrangian_plan(problem: Problem, iterations: int = 24) -> tuple[np.ndarray, np.ndarray, float]:
    """A feasible plan and a lower bound from the Lagrangian relaxation of the budget.

    With a price ``lam`` per saved FLOP quantum the problem splits into one shortest path per
    unit (:func:`solvers.problem.min_cost_sequences`). ``lam`` is bisected to the threshold where
    the plans start to meet the budget; the plan just below (cheaper in error, over budget) is
    repaired by switching units, best error-per-quantum first, to their plan just above, until
    the budget is met. Every ``lam`` also gives the lower bound ``sum_u min(error - lam *
    savings) + lam * need`` on the optimal error.

    Args:
        problem: the problem (its budget must be feasible).
        iterations: bisection steps.

    Returns:
        ``(choice, ages, lower_bound)``: ``(T, U)`` menu indices, the cache age read at each
        (step, unit) (0 where none is read) and the best Lagrangian bound on the error.

    Raises:
        InfeasibleBudgetError: even the cheapest plan misses the budget.
    """
    need = problem.need_quanta()
    errors = np.nan_to_num(problem.error_table, nan=0.0)
    savings = problem.savings_quanta[:, :, :, None].astype(np.float64)
    total_abs_savings = float(np.abs(savings).max(axis=2).sum())
    total_error = float(np.where(problem.allowed[..., None], errors, 0.0).max(axis=(2, 3)).sum())
    bound = -np.inf

    def plan_at(lam: float) -> tuple[np.ndarray, int]:
        nonlocal bound
        best, choice = min_cost_sequences(problem, errors - lam * savings)
        # Float sums of terms up to `size` in magnitude may be off by ~T*U*eps*size: keep the
        # bound valid by subtracting that (FLOP prices can dwarf the errors).
        size = lam * (abs(need) + total_abs_savings) + total_error
        bound = max(bound, float(best.sum()) + lam * need - 8 * savings.size * 2.3e-16 * size)
        return choice, int(_unit_totals(problem, choice)[0].sum())

    lo_choice, total = plan_at(0.0)
    if total >= need:
        return lo_choice, _ages(problem, lo_choice), bound
    # A price so high that FLOPs dominate any error; the error term only breaks ties.
    hi = 2.0 * (float(errors.max(initial=0.0)) * errors[..., 0].size + 1.0)
    hi_choice, total = plan_at(hi)
    if total < need:
        raise infeasible_error(problem, problem.budget)
    # Bisect in log space: the threshold price spans many orders of magnitude across problems.
    lo = hi * 1e-24
    choice, total = plan_at(lo)
    if total >= need:
        return choice, _ages(problem, choice), bound
    lo_choice = choice
    for _ in range(iterations):
        mid = (lo * hi) ** 0.5
        choice, total = plan_at(mid)
        if total >= need:
            hi, hi_choice = mid, choice
        else:
            lo, lo_choice = mid, choice
    # Repair: start from the plan below the threshold, move units to the plan above it.
    s_lo, e_lo = _unit_totals(problem, lo_choice)
    s_hi, e_hi = _unit_totals(problem, hi_choice)
    gain = s_hi - s_lo
    movers = [u for u in np.flatnonzero(gain > 0)]
    movers.sort(key=lambda u: (e_hi[u] - e_lo[u]) / gain[u])
    mixed, total = lo_choice.copy(), int(s_lo.sum())
    for u in movers:
        if total >= need:
            break
        mixed[:, u] = hi_choice[:, u]
        total += int(gain[u])
    if total >= need and _unit_totals(problem, mixed)[1].sum() < e_hi.sum():
        hi_choice = mixed
    return hi_choice, _ages(problem, hi_choice), bound


def _ages(problem: Problem, choice: np.ndarray) -> np.ndarray:
    """Cache age read at each (step, unit); 0 where the action reads no cache."""
    ages = np.zeros(choice.shape, dtype=np.int64)
    last = np.zeros(choice.shape[1], dtype=np.int64)
    for t in range(choice.shape[0]):
        reads = problem.needs_cache[choice[t]]
        ages[t, reads] = t - last[reads]
        last[choice[t] == 0] = t
    return ages


def _unit_totals(problem: Problem, choice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: quanta saved (int) and modelled error of a ``(T, U)`` choice."""
    saved = np.take_along_axis(problem.savings_quanta, choice[:, :, None], axis=2)[:, :, 0]
    ages = _ages(problem, choice)
    t_idx, u_idx = np.indices(choice.shape)
    err = problem.error_table[t_idx, u_idx, choice, ages]
    return saved.sum(axis=0), err.sum(axis=0)
