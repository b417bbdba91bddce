"""Regular rhythms that spend the whole budget: a long warm-up, or a full tail, instead of a fill.

``solvers.uniform`` tries warm-ups up to 4 and :func:`solvers.fill.fill` spends what a rhythm
leaves of the budget on the computes of least modelled error, which breaks the rhythm's even
spacing. This measures the regular alternatives at one budget, each at the most computes that
fit it, at module granularity with a forecast at every cache read (TaylorSeer's policy, the
order measured best):

* ``warm-up``: every step computes up to ``w``, then every ``N``-th (``solvers.uniform.schedule``);
* ``tail``: the first ``w`` steps, then every ``N``-th, then every step from ``s`` on;

next to the plan ``dit_opt.optimize`` keeps with the benchmark's settings. For each: the FLOP
fraction, the calibration's pooled relative error (what :mod:`dit_opt.selection` ranks by), its
per-sample error (:func:`dit_opt.selection.sample_error`, in dB), the calibration's and the
evaluation's PSNR (mean over images, as the benchmark reports it).

    python examples/rhythm_tails.py --model digits-mmdit --budget 0.7
"""

from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
import torch

import dit_opt
from dit_opt import metrics, zoo
from dit_opt.bench import rhythm_study
from dit_opt.selection import measure_outputs, relative_error, sample_error
from solvers import uniform


def masks(num_steps: int, computes: int) -> dict[str, np.ndarray]:
    """Every regular rhythm of the two families with exactly ``computes`` computes."""
    t = np.arange(num_steps)
    out: dict[str, np.ndarray] = {}
    for n in (2, 3):
        for w in range(1, num_steps):
            for p in range(n):
                m = uniform.schedule(num_steps, w, n, p)
                if m.sum() == computes:
                    out.setdefault(f"warm-up: w={w}, N={n}, p={p}", m)
        for w in (1, 2, 3):
            for s in range(num_steps // 2, num_steps):
                m = uniform.schedule(num_steps, w, n, 0) | (t >= s)
                if m.sum() == computes:
                    out.setdefault(f"tail: w={w}, N={n}, every step from {s}", m)
    seen: dict[tuple, str] = {}
    return {k: m for k, m in out.items() if seen.setdefault(tuple(m), k) == k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-mmdit", choices=zoo.available())
    parser.add_argument("--budget", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    study = rhythm_study(args.model, args.budget)
    problem, ref = study.problem, study.reference

    def row(label: str, module) -> None:
        cal = measure_outputs(study.calibration, module)
        psnr = metrics.psnr(study.evaluation(module), study.full)
        print(f"| {label} | {module.plan.flop_fraction:.3f} | {relative_error(cal, ref):.3g} | "
              f"{10 * math.log10(sample_error(cal, ref)):.2f} | {metrics.psnr(torch.cat(cal), torch.cat(ref)):.2f} | "
              f"{psnr:.2f} |", flush=True)

    print(f"### {args.model}, budget {args.budget}\n")
    print("| plan | FLOP fraction | pooled error | per-sample error (dB) | calibration PSNR (dB) | "
          "evaluation PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    kept = dit_opt.optimize(study.model, args.budget, calibration=study.profile, compile=False, progress=False,
                            example_inputs=study.sampler.example_inputs(batch_size=40),  # the evaluation's CFG batch
                            select=study.calibration, granularity="auto")
    row(f"kept by optimize: {kept.plan.solver}", kept)
    steps = problem.num_steps
    for computes in range(int(args.budget * steps), 0, -1):
        found = False
        for label, mask in masks(steps, computes).items():
            try:
                plan = problem.to_plan(problem.with_forecasts(study.cells(mask)), label, "HEURISTIC", 0.0)
            except ValueError:  # over the budget
                continue
            found = True
            row(f"{label} ({computes} computes)", dit_opt.OptimizedTransformer(study.model, plan,
                                                                               profile=study.profile, compile=False))
        if found:
            break


if __name__ == "__main__":
    main()
