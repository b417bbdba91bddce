"""Two TaylorSeer intervals in one schedule: can a rhythm between two settings reach the chord?

The equal-FLOPs comparison joins a peer's settings linearly: on ``digits-mmdit`` at 0.35 the
envelope is the chord between TaylorSeer's interval 4 (8 computes) and interval 3 (10 computes).
This example measures the schedules in between: a warm-up ``w``, then interval ``Na`` until a
switch step and ``Nb`` after it (the switch chosen to spend the most of the budget), at module
granularity with a forecast at every cache read (TaylorSeer's policy, the order measured best), as
they are and with their unspent budget filled (``solvers.fill``). Each row is one generation of
the benchmark's evaluation (20 images, seed 0) and of its calibration (10 images, seed 1000).

    python examples/mixed_rhythms.py --model digits-mmdit --budget 0.35 --threads 1 --max-age 4
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from dit_opt import zoo
from dit_opt.bench import rhythm_study
from solvers.fill import fill

PAIRS = ((2, 3), (3, 2), (3, 4), (4, 3), (4, 5), (5, 4), (5, 6), (6, 5))


def schedule(num_steps: int, warmup: int, first: int, na: int, nb: int, switch: int) -> np.ndarray:
    """``(T,)`` booleans: compute at ``t < max(warmup, 1)``, then from ``first`` every ``na`` steps
    while before ``switch``, every ``nb`` after."""
    c = np.zeros(num_steps, bool)
    c[: max(warmup, 1)] = True
    t = first
    while t < num_steps:
        c[t] = True
        t += na if t < switch else nb
    return c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-mmdit", choices=zoo.available())
    parser.add_argument("--budget", type=float, default=0.35)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-age", type=int, default=None,
                        help="oldest cache the schedules may read (default: the budget's, planned_max_age)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    study = rhythm_study(args.model, args.budget, args.max_age)
    problem = study.problem
    T = problem.num_steps

    def grid(c: np.ndarray) -> list:
        return problem.with_forecasts(study.cells(c))

    seen: set[tuple] = set()
    print("| warm-up, intervals, switch | computes | plan | FLOP fraction | modelled error | calibration error | "
          "PSNR (dB) |")
    print("|---|---|---|---|---|---|---|")
    for w in (1, 2, 3):
        for na, nb in PAIRS:
            if max(na, nb) > problem.max_age + 1:
                continue
            for first in (w, w + 1):
                fits = []
                for s in range(first, T + 1):
                    c = schedule(T, w, first, na, nb, s)
                    g = grid(c)
                    if problem.is_within_budget(flops := problem.evaluate(g)[0]):
                        fits.append((flops, s, c, g))
                if not fits:
                    continue
                _, s, c, g = max(fits, key=lambda f: (f[0], -f[1]))  # the dearest; ties: the earliest switch
                if tuple(c) in seen:
                    continue
                seen.add(tuple(c))
                plan = problem.to_plan(g, f"w={w} {na}->{nb} @{s}", "HEURISTIC", 0.0)
                if plan.flop_fraction < args.budget - 0.05:
                    continue
                for kind, p in (("as is", plan), ("filled", fill(problem, plan))):
                    error, psnr = study.measure(p)
                    print(f"| {w}, {na} then {nb}, at {s} | {np.nonzero(c)[0].tolist()} | {kind} | "
                          f"{p.flop_fraction:.3f} | {p.predicted_error:.3g} | {error:.3g} | {psnr:.2f} |", flush=True)


if __name__ == "__main__":
    main()
