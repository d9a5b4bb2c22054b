"""Weather corruptions: snow, frost, fog, spatter.

Every function takes and returns float32 ``[B,3,H,W]`` in [0,1] (``corrupt`` clamps afterwards).
"""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from corruptions._core import Rng, register
from corruptions._ops import clipped_zoom, gaussian, motion_blur
from corruptions._weather_ops import (
    FROST_FILES, canny, chamfer_distance, correlate3x3, equalize_hist, frost_textures, next_power_of_2, plasma_fractal,
)

# (flake mean, flake std, zoom, threshold, blur radius, blur sigma, image weight)
SNOW = (
    (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
    (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
    (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
    (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
    (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
)
SNOW_ANGLE = (-135.0, -45.0)  # range of the flakes' motion-blur angle, degrees

FROST = ((1.0, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))  # (w_image, w_frost)
FOG = ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))  # (fog strength, wibble decay)


@register
def snow(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """x' + S + rot180(S), x' = w x + (1 - w) max(x, 1.5 grey(x) + 0.5).

    S: N(mean, std) noise zoomed into by ``zoom`` (not cropped yet), values below ``threshold``
    zeroed, clipped to [0, 1], motion-blurred at an angle ~ U(-135, -45) degrees, rounded to
    1/255 steps and cropped to the top-left H x W; grey = 0.299 R + 0.587 G + 0.114 B.
    """
    mean, std, zoom, threshold, radius, sigma, w = SNOW[severity - 1]
    H, W = x.shape[-2:]
    flakes = clipped_zoom(rng.normal(1, H, W, mean=mean, std=std), zoom, crop=False)
    flakes = torch.where(flakes < threshold, 0.0, flakes).clamp(0.0, 1.0)
    flakes = motion_blur(flakes, radius, sigma, rng.uniform(low=SNOW_ANGLE[0], high=SNOW_ANGLE[1]))
    flakes = (flakes * 255).round()[..., :H, :W] / 255
    grey = kornia.color.rgb_to_grayscale(x)
    x = w * x + (1 - w) * torch.maximum(x, grey * 1.5 + 0.5)
    return x + flakes + flakes.flip(-2, -1)


@register
def frost(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """w_image * x + w_frost * F, F a random H x W crop of one of the 5 frost textures (uniform choice,
    uniform offset) after the reference's rescaling (see :func:`frost_textures`)."""
    w_image, w_frost = FROST[severity - 1]
    H, W = x.shape[-2:]
    textures, sizes = frost_textures((H, W), x.device)
    index = rng.randint(0, len(FROST_FILES))  # [B]
    room = sizes[index] - torch.tensor([H, W], device=x.device)  # [B, 2]: crop offsets lie in [0, room)
    start = torch.minimum((rng.uniform(2) * room).long(), room - 1)
    layer = torch.empty_like(x)
    for b, (i, top, left) in enumerate(torch.cat([index[:, None], start], 1).tolist()):  # one host read
        layer[b] = textures[i, :, top:top + H, left:left + W]
    return w_image * x + layer.mul_(w_frost / 255)


@register
def fog(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """(x + c * P) * M / (M + c), P a plasma fractal (map side = next power of 2 of max(H, W)) cropped
    to H x W and shared by the channels, M the image's maximum."""
    c, decay = FOG[severity - 1]
    H, W = x.shape[-2:]
    plasma = plasma_fractal(rng, next_power_of_2(max(H, W)), decay)[:, None, :H, :W]
    top = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + c * plasma) * top / (top + c)


# (liquid mean, liquid std, liquid sigma, threshold, strength (water) or mask sigma (mud), kind)
SPATTER = (
    (0.65, 0.3, 4, 0.69, 0.6, "water"),
    (0.65, 0.3, 3, 0.68, 0.6, "water"),
    (0.65, 0.3, 2, 0.68, 0.5, "water"),
    (0.65, 0.3, 1, 0.65, 1.5, "mud"),
    (0.67, 0.4, 1, 0.65, 1.5, "mud"),
)
WATER = (175 / 255, 238 / 255, 238 / 255)  # pale turquoise, RGB
MUD = (63 / 255, 42 / 255, 20 / 255)  # mud brown, RGB
CANNY_THRESHOLDS = (50.0, 150.0)  # cv2.Canny on the 8-bit liquid layer
DIST_CAP = 20.0  # the distance map is truncated at 20 pixels
EMBOSS = ((-2.0, -1.0, 0.0), (-1.0, 1.0, 1.0), (0.0, 1.0, 2.0))


def _colour(rgb: tuple[float, float, float], like: Tensor) -> Tensor:
    return torch.tensor(rgb, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)


def _box3(x: Tensor) -> Tensor:
    """cv2.blur(x, (3, 3)): 3x3 mean, border reflected without repeating the edge (BORDER_REFLECT_101)."""
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)


def _water(x: Tensor, liquid: Tensor, threshold: float, strength: float) -> Tensor:
    """x + strength * M / max(M) * turquoise, M = L * E (the reference's OpenCV pipeline, batched).

    L = int(255 * liquid). E: distance to the Canny edges of L (cv2 5x5 chamfer, capped at 20),
    3x3 box mean truncated to 8 bits, histogram-equalised, embossed (8-bit saturation), 3x3
    box mean rounded to 8 bits. Box and emboss borders reflect without repeating the edge
    (OpenCV's default BORDER_REFLECT_101).
    """
    level = (liquid * 255).floor().clamp(0, 255)
    dist = chamfer_distance(canny(level, *CANNY_THRESHOLDS), DIST_CAP)
    dist = _box3(dist).floor()
    dist = equalize_hist(dist)
    dist = correlate3x3(dist, EMBOSS, "reflect").clamp(0, 255)
    dist = _box3(dist).round()
    m = level * dist
    m = m / m.amax(dim=(-2, -1), keepdim=True).clamp(min=1.0) * strength
    return x + m * _colour(WATER, x)


def _mud(x: Tensor, liquid: Tensor, threshold: float, sigma: float) -> Tensor:
    """x (1 - m) + m * brown, m = G_sigma * [liquid > threshold] with values below 0.8 zeroed."""
    m = gaussian((liquid > threshold).float(), sigma)
    m = torch.where(m < 0.8, 0.0, m)
    return x * (1 - m) + m * _colour(MUD, x)


_SPATTER_KINDS = {"water": _water, "mud": _mud}


@register
def spatter(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """Water drops (severities 1-3) or mud (4-5) from a liquid layer G_sigma * N(mean, std),
    values below ``threshold`` zeroed (skimage gaussian: replicated border, truncate 4)."""
    mean, std, sigma, threshold, c, kind = SPATTER[severity - 1]
    H, W = x.shape[-2:]
    liquid = gaussian(rng.normal(1, H, W, mean=mean, std=std), sigma)
    liquid = torch.where(liquid < threshold, 0.0, liquid)
    return _SPATTER_KINDS[kind](x, liquid, threshold, c)
