"""CP-SAT under a deterministic time limit (the default) against the wall-clock portfolio.

Profiles a reference model on the benchmark's calibration (10 images, seed 1000), then solves
its problem at each budget and granularity both ways, printing wall time and modelled error;
the wall-clock solve runs twice to show that it need not repeat itself:

    python examples/cpsat_determinism.py --model digits-dit
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import dit_opt
from dit_opt import bench, zoo
from solvers import cpsat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-dit", choices=zoo.available())
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.35, 0.25, 0.2])
    parser.add_argument("--wall-limit", type=float, default=10.0, help="seconds, the portfolio's limit")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    sampler = zoo.load(args.model)
    prof = dit_opt.profile(sampler.transformer, bench.sampling(sampler, 10, seed=1000, reset=True), probes=0,
                           progress=False)
    print(f"{bench.machine()}\n")
    print("| granularity | budget | deterministic (2) | wall clock, run 1 | wall clock, run 2 |")
    print("|---|---|---|---|---|")
    for granularity in ("block", "module"):
        for budget in args.budgets:
            problem = prof.to_problem(budget, granularity=granularity)
            cells = []
            for deterministic in (True, False, False):
                start = time.perf_counter()
                plan = cpsat.solve(problem, relative_gap=0.005, deterministic=deterministic,
                                   time_limit_s=2.0 if deterministic else args.wall_limit)
                cells.append(f"{plan.predicted_error:.6g} in {time.perf_counter() - start:.1f} s")
            print(f"| {granularity} | {budget} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
