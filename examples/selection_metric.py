"""How well the calibration ranks the candidate plans: pooled error against per-sample error.

``dit_opt.optimize`` measures its candidate plans on the calibration and keeps the closest to
the full model. This example runs ``optimize`` as the benchmark does (profile and candidates on
the calibration, 10 images, seed 1000, ``granularity="auto"``), records every candidate's
calibration images, and measures each candidate on the evaluation (20 images, seed 0). For each
budget it prints every candidate with two calibration scores: the pooled relative squared error
(``sum ||x - ref||^2 / sum ||ref||^2``, :func:`dit_opt.selection.relative_error`) and the
per-sample one (the mean over samples of their relative errors in dB, the statistic a per-image
PSNR averages: :func:`dit_opt.selection.sample_error`); ``optimize`` ranks by the first. Then
which candidate each score keeps, with its evaluation PSNR, and how well each ranks the
candidates against the evaluation (``docs/solvers.md`` has the figures). With ``--closed-loop N``
the solver's plan is re-solved from its own trajectory as well (:mod:`dit_opt.closed_loop`), and
its re-solves are candidates too.

    python examples/selection_metric.py --model digits-mmdit --budgets 0.7 0.5 0.35 0.25 0.2 --threads 1
    python examples/selection_metric.py --model crops-pixart --samples 8 --calibration-samples 4
    python examples/selection_metric.py --model digits-mmdit --closed-loop 3
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from scipy.stats import spearmanr

import dit_opt
from dit_opt import metrics, zoo
from dit_opt.bench import sampling
from dit_opt.calibration import returned_tensors
from dit_opt.selection import relative_error, sample_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-mmdit", choices=zoo.available())
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.35, 0.25, 0.2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=20, help="evaluation samples (the benchmark's --samples)")
    parser.add_argument("--calibration-samples", type=int, default=10, help="the benchmark's --calibration-samples")
    parser.add_argument("--closed-loop", type=int, default=0,
                        help="optimize's closed_loop: re-solves of the solver's plan measured as candidates too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    sampler = zoo.load(args.model)
    model = sampler.transformer
    calibration = sampling(sampler, args.calibration_samples, seed=1000, reset=True)
    evaluation = sampling(sampler, args.samples, seed=0, reset=True)
    prof = dit_opt.profile(model, calibration, probes=0, progress=False)
    full = evaluation(model)
    for budget in args.budgets:
        outputs: list[list[torch.Tensor]] = []

        def recording(module: torch.nn.Module, outputs: list = outputs) -> torch.Tensor:
            images = calibration(module)
            outputs.append(returned_tensors(images))
            return images

        opt = dit_opt.optimize(model, budget, calibration=prof, select=recording, compile=False, progress=False,
                               granularity="auto", closed_loop=args.closed_loop)
        ref, runs = outputs[0], outputs[1:]
        print(f"\n### {args.model}, budget {budget}\n")
        print("| candidate | FLOP fraction | pooled error | per-sample error (dB) | evaluation PSNR (dB) |")
        print("|---|---|---|---|---|")
        rows = []
        for cand, got in zip(opt.selection, runs, strict=True):
            module = dit_opt.OptimizedTransformer(model, cand.plan, profile=prof, compile=False)
            psnr = metrics.psnr(evaluation(module), full)
            rows.append((cand.plan.solver, relative_error(got, ref), 10 * np.log10(sample_error(got, ref)), psnr))
            print(f"| {rows[-1][0]} | {cand.plan.flop_fraction:.3f} | {rows[-1][1]:.3g} | {rows[-1][2]:.2f} | "
                  f"{psnr:.2f} |", flush=True)
        by_pooled, by_sample = min(rows, key=lambda r: r[1]), min(rows, key=lambda r: r[2])
        best = max(rows, key=lambda r: r[3])
        psnrs = [-r[3] for r in rows]
        pooled_rho, sample_rho = (spearmanr([r[i] for r in rows], psnrs).statistic for i in (1, 2))
        print(f"\nkept by the pooled error: {by_pooled[0]} ({by_pooled[3]:.2f} dB); by the per-sample error: "
              f"{by_sample[0]} ({by_sample[3]:.2f} dB); the evaluation's best: {best[0]} ({best[3]:.2f} dB). "
              f"Rank correlation with the evaluation (Spearman): pooled {pooled_rho:.2f}, per-sample {sample_rho:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
