"""Noise corruptions: gaussian_noise, shot_noise, impulse_noise, speckle_noise."""

from __future__ import annotations

from torch import Tensor

from corruptions._core import Rng, register

GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)  # std of the additive noise


@register
def gaussian_noise(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """x + N(0, c^2), per pixel and channel."""
    c = GAUSSIAN_NOISE[severity - 1]
    return x + c * rng.normal(*x.shape[1:])
