"""Profile a reference model, solve plans at several budgets, draw their heat maps.

Writes ``docs/plans/<model>_<budget>.png`` and ``docs/plans/<model>.md`` (the plans' action
counts, predicted FLOPs and error, the profile's cost in generations and the rank correlation
of modelled against measured final-output error).

    python examples/plan_digits.py --model digits-dit --budgets 0.8 0.5 0.35 0.25 --probes 12
"""

from __future__ import annotations

import argparse
import datetime
import platform
import warnings
from pathlib import Path

import torch

import dit_opt
from dit_opt import zoo
from dit_opt.bench import sampling
from dit_opt.plan import ActionKind
from solvers import solve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-dit", choices=zoo.available())
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5, 0.35, 0.25])
    ap.add_argument("--labels", type=int, default=10, help="calibration samples (the classes in turn)")
    ap.add_argument("--probes", type=int, default=12, help="single actions checked end to end")
    ap.add_argument("--out", type=Path, default=Path("docs/plans"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    sampler = zoo.load(args.model)
    model = sampler.transformer
    calibration = sampling(sampler, args.labels, seed=1)
    prof = dit_opt.profile(model, calibration, probes=args.probes)
    args.out.mkdir(parents=True, exist_ok=True)
    rep = prof.report
    val = rep.get("validation", {})
    lines = [
        f"# Plans for `{args.model}`",
        "",
        f"Made by `python examples/plan_digits.py --model {args.model} --budgets "
        f"{' '.join(map(str, args.budgets))} --labels {args.labels} --probes {args.probes}` on "
        f"{datetime.date.today()} ({platform.machine()}, {torch.get_num_threads()} threads, CPU).",
        "",
        f"Profile: {len(prof.timesteps)} steps x {len(prof.units)} blocks, {args.labels} calibration samples; "
        f"cost {rep['cost_in_generations']:.1f} x one plain calibration run "
        f"({rep['profile_seconds']:.1f} s against {rep['plain_calibration_seconds']:.1f} s), "
        f"{args.probes} end-to-end probes included.",
        "",
        f"Rank correlation (Spearman) of the modelled error of single actions against the measured "
        f"final-output error: **{val.get('spearman', float('nan')):.3f}** (p = {val.get('pvalue', float('nan')):.2g}, "
        f"{len(val.get('probes', []))} probes).",
        "",
        "| budget | solver status | predicted FLOPs % | predicted error | compute | reuse | prune | width | skip |"
        " heat map |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in args.budgets:
        plan = solve(prof.to_problem(b), "cpsat", relative_gap=0.005, time_limit_s=10.0)
        png = args.out / f"{args.model}_{b}.png"
        plan.heatmap(png, title=f"{args.model}, budget {b}")
        c = plan.counts()
        lines.append(
            f"| {b} | {plan.status} | {100 * plan.flop_fraction:.2f} | {plan.predicted_error:.4g} | "
            + " | ".join(str(c[k]) for k in ActionKind)
            + f" | [{png.name}]({png.name}) |"
        )
        print(plan.summary())
    lines += ["", "Probes (step, block, action, modelled, measured):", ""]
    lines += [f"- {p['step']}, {p['unit']}, {p['action']}: {p['modelled']:.3g} vs {p['measured']:.3g}"
              for p in val.get("probes", [])]
    (args.out / f"{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
