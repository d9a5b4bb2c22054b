"""Registry, input validation and per-sample random streams shared by all corruptions."""

from __future__ import annotations

import hashlib
import numbers
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
from torch import Tensor

#: imagecorruptions' order: 15 ImageNet-C corruptions, then the 4 validation ones.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_SIZE = 32
#: values per part of a Poisson draw on the CPU, where ``torch.poisson`` samples one value after another
#: on one core: every part has its own generator, seeded from the sample's stream, and the parts run on
#: ``torch.get_num_threads()`` threads. The parts depend on the image size only, never on the thread count.
POISSON_PART = 2**18

CorruptionFn = Callable[[Tensor, int, "Rng"], Tensor]
_REGISTRY: dict[str, CorruptionFn] = {}


class CorruptionError(ValueError):
    """A bad argument to :func:`corrupt`; the message says what is allowed."""


def register(fn: CorruptionFn) -> CorruptionFn:
    """Register ``fn(x [B,3,H,W] float32 in [0,1], severity 1..5, rng) -> [B,3,H,W]`` under its name."""
    if fn.__name__ not in CORRUPTIONS:
        raise RuntimeError(f"{fn.__name__} is not one of the 19 corruption names")
    _REGISTRY[fn.__name__] = fn
    return fn


def _key(*parts: object) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Rng:
    """Per-sample random streams on the images' device.

    Sample ``b`` draws from its own ``torch.Generator`` seeded by
    ``blake2b(seed_b, name, severity)``, so its noise never depends on the batch it
    is in. Every method returns a tensor ``[B, *shape]`` (one draw per sample) on
    ``device``. CPU and CUDA generators produce different streams.
    """

    def __init__(self, seeds: Sequence[int], name: str, severity: int, device: torch.device):
        self.device = torch.device(device)
        self.generators = []
        for s in seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(_key(int(s), name, severity))
            self.generators.append(g)

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, draw: Callable[[torch.Generator], Tensor]) -> Tensor:
        if len(self.generators) == 1:  # no copy for a single sample
            return draw(self.generators[0]).unsqueeze(0)
        return torch.stack([draw(g) for g in self.generators])

    def normal(self, *shape: int, mean: float = 0.0, std: float = 1.0) -> Tensor:
        x = self._stack(lambda g: torch.randn(shape, generator=g, device=self.device))
        return x if (mean, std) == (0.0, 1.0) else x.mul_(std).add_(mean)

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        x = self._stack(lambda g: torch.rand(shape, generator=g, device=self.device))
        return x if (low, high) == (0.0, 1.0) else x.mul_(high - low).add_(low)

    def randint(self, low: int, high: int, *shape: int) -> Tensor:
        """Integers in [low, high), int64 [B, *shape]."""
        return self._stack(lambda g: torch.randint(low, high, shape, generator=g, device=self.device))

    def poisson(self, rates: Tensor) -> Tensor:
        """Poisson draws with per-element ``rates`` [B, ...] (float); on the CPU in parts of POISSON_PART
        values, part j of a sample drawn from a generator seeded with the sample stream's j-th draw."""
        if self.device.type != "cpu":
            return torch.stack([torch.poisson(r, generator=g) for r, g in zip(rates, self.generators)])
        jobs = []
        for r, g in zip(rates, self.generators):
            parts = r.reshape(-1).split(POISSON_PART)
            seeds = torch.randint(0, 2**62, (len(parts),), generator=g).tolist()
            jobs += zip(parts, seeds)
        # a pool per call: idle threads that ran torch ops slow the main thread's later ops down (measured 1.6x)
        with ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="corruptions-poisson") as pool:
            draws = list(pool.map(lambda job: torch.poisson(job[0], generator=torch.Generator().manual_seed(job[1])),
                                  jobs))
        return torch.cat(draws).view_as(rates)


def _is_int(value: object) -> bool:
    """An integer, Python's or numpy's (``np.int64`` from ``np.arange``), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate(images: Tensor, name: str, severity: int) -> None:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise CorruptionError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    if not _is_int(severity) or severity not in SEVERITIES:
        raise CorruptionError(f"severity {severity!r} is not allowed; use an integer in 1..5")
    if not isinstance(images, Tensor):
        raise CorruptionError(f"images must be a torch.Tensor [B,3,H,W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise CorruptionError(f"images must have shape [B,3,H,W], got {list(images.shape)}")
    if not images.is_floating_point():
        raise CorruptionError(f"images must be a float tensor in [0,1], got dtype {images.dtype}")
    h, w = images.shape[-2:]
    if h < MIN_SIZE or w < MIN_SIZE:
        raise CorruptionError(f"images must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {h}x{w}")
    if images.numel():
        lo, hi = torch.aminmax(images)  # NaN propagates into both and fails the test below
        if not (bool(lo >= 0) and bool(hi <= 1)):
            seen = (f"values in [{float(lo):g}, {float(hi):g}]" if bool(lo.isfinite() & hi.isfinite())
                    else "NaN or Inf")
            raise CorruptionError(f"images hold {seen}; image values must lie in [0,1] "
                                  "(convert uint8 images with x / 255)")


def _seeds(seed: int | Tensor, batch: int) -> list[int]:
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.shape != (batch,):
            raise CorruptionError(f"seed must be an int or an int64 tensor of shape [{batch}], "
                                  f"got {seed.dtype} {list(seed.shape)}")
        return [int(s) for s in seed.tolist()]
    if not _is_int(seed):
        raise CorruptionError(f"seed must be an int or an int64 tensor [B], got {type(seed).__name__}")
    return [int(seed)] * batch


@torch.no_grad()
def corrupt(images: Tensor, name: str, severity: int, seed: int | Tensor = 0) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to a batch.

    images: float [B,3,H,W] in [0,1], any device, H and W >= 32.
    seed:   an int (the same for every sample) or int64 [B] per-sample seeds; sample b's
            output depends only on (seed_b, name, severity) and its own pixels.
    Returns a tensor of the same shape, dtype and device, clipped to [0,1]; an empty batch (B = 0)
    gives an empty batch. Not differentiable: it runs without autograd (jpeg_compression is a codec).
    """
    _validate(images, name, severity)
    seeds = _seeds(seed, images.shape[0])
    if not seeds:
        return images.clone()
    severity = int(severity)
    rng = Rng(seeds, name, severity, images.device)
    x = images.detach().float().contiguous()  # detached: no_grad holds on this thread only, not in pools
    out = _REGISTRY[name](x, severity, rng)  # one memory layout: one rounding
    return out.clamp_(0.0, 1.0).to(images.dtype)
