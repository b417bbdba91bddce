"""32x32 RGB crops of the natural images that scikit-image bundles: the data of ``crops-pixart``.

Each class is one source image from ``skimage.data`` (files that ship inside the scikit-image
wheel, so nothing is downloaded). Every image is converted to RGB (grey ones are repeated over
the three channels) and resized with antialiasing so that its shorter side is
:data:`SHORT_SIDE` pixels: a 32x32 crop then covers about a quarter of the image's height, enough
to show the image's texture and colour. The split is spatial and fixed: the bottom
:data:`TEST_ROWS` rows of every resized image are held out, the rows above them are for training.
No training crop overlaps a held-out pixel.

Example:
    >>> from dit_opt.zoo import crops
    >>> x, y = crops.real_crops("test")
    >>> x.shape, int(y.max()) + 1 == len(crops.CLASSES)
    (torch.Size([640, 3, 32, 32]), True)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["CLASSES", "CROP_SIZE", "SHORT_SIDE", "TEST_ROWS", "source_images", "real_crops", "random_crops"]

#: The source images, in class order: ``skimage.data.<name>()``.
CLASSES: tuple[str, ...] = (
    "astronaut",
    "brick",
    "chelsea",
    "coffee",
    "grass",
    "hubble_deep_field",
    "immunohistochemistry",
    "rocket",
)
CROP_SIZE = 32
#: Shorter side of every source image after resizing, in pixels.
SHORT_SIDE = 128
#: Rows at the bottom of every resized image that only the test split uses.
TEST_ROWS = 40
_TEST_PER_CLASS = 80


@functools.lru_cache(maxsize=1)
def source_images() -> tuple[torch.Tensor, ...]:
    """The resized source images, one per class.

    Returns:
        float32 tensors ``(3, H, W)`` in ``[0, 1]``, ``min(H, W) == SHORT_SIDE``, in the order of
        :data:`CLASSES`.

    Raises:
        ImportError: scikit-image is not installed (``pip install scikit-image``).
    """
    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("the crops-pixart data needs scikit-image: pip install scikit-image") from exc
    out = []
    for name in CLASSES:
        img = torch.from_numpy(getattr(skimage.data, name)().copy()).float() / 255.0
        img = img[..., None].expand(*img.shape, 3) if img.dim() == 2 else img[..., :3]
        img = img.permute(2, 0, 1)[None]
        h, w = img.shape[-2:]
        scale = SHORT_SIDE / min(h, w)
        size = (round(h * scale), round(w * scale))
        img = F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)
        out.append(img[0].clamp(0.0, 1.0).contiguous())
    return tuple(out)


def _region(img: torch.Tensor, split: str) -> torch.Tensor:
    if split == "train":
        return img[:, : img.shape[1] - TEST_ROWS]
    return img[:, img.shape[1] - TEST_ROWS:]


def random_crops(
    n: int, generator: torch.Generator, split: str = "train", labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops of the training (or test) region, with uniformly drawn classes.

    Args:
        n: Number of crops.
        generator: CPU generator that draws classes and positions (fixes the result).
        split: ``"train"`` or ``"test"``: which region the crops come from.
        labels: Classes to crop from, ``(n,)``; drawn uniformly when ``None``.

    Returns:
        ``(images (n, 3, 32, 32) in [0, 1], labels (n,) int64)``.

    Raises:
        ValueError: Unknown split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if labels is None:
        labels = torch.randint(0, len(CLASSES), (n,), generator=generator)
    regions = [_region(img, split) for img in source_images()]
    out = torch.empty(n, 3, CROP_SIZE, CROP_SIZE)
    for i, c in enumerate(labels.tolist()):
        r = regions[c]
        top = int(torch.randint(0, r.shape[1] - CROP_SIZE + 1, (1,), generator=generator))
        left = int(torch.randint(0, r.shape[2] - CROP_SIZE + 1, (1,), generator=generator))
        out[i] = r[:, top:top + CROP_SIZE, left:left + CROP_SIZE]
    return out, labels.long()


def real_crops(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed reference crops of a split: 80 per class, drawn with seed 0 (test) or 1 (train).

    Args:
        split: ``"test"`` (the held-out bottom rows; the reference for Frechet distances and the
            classifier's held-out accuracy) or ``"train"``.

    Returns:
        ``(images (640, 3, 32, 32) in [0, 1], labels (640,) int64)``, classes in blocks of 80.

    Raises:
        ValueError: Unknown split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    labels = torch.arange(len(CLASSES)).repeat_interleave(_TEST_PER_CLASS)
    gen = torch.Generator().manual_seed(0 if split == "test" else 1)
    return random_crops(len(labels), gen, split, labels)
