"""Draw a grid of samples of each reference model: one row per class, 8 samples per row.

    python examples/sample_grid.py            # writes docs/samples_<model>.png for every shipped model

Each model uses its default sampler (steps and guidance scale from its JSON) unless overridden.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_opt import zoo  # noqa: E402
from dit_opt.images import save_grid  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=zoo.available(), choices=zoo.available())
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="docs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    for name in args.models:
        sampler = zoo.load(name)
        labels = [c for c in range(sampler.num_classes) for _ in range(args.per_class)]
        images = sampler(labels, seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
        # Digits are drawn dark on light, as on paper; RGB crops as they are.
        path = save_grid(images, sampler.num_classes, Path(args.out_dir) / f"samples_{name}.png",
                         invert=sampler.channels == 1)
        print(f"{name}: wrote {path} (one row per class, seed {args.seed})")


if __name__ == "__main__":
    main()
