"""CP-SAT under a deterministic time limit (the default) against the wall-clock portfolio.

Profiles a reference model on the benchmark's calibration (10 images, seed 1000), then solves
its problem at each budget and granularity: the default way (a small problem searched by one
worker first, ``cpsat.SINGLE_WORKER_VARIABLES``), by the interleaved workers alone (an explicit
``num_workers``; "same plan" where its actions equal the default's), and twice under the wall
clock, which need not repeat itself; each with its modelled error and wall time:

    python examples/cpsat_determinism.py --model digits-dit
"""

from __future__ import annotations

import argparse
import os
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
    workers = min(8, os.cpu_count() or 1)
    print("| granularity | budget | deterministic (2) | interleaved only | wall clock, run 1 | wall clock, run 2 |")
    print("|---|---|---|---|---|---|")
    for granularity in ("block", "module"):
        for budget in args.budgets:
            problem = prof.to_problem(budget, granularity=granularity)
            cells, first = [], None
            for deterministic, num_workers in ((True, None), (True, workers), (False, None), (False, None)):
                start = time.perf_counter()
                plan = cpsat.solve(problem, relative_gap=0.005, deterministic=deterministic, num_workers=num_workers,
                                   time_limit_s=2.0 if deterministic else args.wall_limit)
                same = " (same plan)" if first is not None and num_workers and plan.actions == first.actions else ""
                first = first or plan
                cells.append(f"{plan.predicted_error:.6g} in {time.perf_counter() - start:.1f} s{same}")
            print(f"| {granularity} | {budget} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
