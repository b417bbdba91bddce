"""Image grids of the reference models' samples (grey digits or RGB crops), as PNG files.

Example:
    >>> from dit_opt import images, zoo
    >>> sampler = zoo.load("digits-dit")
    >>> x = sampler([c for c in range(10) for _ in range(4)], num_inference_steps=10)
    >>> images.save_grid(x, rows=10, path="digits.png", invert=True)   # one row per digit
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["make_grid", "save_grid"]


def make_grid(images: torch.Tensor, rows: int, scale: int = 4, pad: int = 2) -> torch.Tensor:
    """Tile ``(rows * cols, C, H, W)`` images in ``[0, 1]`` into one ``(H', W', C)`` array.

    Args:
        images: The images, row-major; ``C`` is 1 (grey) or 3 (RGB).
        rows: Number of rows; must divide the number of images.
        scale: Nearest-neighbour upscaling factor, so that 16x16 digits stay visible.
        pad: Background (0) pixels between tiles, after scaling.

    Returns:
        A float tensor ``(H', W', C)`` in ``[0, 1]``.

    Raises:
        ValueError: ``rows`` does not divide the number of images.
    """
    n, c, _, _ = images.shape
    if rows < 1 or n % rows:
        raise ValueError(f"make_grid: {n} images do not fill {rows} rows evenly; pass a multiple of rows.")
    cols = n // rows
    big = F.interpolate(images.float().cpu().clamp(0.0, 1.0), scale_factor=scale, mode="nearest")
    big = F.pad(big, (pad, 0, pad, 0), value=0.0)
    hh, ww = big.shape[-2:]
    grid = big.view(rows, cols, c, hh, ww).permute(0, 3, 1, 4, 2).reshape(rows * hh, cols * ww, c)
    return F.pad(grid, (0, 0, 0, pad, 0, pad), value=0.0)


def save_grid(images: torch.Tensor, rows: int, path: str | Path, invert: bool = False, scale: int = 4) -> Path:
    """Write :func:`make_grid` of ``images`` as a PNG.

    Args:
        images: ``(rows * cols, C, H, W)`` in ``[0, 1]``.
        rows: Number of rows (e.g. one per class).
        path: Where to write the PNG (parent folders are created).
        invert: Draw grey images dark on light (digits, as on paper).
        scale: Nearest-neighbour upscaling factor.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = make_grid(images, rows, scale=scale)
    if invert:
        grid = 1.0 - grid
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if grid.shape[-1] == 1:
        plt.imsave(path, grid[..., 0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    else:
        plt.imsave(path, grid.numpy())
    return path
