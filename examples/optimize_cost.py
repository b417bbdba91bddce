"""What ``dit_opt.optimize`` costs on each reference model, in plain calibration generations.

One calibration generation (the benchmark's: ``--samples`` images of seed 1000) is the unit:
``optimize`` (``granularity="auto"``, as the benchmark runs it) profiles on it and measures its
candidate plans on it; the total is the wall time of all of ``optimize`` (capture, solving and
lowering too) over that unit (``opt.report``), after one plain generation that warms the
process up (the unit is then a steady-state generation). Prints a markdown table (the one in ``BENCHMARKS.md``).

    python examples/optimize_cost.py --models digits-dit digits-mmdit crops-pixart --threads 2
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import dit_opt
from dit_opt import zoo
from dit_opt.bench import with_transformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=zoo.available())
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=None,
                        help="images per calibration generation (default: 10, crops-pixart 4, as the benchmark)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | calibration | one generation (s) | profile (generations) | selection runs | "
          "selection (generations) | capture, solving, lowering (generations) | total (generations) | wall time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        sampler = zoo.load(name)
        n = args.samples or (4 if name == "crops-pixart" else 10)
        labels = sampler.labels(n)

        def calibration(module, sampler=sampler, labels=labels):
            return with_transformer(sampler, module, class_labels=labels, seed=1000)

        # one plain generation first: the unit is then a steady-state generation, not a fresh
        # process's first (slower by up to a third here), which would flatter the count
        calibration(sampler.transformer)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = dit_opt.optimize(sampler.transformer, args.budget, calibration=calibration, compile=False,
                                   progress=False, granularity="auto")
        r = opt.report
        print(f"| {name} | {n} images, {sampler.num_inference_steps} steps | {r['plain_calibration_seconds']:.1f} | "
              f"{r['profile_generations']:.1f} | {r['selection_runs']} | {r['selection_generations']:.1f} | "
              f"{r['other_generations']:.1f} | **{r['generations']:.1f}** | {time.perf_counter() - start:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
