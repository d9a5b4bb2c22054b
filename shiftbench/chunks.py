"""Row chunks: how the estimators and metrics walk a batch on the CPU.

A whole-batch elementwise chain on the CPU streams every temporary through main memory (and
page-faults it in when freshly allocated); cut into row ranges of about ``CHUNK_PIXELS`` values,
the temporaries stay in cache and are reused. On a GPU one chunk is the whole batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

#: values per chunk by device type (a [B,r,W] map of 2^18 float32 values is 1 MB)
CHUNK_PIXELS: dict[str, int] = {"cpu": 2**18}
DEFAULT_CHUNK_PIXELS = 2**62


def row_chunks(shape: Sequence[int], device: torch.device, multiple: int = 1) -> list[slice]:
    """Row ranges that cut a [B,H,W] batch into chunks of about CHUNK_PIXELS values each; the rows of a
    chunk are a multiple of ``multiple``."""
    b, h, w = shape
    per_row = max(1, b * w)
    rows = CHUNK_PIXELS.get(device.type, DEFAULT_CHUNK_PIXELS) // per_row // multiple * multiple
    rows = min(max(rows, multiple), max(h, 1))
    return [slice(r, r + rows) for r in range(0, h, rows)] or [slice(0, 0)]
