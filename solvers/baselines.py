"""Schedules of published caching methods, on the same :class:`~solvers.problem.Problem`.

They ignore the modelled errors (as the methods do) and pick their one or two knobs so that the
plan meets the FLOP budget: among the settings that meet it, the one that spends the most of it
(the least aggressive), ties broken towards the shorter interval. Where a method's action is not
allowed at some (step, unit), that unit computes instead. Each returns a :class:`Plan` with status
``HEURISTIC`` or raises :class:`InfeasibleBudgetError` naming the smallest budget the method reaches.

Example:
    >>> from solvers import baselines
    >>> plan = baselines.fora(problem)        # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Iterable

import numpy as np

from dit_opt.errors import ConfigError, InfeasibleBudgetError
from dit_opt.plan import ActionKind, Plan
from solvers.problem import Problem

__all__ = ["fora", "delta_dit", "toca_like", "soda"]

STATUS = "HEURISTIC"


def fora(problem: Problem, interval: int | None = None) -> Plan:
    """FORA (Selvaraju et al., 2024, "Fast-Forward Caching in Diffusion Transformer").

    Every unit is computed every ``N`` steps and its cached output is reused in between, the same
    ``N`` for all units. ``N`` is the smallest interval (1 .. ``max_age + 1``) that meets the
    budget, or ``interval`` if given.

    Args:
        problem: needs the REUSE family.
        interval: fixed ``N`` instead of the search.

    Returns:
        The plan (status ``HEURISTIC``).

    Raises:
        InfeasibleBudgetError: no interval meets the budget.
        ConfigError: the problem has no REUSE family.
    """
    start = time.perf_counter()
    problem = problem.without_forecasts()
    reuse = _menu_index(problem, ActionKind.REUSE)
    intervals = [interval] if interval is not None else range(1, problem.max_age + 2)
    candidates = [(n, _periodic(problem, n, _all_units(problem), reuse)) for n in intervals]
    return _pick(problem, "fora", candidates, start, lambda n: (n,), "FORA (interval N)", smallest=True)


def delta_dit(problem: Problem, interval: int | None = None, cached_blocks: int | None = None,
              boundary: float = 0.5) -> Plan:
    """Delta-DiT (Chen et al., 2024): Delta-Cache of the rear blocks early, the front blocks late.

    Early steps shape the outline, which the front blocks produce, and late steps the details,
    from the rear blocks. So before ``boundary * T`` the last ``k`` blocks reuse their cached
    residual (the "delta") and after it the first ``k`` blocks do; every ``N`` steps all blocks
    are computed to refresh the caches. Units of one block (its modules) follow the block.
    ``(N, k)`` are searched (``N`` in 2 .. ``max_age + 1``, ``k`` in 1 .. number of blocks) unless
    given.

    Args:
        problem: needs the REUSE family.
        interval: fixed ``N``.
        cached_blocks: fixed ``k``.
        boundary: fraction of the steps in the early phase, in [0, 1].

    Returns:
        The plan (status ``HEURISTIC``).

    Raises:
        InfeasibleBudgetError: no setting meets the budget.
        ValueError: ``boundary`` is not in [0, 1].
    """
    start = time.perf_counter()
    if not 0.0 <= boundary <= 1.0:
        raise ValueError(f"boundary must be a fraction of the steps in [0, 1], got {boundary!r}")
    problem = problem.without_forecasts()
    reuse = _menu_index(problem, ActionKind.REUSE)
    blocks = list(dict.fromkeys(u.block for u in problem.units))
    block_of = np.array([blocks.index(u.block) for u in problem.units])
    switch = boundary * problem.num_steps
    intervals = [interval] if interval is not None else range(2, problem.max_age + 2)
    counts = [cached_blocks] if cached_blocks is not None else range(1, len(blocks) + 1)
    candidates = []
    for n, k in itertools.product(intervals, counts):
        rear, front = block_of >= len(blocks) - k, block_of < k
        cached = np.array([rear if t < switch else front for t in range(problem.num_steps)])
        candidates.append(((n, k), _periodic(problem, n, cached, reuse)))
    return _pick(problem, "delta_dit", candidates, start, lambda nk: (nk[0], nk[1]),
                 "Delta-DiT (interval N, cached blocks k)")


def toca_like(problem: Problem, interval: int | None = None, rate: float | None = None) -> Plan:
    """ToCa-like token-wise caching (Zou et al., 2024, "Accelerating Diffusion Transformers with
    Token-wise Feature Caching").

    Every ``N`` steps all units are computed; in between every unit recomputes only a fraction
    ``rate`` of its tokens (``PRUNE(rate)``) and takes the rest from its cache. ToCa varies the
    ratio by layer and step; this reading uses one uniform rate, chosen with ``N`` to meet the
    budget. Without the PRUNE family it falls back to ``REUSE`` (i.e. FORA).

    Args:
        problem: needs the PRUNE or the REUSE family.
        interval: fixed ``N`` (2 .. ``max_age + 1``).
        rate: fixed rate, one of ``problem.prune_rates``.

    Returns:
        The plan (status ``HEURISTIC``).

    Raises:
        InfeasibleBudgetError: no setting meets the budget.
        ValueError: ``rate`` is not one of the problem's prune rates.
    """
    start = time.perf_counter()
    problem = problem.without_forecasts()
    if not problem.prune_rates:
        if rate is not None:
            raise ValueError(f"rate={rate!r} given but the problem has no PRUNE family")
        # Said out loud: a ToCa row equal to the FORA row must not pass for a measurement of ToCa.
        warnings.warn("toca: the problem has no PRUNE family (no prunable block), so ToCa falls back to "
                      "FORA's schedule", UserWarning, stacklevel=2)
        return fora(problem, interval)
    if rate is not None and rate not in problem.prune_rates:
        raise ValueError(f"rate={rate!r} is not one of the problem's prune_rates {problem.prune_rates}")
    rates = [rate] if rate is not None else problem.prune_rates
    intervals = [interval] if interval is not None else range(2, problem.max_age + 2)
    candidates = []
    for n, r in itertools.product(intervals, rates):
        prune = problem.actions.index(next(a for a in problem.actions if a.rate == r))
        candidates.append(((n, r), _periodic(problem, n, _all_units(problem), prune)))
    # ties: shorter interval first, then the higher rate (more tokens recomputed)
    return _pick(problem, "toca", candidates, start, lambda nr: (nr[0], -nr[1]), "ToCa (interval N, rate)")


def soda(problem: Problem, steps: int = 16, shares: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1, 0.0)) -> Plan:
    """SODA's rule (sensitivity-oriented caching and pruning): SODA's interval DP for the
    compute/reuse schedule, then pruning where the profile says it pays.

    Of the DP plan's reuses (age ``n``), the most sensitive share ``s`` (by their reuse error
    ``e_reuse[t, u, n]``) become ``PRUNE`` at a rate that grows with the sensitivity (a cell's
    percentile ``q`` among them picks ``prune_rates[floor(q K)]``), but only where the pruning
    error at that rate is below the reuse error (else the nearest lower rate where it is, else the
    reuse stays). Pruning spends FLOPs, so the DP runs at one of ``steps`` budgets between the
    smallest feasible one and the problem's, with ``s`` one of ``shares``: of the pairs that meet
    the budget, the one of least modelled error (``s = 0`` at the problem's budget is the DP plan,
    always feasible when any plan is). Without the PRUNE family it is the DP plan alone (with a
    warning). Forecasts are not used, as published.

    This is the rule the solver's pruning choices are compared with: ``solvers.cpsat`` chooses
    the same actions jointly, under the same budget, by the modelled error.

    Returns:
        The plan (status ``HEURISTIC``).

    Raises:
        InfeasibleBudgetError: no DP plan meets the budget.
        ConfigError: the problem has no REUSE family.
    """
    from solvers import dp

    start = time.perf_counter()
    problem = problem.without_forecasts()
    reuse = _menu_index(problem, ActionKind.REUSE)
    cached = problem.restrict((ActionKind.COMPUTE, ActionKind.REUSE))
    try:
        plain = dp.solve(cached)
    except InfeasibleBudgetError as e:
        raise InfeasibleBudgetError(f"SODA (its caching DP) cannot meet budget={problem.budget!r}: {e}") from e
    if not problem.prune_rates:
        warnings.warn("soda: the problem has no PRUNE family (no prunable block), so SODA is its caching DP "
                      "alone", UserWarning, stacklevel=2)
        return problem.to_plan(plain.actions, "soda", STATUS, time.perf_counter() - start)
    def indices(plan: Plan) -> np.ndarray:
        return np.array([[problem.actions.index(a) for a in row] for row in plan.actions])

    prunes = [i for i, a in enumerate(problem.actions) if a.kind is ActionKind.PRUNE]
    by_rate = sorted(range(len(prunes)), key=lambda k: problem.actions[prunes[k]].rate)
    lowest = cached.min_feasible_budget()
    best = (problem.evaluate(plain.actions)[1], indices(plain))  # share 0 at the problem's budget
    for b in np.linspace(problem.budget, lowest, steps):
        try:
            base = dp.solve(cached.with_budget(max(float(b), lowest)))
        except InfeasibleBudgetError:
            continue
        dp_choice = indices(base)
        cells = []  # (t, u, age) of every reuse, least sensitive first
        for u in range(len(problem.units)):
            last = 0
            for t in range(problem.num_steps):
                if dp_choice[t, u] == 0:
                    last = t
                elif dp_choice[t, u] == reuse:
                    cells.append((t, u, t - last))
        cells.sort(key=lambda c: problem.e_reuse[c])
        for share in shares:
            choice = dp_choice.copy()
            pruned = cells[len(cells) - int(round(share * len(cells))):] if share > 0 else []
            for i, (t, u, n) in enumerate(pruned):
                q = i / max(1, len(pruned) - 1)
                for k in by_rate[min(int(q * len(prunes)), len(prunes) - 1)::-1]:
                    a = prunes[k]  # that rate, else the nearest lower one that beats the reuse
                    if problem.allowed[t, u, a] and problem.e_prune[t, u, n, k] < problem.e_reuse[t, u, n]:
                        choice[t, u] = a
                        break
            flops, error = problem.evaluate(problem.grid(choice))
            if problem.is_within_budget(flops) and error < best[0]:
                best = (error, choice)
    return problem.to_plan(problem.grid(best[1]), "soda", STATUS, time.perf_counter() - start)


def _menu_index(problem: Problem, kind: ActionKind) -> int:
    for i, action in enumerate(problem.actions):
        if action.kind is kind:
            return i
    raise ConfigError(
        f"this baseline needs the {kind.name} action family, which the problem does not have; "
        "profile it (e.g. SensitivityProfile.to_problem with actions including it) or use solvers.cpsat"
    )


def _all_units(problem: Problem) -> np.ndarray:
    return np.ones((problem.num_steps, len(problem.units)), dtype=bool)


def _periodic(problem: Problem, interval: int, cached: np.ndarray, action: int) -> np.ndarray:
    """Menu indices: compute where ``t % interval == 0`` or ``cached[t, u]`` is false, else
    ``action`` where it is allowed (the cache is at most ``interval - 1`` steps old)."""
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    T = problem.num_steps
    steps = np.arange(T)[:, None]
    use = cached & (steps % interval != 0) & problem.allowed[:, :, action]
    age = steps % interval  # every unit computes at multiples of the interval
    use &= age <= problem.max_age
    return np.where(use, action, 0)


def _pick(problem: Problem, name: str, candidates: Iterable[tuple[object, np.ndarray]], start: float,
          order: Callable[[object], tuple], knobs: str, smallest: bool = False) -> Plan:
    """The feasible setting spending the most FLOPs (ties: smallest ``order``), or with
    ``smallest`` simply the feasible setting of smallest ``order``."""
    scored = []
    for setting, choice in candidates:
        flops, _ = problem.evaluate(problem.grid(choice))
        scored.append((flops, setting, choice))
    feasible = [s for s in scored if problem.is_within_budget(s[0])]
    if not feasible:
        cheapest = min(scored, key=lambda s: s[0])
        raise InfeasibleBudgetError(
            f"{knobs} cannot meet budget={problem.budget!r}: its cheapest setting {cheapest[1]} needs "
            f"budget {cheapest[0] / problem.full_flops:.6f}; the smallest feasible budget of any plan is "
            f"{problem.min_feasible_budget()!r} (solvers.cpsat reaches it)"
        )
    if smallest:
        best = min(feasible, key=lambda s: order(s[1]))
    else:
        best = max(feasible, key=lambda s: (s[0], tuple(-v for v in order(s[1]))))
    return problem.to_plan(problem.grid(best[2]), name, STATUS, time.perf_counter() - start)
