"""Worked example: optimise a shipped reference model, inspect, save, load, generate.

    python examples/quickstart.py --budget 0.5 --out out/quickstart
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import dit_opt
from dit_opt import zoo
from dit_opt.bench import with_transformer
from dit_opt.metrics import psnr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-dit", choices=zoo.available())
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=Path("out/quickstart"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    # 1. A sampler (diffusers scheduler + transformer) and a calibration that samples with any module.
    sampler = zoo.load(args.model)
    model = sampler.transformer

    def calibration(module):
        return with_transformer(sampler, module, class_labels=sampler.labels(sampler.num_classes), seed=1)

    # 2. Optimise: capture -> FLOPs -> sensitivity profile -> CP-SAT plan -> rewritten graphs.
    opt = dit_opt.optimize(model, budget=args.budget, calibration=calibration, compile=False)
    print(opt.plan.summary())
    print({k: f"{v:.1f} s" for k, v in opt.step_times.items()})

    # 3. Inspect the graph of one step that reuses the cache.
    step = next(t for t, row in enumerate(opt.plan.actions) if any(a.kind.value == "reuse" for a in row))
    print(f"--- step {step} ---")
    print("\n".join(line for line in opt.graph(step).code.splitlines() if "reuse" in line or "cache" in line))

    # 4. Save (JSON + safetensors, no pickle), load onto the same model without solving again.
    opt.save(args.out)
    loaded = dit_opt.load(args.out, model, compile=False)

    # 5. Generate with the loaded module, exactly as with the original.
    labels = sampler.labels(sampler.num_classes)   # one image per class
    full = with_transformer(sampler, model, class_labels=labels, seed=0)
    fast = with_transformer(sampler, loaded, class_labels=labels, seed=0)
    flops = 100 * loaded.stats()["flop_fraction"]
    print(f"PSNR against the full model: {psnr(fast, full):.2f} dB; FLOPs: {flops:.1f} %")
    print(f"saved to {args.out}: {sorted(p.name for p in args.out.iterdir())}")


if __name__ == "__main__":
    main()
