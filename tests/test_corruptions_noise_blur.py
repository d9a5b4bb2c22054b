"""corruptions._ops against the reference helpers; noise and blur corruptions against imagecorruptions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from corruptions import _ops
from tests.reference import shim

SIZES = [(37, 50), (97, 160), (128, 128)]


@pytest.fixture(scope="module")
def ref():
    """imagecorruptions.corruptions (helpers clipped_zoom, _motion_blur, disk) with the shim."""
    shim()
    import imagecorruptions.corruptions as module

    return module


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3))


def _t(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).float()


def _np(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).double().numpy()


# ---------------------------------------------------------------- _ops


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("sigma", [0.7, 1, 1.5, 6])
def test_gaussian_matches_skimage(h, w, sigma):
    import skimage.filters

    img = _image(h, w)
    expected = skimage.filters.gaussian(img, sigma=sigma, channel_axis=-1)
    assert np.abs(_np(_ops.gaussian(_t(img), sigma)) - expected).max() < 1e-6


@pytest.mark.parametrize("mode", ["nearest", "reflect", "mirror", "wrap"])
def test_gaussian_modes_and_anisotropic_sigma_match_scipy(mode):
    img = _image(40, 33)[..., 0]
    sigma = (2.5, 0.8)
    expected = ndi.gaussian_filter(img, sigma, mode=mode, truncate=3.0)
    ours = _ops.gaussian(torch.from_numpy(img)[None, None].float(), sigma, truncate=3.0, mode=mode)
    assert ours.shape == (1, 1, 40, 33)
    assert np.abs(ours[0, 0].double().numpy() - expected).max() < 1e-6


def test_gaussian_kernel_wider_than_image_borders_fold_like_scipy():
    img = _image(5, 7)[..., 0]
    for mode in ("nearest", "reflect", "mirror"):
        expected = ndi.gaussian_filter(img, 4.0, mode=mode)  # radius 16 > 7
        ours = _ops.gaussian(torch.from_numpy(img)[None, None], 4.0, mode=mode)[0, 0].numpy()
        assert np.abs(ours - expected).max() < 1e-9


def test_gaussian_rejects_bad_sigma_and_mode():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="sigma"):
        _ops.gaussian(x, -1.0)
    with pytest.raises(ValueError, match="border mode"):
        _ops.gaussian(x, 1.0, mode="constant")


@pytest.mark.parametrize("h,w", SIZES)
def test_clipped_zoom_matches_reference(ref, h, w):
    img = _image(h, w).astype(np.float32)
    factors = list(np.arange(1, 1.31, 0.03)) + [1.27, 1.5, 2.5, 4.5]
    for z in factors:
        expected = ref.clipped_zoom(img, z)
        full = _np(_ops.clipped_zoom(_t(img), z, crop=False))
        assert full.shape == expected.shape, z
        assert np.abs(full - expected).max() < 1e-4, z
        cropped = _np(_ops.clipped_zoom(_t(img), z))
        assert cropped.shape == (h, w, 3)
        assert np.array_equal(cropped, full[:h, :w])


def test_clipped_zoom_reproduces_scipys_zero_edge(ref):
    # 160 / 1.27: scipy's last source column overshoots the input and reads cval 0.
    img = np.ones((97, 160, 3), np.float32)
    expected = ref.clipped_zoom(img, 1.27)[:97, :160]
    assert expected[:, -1].max() == 0 and expected[:, :-1].min() > 0.99
    assert np.abs(_np(_ops.clipped_zoom(_t(img), 1.27)) - expected).max() < 1e-5


@pytest.mark.parametrize("h,w", [(37, 50), (97, 160), (33, 34)])
def test_motion_blur_matches_reference(ref, h, w):
    img = _image(h, w) * 255
    for radius, sigma in [(10, 3), (15, 8), (20, 15), (12, 8)]:
        for angle in (-45.0, -30.3, 0.0, 12.7, 45.0, -100.0, -135.0):
            expected = ref._motion_blur(img, radius=radius, sigma=sigma, angle=angle)
            ours = _ops.motion_blur(_t(img), radius, sigma, torch.tensor([angle], dtype=torch.float64))
            assert np.abs(_np(ours) - expected).max() < 1e-3, (radius, angle)


def test_motion_blur_per_sample_angles():
    x = torch.rand(3, 2, 40, 41)
    angles = torch.tensor([-40.0, 5.0, 33.0])
    batch = _ops.motion_blur(x, 15, 5, angles)
    for b in range(3):
        assert torch.equal(batch[b:b + 1], _ops.motion_blur(x[b:b + 1], 15, 5, angles[b:b + 1]))


@pytest.mark.parametrize("radius,alias", [(3, 0.1), (10, 0.5)])
def test_filter2d_fft_matches_cv2_reflect101(ref, radius, alias):
    import cv2

    img = _image(37, 50)[..., 0]
    kernel = ref.disk(radius=radius, alias_blur=alias).astype(np.float64)
    kernel[0, 1] += 0.05  # asymmetric, so a flipped kernel would fail
    expected = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    ours = _ops.filter2d_fft(torch.from_numpy(img)[None, None], torch.from_numpy(kernel))[0, 0].numpy()
    assert np.abs(ours - expected).max() < 1e-9
