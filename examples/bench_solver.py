"""Benchmark the CP-SAT solver on a DiT-XL/2-sized synthetic problem.

50 DDIM steps x 28 blocks x 3 modules (self-attention, cross-attention, MLP; PixArt-style) with
every action: REUSE up to age 4, PRUNE at 3 rates, WIDTH at 3 widths (MLPs only), SKIP. FLOPs
follow the real shapes (256 image tokens, 120 text tokens, hidden size 1152); the errors are
synthetic but shaped like measured ones: growing with the cache age, higher in the first and last
steps and in the first and last blocks, deterministic (seeded).

Run::

    python examples/bench_solver.py                    # budgets 0.8 0.5 0.35 0.25
    python examples/bench_solver.py --modules 2 --time-limit 5 --baselines

For each budget it prints the wall time, CP-SAT status, objective (modelled error of the plan),
best bound and relative gap, and optionally the baselines' errors at the same budget.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import solvers
from dit_opt.errors import InfeasibleBudgetError
from dit_opt.plan import Unit
from solvers.problem import Problem

N_IMG, N_TXT, D = 256, 120, 1152


def dit_xl_problem(budget: float, steps: int = 50, blocks: int = 28, modules: int = 3,
                   seed: int = 0) -> Problem:
    """The synthetic DiT-XL/2-sized problem (see the module docstring)."""
    rng = np.random.default_rng(seed)
    roles = ("attn", "cross_attn", "mlp") if modules == 3 else ("attn", "mlp")
    units = tuple(Unit("transformer_blocks", b, r) for b in range(blocks) for r in roles)
    T, U, M = steps, len(units), 4
    prune_rates, widths = (0.25, 0.5, 0.75), (0.25, 0.5, 0.75)
    # integer FLOPs (multiply-add = 2) of one module on one sample
    per_role = {
        "attn": 8 * N_IMG * D * D + 4 * N_IMG * N_IMG * D,
        "cross_attn": 4 * N_IMG * D * D + 4 * N_TXT * D * D + 4 * N_IMG * N_TXT * D,
        "mlp": 16 * N_IMG * D * D,
    }
    compute = np.array([[per_role[u.role.value] for u in units]] * T, dtype=np.float64)
    overhead = 3 * N_IMG * D  # token scores, gather, scatter
    flops_prune = np.stack([np.floor(r * compute) + overhead for r in prune_rates], axis=2)
    flops_width = np.stack([np.floor(w * compute) for w in widths], axis=2)
    flops_reuse = np.full((T, U), float(N_IMG * D))  # the residual add

    # sensitivity: U-shaped over steps and blocks, per-role scale, lognormal noise
    s = np.linspace(0, 1, T)[:, None]
    b = np.array([u.index for u in units]) / (blocks - 1)
    role_scale = np.array([{"attn": 1.0, "cross_attn": 0.6, "mlp": 1.3}[u.role.value] for u in units])
    base = 0.02 * (1 + 3 * (1 - s) ** 4 + 1.5 * s**6) * (1 + 1.5 * (1 - b) ** 6 + 1.0 * b**6) * role_scale
    base = base * rng.lognormal(0.0, 0.3, size=(T, U))
    ages = np.arange(M + 1)
    e_reuse = base[:, :, None] * ages[None, None, :] ** 1.6 * rng.lognormal(0.0, 0.1, size=(T, U, M + 1))
    e_reuse[:, :, 0] = 0.0
    keep = np.array([(1 - r) ** 1.5 for r in prune_rates])
    e_prune = e_reuse[:, :, :, None] * keep[None, None, None, :] * 0.8 + 0.002 * base[:, :, None, None]
    e_width = np.stack([4 * base * (1 - w) ** 2 for w in widths], axis=2)
    e_skip = 6.0 * base
    fixed = 0.02 * compute.sum()
    return Problem(
        units=units, num_steps=T, max_age=M, budget=budget, flops_compute=compute,
        flops_fixed=float(np.floor(fixed)), e_reuse=e_reuse, flops_reuse=flops_reuse,
        prune_rates=prune_rates, e_prune=e_prune, flops_prune=flops_prune, widths=widths,
        e_width=e_width, flops_width=flops_width, e_skip=e_skip,
        timesteps=tuple(np.linspace(999, 0, T).round()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5, 0.35, 0.25])
    parser.add_argument("--time-limit", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--gap", type=float, default=0.01, help="stop at this relative gap (0: prove)")
    parser.add_argument("--modules", type=int, choices=(2, 3), default=3)
    parser.add_argument("--no-warm-start", action="store_true")
    parser.add_argument("--baselines", action="store_true", help="also run dp (restricted) and baselines")
    args = parser.parse_args()

    print(f"{'budget':>6} {'wall s':>7} {'status':>9} {'objective':>10} {'bound':>10} {'gap %':>7} "
          f"{'FLOPs %':>8}")
    for budget in args.budgets:
        problem = dit_xl_problem(budget, modules=args.modules)
        start = time.perf_counter()
        plan = solvers.solve(problem, "cpsat", time_limit_s=args.time_limit, num_workers=args.workers,
                             relative_gap=args.gap, warm_start=not args.no_warm_start)
        wall = time.perf_counter() - start
        bound = plan.predicted_error * (1 - (plan.gap or 0.0))
        print(f"{budget:>6.2f} {wall:>7.2f} {plan.status:>9} {plan.predicted_error:>10.4f} {bound:>10.4f} "
              f"{100 * (plan.gap or 0):>7.3f} {100 * plan.flop_fraction:>8.2f}")
        if args.baselines:
            for name in ("dp", "fora", "delta_dit", "toca"):
                target = problem.restrict() if name == "dp" else problem
                try:
                    start = time.perf_counter()
                    other = solvers.solve(target, name)
                    wall = time.perf_counter() - start
                    print(f"{'':>6} {wall:>7.2f} {name:>9} {other.predicted_error:>10.4f} {'':>10} {'':>7} "
                          f"{100 * other.flop_fraction:>8.2f}")
                except InfeasibleBudgetError as exc:
                    print(f"{'':>6} {'':>7} {name:>9} infeasible: {str(exc)[:70]}")
    print(f"problem: {problem.num_steps} steps x {len(problem.units)} units, max_age {problem.max_age}, "
          f"{len(problem.actions)} actions; bound = objective x (1 - gap); dp runs on the COMPUTE/REUSE "
          "restriction (its own optimum)")


if __name__ == "__main__":
    main()
