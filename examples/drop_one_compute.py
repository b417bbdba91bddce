"""What one irregular gap costs a TaylorSeer rhythm: drop a single compute step and measure.

A uniform rhythm (warm-up ``w``, then every ``N`` steps) one notch over the budget has to lose a
little compute to fit it; ``solvers.fill.trim`` takes it where the modelled error grows least.
This example measures the alternative of dropping one whole compute step (every unit) of the
rhythm, at each step in turn, at module granularity with a forecast at every cache read (the
order measured best; orders 2 and 3 need evenly spaced computes), as it is and then trimmed or
filled to the budget. Each row is one generation of the benchmark's evaluation (20 images,
seed 0) and of its calibration (10 images, seed 1000).

    python examples/drop_one_compute.py --model digits-mmdit --budget 0.5 --warmup 2 --interval 2
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from dit_opt import zoo
from dit_opt.bench import rhythm_study
from solvers import uniform
from solvers.fill import fill, trim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-mmdit", choices=zoo.available())
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    study = rhythm_study(args.model, args.budget)
    problem = study.problem
    rhythm = uniform.schedule(problem.num_steps, args.warmup, args.interval)

    def measure(computes: np.ndarray, label: str) -> None:
        grid = problem.with_forecasts(study.cells(computes))
        plan = problem.with_budget(1.0).to_plan(grid, label, "HEURISTIC", 0.0)
        fitted = fill(problem, plan) if problem.is_within_budget(problem.evaluate(grid)[0]) else trim(problem, plan)
        for kind, p in (("as is", plan), ("to the budget", fitted)):
            if p is None:
                print(f"| {label} | {kind} | - | - | - |")
                continue
            error, psnr = study.measure(p)
            print(f"| {label} | {kind} | {p.flop_fraction:.3f} | {error:.3g} | {psnr:.2f} |", flush=True)

    print(f"computes of warm-up {args.warmup}, interval {args.interval}: {np.nonzero(rhythm)[0].tolist()}\n")
    print("| dropped step | plan | FLOP fraction | calibration error | PSNR (dB) |")
    print("|---|---|---|---|---|")
    measure(rhythm, "none")
    for s in np.nonzero(rhythm)[0][1:]:
        dropped = rhythm.copy()
        dropped[s] = False
        measure(dropped, str(int(s)))


if __name__ == "__main__":
    main()
