"""TaylorSeer's rhythms inside dit-opt's action space: FLOPs, modelled error, measured error, PSNR.

For each (interval N, warm-up w) of diffusers' ``TaylorSeerCacheConfig`` (its phase: compute at
``t < w`` and ``(t - w - 1) % N == 0``), the plan of ``solvers.uniform`` with that rhythm, at block
and at module granularity (forecasts of the order measured best), is run on the benchmark's
evaluation (20 samples, seed 0) and on its calibration (10 samples, seed 1000). Shows whether
the action space contains TaylorSeer's policy and how well the modelled error ranks rhythms.

    python examples/taylorseer_rhythms.py --model digits-mmdit
"""

from __future__ import annotations

import argparse
import warnings

import torch

import dit_opt
from dit_opt import metrics, zoo
from dit_opt.bench import with_transformer
from dit_opt.selection import measure_outputs, relative_error
from solvers import solve

RHYTHMS = ((2, 1), (3, 1), (3, 2), (3, 3), (4, 1), (4, 2), (5, 1), (5, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-mmdit", choices=zoo.available())
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    sampler = zoo.load(args.model)
    cal_labels, eval_labels = sampler.labels(10), sampler.labels(20)

    def calibration(module):
        return with_transformer(sampler, module, class_labels=cal_labels, seed=1000)

    prof = dit_opt.profile(sampler.transformer, calibration, probes=0, progress=False)
    full = with_transformer(sampler, sampler.transformer, class_labels=eval_labels, seed=0)
    ref = measure_outputs(calibration, sampler.transformer)
    print("| granularity | interval, warm-up | FLOP fraction | modelled error | calibration error | PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    for granularity in ("module", "block"):
        problem = prof.to_problem(1.0, granularity=granularity)
        for n, w in RHYTHMS:
            plan = solve(problem, "uniform", warmup=w, interval=n, phase=1)
            opt = dit_opt.OptimizedTransformer(sampler.transformer, plan, profile=prof, compile=False)
            images = with_transformer(sampler, opt, class_labels=eval_labels, seed=0)
            opt.reset()
            error = relative_error(measure_outputs(calibration, opt), ref)
            print(f"| {granularity} | {n}, {w} | {plan.flop_fraction:.3f} | {plan.predicted_error:.3g} | "
                  f"{error:.3g} | {metrics.psnr(images, full):.2f} |", flush=True)


if __name__ == "__main__":
    main()
