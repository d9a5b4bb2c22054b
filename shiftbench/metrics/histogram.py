"""The distribution of a normalised uncertainty map over valid pixels: histogram and mean."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from shiftbench.errors import ShiftbenchError
from shiftbench.metrics.base import Accumulator, RangeCheck, check_labels, check_map, row_chunks


class UncertaintyHistogram(Accumulator):
    """Pixel counts of the uncertainty in ``bins`` equal-width bins [i/n, (i+1)/n) of [0,1] (1.0 in the
    last; bin = floor(n u), exact in float64), and the float64 sum for the mean, over valid pixels."""

    def __init__(self, bins: int = 50, ignore_index: int = 255) -> None:
        if not isinstance(bins, int) or bins < 1:
            raise ShiftbenchError(f"bins must be a positive integer; got {bins!r}")
        super().__init__(bins=bins, ignore_index=ignore_index)
        self.bins, self.ignore_index = bins, ignore_index
        self.add_state("counts", torch.zeros(bins, dtype=torch.int64))
        self.add_state("total", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, uncertainty: Tensor, target: Tensor) -> None:
        """uncertainty [B,H,W] in [0,1] (checked on valid pixels), target [B,H,W] (``ignore_index`` = ignore)."""
        check_labels("target", target)
        check_map("uncertainty", uncertainty, target.shape)
        self._follow(target)
        n = self.bins
        counts = torch.zeros(n + 1, dtype=torch.int64, device=target.device)
        total = torch.zeros((), dtype=torch.float64, device=target.device)
        checks = RangeCheck()
        for rows in row_chunks(target.shape, target.device):
            u, invalid = uncertainty[:, rows].double(), target[:, rows] == self.ignore_index
            checks.add("uncertainty", u, 0.0, 1.0, "normalised uncertainty in [0, 1] on valid pixels", ~invalid)
            checks.raise_if_bad()  # before binning; the states are still untouched
            u.masked_fill_(invalid, 0)
            cell = u.mul(n).floor_().clamp_(0, n - 1).long().masked_fill_(invalid, n)
            counts += torch.bincount(cell.reshape(-1), minlength=n + 1)
            total += u.sum()
        self.counts += counts[:n]
        self.total += total

    def compute(self) -> dict[str, Any]:
        """edges [n+1], centres [n], counts [n] (int64), n_pixels, mean (NaN without valid pixels)."""
        edges = torch.linspace(0, 1, self.bins + 1, dtype=torch.float64)
        n_pixels = int(self.counts.sum())
        return {"edges": edges, "centres": (edges[:-1] + edges[1:]) / 2, "counts": self.counts.cpu(),
                "n_pixels": n_pixels, "mean": self.total.item() / n_pixels if n_pixels else float("nan")}
