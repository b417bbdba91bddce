"""Reuse across guidance branches (``CFG``) on a reference model: its profiled error against the
reuse's, and CP-SAT's block-level plan with and without it, measured end to end.

The profile is calibrated as the benchmark's (10 samples, seed 1000); PSNR is against the full
model on the benchmark's evaluation (20 samples, seed 0).

    python examples/cfg_reuse.py --model digits-dit --budgets 0.5 0.25
"""

from __future__ import annotations

import argparse
import warnings

import torch

import dit_opt
from dit_opt import metrics, zoo
from dit_opt.bench import sampling
from dit_opt.flops import flop_counter
from dit_opt.plan import ActionKind
from dit_opt.sensitivity import ACTION_FAMILIES
from solvers import solve, solver_defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-dit", choices=zoo.available())
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    sampler = zoo.load(args.model)
    model = sampler.transformer
    calibration, evaluation = sampling(sampler, 10, seed=1000), sampling(sampler, 20, seed=0, reset=True)

    def generate(module):
        with torch.no_grad(), flop_counter() as fc:
            images = evaluation(module)
        return images, fc.get_total_flops()

    prof = dit_opt.profile(model, calibration, probes=0, progress=False)
    if prof.e_cfg is None:
        raise SystemExit(f"{args.model}: the calibration ran no guidance batches, so there is no CFG to measure")
    amp = prof.report["cfg_amplification"]
    print(f"{args.model}: derived half {prof.cfg_branch} (of 0, 1); an error in it alone moves the sampler's "
          f"update {amp:.2f} times what the same error in both halves does (the weight of the CFG errors)")
    print("| cache age | reuse error | CFG error at the block | ratio | CFG error weighted | ratio |")
    print("|---|---|---|---|---|---|")
    for n in (1, 2, 3):
        reuse, cfg = prof.e_reuse[n:, :, n].mean(), prof.e_cfg[n:, :, n].mean()
        print(f"| {n} | {reuse:.2e} | {cfg / amp:.2e} | {reuse * amp / cfg:.1f} | {cfg:.2e} | {reuse / cfg:.2f} |")
    full, full_flops = generate(model)
    print("\n| budget | actions | CFG actions | counted FLOP fraction | PSNR (dB) |")
    print("|---|---|---|---|---|")
    for budget in args.budgets:
        for actions in (tuple(a for a in ACTION_FAMILIES if a != "cfg"), ACTION_FAMILIES):
            plan = solve(prof.to_problem(budget, actions=actions), "cpsat", **solver_defaults("cpsat", None))
            images, flops = generate(dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False))
            print(f"| {budget} | {'with' if 'cfg' in actions else 'without'} cfg | {plan.counts()[ActionKind.CFG]} | "
                  f"{flops / full_flops:.3f} | {metrics.psnr(images, full):.2f} |", flush=True)


if __name__ == "__main__":
    main()
