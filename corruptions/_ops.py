"""Low-level image operations shared by the corruptions, on ``[B,C,H,W]`` float tensors, any device.

- :func:`gaussian`: ``skimage.filters.gaussian`` / ``scipy.ndimage.gaussian_filter`` semantics
  (kernel radius ``int(truncate * sigma + 0.5)``, scipy border modes).
- :func:`filter2d_fft`: a 2-D correlation with a large non-separable kernel (defocus disk), via FFT.
- :func:`clipped_zoom`: imagecorruptions' ``clipped_zoom`` (centre crop, ``scipy.ndimage.zoom`` order 1).
- :func:`motion_blur`: imagecorruptions' ``_motion_blur`` (one-sided Gaussian taps laid along an angle).

The 1-D filters run as banded matrix products on blocks of 64 rows or columns: on the CPU a
pass over 3x1208x1920 takes about 0.04-0.06 s against 0.5-1 s for ``F.conv2d`` with one input
channel (one thread, measured while building this); on CUDA it is a batched GEMM.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: scipy.ndimage border modes -> index map for positions i (any int) on an axis of length n.
_BORDER = {
    "nearest": lambda i, n: i.clamp(0, n - 1),  # a a a | a b c d | d d d
    "reflect": lambda i, n: _fold(i.remainder(2 * n), 2 * n - 1, n),  # b a | a b c d | d c
    "mirror": lambda i, n: _fold(i.remainder(max(2 * n - 2, 1)), 2 * n - 2, n),  # c b | a b c d | c b
    "wrap": lambda i, n: i.remainder(n),  # c d | a b c d | a b
}
_BLOCK = 64  # output rows per block of the banded matrix product
_SHIFT_MAX = 25  # along W, kernels up to this length are cheaper as k shifted multiply-adds


def _fold(i: Tensor, top: int, n: int) -> Tensor:
    """Indices in [0, period) folded back into [0, n): i if i < n else top - i."""
    return torch.where(i < n, i, top - i)


def border_index(start: int, length: int, n: int, mode: str, device: torch.device) -> Tensor:
    """Source indices (int64 [length]) of positions start .. start+length-1 on an axis of length n."""
    if mode not in _BORDER:
        raise ValueError(f"border mode {mode!r} is not supported; use one of {', '.join(_BORDER)}")
    return _BORDER[mode](torch.arange(start, start + length, device=device), n)


def pad_axis(x: Tensor, dim: int, before: int, after: int, mode: str) -> Tensor:
    """x extended by ``before`` / ``after`` positions along ``dim`` with scipy border ``mode``."""
    n = x.shape[dim]
    head = border_index(-before, before, n, mode, x.device)
    tail = border_index(n, after, n, mode, x.device)
    return torch.cat([x.index_select(dim, head), x, x.index_select(dim, tail)], dim)


_TORCH_PAD = {"nearest": "replicate", "mirror": "reflect", "wrap": "circular"}  # scipy mode -> F.pad mode


def pad2d(x: Tensor, top: int, bottom: int, left: int, right: int, mode: str) -> Tensor:
    """x [..., H, W] extended on each side with scipy border ``mode`` (F.pad where it has the mode)."""
    h, w = x.shape[-2:]
    if mode in _TORCH_PAD and x.dim() in (3, 4) and max(top, bottom) < h and max(left, right) < w:
        return F.pad(x, (left, right, top, bottom), mode=_TORCH_PAD[mode])
    return pad_axis(pad_axis(x, -2, top, bottom, mode), -1, left, right, mode)


@functools.lru_cache(maxsize=64)
def _banded(weights: tuple[float, ...], block: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Band matrix K [block, block+k-1] with K[i, i+j] = w[j]: (K @ window)[i] = sum_j w[j] x[i+j]."""
    w = torch.tensor(weights, dtype=dtype, device=device)
    k = len(weights)
    rows = torch.arange(block, device=device)[:, None]
    cols = rows + torch.arange(k, device=device)
    return torch.zeros(block, block + k - 1, dtype=dtype, device=device).scatter_(1, cols, w.expand(block, k))


def correlate1d(x: Tensor, weights: Sequence[float], dim: int, mode: str = "nearest") -> Tensor:
    """1-D correlation along ``dim`` (-1 or -2) of ``x`` [..., H, W], centred like scipy.

    out[i] = sum_j w[j] x[border(i + j - k // 2)], j = 0..k-1 (scipy.ndimage.correlate1d, origin 0).
    """
    if dim not in (-1, -2):
        raise ValueError(f"dim must be -1 or -2 (W or H), got {dim}")
    k, n = len(weights), x.shape[dim]
    if dim == -1 and k <= _SHIFT_MAX:  # the banded product reads W through a strided unfold: slow
        padded = pad2d(x, 0, 0, k // 2, k - 1 - k // 2, mode)
        out = padded[..., :n] * float(weights[0])
        for j in range(1, k):
            out.add_(padded[..., j:j + n], alpha=float(weights[j]))
        return out
    if dim == -1:  # one banded product over all rows: MKL's rounding then depends on its thread count
        return correlate1d(x.transpose(-1, -2), weights, -2, mode).transpose(-1, -2).contiguous()
    block = min(_BLOCK, n)
    nblocks = -(-n // block)
    length = block + k - 1  # source positions one block of outputs reads
    before, after = k // 2, nblocks * block - n + k - 1 - k // 2
    padded = pad2d(x, before, after, 0, 0, mode)
    band = _banded(tuple(float(w) for w in weights), block, x.device, x.dtype)
    windows = padded.unfold(-2, length, block)  # a view [..., nb, W, L]
    return (band @ windows.transpose(-1, -2)).flatten(-3, -2)[..., :n, :]


def gaussian_weights(sigma: float, truncate: float = 4.0) -> tuple[float, ...]:
    """scipy's 1-D Gaussian: w[x] = exp(-x^2 / 2 sigma^2) / sum, x = -r..r, r = int(truncate*sigma + 0.5)."""
    r = int(truncate * float(sigma) + 0.5)
    w = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-r, r + 1)]
    total = sum(w)
    return tuple(v / total for v in w)


def gaussian(x: Tensor, sigma: float | Sequence[float], truncate: float = 4.0, mode: str = "nearest") -> Tensor:
    """Gaussian blur of x [B,C,H,W] over H and W, as skimage.filters.gaussian(channel_axis=-1).

    sigma: one value or (sigma_H, sigma_W); an axis with sigma 0 is left alone.
    mode:  scipy border mode ('nearest' = replicate, 'reflect' = symmetric, 'mirror' = reflect-101, 'wrap').
    """
    sigmas = (sigma, sigma) if isinstance(sigma, (int, float)) else tuple(sigma)
    if len(sigmas) != 2 or min(sigmas) < 0:
        raise ValueError(f"sigma must be >= 0, one value or (sigma_H, sigma_W); got {sigma!r}")
    for dim, s in zip((-2, -1), sigmas):
        if s > 0:
            x = correlate1d(x, gaussian_weights(s, truncate), dim, mode)
    return x


def _fast_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (FFT sizes with small prime factors are fast)."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def fft_shape(h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
    """FFT size for correlating an H x W image with a kh x kw kernel without wrap-around."""
    return _fast_len(h + kh - 1), _fast_len(w + kw - 1)


def kernel_spectrum(kernel: Tensor, shape: tuple[int, int]) -> Tensor:
    """rfft2 of the flipped kernel [kh,kw] zero-padded to ``shape`` (correlation = convolution with the flip)."""
    return torch.fft.rfft2(kernel.flip(0, 1), s=shape)


def filter2d_fft(x: Tensor, kernel: Tensor, mode: str = "mirror", spectrum: Tensor | None = None) -> Tensor:
    """2-D correlation of x [B,C,H,W] with an odd kernel [kh,kw], borders by scipy ``mode``.

    out[y,x] = sum_{i,j} K[i,j] x[border(y+i-kh//2), border(x+j-kw//2)] (cv2.filter2D with
    BORDER_REFLECT_101 is mode 'mirror'); computed as a product of real FFTs of size
    :func:`fft_shape`. ``spectrum``: :func:`kernel_spectrum` of the kernel at that size, if cached.
    """
    kh, kw = kernel.shape
    h, w = x.shape[-2:]
    shape = fft_shape(h, w, kh, kw)
    # Border values out to the FFT size: only the first H+kh-1 x W+kw-1 reach the valid outputs,
    # the rest (instead of zeros) never wraps into them.
    padded = pad2d(x, kh // 2, shape[0] - h - kh // 2, kw // 2, shape[1] - w - kw // 2, mode)
    if spectrum is None:
        spectrum = kernel_spectrum(kernel.to(x), shape)
    out = torch.fft.irfft2(_complex_mul(torch.fft.rfft2(padded), spectrum), s=shape)
    return out[..., kh - 1:kh - 1 + h, kw - 1:kw - 1 + w]


def _complex_mul(a: Tensor, b: Tensor) -> Tensor:
    """a * b (b broadcast to a) from real products and sums, (ar br - ai bi) + i (ar bi + ai br), written into
    the real and imaginary views of one new tensor: torch's vectorised complex product rounds its scalar tail
    differently, so its bits depend on where each thread's chunk ends, i.e. on the number of threads
    (defocus_blur at 480x640: 88 values, up to 1.2e-7). About 4x the time of ``a * b`` (16 against 4 ms for
    3x1250x973 values on 2 threads)."""
    out = torch.empty_like(a)
    torch.mul(a.real, b.real, out=out.real).sub_(a.imag * b.imag)
    torch.mul(a.real, b.imag, out=out.imag).add_(a.imag * b.real)
    return out


def _overshoots(n_in: int, n_out: int) -> bool:
    """Whether scipy.ndimage.zoom's last source coordinate lands past the input (then it reads cval)."""
    return n_out > 1 and (n_out - 1) * ((n_in - 1) / (n_out - 1)) > n_in - 1


def clipped_zoom(x: Tensor, zoom_factor: float, crop: bool = True) -> Tensor:
    """imagecorruptions' clipped_zoom on x [B,C,H,W]: zoom into the centre by ``zoom_factor``.

    Crops the centre ceil(H/z) x ceil(W/z) at ((H - ceil(H/z)) // 2, ...), resizes it to
    round(ceil(H/z) * z) x ... with bilinear interpolation on scipy.ndimage.zoom's grid
    (grid_mode=False: corners map to corners, i.e. align_corners=True), and with ``crop``
    keeps the top-left H x W (imagecorruptions crops after the call).
    """
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / float(zoom_factor)), math.ceil(w / float(zoom_factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    size = (int(round(ch * zoom_factor)), int(round(cw * zoom_factor)))
    centre = x[..., top:top + ch, left:left + cw]
    # As [B*C,1,h,w] planes: on one CPU thread torch's bilinear kernel takes a slower path for C > 1
    # (3.5x at 1208x1920, C = 3) that rounds differently (1 ulp) from its multi-thread path; planes get
    # the same bits on any number of threads.
    planes = centre.reshape(-1, 1, ch, cw)
    out = F.interpolate(planes, size=size, mode="bilinear", align_corners=True).view(*x.shape[:-2], *size)
    if _overshoots(ch, size[0]):
        out[..., -1, :] = 0
    if _overshoots(cw, size[1]):
        out[..., -1] = 0
    return out[..., :h, :w] if crop else out


def motion_kernel(radius: int, sigma: float) -> tuple[float, ...]:
    """One-sided Gaussian taps k[i] = exp(-i^2 / 2 sigma^2) / sum, i = 0..2*radius."""
    w = [math.exp(-(i ** 2) / (2 * sigma ** 2)) for i in range(2 * radius + 1)]
    total = sum(w)
    return tuple(v / total for v in w)


def motion_taps(radius: int, angle_deg: float, h: int, w: int) -> list[tuple[int, int]]:
    """Integer shifts (dy, dx) of imagecorruptions' _motion_blur taps along ``angle_deg``.

    dy_i = -ceil(i sin(a) - 0.5), dx_i = -ceil(i cos(a) - 0.5), with sin and cos computed the
    reference's way (a point at distance 2 radius + 1, divided by its hypot); stops at the first
    tap whose shift reaches the image size (the remaining taps are dropped, not renormalised).
    """
    width = 2 * radius + 1
    py, px = width * math.sin(math.radians(angle_deg)), width * math.cos(math.radians(angle_deg))
    hypot = math.hypot(py, px)
    taps = []
    for i in range(width):
        dy, dx = -math.ceil(i * py / hypot - 0.5), -math.ceil(i * px / hypot - 0.5)
        if abs(dy) >= h or abs(dx) >= w:
            break
        taps.append((dy, dx))
    return taps


def motion_blur(x: Tensor, radius: int, sigma: float, angle_deg: Tensor) -> Tensor:
    """imagecorruptions' _motion_blur on x [B,C,H,W] with per-sample angles angle_deg [B] (degrees).

    out_b[y,x] = sum_i k[i] x_b[clamp(y - dy_i), clamp(x - dx_i)] (edge replication); see
    :func:`motion_kernel` and :func:`motion_taps`. The B angles are read on the host once. On
    the CPU the taps are summed over bands of 32 rows, which stay in cache (2-3x faster at 1208x1920).
    """
    h, w = x.shape[-2:]
    kernel = motion_kernel(radius, sigma)
    taps = [motion_taps(radius, a, h, w) for a in angle_deg.tolist()]
    shifts = [s for t in taps for s in t] or [(0, 0)]
    top, bottom = max(0, *(dy for dy, _ in shifts)), max(0, *(-dy for dy, _ in shifts))
    left, right = max(0, *(dx for _, dx in shifts)), max(0, *(-dx for _, dx in shifts))
    padded = F.pad(x, (left, right, top, bottom), mode="replicate")
    out = torch.zeros_like(x)
    band = 32 if x.device.type == "cpu" else h
    for b, sample_taps in enumerate(taps):
        for r in range(0, h, band):
            rows = min(band, h - r)
            for k, (dy, dx) in zip(kernel, sample_taps):
                y0 = top - dy + r
                out[b, :, r:r + rows].add_(padded[b, :, y0:y0 + rows, left - dx:left - dx + w], alpha=k)
    return out
