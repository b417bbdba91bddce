"""Closed-loop plan search on a reference model: the solver's plan, re-solved round by round.

``optimize(..., closed_loop=True)`` runs :func:`dit_opt.closed_loop.refine` from the solver's
plan: each round runs the plan through the calibration with the full model beside it, divides
the error measured at each step by the error the problem models there, and solves again with the
errors so corrected (:data:`dit_opt.closed_loop.DAMPING`). This prints, per budget, the solver's
plan (at module granularity, as ``granularity="auto"`` makes it) and each re-solved plan: FLOP
fraction, calibration error (what the selection ranks by) and evaluation PSNR, with the
benchmark's calibration (10 images, seed 1000) and evaluation (20 images, seed 0) unless told.

    python examples/closed_loop.py --model digits-mmdit --budgets 0.5 0.35
    python examples/closed_loop.py --model crops-pixart --samples 8 --calibration-samples 4
    python examples/closed_loop.py --model digits-mmdit --budgets 0.5 --damping 1    # no damping
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import dit_opt
from dit_opt import closed_loop, metrics, zoo
from dit_opt.bench import rhythm_study
from dit_opt.selection import relative_error
from solvers import solve, solver_defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-mmdit", choices=zoo.available())
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.35, 0.25, 0.2])
    parser.add_argument("--rounds", type=int, default=closed_loop.ROUNDS)
    parser.add_argument("--granularity", default="module", choices=["block", "module"])
    parser.add_argument("--damping", type=float, default=closed_loop.DAMPING,
                        help="how far each round moves towards the measured corrections (1: all the way)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=20, help="evaluation samples (the benchmark's --samples)")
    parser.add_argument("--calibration-samples", type=int, default=10, help="the benchmark's --calibration-samples")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    closed_loop.DAMPING = args.damping  # read by closed_loop.step_weights at each round
    warnings.simplefilter("ignore")
    study = rhythm_study(args.model, args.budgets[0], calibration_samples=args.calibration_samples,
                         samples=args.samples)
    print(f"### {args.model}: the solver's plan ({args.granularity} granularity) and its closed-loop re-solves "
          f"(damping {closed_loop.DAMPING}, at most {args.rounds} rounds)\n")
    print("| budget | plan | FLOP fraction | calibration error | evaluation PSNR (dB) | the loop's seconds |")
    print("|---|---|---|---|---|---|")

    def cpsat(problem):
        return solve(problem, "cpsat", **solver_defaults("cpsat", None))

    def build(plan):
        return dit_opt.OptimizedTransformer(study.model, plan, profile=study.profile, compile=False)

    for budget in args.budgets:
        problem = study.profile.to_problem(budget, granularity=args.granularity)
        start = time.perf_counter()
        found = closed_loop.refine(
            cpsat(problem), problem, cpsat,
            lambda plan, steps=problem.num_steps: closed_loop.on_policy_errors(study.calibration, build(plan),
                                                                               study.model, steps),
            lambda out: relative_error(out, study.reference), args.rounds)
        seconds = time.perf_counter() - start
        for plan, error in found:
            psnr = metrics.psnr(study.evaluation(build(plan)), study.full)
            print(f"| {budget} | {plan.solver} | {plan.flop_fraction:.3f} | {error:.3g} | {psnr:.2f} | "
                  f"{seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
