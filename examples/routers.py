"""Elastic routers (E-DiT) on a reference model against dit-opt's static plan at the same budget.

For each budget: routers trained on the benchmark's calibration (10 images by default, seed 1000; the
model's weights frozen), then the routed module generates the evaluation images (seed 0), its
FLOPs counted per sample (``RoutedTransformer.stats``: mean, min, median, max); and the plan
``dit_opt.optimize`` keeps at that budget (``--granularity``, default ``auto`` as in
``BENCHMARKS.md``) on the same images. PSNR against the full model's images, class accuracy by
the shipped classifier and Frechet distance to the held-out real images, as the benchmark
measures them. ``--dynamic HEADROOM ...`` adds routers on a static plan
(``dit_opt.optimize(..., dynamic=HEADROOM)``: the plan solved at ``budget * (1 + HEADROOM)``, its
computes gated per sample down to the budget; headroom 0 is the plan's schedule alone).

    python examples/routers.py --model digits-dit --budgets 0.5 0.35 --samples 200
    python examples/routers.py --model digits-dit --budgets 0.5 --no-routers --dynamic 0 0.2  # on a plan
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

import dit_opt
from dit_opt import metrics, zoo
from dit_opt.bench import machine, sampling, time_alternating
from dit_opt.routers import DEFAULT_WIDTHS


def quality(images: torch.Tensor, full: torch.Tensor, labels: list[int], real: torch.Tensor) -> str:
    return (f"{metrics.psnr(images, full):.2f} | {metrics.class_accuracy(images, labels):.0%} | "
            f"{metrics.frechet_distance(images, real):.2f}")


def measured(routed: dit_opt.RoutedTransformer, evaluation, full: torch.Tensor, labels: list[int],
             real: torch.Tensor) -> str:
    """The evaluation through ``routed`` from a fresh state: FLOP fraction per sample (mean; min,
    median, max) | PSNR | class acc. | Frechet dist."""
    routed.reset()
    routed.clear_stats()
    images = evaluation(routed)
    st = routed.stats()
    per = st["per_sample"]
    return (f"{st['flop_fraction']:.3f}; {per['min']:.3f}, {per['median']:.3f}, {per['max']:.3f} | "
            f"{quality(images, full, labels, real)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-dit", choices=zoo.available())
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--samples", type=int, default=20, help="evaluation images")
    parser.add_argument("--calibration-samples", type=int, default=10,
                        help="calibration images (seed 1000): what the routers train on and the plans solve on")
    parser.add_argument("--widths", choices=["full", "edit"], default="full",
                        help="full: gates only; edit: E-DiT's MLP widths 1/4 .. 1 as well")
    parser.add_argument("--closed", nargs="+", choices=["forecast", "reuse", "skip"], default=["forecast"])
    parser.add_argument("--decide", nargs="+", choices=["block", "step"], default=["block"])
    parser.add_argument("--dynamic", type=float, nargs="*", default=[], metavar="HEADROOM",
                        help="also routers on a static plan: dit_opt.optimize(..., dynamic=HEADROOM), the plan "
                        "solved at budget * (1 + HEADROOM)")
    parser.add_argument("--no-routers", action="store_true", help="leave out the routers on the bare model")
    parser.add_argument("--no-static", action="store_true", help="leave out the static plan")
    parser.add_argument("--granularity", default="auto", choices=["block", "module", "auto"])
    parser.add_argument("--timing", type=int, default=0, metavar="REPEATS",
                        help="also time whole generations of the compiled routed module against the compiled "
                        "model (torch.compile), alternating, medians of REPEATS (the last budget's first routers)")
    parser.add_argument("--timing-samples", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(machine())
    sampler = zoo.load(args.model)
    model = sampler.transformer
    calibration = sampling(sampler, args.calibration_samples, seed=1000)
    evaluation = sampling(sampler, args.samples, seed=0)
    labels = sampler.labels(args.samples)
    real, _ = sampler.reference_images()
    full = evaluation(model)
    print(f"full model: {quality(full, full, labels, real)} (PSNR | class acc. | Frechet dist.)")
    print("| budget | module | closed gate | decide | FLOP fraction (mean; min, median, max) | PSNR (dB) | "
          "class acc. | Frechet dist. | training (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    timed = None
    for budget in args.budgets:
        timed = None
        for closed in [] if args.no_routers else args.closed:
            for decide in args.decide:
                t0 = time.perf_counter()
                routed = dit_opt.train_routers(model, calibration, budget=budget, steps=args.train_steps,
                                               widths=DEFAULT_WIDTHS if args.widths == "edit" else (1.0,),
                                               closed=closed, decide=decide, progress=False)
                seconds = time.perf_counter() - t0
                print(f"| {budget} | routers ({args.widths} width) | {closed} | {decide} | "
                      f"{measured(routed, evaluation, full, labels, real)} | {seconds:.0f} |", flush=True)
                rounds = ", ".join(f"{o:g}: {f:.3f}" for o, f in routed.routers.config.report["offset_rounds"])
                print(f"  (gate offset -> calibration FLOP fraction: {rounds})", flush=True)
                timed = timed or routed
        for headroom in args.dynamic:
            t0 = time.perf_counter()
            routed = dit_opt.optimize(model, budget, calibration=calibration, dynamic=headroom, compile=False,
                                      progress=False, example_inputs=sampler.example_inputs())
            seconds = time.perf_counter() - t0
            report = routed.routers.config.report
            print(f"| {budget} | routers on a plan (headroom {headroom:g}: plan at {report['plan_flop_fraction']:.3f}) "
                  f"| forecast | block | {measured(routed, evaluation, full, labels, real)} | {seconds:.0f} |",
                  flush=True)
            plain = dit_opt.OptimizedTransformer(model, routed.plan, compile=False)  # the plan in its own runtime
            print(f"| {budget} | that plan alone (its own forecasts) | - | - | {routed.plan.flop_fraction:.3f} | "
                  f"{quality(evaluation(plain), full, labels, real)} | - |", flush=True)
            timed = timed or routed
        if not args.no_static:
            opt = dit_opt.optimize(model, budget, calibration=calibration, compile=False, progress=False,
                                   granularity=args.granularity, example_inputs=sampler.example_inputs())
            opt.reset()
            static = evaluation(opt)
            print(f"| {budget} | static plan ({opt.plan.solver}) | - | - | {opt.plan.flop_fraction:.3f} | "
                  f"{quality(static, full, labels, real)} | - |", flush=True)
    if args.timing and timed is not None:
        time_compiled(timed, sampler, args)


def time_compiled(routed: dit_opt.RoutedTransformer, sampler, args) -> None:
    """Wall clock of whole generations: the routed module compiled against the model compiled."""
    with tempfile.TemporaryDirectory() as tmp:
        path = routed.save(Path(tmp) / "routers.safetensors")
        fast = dit_opt.RoutedTransformer.load(path, sampler.transformer, compile=True)
    base = torch.compile(sampler.transformer)
    generate = sampling(sampler, args.timing_samples, seed=0, reset=True)
    with torch.no_grad():
        result = time_alternating(lambda: generate(base), lambda: generate(fast), repeats=args.timing, warmup=1)
    fast.clear_stats()
    generate(fast)
    frac = fast.stats()["flop_fraction"]
    print(f"wall clock ({args.timing_samples} images, medians of {args.timing}, alternating): compiled model "
          f"{result['a_s']:.2f} s, compiled routed module {result['b_s']:.2f} s: {result['speedup']:.2f}x for a FLOP "
          f"ratio of {1 / frac:.2f}x ({result['speedup'] * frac:.2f} of it)")


if __name__ == "__main__":
    main()
