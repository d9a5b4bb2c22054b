"""Noise corruptions: gaussian_noise, shot_noise, impulse_noise, speckle_noise.

Each draws one value per pixel and channel from the sample's own stream (``rng``); the
severity tables are imagecorruptions 1.1.2's.
"""

from __future__ import annotations

from torch import Tensor

from corruptions._core import Rng, register

GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)  # std of the additive noise
SHOT_NOISE = (60, 25, 12, 5, 3)  # photons per unit intensity (Poisson rate scale)
IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)  # fraction of values set to 0 or 1
SPECKLE_NOISE = (0.15, 0.2, 0.35, 0.45, 0.6)  # std of the multiplicative noise


@register
def gaussian_noise(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """x + N(0, c^2), per pixel and channel."""
    return rng.normal(*x.shape[1:], std=GAUSSIAN_NOISE[severity - 1]).add_(x)


@register
def shot_noise(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """Poisson(c x) / c, per pixel and channel."""
    c = SHOT_NOISE[severity - 1]
    return rng.poisson(x * c) / c


@register
def impulse_noise(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """Salt and pepper (skimage ``random_noise(mode='s&p', amount=c)``), per pixel and channel.

    A value is replaced with probability c, by 1 (salt) or 0 (pepper) with equal odds:
    with u ~ U[0,1), out = 1 if u < c/2, 0 if c/2 <= u < c, else x.
    """
    c = IMPULSE_NOISE[severity - 1]
    u = rng.uniform(*x.shape[1:])
    return x.where(u >= c, (u < c / 2).to(x.dtype))


@register
def speckle_noise(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """x + x N(0, c^2), per pixel and channel."""
    return rng.normal(*x.shape[1:], std=SPECKLE_NOISE[severity - 1]).mul_(x).add_(x)
