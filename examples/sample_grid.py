"""Draw a grid of samples of each reference model: one row per digit, 8 samples per row.

    python examples/sample_grid.py            # writes docs/samples_digits-dit.png and docs/samples_digits-mmdit.png

Each model uses its default sampler (steps and guidance scale from its JSON) unless overridden.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_opt import zoo  # noqa: E402


def make_grid(images: torch.Tensor, rows: int, scale: int = 4, pad: int = 2) -> torch.Tensor:
    """Tile ``(rows * cols, 1, H, W)`` images in ``[0, 1]`` into one ``(H', W')`` array.

    Args:
        images: The images, row-major.
        rows: Number of rows.
        scale: Nearest-neighbour upscaling factor, so 16x16 digits stay visible.
        pad: Background (0) pixels between tiles, after scaling.

    Returns:
        A 2-D float tensor in ``[0, 1]``.
    """
    n, _, h, w = images.shape
    cols = n // rows
    big = F.interpolate(images.float().cpu(), scale_factor=scale, mode="nearest")[:, 0]
    big = F.pad(big, (pad, 0, pad, 0), value=0.0)
    hh, ww = big.shape[1:]
    grid = big.view(rows, cols, hh, ww).permute(0, 2, 1, 3).reshape(rows * hh, cols * ww)
    return F.pad(grid, (0, pad, 0, pad), value=0.0)


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

    import matplotlib.pyplot as plt

    for name in args.models:
        sampler = zoo.load(name)
        labels = [c for c in range(10) for _ in range(args.per_class)]
        images = sampler(labels, seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
        # Digits are drawn dark on light, as on paper.
        grid = 1.0 - make_grid(images, rows=10)
        path = Path(args.out_dir) / f"samples_{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        plt.imsave(path, grid.numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        print(f"{name}: wrote {path} (rows = digits 0..9, seed {args.seed})")


if __name__ == "__main__":
    main()
