"""Fidelity and sample-quality metrics for the reference models' images.

Two families, following the project's measuring protocol (``docs/reference_models.md``):

* **Fidelity** of an optimised model's output against the full-compute output from the same
  noise: :func:`psnr` and :func:`ssim`, on batches ``(N, C, H, W)``, averaged over the batch.
* **Sample quality** of generated images: :func:`class_accuracy` (does a small trained
  classifier agree with the conditioning class?) and :func:`frechet_distance` between the
  classifier's penultimate features of two image sets (an FID-like score; not comparable with
  Inception FIDs). The classifier is chosen by the image shape: 1x16x16 digits are judged by
  ``digits-classifier``, 3x32x32 crops (``crops-pixart``) by ``crops-classifier``.
  :func:`real_digits` gives the real digits, upsampled to 16x16, with a fixed train/test split,
  as the reference set; :func:`dit_opt.zoo.crops.real_crops` the crops.

Example:
    >>> from dit_opt import metrics
    >>> real, labels = metrics.real_digits("test")
    >>> metrics.class_accuracy(real, labels) > 0.9
    True
    >>> metrics.psnr(real, real)
    inf
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from dit_opt.zoo.classifier import CropClassifier, DigitClassifier

__all__ = [
    "psnr",
    "ssim",
    "real_digits",
    "CLASSIFIERS",
    "classifier_for",
    "load_classifier",
    "classifier_info",
    "classifier_features",
    "class_accuracy",
    "frechet_distance",
    "SSIM_WINDOW_SIZE",
    "SSIM_SIGMA",
]

#: SSIM Gaussian window. The usual 11x11 window (sigma 1.5) is designed for large images; on
#: 16x16 digits it would leave a 6x6 map dominated by the window edges. A 7x7 window with the
#: same sigma keeps the local character of SSIM and leaves a 10x10 map ("valid" convolution).
SSIM_WINDOW_SIZE = 7
SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03

_WEIGHTS_DIR = Path(__file__).resolve().parent / "zoo" / "weights"
#: The shipped judges: name -> (image shape (C, H, W) they classify, architecture).
CLASSIFIERS: dict[str, tuple[tuple[int, int, int], type[nn.Module]]] = {
    "digits-classifier": ((1, 16, 16), DigitClassifier),
    "crops-classifier": ((3, 32, 32), CropClassifier),
}
# The split is a property of the data set, fixed here so that every caller (training, tests,
# evaluation) sees the same held-out digits.
_TEST_FRACTION = 0.25
_SPLIT_SEED = 0


def _check_pair(a: torch.Tensor, b: torch.Tensor, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"{fn}: the two batches differ in shape, {tuple(a.shape)} vs {tuple(b.shape)}; "
                         "compare images of the same shape (N, C, H, W).")
    if a.dim() != 4:
        raise ValueError(f"{fn}: expected batches of shape (N, C, H, W), got {tuple(a.shape)}; "
                         "add a batch dimension with `x[None]` for a single image.")
    # float64 so that the known cases (identical images, constant offsets) come out exact.
    return a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, computed per image and averaged over the batch.

    Args:
        a: Images ``(N, C, H, W)``.
        b: Images of the same shape.
        data_range: Difference between the largest and smallest possible value (1.0 for [0, 1]).

    Returns:
        Mean over the batch of ``10 log10(data_range^2 / MSE_i)``; ``inf`` when every image pair
        is identical (and also when any single pair is, since the mean of values containing
        ``inf`` is ``inf``).

    Raises:
        ValueError: The shapes differ or are not 4-D, or ``data_range`` is not positive.
    """
    if data_range <= 0:
        raise ValueError(f"psnr: data_range must be positive, got {data_range}.")
    a, b = _check_pair(a, b, "psnr")
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(data_range**2 / mse.numpy())
    return float(values.mean())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Structural similarity with a Gaussian window, averaged over pixels, channels and batch.

    The window is :data:`SSIM_WINDOW_SIZE` x :data:`SSIM_WINDOW_SIZE` with standard deviation
    :data:`SSIM_SIGMA` (7x7, 1.5), applied without padding; images smaller than the window are
    rejected. Constants ``K1 = 0.01``, ``K2 = 0.03`` as in Wang et al. (2004).

    Args:
        a: Images ``(N, C, H, W)``.
        b: Images of the same shape.
        data_range: Difference between the largest and smallest possible value.

    Returns:
        Mean SSIM: 1.0 for identical images, lower for dissimilar ones; symmetric in ``a``, ``b``.

    Raises:
        ValueError: The shapes differ, are not 4-D, or are smaller than the window; or
            ``data_range`` is not positive.
    """
    if data_range <= 0:
        raise ValueError(f"ssim: data_range must be positive, got {data_range}.")
    a, b = _check_pair(a, b, "ssim")
    n, c, h, w = a.shape
    if h < SSIM_WINDOW_SIZE or w < SSIM_WINDOW_SIZE:
        raise ValueError(f"ssim: images of {h}x{w} are smaller than the {SSIM_WINDOW_SIZE}x"
                         f"{SSIM_WINDOW_SIZE} window; use psnr for such small images.")
    window = _gaussian_window(SSIM_WINDOW_SIZE, SSIM_SIGMA)
    # Channels are treated as separate images: fold them into the batch.
    a = a.reshape(n * c, 1, h, w)
    b = b.reshape(n * c, 1, h, w)
    mu_a, mu_b = F.conv2d(a, window), F.conv2d(b, window)
    var_a = F.conv2d(a * a, window) - mu_a**2
    var_b = F.conv2d(b * b, window) - mu_b**2
    cov = F.conv2d(a * b, window) - mu_a * mu_b
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def _digits_16x16() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    # load_digits stores 8x8 images with integer intensities 0..16.
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return images, torch.tensor(data.target, dtype=torch.long)


@functools.lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = _digits_16x16()
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=_TEST_FRACTION, random_state=_SPLIT_SEED,
                                   stratify=labels.numpy())
    return np.sort(train), np.sort(test)


def real_digits(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits, upsampled bilinearly from 8x8 to 16x16.

    The split is fixed (stratified, 25 % held out, ``random_state=0``): 1347 training and 450 test
    digits. The reference models and the classifier were trained on ``"train"`` only.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 16, 16)`` in ``[0, 1]`` and int64 ``(N,)`` in 0..9.

    Raises:
        ValueError: Unknown split.
    """
    images, labels = _digits_16x16()
    if split == "all":
        return images, labels
    train, test = _split_indices()
    if split == "train":
        idx = train
    elif split == "test":
        idx = test
    else:
        raise ValueError(f"real_digits: unknown split {split!r}; use 'train', 'test' or 'all'.")
    idx_t = torch.from_numpy(idx)
    return images[idx_t], labels[idx_t]


@functools.cache
def load_classifier(name: str = "digits-classifier") -> nn.Module:
    """A shipped classifier, on CPU, in eval mode (loaded once, then cached).

    Args:
        name: A key of :data:`CLASSIFIERS` (``"digits-classifier"``, ``"crops-classifier"``).

    Returns:
        The model; its held-out accuracy is in ``dit_opt/zoo/weights/<name>.json``.

    Raises:
        ValueError: Unknown name.
        FileNotFoundError: The weights are missing; regenerate them with
            ``python examples/train_reference_models.py --model <classifier|crops-classifier>``.
    """
    from safetensors.torch import load_file

    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; shipped: {', '.join(CLASSIFIERS)}.")
    path = _WEIGHTS_DIR / f"{name}.safetensors"
    if not path.exists():
        flag = "classifier" if name == "digits-classifier" else name
        raise FileNotFoundError(f"{name} weights not found at {path}; regenerate them with "
                                f"`python examples/train_reference_models.py --model {flag}`.")
    model = CLASSIFIERS[name][1]()
    model.load_state_dict(load_file(str(path)))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def classifier_info(name: str = "digits-classifier") -> dict:
    """Training metadata of a shipped classifier.

    Args:
        name: A key of :data:`CLASSIFIERS`.

    Returns:
        The contents of ``<name>.json``: held-out accuracy, seed, steps, command.
    """
    return json.loads((_WEIGHTS_DIR / f"{name}.json").read_text())


def classifier_for(images: torch.Tensor, fn: str = "classifier_for") -> str:
    """The name of the classifier that judges images of this shape.

    Args:
        images: ``(N, C, H, W)``: ``(N, 1, 16, 16)`` digits or ``(N, 3, 32, 32)`` crops.
        fn: The caller, named in the error.

    Returns:
        A key of :data:`CLASSIFIERS`.

    Raises:
        ValueError: No shipped classifier takes this shape.
    """
    shape = tuple(images.shape[1:]) if images.dim() == 4 else None
    for name, (want, _) in CLASSIFIERS.items():
        if shape == want:
            return name
    shapes = ", ".join(f"(N, {c}, {h}, {w}) for {n}" for n, ((c, h, w), _) in CLASSIFIERS.items())
    raise ValueError(f"{fn}: expected images of shape {shapes}, in [0, 1]; got {tuple(images.shape)}. "
                     "Resize with F.interpolate to the reference model's image size.")


def _judge(images: torch.Tensor, fn: str) -> tuple[torch.Tensor, nn.Module]:
    """The images on CPU in float32, and the classifier of their shape."""
    model = load_classifier(classifier_for(images, fn))
    return images.detach().to("cpu", torch.float32), model


@torch.no_grad()
def classifier_features(images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features of the shipped classifier of the images' shape.

    Args:
        images: ``(N, 1, 16, 16)`` digits or ``(N, 3, 32, 32)`` crops in ``[0, 1]`` (any device
            or dtype; computed on CPU in float32).
        batch_size: Images per forward pass.

    Returns:
        float32 ``(N, 64)`` features on CPU.

    Raises:
        ValueError: Wrong image shape.
    """
    images, model = _judge(images, "classifier_features")
    return torch.cat([model.features(chunk) for chunk in images.split(batch_size)])


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels: torch.Tensor | list[int]) -> float:
    """Fraction of images that the shipped classifier (of their shape) assigns to the given labels.

    Args:
        images: ``(N, 1, 16, 16)`` digits or ``(N, 3, 32, 32)`` crops in ``[0, 1]``.
        labels: ``N`` class indices, e.g. the conditioning classes of generated samples.

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        ValueError: Wrong image shape, or a number of labels different from the number of images.
    """
    images, model = _judge(images, "class_accuracy")
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"class_accuracy: {images.shape[0]} images but labels of shape "
                         f"{tuple(labels.shape)}; pass one label per image.")
    pred = torch.cat([model(chunk).argmax(dim=1) for chunk in images.split(512)])
    return float((pred == labels).double().mean())


def frechet_distance(images: torch.Tensor, reference_images: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to the classifier features of two image sets.

    ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with the matrix square root from
    ``scipy.linalg.sqrtm``, as in FID, but on the 64-dimensional features of the small
    classifier of the images' shape. Small sets bias the estimate upwards; compare numbers
    obtained with the same set sizes.

    Args:
        images: ``(N, C, H, W)`` in ``[0, 1]`` (digits or crops), ``N >= 2``.
        reference_images: ``(M, C, H, W)`` in ``[0, 1]``, the same shape, ``M >= 2``.

    Returns:
        The distance (``>= 0``, about 0 for a set against itself).

    Raises:
        ValueError: Wrong image shape, two sets of different shapes, or fewer than two images in a set.
    """
    if tuple(images.shape[1:]) != tuple(reference_images.shape[1:]):
        raise ValueError(f"frechet_distance: the sets hold images of different shapes, {tuple(images.shape[1:])} "
                         f"vs {tuple(reference_images.shape[1:])}; compare samples with the real images of the "
                         "same model (sampler.reference_images()).")
    feats = []
    for name, x in (("images", images), ("reference_images", reference_images)):
        if x.shape[0] < 2:
            raise ValueError(f"frechet_distance: {name} holds {x.shape[0]} image(s); a covariance "
                             "needs at least 2 (use a few hundred for a stable estimate).")
        feats.append(classifier_features(x).double().numpy())
    return _frechet_from_features(*feats)


def _frechet_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if caught or not np.isfinite(covmean).all():
        # Singular product (dead ReLU features, fewer samples than features): regularise as the
        # FID reference code does.
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    dist = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    # Round-off can make the distance of a set to itself slightly negative.
    return max(dist, 0.0) if math.isfinite(dist) else dist
