"""Conditional correctness after Mukhoti & Gal (2018): p(accurate|certain), p(uncertain|inaccurate), PAvPU.

Images are cut into non-overlapping ``patch_size`` x ``patch_size`` patches from the top-left
corner; when H or W is not a multiple of the patch size, the patches of the last row/column
are smaller (the remainder is kept, not dropped). For each patch, over its valid
(non-ignored) pixels: accuracy = share of correct pixels; the patch is *accurate* iff
accuracy > ``accuracy_threshold``; its uncertainty u = mean of the pixel uncertainties,
computed in float64 and rounded to float32; patches without a valid pixel are dropped.
A patch is *certain* at threshold t iff u <= t, compared in float32 with t rounded to float32
(so thresholds and patch means share one float grid). With n_ac, n_au, n_ic, n_iu the counts
of accurate/inaccurate x certain/uncertain patches and N their total:

    p(accurate|certain)    = n_ac / (n_ac + n_ic)
    p(uncertain|inaccurate) = n_iu / (n_ic + n_iu)
    PAvPU                  = (n_ac + n_iu) / N

An undefined ratio (0/0) is NaN. All thresholds come exact from one pass: the state is a
histogram of patch uncertainty over the grid, split by accurate/inaccurate; cumulative sums
give the certain counts at every t. ``patch_size=1`` is the pixel-wise variant.

The grid is ``linspace(lo, hi, thresholds)`` with ``threshold_range=(lo, hi)``, by default [0, 1]. On that
grid t = 0 makes only patches of uncertainty exactly 0 certain, so p(uncertain|inaccurate) peaks there at 1
whenever no inaccurate patch has u = 0; the authors' code sweeps 0.01, 0.03, ..., 0.99
(``thresholds=50, threshold_range=(0.01, 0.99)``), where its peaks are informative and comparable with the
paper's Table 2. AU-PAvPU is the trapezoid over the grid divided by hi - lo: the mean PAvPU over the range.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from shiftbench.errors import ShiftbenchError, is_real
from shiftbench.metrics.base import (Accumulator, RangeCheck, check_count, check_labels, check_map,
                                     check_unit_range, row_chunks)
from shiftbench.metrics.outcome import Outcome, patch_sums

CURVES = ("p_accurate_certain", "p_uncertain_inaccurate", "pavpu")


class ConditionalMetrics(Accumulator):
    """Patch-wise conditional correctness at every threshold of ``linspace(lo, hi, thresholds)``.

    States: ``hist`` int64 [2,T+1] (row 0 inaccurate, row 1 accurate patches; column j < T counts the
    patches whose uncertainty first satisfies u <= t_j, column T those above the last threshold), the
    float64 sum of the uncertainty over valid pixels and the valid pixel count (for ``mean_uncertainty``).
    """

    def __init__(self, patch_size: int = 4, accuracy_threshold: float = 0.5, thresholds: int = 101,
                 ignore_index: int = 255, threshold_range: tuple[float, float] = (0.0, 1.0)) -> None:
        patch_size = check_count("patch_size", patch_size)
        if not is_real(accuracy_threshold) or not 0.0 <= accuracy_threshold < 1.0:
            raise ShiftbenchError(f"accuracy_threshold must be a number in [0, 1); got {accuracy_threshold!r}")
        thresholds = check_count("thresholds", thresholds, 2, "points of linspace(lo, hi)")
        lo, hi = check_unit_range(threshold_range)
        super().__init__(patch_size=patch_size, accuracy_threshold=float(accuracy_threshold),
                         thresholds=thresholds, threshold_range=(lo, hi), ignore_index=ignore_index)
        self.patch_size, self.accuracy_threshold = patch_size, float(accuracy_threshold)
        self.ignore_index = self.config["ignore_index"]
        self.thresholds = torch.linspace(lo, hi, thresholds, dtype=torch.float64)
        self.grid = self.thresholds.float()  # the float32 grid the patch means are compared with
        self.add_state("hist", torch.zeros(2, thresholds + 1, dtype=torch.int64))
        self.add_state("uncertainty_sum", torch.zeros((), dtype=torch.float64))
        self.add_state("n_pixels", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, uncertainty: Tensor, *, outcome: Outcome | None = None) -> None:
        """pred, target [B,H,W] class ids (``ignore_index`` in target = ignore); uncertainty [B,H,W] in [0,1]
        (checked on valid pixels). ``outcome``: the :class:`~shiftbench.metrics.outcome.Outcome` of ``pred``
        and ``target``, shared with the other metrics of the same model (computed here if not given)."""
        check_labels("target", target)
        check_labels("pred", pred, target.shape)
        check_map("uncertainty", uncertainty, target.shape)
        outcome = Outcome.resolve(outcome, pred, target, self.ignore_index, "ConditionalMetrics")
        outcome.check_target()
        outcome.check_pred()
        self._follow(target)
        p, t = self.patch_size, self.grid.numel()
        n_valid, n_correct = outcome.patches(p)
        accurate = (n_correct.double() / n_valid.double()) > self.accuracy_threshold  # float64, like Python's /
        row = t + 1  # cells per row of hist: the T thresholds, then "above the last one"
        dropped = 2 * row  # the cell of patches without a valid pixel
        base = torch.where(n_valid > 0, accurate * row, dropped)
        hist = torch.zeros(dropped + 1, dtype=torch.int64, device=target.device)
        u_total = torch.zeros((), dtype=torch.float64, device=target.device)
        grid = self.grid.to(target.device)
        checks = RangeCheck()
        for rows in row_chunks(target.shape, target.device, multiple=p):
            u = checks.masked("uncertainty", uncertainty[:, rows], 0.0, 1.0,
                              "normalised uncertainty in [0, 1] on valid pixels", outcome.invalid[:, rows])
            if u is None:
                continue  # refused by checks.raise_if_bad() below
            u_sum = patch_sums(u.mul(outcome.valid[:, rows]).double(), p)  # float64: exact for float32 inputs
            prow = slice(rows.start // p, -(-rows.stop // p))
            u_patch = (u_sum / n_valid[:, prow]).float()  # rounded to float32; NaN without valid pixels (dropped)
            first = torch.bucketize(u_patch, grid)  # first j with u <= t_j (T if none)
            cell = torch.where(base[:, prow] < dropped, base[:, prow] + first, dropped)
            hist += torch.bincount(cell.reshape(-1), minlength=dropped + 1)
            u_total += u_sum.sum()
        checks.raise_if_bad()
        self.hist += hist[:dropped].view(2, row)
        self.uncertainty_sum += u_total
        self.n_pixels += outcome.n_valid.sum()

    def compute(self) -> dict[str, Any]:
        """thresholds [T]; curves p_accurate_certain, p_uncertain_inaccurate, pavpu [T] (float64, NaN where
        undefined); counts n_ac, n_au, n_ic, n_iu [T] (int64); peak_<curve> and peak_<curve>_threshold (NaN
        skipped; the first threshold reaching the maximum); au_pavpu (trapezoid over the grid / (hi - lo));
        n_patches, n_accurate_patches, n_pixels, mean_uncertainty (over valid pixels)."""
        hist = self.hist.cpu()
        n_ic, n_ac = hist[:, :-1].cumsum(1)
        n_iu, n_au = hist[0].sum() - n_ic, hist[1].sum() - n_ac
        total = hist.sum().double()
        curves = {
            "p_accurate_certain": n_ac / (n_ac + n_ic).double(),
            "p_uncertain_inaccurate": n_iu / (n_ic + n_iu).double(),
            "pavpu": (n_ac + n_iu) / total,
        }
        out: dict[str, Any] = {"thresholds": self.thresholds.clone(), **curves,
                               "n_ac": n_ac, "n_au": n_au, "n_ic": n_ic, "n_iu": n_iu}
        for name, curve in curves.items():
            out[f"peak_{name}"], out[f"peak_{name}_threshold"] = _peak(curve, self.thresholds)
        span = self.thresholds[-1] - self.thresholds[0]
        out["au_pavpu"] = (torch.trapezoid(curves["pavpu"], self.thresholds) / span).item()
        out["n_patches"] = int(total.item())
        out["n_accurate_patches"] = int(hist[1].sum())
        out["n_pixels"] = int(self.n_pixels.item())
        out["mean_uncertainty"] = (self.uncertainty_sum.cpu() / self.n_pixels.cpu()).item()
        return out


def _peak(curve: Tensor, thresholds: Tensor) -> tuple[float, float]:
    """(max of the curve over its defined points, the first threshold reaching it); (NaN, NaN) if none."""
    defined = ~curve.isnan()
    if not defined.any():
        return float("nan"), float("nan")
    i = int(torch.where(defined, curve, -torch.inf).argmax())
    return curve[i].item(), thresholds[i].item()
