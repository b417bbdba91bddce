"""Trimming a TaylorSeer rhythm to the budget by measured, not modelled, error.

``solvers.fill.trim`` takes the computes a rhythm one notch over the budget has to give up
where the modelled error (each action's error measured alone on the full model's trajectory)
grows least. This example measures the alternative, a closed-loop greedy search: at each round
every remaining compute of every unit after the warm-up is turned into a cache read (a forecast
of the order measured best, TaylorSeer's policy) in turn and the plan run through the
calibration (10 images, seed 1000); the ``--per-round`` changes with the lowest calibration
error are kept, until the plan fits the budget. The result and the modelled trim are then run on
the evaluation (20 images, seed 0). Module granularity; diffusers' phase (compute at ``t < w``
and ``(t - w - 1) % N == 0``).

    python examples/measured_trim.py --model digits-mmdit --budget 0.5 --warmup 3 --interval 2
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from dit_opt import zoo
from dit_opt.bench import machine, rhythm_study
from dit_opt.plan import COMPUTE, REUSE
from solvers import uniform
from solvers.fill import trim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-mmdit", choices=zoo.available())
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--per-round", type=int, default=5, help="changes kept per round of measurements")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    study = rhythm_study(args.model, args.budget)
    problem = study.problem
    T, U, reuse = problem.num_steps, len(problem.units), problem.menu_index(REUSE)
    rhythm = uniform.schedule(T, args.warmup, args.interval, phase=1 if args.warmup else 0)
    grid = study.cells(rhythm)
    unlimited = problem.with_budget(1.0)
    runs = 0

    def plan_of(cells, name):
        return unlimited.to_plan(problem.with_forecasts(cells), name, "HEURISTIC", 0.0)

    def error(plan):
        nonlocal runs
        runs += 1
        return study.error(plan)

    def row(plan, label, cost):
        err, psnr = study.measure(plan)
        print(f"| {label} | {plan.flop_fraction:.3f} | {err:.3g} | {psnr:.2f} | {cost} |", flush=True)

    start = plan_of(grid, "rhythm")
    print(f"{args.model}, budget {args.budget}, warm-up {args.warmup}, interval {args.interval}, "
          f"computes {rhythm.nonzero()[0].tolist()}; {machine()}\n")
    print("| plan | FLOP fraction | calibration error | PSNR (dB) | calibration runs |")
    print("|---|---|---|---|---|")
    row(start, "rhythm as is", "-")
    t0 = time.perf_counter()
    current = start
    while current.flop_fraction > args.budget + 1e-9:
        scored = []
        for t in range(max(args.warmup, 1), T):
            for u in range(U):
                if grid[t][u] != COMPUTE or not problem.allowed[t, u, reuse]:
                    continue
                cells = [list(row) for row in grid]
                cells[t][u] = REUSE
                try:
                    plan = plan_of(cells, "candidate")
                except ValueError:  # a cache older than the problem's age limit
                    continue
                scored.append((error(plan), t, u))
        if not scored:
            print("| measured trim | - | no compute left to give up | - | - |")
            return
        scored.sort()
        print(f"round: kept {[(t, str(problem.units[u]), f'{e:.3g}') for e, t, u in scored[:args.per_round]]}",
              flush=True)
        for _, t, u in scored[:args.per_round]:
            grid[t][u] = REUSE
            current = plan_of(grid, "measured-trim")
            if current.flop_fraction <= args.budget + 1e-9:
                break
    spent = time.perf_counter() - t0
    row(current, "measured trim", f"{runs} ({spent:.0f} s)")
    modelled = trim(problem, start)
    if modelled is not None:
        row(modelled, "modelled trim", "0")


if __name__ == "__main__":
    main()
