"""Metrics: PSNR/SSIM known cases, the shipped classifier, the Frechet distance, the digit split."""

from __future__ import annotations

import math

import pytest
import torch

from dit_opt import metrics


@pytest.fixture(scope="module")
def test_digits():
    return metrics.real_digits("test")


def test_psnr_identical_is_inf():
    x = torch.rand(3, 1, 16, 16)
    assert metrics.psnr(x, x.clone()) == math.inf


def test_psnr_constant_offset_is_20db():
    x = torch.rand(4, 1, 16, 16) * 0.9
    value = metrics.psnr(x, x + 0.1, data_range=1.0)
    assert value == pytest.approx(20.0, abs=1e-4), f"PSNR of a 0.1 offset is {value}, expected 20 dB"


def test_psnr_data_range_scales():
    x = torch.rand(2, 1, 16, 16)
    # Same relative error on a 0..255 scale gives the same PSNR.
    assert metrics.psnr(x * 255, (x + 0.1) * 255, data_range=255.0) == pytest.approx(20.0, abs=1e-3)


def test_ssim_identical_is_one():
    x = torch.rand(3, 2, 16, 16)
    assert metrics.ssim(x, x.clone()) == pytest.approx(1.0, abs=1e-12)


def test_ssim_symmetric_and_below_one_for_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=gen)
    y = (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    ab, ba = metrics.ssim(x, y), metrics.ssim(y, x)
    assert ab == pytest.approx(ba, abs=1e-12), f"SSIM not symmetric: {ab} vs {ba}"
    assert ab < 0.95, f"SSIM of a noisy copy is {ab}, expected clearly below 1"


def test_shape_errors_name_the_fix():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="batch dimension"):
        metrics.ssim(torch.rand(1, 16, 16), torch.rand(1, 16, 16))
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4))


def test_real_digits_split_is_fixed_and_disjoint():
    train_x, train_y = metrics.real_digits("train")
    test_x, test_y = metrics.real_digits("test")
    all_x, _ = metrics.real_digits("all")
    assert train_x.shape == (1347, 1, 16, 16) and test_x.shape == (450, 1, 16, 16)
    assert len(train_x) + len(test_x) == len(all_x)
    assert 0.0 <= float(all_x.min()) and float(all_x.max()) <= 1.0
    assert torch.equal(metrics.real_digits("test")[0], test_x)
    assert sorted(set(test_y.tolist())) == list(range(10))
    with pytest.raises(ValueError, match="unknown split"):
        metrics.real_digits("validation")


def test_classifier_accuracy_on_held_out_digits(test_digits):
    images, labels = test_digits
    acc = metrics.class_accuracy(images, labels)
    assert acc >= 0.9, f"classifier accuracy on held-out digits is {acc:.3f}, expected >= 0.9"
    assert metrics.classifier_info()["test_accuracy"] == pytest.approx(acc, abs=1e-3)


def test_classifier_features_shape(test_digits):
    feats = metrics.classifier_features(test_digits[0][:5])
    assert feats.shape == (5, 64) and feats.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        metrics.classifier_features(torch.rand(2, 3, 16, 16))


def test_frechet_distance_self_is_zero_and_noise_is_far(test_digits):
    images = test_digits[0]
    self_fd = metrics.frechet_distance(images, images)
    assert self_fd == pytest.approx(0.0, abs=1e-3), f"FD of a set to itself is {self_fd}"
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(images.shape, generator=gen)
    far = metrics.frechet_distance(noise, images)
    train_fd = metrics.frechet_distance(images, metrics.real_digits("train")[0])
    assert far > 10 * max(train_fd, 1e-6), f"noise FD {far} not far above real-vs-real FD {train_fd}"


def test_class_accuracy_rejects_label_count_mismatch(test_digits):
    with pytest.raises(ValueError, match="one label per image"):
        metrics.class_accuracy(test_digits[0][:4], [0, 1])
