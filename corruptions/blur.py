"""Blur corruptions: defocus_blur, glass_blur, motion_blur, zoom_blur, gaussian_blur.

Severity tables are imagecorruptions 1.1.2's; the filters are in :mod:`corruptions._ops`.
"""

from __future__ import annotations

import functools

import kornia
import numpy as np
import torch
from torch import Tensor

from corruptions import _ops
from corruptions._core import Rng, register

DEFOCUS_BLUR = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # (disk radius, anti-alias sigma)
GLASS_BLUR = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))  # (sigma, max shift, sweeps)
MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # (radius, sigma) of the one-sided kernel
MOTION_ANGLE = (-45.0, 45.0)  # degrees, uniform
ZOOM_BLUR = ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03))  # np.arange
GAUSSIAN_BLUR = (1, 2, 3, 4, 6)  # sigma


@functools.lru_cache(maxsize=None)
def disk(radius: int, alias_sigma: float, device: torch.device = torch.device("cpu")) -> Tensor:
    """imagecorruptions' anti-aliased disk kernel, float64 [2L+1, 2L+1] with L = max(radius, 8), on ``device``.

    The indicator of x^2 + y^2 <= radius^2, normalised to sum 1, then blurred by a Gaussian of
    ``alias_sigma`` (3x3, or 5x5 for radius > 8) with reflect-101 borders (cv2.GaussianBlur).
    """
    half = max(radius, 8)
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    aliased = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius ** 2).double()
    aliased /= aliased.sum()
    ksize = 3 if radius <= 8 else 5
    blurred = kornia.filters.gaussian_blur2d(aliased[None, None], (ksize, ksize), (alias_sigma, alias_sigma),
                                             border_type="reflect")
    return blurred[0, 0].to(device)


@functools.lru_cache(maxsize=10)
def disk_spectrum(severity: int, h: int, w: int, device: torch.device) -> Tensor:
    """The FFT of severity's disk for H x W images (see :func:`corruptions._ops.filter2d_fft`)."""
    kernel = disk(*DEFOCUS_BLUR[severity - 1], device).float()
    return _ops.kernel_spectrum(kernel, _ops.fft_shape(h, w, *kernel.shape))


@register
def defocus_blur(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """x correlated with the anti-aliased disk, reflect-101 borders (cv2.filter2D's default)."""
    kernel = disk(*DEFOCUS_BLUR[severity - 1], x.device)
    spectrum = disk_spectrum(severity, *x.shape[-2:], x.device)
    return _ops.filter2d_fft(x, kernel, mode="mirror", spectrum=spectrum)


@functools.lru_cache(maxsize=8)
def visits(h: int, w: int, delta: int, device: torch.device) -> Tensor:
    """Flat positions glass_blur's sweep visits, in its order: rows h-delta .. delta+1, and in each
    row columns w-delta .. delta+1 (both descending); int64 [n]."""
    rows = torch.arange(h - delta, delta, -1, device=device)
    cols = torch.arange(w - delta, delta, -1, device=device)
    return (rows[:, None] * w + cols[None, :]).flatten()


def sweep_sources(shifts: Tensor, h: int, w: int, delta: int) -> Tensor:
    """Source map [B, H*W] of one glass_blur sweep: where each pixel's value comes from.

    shifts [B, n, 2]: (dx, dy) in [-delta, delta) for each of :func:`visits`' positions. The
    reference writes ``x[p], x[q] = x[q], x[p]`` on pixel *views*, which copies x[q] into x[p]
    and leaves x[q] as it is. So, visiting p with q = p + (dy, dx): src(p) = src(q) if q was
    visited before p (a visited q > p), else q; unvisited pixels keep their own value. The
    chains are resolved by pointer doubling (about log2 of the longest chain rounds).
    """
    b, hw = shifts.shape[0], h * w
    pos = visits(h, w, delta, shifts.device)
    q = pos + shifts[..., 1] * w + shifts[..., 0]  # [B, n]
    visited = torch.zeros(hw, dtype=torch.bool, device=shifts.device)
    visited[pos] = True
    nxt = torch.arange(hw, device=shifts.device).repeat(b, 1)
    nxt[:, pos] = q
    step = nxt.clone()  # step(p) = q where q's value was already overwritten, else p (a chain's end)
    step[:, pos] = torch.where(visited[q] & (q > pos), q, pos)
    while True:
        jumped = step.gather(1, step)
        if torch.equal(jumped, step):
            return nxt.gather(1, step)
        step = jumped


def glass_sources(b: int, h: int, w: int, delta: int, sweeps: int, rng: Rng) -> Tensor:
    """Source map [B, H*W] of ``sweeps`` sweeps with shifts drawn from each sample's stream."""
    n = visits(h, w, delta, rng.device).numel()
    src = torch.arange(h * w, device=rng.device).repeat(b, 1)
    for _ in range(sweeps):
        src = src.gather(1, sweep_sources(rng.randint(-delta, delta, n, 2), h, w, delta))
    return src


@register
def glass_blur(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """gaussian(local_copies(floor(255 gaussian(x)) / 255)), imagecorruptions' glass_blur.

    The first blur is truncated to uint8 like the reference; its sequential sweeps of local
    pixel copies are computed in parallel, exactly (:func:`sweep_sources`), and applied as a gather.
    """
    sigma, delta, sweeps = GLASS_BLUR[severity - 1]
    b, c, h, w = x.shape
    x = torch.floor(_ops.gaussian(x, sigma) * 255) / 255
    src = glass_sources(b, h, w, delta, sweeps, rng)
    x = x.flatten(2).gather(2, src[:, None, :].expand(b, c, h * w)).view(b, c, h, w)
    return _ops.gaussian(x, sigma)


@register
def motion_blur(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """imagecorruptions' _motion_blur with a per-sample angle ~ U(-45, 45) degrees."""
    radius, sigma = MOTION_BLUR[severity - 1]
    return _ops.motion_blur(x, radius, sigma, rng.uniform(low=MOTION_ANGLE[0], high=MOTION_ANGLE[1]))


@register
def zoom_blur(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """(x + sum_z clipped_zoom(x, z)) / (n + 1) over the n zoom factors z = np.arange(*table)."""
    factors = np.arange(*ZOOM_BLUR[severity - 1])
    out = x.clone()
    for z in factors.tolist():
        out += _ops.clipped_zoom(x, z)
    return out / (len(factors) + 1)


@register
def gaussian_blur(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """skimage.filters.gaussian(x, sigma=c): scipy's kernel, radius int(4c + 0.5), replicate borders."""
    return _ops.gaussian(x, GAUSSIAN_BLUR[severity - 1])
