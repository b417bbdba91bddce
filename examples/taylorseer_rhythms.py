"""TaylorSeer's rhythms inside dit-opt's action space, next to diffusers' TaylorSeer hook.

For each (interval N, warm-up w) of diffusers' ``TaylorSeerCacheConfig`` (its phase: compute at
``t < w`` and ``(t - w - 1) % N == 0``), the plan of ``solvers.uniform`` with that rhythm is run on
the benchmark's evaluation (20 samples, seed 0) and on its calibration (10 samples, seed 1000):
at module granularity under both forecast policies (``"measured"``: a forecast where the profile
measures it better than the reuse; ``"always"``: at every cache read, TaylorSeer's policy), with
the order measured best and with order 1 only, and at block granularity; then the hook itself at
orders 1 and 2. Shows that the action space contains TaylorSeer's policy (``always``, order 1, at
module granularity is the hook's plan) and how well the modelled error ranks rhythms.

    python examples/taylorseer_rhythms.py --model digits-mmdit
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import torch

import dit_opt
from dit_opt import metrics, zoo
from dit_opt.bench import with_transformer
from dit_opt.benchmark import peer_module
from dit_opt.selection import measure_outputs, relative_error
from solvers import solve

RHYTHMS = ((2, 1), (2, 3), (3, 1), (3, 3), (4, 1), (5, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-mmdit", choices=zoo.available())
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    sampler = zoo.load(args.model)
    model = sampler.transformer
    cal_labels, eval_labels = sampler.labels(10), sampler.labels(20)

    def calibration(module):
        return with_transformer(sampler, module, class_labels=cal_labels, seed=1000)

    prof = dit_opt.profile(model, calibration, probes=0, progress=False)
    full = with_transformer(sampler, model, class_labels=eval_labels, seed=0)
    ref = measure_outputs(calibration, model)
    module = prof.to_problem(1.0, granularity="module")
    variants = [("module", "measured", "best", module),
                ("module", "always", "best", dataclasses.replace(module, forecast_policy="always")),
                ("module", "always", "1", dataclasses.replace(module, forecast_policy="always",
                                                              e_forecast=module.e_forecast[:, :, :1])),
                ("block", "measured", "best", prof.to_problem(1.0))]
    print("| interval, warm-up | plan | forecasts | order | FLOP fraction | modelled error | calibration error | "
          "PSNR (dB) |")
    print("|---|---|---|---|---|---|---|---|")
    for n, w in RHYTHMS:
        for granularity, policy, order, problem in variants:
            plan = solve(problem, "uniform", warmup=w, interval=n, phase=1)
            opt = dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)
            images = with_transformer(sampler, opt, class_labels=eval_labels, seed=0)
            opt.reset()
            error = relative_error(measure_outputs(calibration, opt), ref)
            print(f"| {n}, {w} | dit-opt {granularity} | {policy} | {order} | {plan.flop_fraction:.3f} | "
                  f"{plan.predicted_error:.3g} | {error:.3g} | {metrics.psnr(images, full):.2f} |", flush=True)
        for k in (1, 2):
            hook = peer_module(model, "taylorseer", (n, w, k), sampler.num_inference_steps)
            images = with_transformer(sampler, hook, class_labels=eval_labels, seed=0)
            print(f"| {n}, {w} | diffusers TaylorSeer | always | {k} | - | - | - | "
                  f"{metrics.psnr(images, full):.2f} |", flush=True)


if __name__ == "__main__":
    main()
