"""Digital corruptions: brightness, contrast, saturate, pixelate, jpeg_compression, elastic_transform.

Every function takes and returns float32 ``[B,3,H,W]`` in [0,1] (``corrupt`` clamps afterwards).
"""

from __future__ import annotations

import functools
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from corruptions._core import Rng, register
from corruptions._ops import gaussian

BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to the HSV value channel
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # factor on the deviation from the per-channel mean
SATURATE = ((0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2))  # (scale, shift) of HSV saturation
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)  # downscale factor
JPEG_QUALITY = (25, 18, 15, 10, 7)  # libjpeg quality
ELASTIC_ALPHA = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)  # displacement gain
ELASTIC_SIGMA = 0.01  # smoothing sigma of the displacement field, as a fraction of (H, W)
ELASTIC_MAX = 0.005  # raw displacements ~ U(-m, m), m = 0.005 * H (both axes, as in the reference)
ELASTIC_TRUNCATE = 3.0  # the reference's truncate of the field's gaussian


@register
def brightness(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """HSV value V' = min(V + c, 1) with hue and saturation kept (skimage rgb2hsv -> hsv2rgb).

    With V = max_c x_c, keeping H and S means scaling the pixel: x' = x * V' / V (exact down to the
    smallest normal float32, V = 1.2e-38); a black pixel (V = 0, so S = 0) becomes grey V'.
    """
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + BRIGHTNESS[severity - 1]).clamp(max=1.0)
    # V'/V on [B,1,H,W], then one full-size product; V below the smallest normal float (denormals) is
    # taken as that, so that V'/V stays finite
    return torch.where(v > 0, x * (v_new / v.clamp(min=torch.finfo(x.dtype).tiny)), v_new)


@register
def contrast(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """(x - m) * c + m, m the mean of each image channel over H, W."""
    means = x.mean(dim=(-2, -1), keepdim=True)
    return (x - means).mul_(CONTRAST[severity - 1]).add_(means)


@register
def saturate(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """HSV saturation S' = clip(S * a + b, 0, 1) with hue and value kept (skimage rgb2hsv -> hsv2rgb).

    With V = max_c x_c and S = (V - min_c x_c) / V, each channel is V - (V - x_c) * S' / S.
    A grey pixel (S = 0) has hue 0 (red), so it becomes (V, V (1 - S'), V (1 - S')).
    """
    a, b = SATURATE[severity - 1]
    v = x.amax(dim=1, keepdim=True)
    spread = v - x.amin(dim=1, keepdim=True)  # V * S
    s_new = (spread / v.clamp(min=1e-12) * a + b).clamp(0.0, 1.0)
    scaled = v - (v - x) * (s_new * v / spread.clamp(min=1e-12))
    grey = v - v * s_new * _RED_HUE.to(x)
    return torch.where(spread > 0, scaled, grey)


_RED_HUE = torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1)  # (V - x_c) / (V S) at hue 0


@functools.lru_cache(maxsize=64)
def _box_taps(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Pillow's BOX resampling from n_in to n_out samples along one axis, as taps.

    Output i averages the inputs j with -1/2 < (j + 1/2 - c_i) / s <= 1/2, c_i = (i + 1/2) s,
    s = n_in / n_out, within Pillow's window [int(c_i - s/2 + 1/2), int(c_i + s/2 + 1/2)),
    evaluated in float64 in Pillow's order so that boundary ties fall the same way.
    Returns (index [T, n_out], mask [T, n_out], count [n_out]), T the widest box.
    """
    s = n_in / n_out
    centre = (np.arange(n_out) + 0.5) * s
    lo = np.maximum((centre - s * 0.5 + 0.5).astype(np.int64), 0)
    hi = np.minimum((centre + s * 0.5 + 0.5).astype(np.int64), n_in)
    j = lo + np.arange(int((hi - lo).max()))[:, None]
    v = (j - centre + 0.5) * (1.0 / s)
    mask = (j < hi) & (v > -0.5) & (v <= 0.5)
    index = np.minimum(j, n_in - 1)
    as_tensor = functools.partial(torch.tensor, device=device)
    return as_tensor(index), as_tensor(mask, dtype=torch.float32), as_tensor(mask.sum(0), dtype=torch.float32)


def _box_pass(y: Tensor, n_out: int) -> Tensor:
    """One Pillow BOX pass along dim -2 of integer-valued float [..., n_in, m], rounded half up as its
    fixed point does (sums of at most 5 integers are exact in float32, so the rounding is exact)."""
    index, mask, count = _box_taps(y.shape[-2], n_out, y.device)
    total = sum(y.index_select(-2, index[t]) * mask[t, :, None] for t in range(len(index)))
    return torch.floor(total / count[:, None] + 0.5)


def _box_resize_8bit(y: Tensor, size: tuple[int, int]) -> Tensor:
    """Pillow ``resize(size, BOX)`` of an 8-bit image held as float [B,C,H,W] in 0..255: the
    horizontal pass, then the vertical one (on a transposed copy, where row gathers are fast)."""
    h, w = size
    y = _box_pass(y.transpose(-1, -2).contiguous(), w).transpose(-1, -2)
    return _box_pass(y, h)


@functools.lru_cache(maxsize=64)
def _nearest_index(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """Pillow NEAREST: output i reads int(x_i), x_0 = s/2, x_{i+1} = x_i + s (float64, accumulated), s = n_in/n_out."""
    s = n_in / n_out
    x = np.cumsum(np.r_[0.5 * s, np.full(n_out - 1, s)])
    return torch.tensor(np.minimum(x.astype(np.int64), n_in - 1), device=device)


@functools.lru_cache(maxsize=64)
def _interpolate_is_pillow(n_in: int, n_out: int) -> bool:
    """Whether F.interpolate(mode='nearest-exact') reads the same inputs as Pillow's NEAREST (it does for
    about 80 % of size pairs; Pillow's accumulated float error breaks some exact ties)."""
    probe = torch.arange(n_in, dtype=torch.float32)[None, None]
    ours = F.interpolate(probe, size=n_out, mode="nearest-exact")[0, 0].long()
    return torch.equal(ours, _nearest_index(n_in, n_out, torch.device("cpu")))


def _nearest_resize(small: Tensor, size: tuple[int, int]) -> Tensor:
    """Pillow ``resize(size, NEAREST)`` of [B,C,h,w]: F.interpolate where its mapping is Pillow's, else gathers."""
    (h, w), (H, W) = small.shape[-2:], size
    if _interpolate_is_pillow(h, H) and _interpolate_is_pillow(w, W):
        return F.interpolate(small, size=size, mode="nearest-exact")
    cols, rows = _nearest_index(w, W, small.device), _nearest_index(h, H, small.device)
    return small.index_select(-1, cols).index_select(-2, rows)


@register
def pixelate(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """Pillow on the 8-bit image round(255 x): BOX downscale to (int(H*c), int(W*c)), NEAREST upscale to (H, W).

    As in the reference, the result is quantised to 1/255 steps.
    """
    c = PIXELATE[severity - 1]
    H, W = x.shape[-2:]
    small = _box_resize_8bit((x * 255).round_(), (int(H * c), int(W * c)))
    return _nearest_resize(small, (H, W)).div_(255)


@register
def jpeg_compression(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """Encode the 8-bit image round(255 x) as JPEG at quality q and decode it (torchvision.io).

    The codec is libjpeg-turbo on the host, on every device: 4:2:0 chroma subsampling like the
    reference's Pillow, and the same bits on CPU and CUDA. (torchvision's nvJPEG encoder is fixed to
    4:4:4, which keeps far more colour and misses the reference by 3-7 gray levels on average; its
    decoder has its own IDCT and chroma upsampling, and writes on a stream of its own.) libjpeg-turbo
    codes one image on one core, so the images are coded on ``torch.get_num_threads()`` threads (the
    codec releases the GIL; the bytes do not depend on the thread count).
    """
    q = JPEG_QUALITY[severity - 1]
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs in favour of TorchCodec
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return _jpeg_on_cpu(x, q) if x.device.type == "cpu" else _jpeg_via_host(x, q)


def _jpeg_on_cpu(x: Tensor, q: int) -> Tensor:
    """jpeg_compression of images on the CPU: each image whole on one thread (8 bits, encode, decode, back to
    float), in cache rather than over the whole batch."""
    out = torch.empty_like(x)
    pooled = min(len(x), torch.get_num_threads()) > 1

    def code(b: int) -> None:
        if pooled:  # numpy on this thread alone, where a torch op would start a team of threads of its own
            scaled = x[b].numpy().transpose(1, 2, 0) * np.float32(255)
            pixels = np.rint(scaled, out=scaled).astype(np.uint8, order="C")
            np.divide(_jpeg_round_trip(torch.from_numpy(pixels), q).numpy(), np.float32(255), out=out[b].numpy())
        else:  # the same bits (IEEE product and quotient, round half to even) on torch's threads
            pixels = x[b].mul(255).round_().to(torch.uint8).permute(1, 2, 0)
            out[b].copy_(_jpeg_round_trip(pixels, q)).div_(255)

    _on_threads(code, range(len(x)))
    return out


def _jpeg_via_host(x: Tensor, q: int) -> Tensor:
    """jpeg_compression of images on an accelerator: 8 bits there, one copy to the host, coded on its threads,
    one copy back. Bit for bit the CPU path's output (the same rounding, codec and quotient)."""
    pixels = x.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()  # [B,H,W,3]
    coded = torch.stack(_on_threads(lambda image: _jpeg_round_trip(image, q), pixels))
    return coded.to(x.device).to(x.dtype).div_(255)


def _jpeg_round_trip(pixels: Tensor, q: int) -> Tensor:
    """Encode uint8 [H,W,3] pixels (HWC, so that the codec's own CHW <-> HWC copies are views) at quality q with
    libjpeg-turbo and decode them; uint8 [3,H,W]. Runs no parallel torch op: safe on pool threads."""
    from torchvision.io import decode_jpeg, encode_jpeg

    return decode_jpeg(encode_jpeg(pixels.permute(2, 0, 1), quality=q))


def _on_threads(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """``[fn(item) for item in items]`` on up to ``torch.get_num_threads()`` threads (in order), for work that
    runs one item per core and releases the GIL (libjpeg-turbo). A pool per call, as for the CPU's Poisson
    draws in _core: idle threads that ran torch ops slow the main thread's later ops down."""
    items = list(items)
    workers = min(len(items), torch.get_num_threads())
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="corruptions-jpeg") as pool:
        return list(pool.map(fn, items))


def _symmetric_gaussian(field: Tensor, sigma: tuple[float, float]) -> Tensor:
    """scipy gaussian_filter(mode='reflect', truncate=3) of [B,1,H,W]: symmetric padding, radius int(3*sigma+0.5)."""
    return gaussian(field, sigma, mode="reflect", truncate=ELASTIC_TRUNCATE)


@register
def elastic_transform(x: Tensor, severity: int, rng: Rng) -> Tensor:
    """x sampled (bilinear, reflected at the borders) at (i + dy, j + dx).

    dx, dy = alpha * G_sigma * U(-m, m) per pixel, G_sigma a gaussian with sigma = 0.01 * (H, W),
    m = 0.005 * H. The reference's map_coordinates(order=1, mode='reflect') reflects about the
    pixel borders, which is grid_sample(padding_mode='reflection', align_corners=False).
    """
    B, _, H, W = x.shape
    m = ELASTIC_MAX * H
    sigma = (ELASTIC_SIGMA * H, ELASTIC_SIGMA * W)
    alpha = ELASTIC_ALPHA[severity - 1]
    dx = _symmetric_gaussian(rng.uniform(1, H, W, low=-m, high=m), sigma) * alpha
    dy = _symmetric_gaussian(rng.uniform(1, H, W, low=-m, high=m), sigma) * alpha
    rows = torch.arange(H, device=x.device, dtype=x.dtype)[:, None] + dy[:, 0]
    cols = torch.arange(W, device=x.device, dtype=x.dtype)[None, :] + dx[:, 0]
    grid = torch.stack(((2 * cols + 1) / W - 1, (2 * rows + 1) / H - 1), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
