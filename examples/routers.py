"""Elastic routers (E-DiT) on a reference model: train them at a budget, then compare the routed
model's images with the full model's, beside the static plan ``dit_opt.optimize`` makes at the same
budget.

Training and calibration use the benchmark's calibration (10 images, seed 1000); the figures are
on its evaluation images (seed 0). FLOP fractions are counted per sample by the routed module
(``RoutedTransformer.stats``) and, for the static plan, by the plan.

    python examples/routers.py --model digits-dit --budget 0.5
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import dit_opt
from dit_opt import metrics, zoo
from dit_opt.bench import machine, sampling
from dit_opt.routers import DEFAULT_WIDTHS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-dit", choices=zoo.available())
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--samples", type=int, default=20, help="evaluation images")
    parser.add_argument("--widths", choices=["full", "edit"], default="full",
                        help="full: gates only; edit: E-DiT's MLP widths 1/4 .. 1 as well")
    parser.add_argument("--closed", choices=["forecast", "reuse", "skip"], default="forecast")
    parser.add_argument("--decide", choices=["block", "step"], default="block")
    parser.add_argument("--static", action="store_true", help="also optimise the static plan at the budget")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(machine())
    sampler = zoo.load(args.model)
    model = sampler.transformer
    calibration = sampling(sampler, 10, seed=1000)
    evaluation = sampling(sampler, args.samples, seed=0)
    full = evaluation(model)
    t0 = time.perf_counter()
    routed = dit_opt.train_routers(model, calibration, budget=args.budget, steps=args.train_steps,
                                   widths=DEFAULT_WIDTHS if args.widths == "edit" else (1.0,), closed=args.closed,
                                   decide=args.decide, progress=False)
    seconds = time.perf_counter() - t0
    routed.reset()
    routed.clear_stats()
    images = evaluation(routed)
    st = routed.stats()
    per = st["per_sample"]
    print("| module | widths | closed gate | decide | FLOP fraction (mean; min, median, max) | PSNR (dB) | "
          "class acc. | training (s) |")
    print("|---|---|---|---|---|---|---|---|")
    labels = sampler.labels(args.samples)
    print(f"| routers | {args.widths} | {args.closed} | {args.decide} | {st['flop_fraction']:.3f}; {per['min']:.3f}, "
          f"{per['median']:.3f}, {per['max']:.3f} | {metrics.psnr(images, full):.2f} | "
          f"{metrics.class_accuracy(images, labels):.0%} | {seconds:.0f} |", flush=True)
    if args.static:
        opt = dit_opt.optimize(model, args.budget, calibration=calibration, compile=False, progress=False,
                               example_inputs=sampler.example_inputs())
        opt.reset()
        static = evaluation(opt)
        print(f"| static plan ({opt.plan.solver}) | - | - | - | {opt.plan.flop_fraction:.3f} | "
              f"{metrics.psnr(static, full):.2f} | {metrics.class_accuracy(static, labels):.0%} | - |")


if __name__ == "__main__":
    main()
