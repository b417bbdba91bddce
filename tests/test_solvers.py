"""Tests of solvers: Problem, DP and CP-SAT against brute force, baselines, the registry."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import solvers
from dit_opt.errors import ConfigError, InfeasibleBudgetError
from dit_opt.plan import ActionKind, Plan, Unit
from solvers import baselines, cpsat, dp
from solvers.problem import Problem

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROLES = (None, "attn", "mlp")


def make_problem(seed: int, T: int, U: int, M: int, budget: float, *, prune: bool = True, width: bool = True,
                 skip: bool = True, integer_flops: bool = True, disable: float = 0.15) -> Problem:
    """A random tiny problem; integer FLOPs make the shared scaling exact."""
    rng = np.random.default_rng(seed)
    units = tuple(Unit("blocks", u, ROLES[rng.integers(3)]) for u in range(U))

    def flops(*shape: int, low: int = 1, high: int = 20) -> np.ndarray:
        values = rng.integers(low, high, size=shape).astype(float)
        return values if integer_flops else values + rng.random(shape)

    compute = flops(T, U, low=10, high=40)
    kwargs: dict = {"e_reuse": rng.random((T, U, M + 1)), "flops_reuse": flops(T, U, low=0, high=3)}
    if prune:
        kwargs.update(prune_rates=(0.25, 0.5), e_prune=rng.random((T, U, M + 1, 2)),
                      flops_prune=flops(T, U, 2, low=3, high=30))
    if width:
        kwargs.update(widths=(0.5,), e_width=rng.random((T, U, 1)), flops_width=flops(T, U, 1, low=5, high=25))
    if skip:
        kwargs["e_skip"] = rng.random((T, U)) * 2
    problem = Problem(units=units, num_steps=T, max_age=M, budget=budget, flops_compute=compute,
                      flops_fixed=float(rng.integers(0, 10)), **kwargs)
    allowed = np.array(problem.allowed)
    allowed[:, :, 1:] &= rng.random(allowed[:, :, 1:].shape) > disable  # disable some actions
    return Problem(units=units, num_steps=T, max_age=M, budget=budget, flops_compute=compute,
                   flops_fixed=problem.flops_fixed, allowed=allowed, **kwargs)


def brute_force(problem: Problem) -> tuple[float, float, float]:
    """(least error within budget or inf, its flops, least flops of any plan) by enumeration."""
    T, U, M = problem.num_steps, len(problem.units), problem.max_age
    per_unit = []
    for u in range(U):
        flops, errors = [], []
        for rest in itertools.product(range(len(problem.actions)), repeat=T - 1):
            seq, last, ok = (0, *rest), 0, True
            f, e = [], []
            for t, a in enumerate(seq):
                action = problem.actions[a]
                age = t - last
                if not problem.allowed[t, u, a] or (action.needs_cache and age > M):
                    ok = False
                    break
                f.append(problem.flops_table[t, u, a])
                e.append(problem.error_table[t, u, a, age if action.needs_cache else 0])
                if a == 0:
                    last = t
            if ok:
                flops.append(math.fsum(f))
                errors.append(math.fsum(e))
        per_unit.append((np.array(flops), np.array(errors)))
    total_f, total_e = np.zeros(1), np.zeros(1)
    for f, e in per_unit:  # integer FLOPs: these float sums are exact
        total_f = (total_f[:, None] + f[None, :]).ravel()
        total_e = (total_e[:, None] + e[None, :]).ravel()
    total_f = total_f + problem.flops_fixed
    ok = total_f <= problem.budget * problem.full_flops
    best = int(np.argmin(np.where(ok, total_e, np.inf)))
    return (float(total_e[best]) if ok.any() else math.inf), float(total_f[best]), float(total_f.min())


def check_plan(plan: Plan, problem: Problem) -> None:
    plan.validate()
    flops, error = problem.evaluate(plan.actions)
    assert flops == plan.predicted_flops and error == pytest.approx(plan.predicted_error, abs=1e-12)
    assert plan.predicted_flops <= problem.budget * problem.full_flops, (
        f"{plan.predicted_flops} > {problem.budget} x {problem.full_flops}")


tiny = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(1, 2), st.integers(0, 2),
                 st.floats(0.3, 1.0))


# ------------------------------------------------------------------------- optimality checks
@SETTINGS
@given(tiny, st.booleans(), st.booleans(), st.booleans())
def test_cpsat_matches_brute_force(params, prune: bool, width: bool, skip: bool) -> None:
    seed, T, U, M, budget = params
    problem = make_problem(seed, T, U, M, budget, prune=prune, width=width, skip=skip)
    best, _, cheapest = brute_force(problem)
    if math.isinf(best):
        with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget"):
            cpsat.solve(problem)
        assert problem.min_feasible_budget() * problem.full_flops >= cheapest
        return
    plan = cpsat.solve(problem, time_limit_s=10.0)
    check_plan(plan, problem)
    assert plan.status == "OPTIMAL" and plan.gap == 0.0
    assert plan.predicted_error == pytest.approx(best, abs=1e-6), f"cpsat {plan.predicted_error} vs brute {best}"


@SETTINGS
@given(tiny)
def test_dp_matches_brute_force(params) -> None:
    seed, T, U, M, budget = params
    problem = make_problem(seed, T + 1, U, M, budget, prune=False, width=False, skip=False)
    best, _, _ = brute_force(problem)
    if math.isinf(best):
        with pytest.raises(InfeasibleBudgetError):
            dp.solve(problem)
        return
    plan = dp.solve(problem)
    check_plan(plan, problem)
    assert plan.predicted_error == pytest.approx(best, abs=1e-9), f"dp {plan.predicted_error} vs brute {best}"


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(2, 10), st.integers(1, 4), st.integers(1, 3), st.floats(0.2, 1.0))
def test_dp_and_cpsat_agree_on_compute_reuse(seed: int, T: int, U: int, M: int, budget: float) -> None:
    problem = make_problem(seed, T, U, M, budget, prune=False, width=False, skip=False, disable=0.0)
    try:
        a = dp.solve(problem)
    except InfeasibleBudgetError:
        with pytest.raises(InfeasibleBudgetError):
            cpsat.solve(problem)
        return
    b = cpsat.solve(problem, warm_start=False)  # no DP hint: an independent answer
    check_plan(a, problem)
    check_plan(b, problem)
    assert a.predicted_error == pytest.approx(b.predicted_error, abs=1e-6)


@SETTINGS
@given(tiny)
def test_plans_within_budget_with_non_integer_flops(params) -> None:
    seed, T, U, M, budget = params
    problem = make_problem(seed, T, U, M, budget, integer_flops=False)
    best, _, _ = brute_force(problem)
    try:
        plan = cpsat.solve(problem)
    except InfeasibleBudgetError:
        return
    check_plan(plan, problem)
    assert plan.predicted_error >= best - 1e-9  # rounding is conservative: never better than optimal


# ---------------------------------------------------------------------------- feasibility
@SETTINGS
@given(tiny, st.booleans())
def test_infeasible_budget_states_smallest_feasible_one(params, integer_flops: bool) -> None:
    seed, T, U, M, _ = params
    problem = make_problem(seed, T + 1, U, M, 1.0, integer_flops=integer_flops)
    smallest = problem.min_feasible_budget()
    _, _, cheapest = brute_force(problem)
    assert smallest * problem.full_flops >= cheapest
    if integer_flops:  # exact scaling: no smaller budget admits the cheapest plan
        assert math.nextafter(smallest, 0.0) * problem.full_flops < cheapest
    plan = cpsat.solve(problem.with_budget(smallest))
    check_plan(plan, problem.with_budget(smallest))
    if smallest > 1e-3:
        below = problem.with_budget(smallest * 0.999)
        with pytest.raises(InfeasibleBudgetError) as info:
            cpsat.solve(below)
        stated = float(re.search(r"smallest feasible budget for this problem is ([0-9.e-]+)", str(info.value))[1])
        assert stated == smallest
        with pytest.raises(InfeasibleBudgetError, match=re.escape(repr(smallest))):
            below.check_feasible()


@pytest.mark.parametrize("budget", [0.0, -1.0, 1.0001, float("nan")])
def test_problem_rejects_bad_budget(budget: float) -> None:
    with pytest.raises(ConfigError, match="budget"):
        make_problem(0, 3, 1, 1, budget)
    with pytest.raises(ConfigError, match="budget"):
        make_problem(0, 3, 1, 1, 0.5).with_budget(budget)


def test_problem_shape_errors_name_the_array() -> None:
    problem = make_problem(0, 3, 2, 1, 0.5)
    with pytest.raises(ValueError, match=r"e_reuse has shape \(3, 2, 3\), expected .*max_age \+ 1.*\(3, 2, 2\)"):
        Problem(units=problem.units, num_steps=3, max_age=1, budget=0.5, flops_compute=problem.flops_compute,
                e_reuse=np.zeros((3, 2, 3)), flops_reuse=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="needs both"):
        Problem(units=problem.units, num_steps=3, max_age=1, budget=0.5, flops_compute=problem.flops_compute,
                e_reuse=np.zeros((3, 2, 2)))
    with pytest.raises(ValueError, match="allow COMPUTE"):
        Problem(units=problem.units, num_steps=3, max_age=1, budget=0.5, flops_compute=problem.flops_compute,
                allowed=np.zeros((2, 1), dtype=bool))
    attn = (Unit("b", 0, "attn"),)
    with pytest.raises(ValueError, match="WIDTH on b.0.attn"):
        Problem(units=attn, num_steps=2, max_age=1, budget=0.5, flops_compute=np.ones((2, 1)), widths=(0.5,),
                e_width=np.zeros((2, 1, 1)), flops_width=np.zeros((2, 1, 1)), allowed=np.ones((1, 2), dtype=bool))


def test_restrict_keeps_compute_reuse() -> None:
    problem = make_problem(3, 4, 2, 2, 0.6)
    restricted = problem.restrict()
    assert [a.kind for a in restricted.actions] == [ActionKind.COMPUTE, ActionKind.REUSE]
    assert restricted.allowed.shape == (4, 2, 2)
    assert restricted.full_flops == problem.full_flops


def test_with_max_age_keeps_the_younger_ages_and_plans_within_them() -> None:
    problem = make_problem(5, 8, 2, 4, 0.4)
    short = problem.with_max_age(2)
    assert short.max_age == 2 and short.e_reuse.shape == (8, 2, 3) and short.e_prune.shape == (8, 2, 3, 2)
    assert np.array_equal(short.e_reuse, problem.e_reuse[:, :, :3])
    plan = cpsat.solve(short, time_limit_s=5.0)
    check_plan(plan, short)
    # a plan within the shorter ages costs and errs the same in the full problem
    assert problem.evaluate(plan.actions) == pytest.approx(short.evaluate(plan.actions))
    assert problem.with_max_age(4) is problem
    for bad in (5, -1, 2.0, True):
        with pytest.raises(ValueError, match="max_age"):
            problem.with_max_age(bad)


# ------------------------------------------------------------------------- solver contracts
def test_dp_refuses_other_actions() -> None:
    with pytest.raises(ConfigError, match="cpsat"):
        dp.solve(make_problem(0, 3, 1, 1, 0.9))


def test_registry() -> None:
    assert solvers.get_solver("dp") is dp.solve
    assert solvers.get_solver("toca") is baselines.toca_like
    with pytest.raises(ConfigError, match="cpsat, dp, periodic, uniform, fora, delta_dit, toca"):
        solvers.get_solver("greedy")
    problem = make_problem(5, 4, 2, 2, 0.7)
    assert solvers.solve(problem).solver == "cpsat"


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(2, 12), st.integers(1, 6), st.integers(1, 4), st.floats(0.2, 1.0),
       st.booleans())
def test_baselines_meet_budget(seed: int, T: int, U: int, M: int, budget: float, prune: bool) -> None:
    problem = make_problem(seed, T, U, M, budget, prune=prune, disable=0.0)
    best = None
    for name in ("fora", "delta_dit", "toca", "soda"):
        try:
            plan = solvers.solve(problem, name)
        except InfeasibleBudgetError as exc:
            assert "cannot meet budget" in str(exc)
            continue
        check_plan(plan, problem)
        assert plan.status == "HEURISTIC"
        best = best if best is not None else cpsat.solve(problem)
        assert plan.predicted_error >= best.predicted_error - 1e-6


def test_soda_prunes_the_most_sensitive_reuses_at_rates_growing_with_sensitivity() -> None:
    import dataclasses

    base = make_problem(3, 10, 3, 3, 0.6, width=False, skip=False, disable=0.0)
    # pruning cheap and better than the reuse (more so at the higher rate): SODA should use it
    problem = dataclasses.replace(base, e_prune=base.e_reuse[..., None] * np.array([0.5, 0.2]),
                                  flops_prune=np.broadcast_to(base.flops_reuse[..., None] + [1.0, 2.0],
                                                              base.flops_prune.shape).copy(), allowed=None)
    plan = solvers.solve(problem, "soda")
    check_plan(plan, problem)
    pruned, reused = [], []  # (reuse error, rate) of every cache read
    for u in range(len(problem.units)):
        last = 0
        for t, row in enumerate(plan.actions):
            a = row[u]
            if a.kind is ActionKind.COMPUTE:
                last = t
            elif a.kind is ActionKind.PRUNE:
                k = problem.prune_rates.index(a.rate)
                assert problem.e_prune[t, u, t - last, k] < problem.e_reuse[t, u, t - last]
                pruned.append((problem.e_reuse[t, u, t - last], a.rate))
            else:
                assert a.kind is ActionKind.REUSE
                reused.append(problem.e_reuse[t, u, t - last])
    assert pruned
    assert max(reused, default=0.0) <= min(e for e, _ in pruned)  # the most sensitive reads are pruned
    rates = [rate for _, rate in sorted(pruned)]
    assert rates == sorted(rates)  # at rates growing with the sensitivity
    assert plan.predicted_error < solvers.solve(problem.restrict(), "dp").predicted_error
    with pytest.warns(UserWarning, match="no PRUNE family"):
        alone = solvers.solve(make_problem(3, 10, 3, 3, 0.6, prune=False, width=False, skip=False), "soda")
    assert alone.counts()[ActionKind.PRUNE] == 0


def test_fora_picks_smallest_interval() -> None:
    problem = make_problem(1, 9, 2, 3, 1.0, prune=False, width=False, skip=False, disable=0.0)
    assert solvers.solve(problem, "fora").counts()[ActionKind.REUSE] == 0
    plan = baselines.fora(problem, interval=3)
    assert [a.kind for a in plan.actions[3]] == [ActionKind.COMPUTE] * 2
    assert [a.kind for a in plan.actions[4]] == [ActionKind.REUSE] * 2


def test_cpsat_on_larger_problem_reports_gap() -> None:
    problem = make_problem(7, 12, 6, 3, 0.45)
    plan = cpsat.solve(problem, time_limit_s=10.0, relative_gap=0.0)
    check_plan(plan, problem)
    assert plan.status in ("OPTIMAL", "FEASIBLE") and plan.gap is not None and plan.gap < 0.05
    choice, _, bound = cpsat.lagrangian_plan(problem)
    assert bound <= plan.predicted_error + 1e-9
    assert problem.evaluate(problem.grid(choice))[1] >= plan.predicted_error - 1e-9


def test_placeholder_errors_on_disallowed_actions_do_not_cost_precision() -> None:
    base = make_problem(11, 4, 2, 2, 0.6, prune=False, width=False, disable=0.0)
    allowed = np.array(base.allowed)
    allowed[:, :, -1] = False  # SKIP disallowed everywhere, with a huge placeholder error
    problem = Problem(units=base.units, num_steps=4, max_age=2, budget=0.6, flops_compute=base.flops_compute,
                      flops_fixed=base.flops_fixed, e_reuse=base.e_reuse * 1e-3, flops_reuse=base.flops_reuse,
                      e_skip=np.full((4, 2), 1e6), allowed=allowed)
    best, _, _ = brute_force(problem)
    plan = cpsat.solve(problem)
    assert plan.predicted_error == pytest.approx(best, abs=1e-9)


def test_baseline_without_its_family_says_so() -> None:
    problem = make_problem(2, 4, 2, 2, 0.9).restrict([ActionKind.SKIP])
    with pytest.raises(ConfigError, match="REUSE action family"):
        baselines.fora(problem)


_SOLVE_IN_A_PROCESS = """
import sys
import numpy as np
from dit_opt.plan import Unit
from solvers import cpsat
from solvers.problem import Problem
T, U, M = 40, 12, 4
rng = np.random.default_rng(0)
scale = rng.uniform(0.5, 2.0, size=(T, U, 1))
e_reuse = scale * np.arange(M + 1)[None, None, :] ** 1.5 * rng.uniform(0.8, 1.2, size=(T, U, M + 1))
problem = Problem(units=tuple(Unit("blocks", i) for i in range(U)), num_steps=T, max_age=M, budget=0.4,
                  flops_compute=rng.uniform(5, 15, size=(T, U)), e_reuse=e_reuse, flops_reuse=np.zeros((T, U)),
                  e_skip=rng.uniform(1, 4, size=(T, U)), widths=(0.5,), e_width=rng.uniform(0.2, 2, size=(T, U, 1)),
                  flops_width=rng.uniform(2, 7, size=(T, U, 1)))
plan = cpsat.solve(problem, time_limit_s=0.3, num_workers=int(sys.argv[1]))
print(plan.status, repr(plan.predicted_error), [[str(a) for a in row] for row in plan.actions])
"""


def test_cpsat_gives_the_same_plan_in_every_process():
    """CP-SAT stopped by its time limit (not by proving the optimum) returns the same plan in two
    processes with other worker counts, hash seeds and load: its limit is deterministic time."""
    import os
    import subprocess
    import sys

    outs = []
    for workers, seed in ((2, "1"), (1, "2")):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run([sys.executable, "-c", _SOLVE_IN_A_PROCESS, str(workers)], capture_output=True,
                             text=True, env=env, timeout=300, check=True)
        outs.append(run.stdout)
    assert outs[0].startswith("FEASIBLE")  # the limit stopped the search: what a wall clock would make vary
    assert outs[0] == outs[1]


def test_cpsat_stops_at_its_proof_on_a_small_problem(monkeypatch):
    """A small problem is searched by one worker, which stops at the proven optimum (interleaved
    workers would run on to the deterministic limit); its plan is the brute-force optimum."""
    problem = make_problem(3, T=5, U=2, M=2, budget=0.55)
    searches = []
    search = cpsat._search

    def spy(model, time_limit_s, seed, num_workers, *rest):
        searches.append(num_workers)
        return search(model, time_limit_s, seed, num_workers, *rest)

    monkeypatch.setattr(cpsat, "_search", spy)
    plan = cpsat.solve(problem)
    assert searches == [1] and plan.status == "OPTIMAL"
    best, _, _ = brute_force(problem)
    assert math.isclose(plan.predicted_error, best, rel_tol=1e-6, abs_tol=1e-9)
    portfolio = cpsat.solve(problem, num_workers=2)  # asked for: no single-worker search first
    assert searches == [1, 2] and math.isclose(portfolio.predicted_error, best, rel_tol=1e-6, abs_tol=1e-9)
