"""Solvers: turn a :class:`solvers.problem.Problem` into a :class:`dit_opt.plan.Plan`.

Every solver is a function ``(problem, **options) -> Plan``; they are looked up by name so that
the CLI and configs can name them:

==============  ===========================================================================
``cpsat``       joint choice of all actions under the budget, OR-Tools CP-SAT (default)
``dp``          SODA's interval dynamic programme, exact, COMPUTE/REUSE-only problems
``periodic``    one compute interval per unit, chosen under the budget (exact knapsack)
``uniform``     TaylorSeer's rule: a warm-up, then every unit every ``N`` steps (best pair)
``fora``        FORA: uniform reuse interval
``delta_dit``   Delta-DiT: rear blocks cached early, front blocks late
``toca``        ToCa-like: uniform token pruning between full computes
``soda``        SODA's rule: the caching DP, then pruning where it beats the reuse, rate by sensitivity
==============  ===========================================================================

Example:
    >>> import solvers
    >>> plan = solvers.solve(problem, solver="cpsat", time_limit_s=5.0)   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from dit_opt.errors import ConfigError
from dit_opt.plan import Plan
from solvers.problem import Problem

__all__ = ["Problem", "SOLVERS", "get_solver", "solve", "solver_defaults"]

#: solver name -> (module, function); imported on first use so ``import solvers`` stays light.
SOLVERS: dict[str, tuple[str, str]] = {
    "cpsat": ("solvers.cpsat", "solve"),
    "dp": ("solvers.dp", "solve"),
    "periodic": ("solvers.periodic", "solve"),
    "uniform": ("solvers.uniform", "solve"),
    "fora": ("solvers.baselines", "fora"),
    "delta_dit": ("solvers.baselines", "delta_dit"),
    "toca": ("solvers.baselines", "toca_like"),
    "soda": ("solvers.baselines", "soda"),
}


def get_solver(name: str) -> Callable[..., Plan]:
    """The solver function registered under ``name``.

    Raises:
        ConfigError: unknown name; the message lists the valid ones.

    Example:
        >>> get_solver("dp").__module__
        'solvers.dp'
    """
    try:
        module, function = SOLVERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown solver {name!r}; valid solvers are {', '.join(SOLVERS)}") from None
    return getattr(importlib.import_module(module), function)


def solve(problem: Problem, solver: str = "cpsat", **options: Any) -> Plan:
    """Solve ``problem`` with the named solver, passing ``options`` through.

    Raises:
        ConfigError: unknown solver name.
        InfeasibleBudgetError: no plan meets the budget (the message states the smallest one).
    """
    return get_solver(solver)(problem, **options)


def solver_defaults(solver: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` completed with the defaults dit-opt solves with.

    CP-SAT stops within 0.5 % of its proven bound and after 2 deterministic seconds (its count of
    work done, the same on every machine: the plan is reproducible) unless told otherwise:
    proving exactness costs seconds and changes the plan's modelled error by less than the gap.
    (Against the wall-clock portfolio it replaced, 10 s on 2 cores, the plans of ``digits-dit``
    at budgets 0.7 to 0.2 have the same modelled error to within 0.5 %.)

    Example:
        >>> solver_defaults("cpsat", {"time_limit_s": 2.0})
        {'time_limit_s': 2.0, 'relative_gap': 0.005}
    """
    out = dict(options or {})
    if solver == "cpsat":
        out.setdefault("relative_gap", 0.005)
        out.setdefault("time_limit_s", 2.0)
    return out
