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


class DigitClassifier(nn.Module):
    """Conv(16) - pool - Conv(32) - pool - Linear(64) - Linear(10) on 1x16x16 images in [0, 1].

    Example:
        >>> model = DigitClassifier()
        >>> model(torch.rand(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(32 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations.

        Args:
            images: ``(N, 1, 16, 16)`` in ``[0, 1]``.

        Returns:
            ``(N, FEATURE_DIM)`` non-negative features.
        """
        # Centre the inputs: the generators' outputs and the real digits share the [0, 1] range.
        h = self.conv(images * 2.0 - 1.0)
        return torch.relu(self.fc1(h.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits.

        Args:
            images: ``(N, 1, 16, 16)`` in ``[0, 1]``.

        Returns:
            ``(N, 10)`` logits.
        """
        return self.fc2(self.features(images))


class CropClassifier(nn.Module):
    """Three Conv-ReLU-pool stages (32, 64, 64 channels) - Linear(64) - Linear(8) on 3x32x32 crops.

    Args:
        num_classes: Number of crop classes (8, :data:`dit_opt.zoo.crops.CLASSES`).

    Example:
        >>> model = CropClassifier()
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 8])
    """

    def __init__(self, num_classes: int = 8) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations.

        Args:
            images: ``(N, 3, 32, 32)`` in ``[0, 1]``.

        Returns:
            ``(N, FEATURE_DIM)`` non-negative features.
        """
        h = self.conv(images * 2.0 - 1.0)
        return torch.relu(self.fc1(h.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits.

        Args:
            images: ``(N, 3, 32, 32)`` in ``[0, 1]``.

        Returns:
            ``(N, num_classes)`` logits.
        """
        return self.fc2(self.features(images))
