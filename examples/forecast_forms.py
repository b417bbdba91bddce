"""The two forms of a forecast on TaylorSeer's rhythms: the interpolating polynomial and TaylorSeer's expansion.

For each (interval N, warm-up w) of diffusers' ``TaylorSeerCacheConfig`` (its phase: compute at
``t < w`` and ``(t - w - 1) % N == 0``), the module-level plan with a forecast at every cache read
of the highest order (up to ``k``) the unit's computes allow, run once with each
``Plan.forecast_form`` (:func:`dit_opt.plan.forecast_weights`) on the benchmark's calibration (10
samples, seed 1000) and evaluation (20 samples, seed 0). The Taylor form at order ``k`` is
diffusers' TaylorSeer hook at ``max_order=k`` (``tests/test_forecast.py``).

    python examples/forecast_forms.py --model digits-mmdit
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import torch

from dit_opt import zoo
from dit_opt.bench import rhythm_study
from dit_opt.plan import COMPUTE, REUSE, Action, ActionKind, after_step
from solvers import uniform

RHYTHMS = ((2, 1), (3, 1), (4, 1), (5, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-mmdit", choices=zoo.available())
    parser.add_argument("--orders", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    study = rhythm_study(args.model, 0.2)  # the lowest budget's max_age: every rhythm's caches
    problem = study.problem.with_budget(1.0)
    T, U = problem.num_steps, len(problem.units)
    print("| interval, warm-up | FLOP fraction | order | form | calibration error | PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    for interval, warmup in RHYTHMS:
        rhythm = uniform.schedule(T, warmup, interval, phase=1)
        for order in args.orders:
            columns = []
            for u in range(U):
                column, computes = [], ()
                reusable = problem.allowed[:, u, problem.menu_index(REUSE)]
                for t in range(T):
                    k = min(order, len(computes) - 1)
                    if rhythm[t] or not reusable[t]:
                        action = COMPUTE
                    else:
                        action = Action(ActionKind.FORECAST, order=k) if k >= 1 else REUSE
                    column.append(action)
                    computes = after_step(t, action, computes)
                columns.append(column)
            grid = [[columns[u][t] for u in range(U)] for t in range(T)]
            # costed as reuses (a forecast costs what a reuse does); the problem's error tables
            # model evenly spaced higher orders only, and the hook forecasts at any spacing
            reuses = [[REUSE if a.kind is ActionKind.FORECAST else a for a in row] for row in grid]
            plan = dataclasses.replace(problem.to_plan(reuses, "rhythm", "HEURISTIC", 0.0), actions=grid)
            for form in ("lagrange", "taylor"):
                error, psnr = study.measure(dataclasses.replace(plan, forecast_form=form))
                print(f"| {interval}, {warmup} | {plan.flop_fraction:.3f} | {order} | {form} | {error:.3g} | "
                      f"{psnr:.2f} |", flush=True)


if __name__ == "__main__":
    main()
