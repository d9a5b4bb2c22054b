"""Argument checks shared by the models: metadata only (type, ndim, shape, dtype), no pass over data."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from shiftbench.errors import ShiftbenchError, is_int, is_real


class ImagesOutOfRange(ShiftbenchError):
    """Images with values outside [0, 1] (NaN and Inf included): the runner fails only that condition."""


def count(n: Any, what: str) -> int:
    """``n`` if it is an int >= 1 (not a bool)."""
    if not is_int(n) or n < 1:
        raise ShiftbenchError(f"{what} must be an int >= 1, got {n!r}")
    return int(n)


def rate(p: Any, what: str) -> float:
    """``p`` if it is a number in [0, 1) (a dropout rate; 1 would drop everything)."""
    if not is_real(p) or not 0 <= p < 1:
        raise ShiftbenchError(f"{what} must be a number in [0, 1), got {p!r}")
    return float(p)


def grid(g: Any, what: str = "grid") -> tuple[int, int]:
    """``g`` as ``(h, w)`` if it is a pair of ints >= 1."""
    if (isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or len(g) != 2
            or any(not is_int(n) or n < 1 for n in g)):
        raise ShiftbenchError(f"{what} must be a pair of ints >= 1 (h, w), got {g!r}")
    return int(g[0]), int(g[1])


def seeds(s: Any, batch: int | None) -> list[int]:
    """Per-sample seeds as ints: an int64 tensor ``[B]`` or a sequence of ``B`` ints (any number if ``batch``
    is None)."""
    if isinstance(s, Tensor):
        if s.dtype != torch.int64 or s.dim() != 1:
            raise ShiftbenchError(f"seeds must be an int64 tensor [B] or a list of B ints, "
                                  f"got {s.dtype} {list(s.shape)}")
        s = s.tolist()
    elif isinstance(s, (str, bytes)) or not hasattr(s, "__iter__"):
        raise ShiftbenchError(f"seeds must be an int64 tensor [B] or a list of B ints, got {type(s).__name__}")
    s = list(s)
    bad = next((v for v in s if not is_int(v)), None)
    if bad is not None:
        raise ShiftbenchError(f"seeds must be ints (an int64 tensor [B] or a list of B ints), "
                              f"got a {type(bad).__name__} ({bad!r})")
    if batch is not None and len(s) != batch:
        raise ShiftbenchError(f"got {len(s)} seeds for a batch of {batch} images; give one per image")
    return [int(v) for v in s]


def _autocast(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def images(x: Any, dtype: torch.dtype | None = None) -> None:
    """Refuse anything but a non-empty floating batch ``[B,3,H,W]``; with ``dtype`` (the model's), also
    another floating dtype unless autocast is on for ``x``'s device."""
    if not isinstance(x, Tensor):
        raise ShiftbenchError(f"x must be a torch.Tensor [B,3,H,W] of images in [0,1], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ShiftbenchError(f"x must have shape [B,3,H,W] (RGB images in [0,1]), got {list(x.shape)}")
    if x.shape[0] == 0:
        raise ShiftbenchError(f"x is an empty batch {list(x.shape)}; give at least one image")
    if not x.is_floating_point():
        raise ShiftbenchError(f"x must be a floating tensor of images in [0,1], got {x.dtype} "
                              "(convert uint8 images with x.float() / 255)")
    if dtype is not None and x.dtype != dtype and not _autocast(x.device.type):
        raise ShiftbenchError(f"x is {x.dtype}; the model runs in {dtype}: cast with x.to({dtype}) "
                              "(or run under torch.autocast)")
