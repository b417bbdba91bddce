"""Tiny CNNs that classify the reference models' images; their features drive the Frechet distance.

The classifiers are the judges of sample quality for the reference models (see
:mod:`dit_opt.metrics`): :class:`DigitClassifier` for the 1x16x16 digits, :class:`CropClassifier`
for the 3x32x32 crops of ``crops-pixart``. They are deliberately small so that they train in
about a minute on a CPU and load instantly in tests; the trained weights ship as
``dit_opt/zoo/weights/<name>.safetensors`` with their held-out accuracy recorded in
``<name>.json`` (``digits-classifier``, ``crops-classifier``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitClassifier", "CropClassifier", "FEATURE_DIM"]

#: Width of the penultimate layer, used as the feature space of the Frechet distance.
FEATURE_DIM = 64


def _stage(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]


class _SmallCNN(nn.Module):
    """Conv-ReLU-pool stages, then Linear(FEATURE_DIM) with ReLU (the features), then the class head."""

    def __init__(self, channels: tuple[int, ...], image_size: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*[m for a, b in zip(channels, channels[1:], strict=False) for m in _stage(a, b)])
        side = image_size // 2 ** (len(channels) - 1)
        self.fc1 = nn.Linear(channels[-1] * side * side, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations.

        Args:
            images: ``(N, C, H, W)`` in ``[0, 1]``, the shape the classifier was built for.

        Returns:
            ``(N, FEATURE_DIM)`` non-negative features.
        """
        # Centre the inputs: the generators' outputs and the real images share the [0, 1] range.
        h = self.conv(images * 2.0 - 1.0)
        return torch.relu(self.fc1(h.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)`` of images ``(N, C, H, W)`` in ``[0, 1]``."""
        return self.fc2(self.features(images))


class DigitClassifier(_SmallCNN):
    """Conv(16) - pool - Conv(32) - pool - Linear(64) - Linear(10) on 1x16x16 images in [0, 1].

    Example:
        >>> model = DigitClassifier()
        >>> model(torch.rand(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__((1, 16, 32), image_size=16, num_classes=10)


class CropClassifier(_SmallCNN):
    """Three Conv-ReLU-pool stages (32, 64, 64 channels) - Linear(64) - Linear(8) on 3x32x32 crops.

    Args:
        num_classes: Number of crop classes (8, :data:`dit_opt.zoo.crops.CLASSES`).

    Example:
        >>> model = CropClassifier()
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 8])
    """

    def __init__(self, num_classes: int = 8) -> None:
        super().__init__((3, 32, 64, 64), image_size=32, num_classes=num_classes)
