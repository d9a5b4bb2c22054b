"""The distribution of a normalised uncertainty map over valid pixels: histogram and mean."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from shiftbench.metrics.base import Accumulator, RangeCheck, check_count, check_labels, check_map, row_chunks
from shiftbench.metrics.outcome import Outcome


class UncertaintyHistogram(Accumulator):
    """Pixel counts of the uncertainty in ``bins`` equal-width bins [i/n, (i+1)/n) of [0,1] (1.0 in the
    last; bin = floor(n u), exact in float64), and the float64 sum for the mean, over valid pixels."""

    def __init__(self, bins: int = 50, ignore_index: int = 255) -> None:
        bins = check_count("bins", bins)
        super().__init__(bins=bins, ignore_index=ignore_index)
        self.bins, self.ignore_index = bins, self.config["ignore_index"]
        self.add_state("counts", torch.zeros(bins, dtype=torch.int64))
        self.add_state("total", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, uncertainty: Tensor, target: Tensor, *, outcome: Outcome | None = None) -> None:
        """uncertainty [B,H,W] in [0,1] (checked on valid pixels), target [B,H,W] (``ignore_index`` = ignore);
        ``outcome``: an :class:`~shiftbench.metrics.outcome.Outcome` for ``target`` whose masks are reused."""
        check_labels("target", target)
        check_map("uncertainty", uncertainty, target.shape)
        outcome = Outcome.resolve(outcome, None, target, self.ignore_index, "UncertaintyHistogram")
        outcome.check_target()
        self._follow(target)
        n = self.bins
        counts = torch.zeros(n + 1, dtype=torch.int64, device=target.device)
        total = torch.zeros((), dtype=torch.float64, device=target.device)
        checks = RangeCheck()
        for rows in row_chunks(target.shape, target.device):
            valid = outcome.valid[:, rows]
            u = checks.masked("uncertainty", uncertainty[:, rows], 0.0, 1.0,
                              "normalised uncertainty in [0, 1] on valid pixels", outcome.invalid[:, rows])
            if u is None:
                continue  # refused by checks.raise_if_bad() below
            u = u.mul(valid).double()  # 0 on ignored pixels
            # bin floor(n u) in [0, n-1] (1.0 in the last), exact in float64; ignored pixels: bin n (dropped)
            cell = u.mul(n).clamp_(0, n - 0.5).trunc_().float().sub_(n).mul_(valid).add_(n)  # trunc = floor here
            counts += torch.bincount(cell.view(-1).int(), minlength=n + 1)
            total += u.sum()
        checks.raise_if_bad()
        self.counts += counts[:n]
        self.total += total

    def compute(self) -> dict[str, Any]:
        """edges [n+1], centres [n], counts [n] (int64), n_pixels, mean (NaN without valid pixels)."""
        edges = torch.linspace(0, 1, self.bins + 1, dtype=torch.float64)
        n_pixels = int(self.counts.sum())
        return {"edges": edges, "centres": (edges[:-1] + edges[1:]) / 2, "counts": self.counts.cpu(),
                "n_pixels": n_pixels, "mean": self.total.item() / n_pixels if n_pixels else float("nan")}
