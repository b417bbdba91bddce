"""Whole step forecasts (``STEP``): one order throughout a rhythm against the best order per step.

For the dearest TaylorSeer rhythms within the budget with a ``STEP`` at every step between their
computes (``solvers.uniform.dearest(..., whole=True, order=k)``), each order 0..3 throughout
(lower only where fewer full steps precede) and the order the profile measures best at each step
(``order=None``), measured on the benchmark's evaluation (20 images, seed 0) and calibration (10
images, seed 1000), module granularity, a forecast at every other cache read:

    python examples/step_forecasts.py --model digits-mmdit --budget 0.5
"""

from __future__ import annotations

import argparse
import warnings

import torch

from dit_opt import bench, zoo
from solvers import uniform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-mmdit", choices=zoo.available())
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--rhythms", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    study = bench.rhythm_study(args.model, args.budget)
    print("| rhythm | STEP order | FLOP fraction | modelled error | calibration error | PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    for order in (0, 1, 2, 3, None):
        for plan in uniform.dearest(study.problem, args.rhythms, whole=True, order=order):
            error, psnr = study.measure(plan)
            print(f"| {plan.solver.split('(')[1].rstrip(')')} | {'per step' if order is None else order} | "
                  f"{plan.flop_fraction:.3f} | {plan.predicted_error:.3g} | {error:.3g} | {psnr:.2f} |", flush=True)


if __name__ == "__main__":
    main()
