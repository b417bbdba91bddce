"""Wall-clock speedup of optimised reference models, next to their FLOP ratio.

Both sides are compiled (the original with ``torch.compile``, dit-opt with its regional
compilation), run alternately in one process after a warm-up; medians are compared.

    python examples/speed.py --model digits-dit --budgets 0.5 0.25 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import platform
import warnings

import torch

import dit_opt
from dit_opt import zoo
from dit_opt.bench import flop_fraction, sampling, time_alternating


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-dit", choices=zoo.available())
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--samples", type=int, default=10, help="samples per generation (the classes in turn)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="time eager modules instead")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    sampler = zoo.load(args.model)
    model = sampler.transformer
    calibration = sampling(sampler, args.samples, seed=1)
    gen = sampling(sampler, args.samples, seed=0)
    prof = dit_opt.profile(model, calibration, probes=0, progress=False)
    baseline = model if args.no_compile else torch.compile(model)
    print(f"{args.model}, {args.samples} samples, {platform.machine()} CPU, {torch.get_num_threads()} threads, "
          f"{datetime.date.today()}, compile={not args.no_compile}")
    print("| budget | FLOP fraction (counted) | FLOP ratio | wall-clock speedup | speedup / FLOP ratio |")
    print("|---|---|---|---|---|")
    for b in args.budgets:
        eager = dit_opt.optimize(model, b, calibration=prof, compile=False, progress=False,
                                 example_inputs=sampler.example_inputs(batch_size=2 * args.samples))
        frac = flop_fraction(gen, model, eager)
        opt = eager if args.no_compile else dit_opt.optimize(
            model, b, calibration=prof, compile=True, progress=False,
            example_inputs=sampler.example_inputs(batch_size=2 * args.samples))
        t = time_alternating(lambda: gen(baseline), lambda opt=opt: gen(opt), repeats=args.repeats)  # noqa: B023
        ratio = 1.0 / frac
        print(f"| {b} | {frac:.4f} | {ratio:.2f}x | {t['speedup']:.2f}x ({t['a_s']:.2f} s -> {t['b_s']:.2f} s) | "
              f"{t['speedup'] / ratio:.2f} |")


if __name__ == "__main__":
    main()
