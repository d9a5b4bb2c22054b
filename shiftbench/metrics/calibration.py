"""Calibration: ECE, MCE, Brier, NLL and the reliability diagram, exact and in constant memory.

Two confidence sources (fixed per accumulator):

- probability mode (``update(probs, target)``): confidence = top-label probability max_k p_k;
  ``brier`` = sum_k (p_k - 1[k=y])^2 and ``nll`` = -log max(p_y, 1e-12) (multiclass).
- given confidence (``update(probs, target, confidence)``), the authors' protocol: confidence
  = 1 - normalised uncertainty of an estimator (or 1 - normalised gate entropy for routing
  calibration), judged against the correctness of argmax(probs). ``brier`` and ``nll`` become
  the binary scores of that confidence as a forecast of correctness: mean (conf - correct)^2
  and mean -[correct log conf + (1 - correct) log(1 - conf)], probabilities clamped at 1e-12.

The multiclass scores are also returned as ``brier_multiclass`` / ``nll_multiclass``; with a given
confidence they do not depend on it, so ``multiclass=False`` skips them (NaN) where another
accumulator of the same model already has them (the runner keeps them on one estimator per model).
Bins: n equal-width bins [e_i, e_i+1) with e = float32 ``linspace(0, 1, n+1)`` (torchmetrics' edges,
compared in float32 as torchmetrics does; within 1 ulp of i/n but not always i/n rounded: for 15 bins
e_3, e_6, e_7 are 1 ulp above and e_8, e_9, e_10 1 ulp below), the last bin closed at 1
(torchmetrics puts a confidence of exactly 1 into an extra bin of its own).
ECE = sum_b (n_b/N) |acc_b - conf_b|, MCE = max over non-empty bins.
``average="pixels"`` pools all valid pixels; ``average="images"`` is the mean of per-image
values (images without a valid pixel are skipped); the reliability bins are always pooled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from shiftbench.errors import ShiftbenchError
from shiftbench.metrics.base import Accumulator, RangeCheck, check_count, check_labels, check_map, row_chunks
from shiftbench.metrics.outcome import Outcome

AVERAGES = ("pixels", "images")
#: per-pixel scores, in the order of the ``pixel_sum`` / ``image_sum`` states
SCORES = ("brier", "nll", "brier_multiclass", "nll_multiclass")
#: per-image calibration errors, before SCORES in ``image_sum``
ERRORS = ("ece", "mce")
MODES = ("probability", "given")
EPS = 1e-12
#: how far from 1 a pixel's probabilities may sum, beyond K ulps of their dtype (fp16 softmax: about 1e-2);
#: a top-label probability may exceed 1 by as much (a gate-weighted mixture sums to 1 + ulps)
SUM_SLACK = 1e-3


def prob_slack(probs: Tensor) -> float:
    """Rounding allowed around 1 for probs [B,K,...]: SUM_SLACK + K ulps of their dtype."""
    return SUM_SLACK + probs.shape[1] * torch.finfo(probs.dtype).eps


def class_scores(probs: Tensor, y: Tensor, top: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """(sum_k p_k^2, p_y, max_k p_k if ``top``) of probabilities [B,K,H,W] at labels y [B,H,W] -> float32 [B,H,W].

    The squares are added one class plane at a time, k = 0, 1, ...: the same order for every pixel whatever
    the batch or chunk shape (a ``sum(1)`` may reorder it), and no [B,K,H,W] temporary.
    """
    sos = torch.zeros(probs.shape[:1] + probs.shape[2:], dtype=torch.float32, device=probs.device)
    for plane in probs.unbind(1):
        sos.addcmul_(plane, plane)
    p_y = probs.gather(1, y.unsqueeze(1)).squeeze(1).float()
    return sos, p_y, probs.amax(1).float() if top else None


def _check_simplex(checks: RangeCheck, probs: Tensor, invalid: Tensor) -> None:
    """Record for refusal the valid pixels of [B,K,r,W] whose probabilities are negative or do not sum to 1
    (softmax over the wrong dim, logits, a scaled map), up to :func:`prob_slack`."""
    slack = prob_slack(probs)
    valid = ~invalid
    checks.add("probs summed over the classes", probs.sum(1, dtype=torch.float32), 1 - slack, 1 + slack,
               f"1 on valid pixels (within {slack:.2g}): probabilities over dim 1", valid)
    checks.add("probs (the smallest per pixel)", probs.amin(1), 0.0, 1.0, "probabilities >= 0 on valid pixels", valid)


@dataclass
class _Score:
    rows: list[int]  # rows of SCORES this map adds to
    map: Tensor  # [B,r,W] float32, 0 on ignored pixels
    scale: float = 1.0  # per-pixel score = scale * map + shift
    shift: float = 0.0


@dataclass
class _Partial:
    """Per-image sums of one update, filled chunk by chunk, committed only after the checks pass."""

    hist: Tensor  # int64 [B,n+1,2]: pixels by image, bin (n = ignored) and (incorrect, correct)
    conf_sum: Tensor  # float64 [B,n+1,2]: their confidence sums
    scores: Tensor  # float64 [len(SCORES),B]
    n_valid: Tensor  # int64 [B]
    shift: Tensor  # float64 [len(SCORES)]: each score's constant per valid pixel (_Score.shift)

    @classmethod
    def zeros(cls, b: int, n: int, s: int, device: torch.device) -> _Partial:
        i64, f64 = dict(dtype=torch.int64, device=device), dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(b, n + 1, 2, **i64), torch.zeros(b, n + 1, 2, **f64), torch.zeros(s, b, **f64),
                   torch.zeros(b, **i64), torch.zeros(s, **f64))


def _edge_margin(edges: Tensor) -> float:
    """max_i |n e_i - i| (exact in float64), the most an edge's bucket boundary in t = n x lies off an integer.

    For a float32 x, t = n x is exact in float64; its bucket against ``edges`` is floor(t) whenever t is
    farther than this margin from every integer."""
    n = edges.numel() - 1
    exact = torch.arange(n + 1, dtype=torch.float64)
    return (edges.double() * n - exact).abs().max().item() + 1e-12


class CalibrationMetrics(Accumulator):
    """Top-label calibration of a segmentation model, see the module docstring for the definitions.

    States: per-bin pixel counts, correct counts (int64) and confidence sums (float64); float64
    sums of the scores over pixels and of the per-image values over images; pixel and image
    counts; update counts per confidence mode (mixing modes is refused at ``compute``).
    """

    def __init__(self, num_classes: int, n_bins: int = 15, ignore_index: int = 255, average: str = "pixels",
                 multiclass: bool = True) -> None:
        num_classes, n_bins = check_count("num_classes", num_classes), check_count("n_bins", n_bins)
        if average not in AVERAGES:
            raise ShiftbenchError(f"average={average!r} is not one of {', '.join(AVERAGES)}")
        super().__init__(num_classes=num_classes, n_bins=n_bins, ignore_index=ignore_index, average=average,
                         multiclass=bool(multiclass))
        self.num_classes, self.n_bins, self.average = num_classes, n_bins, average
        self.ignore_index = self.config["ignore_index"]
        self.multiclass = bool(multiclass)
        self.edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)  # torchmetrics' edges
        self._margin = _edge_margin(self.edges)
        f64, i64 = dict(dtype=torch.float64), dict(dtype=torch.int64)
        self.add_state("bin_count", torch.zeros(n_bins, **i64))
        self.add_state("bin_correct", torch.zeros(n_bins, **i64))
        self.add_state("bin_confidence", torch.zeros(n_bins, **f64))
        self.add_state("pixel_sum", torch.zeros(len(SCORES), **f64))
        self.add_state("image_sum", torch.zeros(len(ERRORS) + len(SCORES), **f64))
        self.add_state("n_images", torch.zeros((), **i64))
        self.add_state("modes_used", torch.zeros(len(MODES), **i64), reduce="max")  # 0/1 flags: batching-invariant

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, probs: Tensor, target: Tensor, confidence: Tensor | None = None, *,
               pred: Tensor | None = None, outcome: Outcome | None = None) -> None:
        """probs [B,K,H,W], target [B,H,W]; optional confidence [B,H,W] in [0,1] (checked on valid pixels).

        ``pred`` [B,H,W] may pass argmax(probs) when the caller already has it: it is used as the
        prediction without being recomputed (on CPU ``probs.max(1)`` is the slowest part of an update).
        ``outcome`` (:class:`~shiftbench.metrics.outcome.Outcome` of that prediction and ``target``) passes
        the correctness masks that the other metrics of the same model share; it implies ``pred``.
        """
        self._check_shapes(probs, target, confidence, pred)
        if outcome is None and pred is None:
            pred = probs.max(1).indices
        outcome = Outcome.resolve(outcome, pred, target, self.ignore_index, "CalibrationMetrics")
        outcome.check_target(self.num_classes)
        outcome.check_pred(self.num_classes)
        self._follow(target)
        given = confidence is not None
        if bool(self.modes_used[1 - int(given)]):  # one small host sync per update
            raise ShiftbenchError(f"CalibrationMetrics was updated {'without' if given else 'with'} a confidence "
                                  f"before; use one accumulator per confidence source")
        b, n = target.shape[0], self.n_bins
        part = _Partial.zeros(b, n, len(SCORES), target.device)
        checks = RangeCheck()
        # probs are read (and so checked) without a confidence or for the multiclass scores; the estimators of
        # one model share its probs and outcome: check them once
        simplex = (not given or self.multiclass) and probs is not outcome.checked_probs
        for rows in row_chunks(target.shape, target.device):
            self._chunk(part, probs[:, :, rows], None if confidence is None else confidence[:, rows], outcome, rows,
                        checks, simplex)
        checks.raise_if_bad()  # before anything is committed; the states are still untouched
        if simplex:
            outcome.checked_probs = probs
        part.n_valid += outcome.n_valid
        part.scores += part.shift[:, None] * part.n_valid
        self._commit(part, given=given)

    def _check_shapes(self, probs: Tensor, target: Tensor, confidence: Tensor | None, pred: Tensor | None) -> None:
        check_labels("target", target)
        b, h, w = target.shape
        want = (b, self.num_classes, h, w)
        if not isinstance(probs, Tensor) or not probs.is_floating_point() or tuple(probs.shape) != want:
            got = f"{probs.dtype} {list(probs.shape)}" if isinstance(probs, Tensor) else type(probs).__name__
            raise ShiftbenchError(f"probs must be a float tensor [B,K,H,W] = {list(want)}; "
                                  f"got {got}")
        if confidence is not None:
            check_map("confidence", confidence, target.shape)
        if pred is not None:
            check_labels("pred", pred, target.shape)

    def _chunk(self, part: _Partial, probs: Tensor, confidence: Tensor | None, outcome: Outcome, rows: slice,
               checks: RangeCheck, simplex: bool) -> None:
        """Add one row chunk ([B,K,r,W] probabilities, [B,r,W] confidence) to the per-image partial sums."""
        valid, correct, invalid = outcome.valid[:, rows], outcome.correct[:, rows], outcome.invalid[:, rows]
        given = confidence is not None
        sos = p_y = None
        if not given or self.multiclass:  # the reductions over the classes, once per chunk
            sos, p_y, top = class_scores(probs, outcome.safe_target[:, rows], top=not given)
            if simplex:  # False when the caller's outcome already saw these probs
                _check_simplex(checks, probs, invalid)
        if given:
            conf = checks.masked("confidence", confidence.float(), 0.0, 1.0, "values in [0, 1] on valid pixels",
                                 invalid, fill=0.5)
        else:
            conf = checks.masked("probs", top, 0.0, 1.0 + prob_slack(probs),
                                 "probabilities (top-label probability in [0, 1])", invalid, fill=0.5)
        if conf is None:
            return  # refused by checks.raise_if_bad(); nothing of this update is committed
        for score in self._scores(sos, p_y, conf, valid, correct, invalid, given):
            total = score.map.sum(2).sum(1, dtype=torch.float64)  # float32 along W, then float64
            part.scores[score.rows] += score.scale * total
            if score.shift:  # the constant per valid pixel; the update adds it per image (n_valid) at the end
                part.shift[score.rows] = score.shift
        conf64 = conf.double()
        cell = self._cells(conf64, valid, correct)
        size = part.hist.numel()
        part.hist += torch.bincount(cell, minlength=size).view_as(part.hist)
        part.conf_sum += torch.bincount(cell, conf64.view(-1), minlength=size).view_as(part.hist)

    def _scores(self, sos: Tensor | None, p_y: Tensor | None, conf: Tensor, valid: Tensor, correct: Tensor,
                invalid: Tensor, given: bool) -> list[_Score]:
        """Per-pixel float32 maps, zero on ignored pixels, with the SCORES rows they add to as
        score = scale * map + shift (the constant and the sign are applied to the sums, not per pixel).

        Multiclass (from sos = sum_k p_k^2 and p_y of :func:`class_scores`): Brier = sos - 2 p_y + 1,
        NLL = -log max(p_y, 1e-12). Given confidence c and
        q = c if correct else 1 - c (the forecast probability of what happened): binary Brier = (c - correct)^2,
        binary NLL = -log max(q, 1e-12), with q = |c + (correct - 1)| (exactly c, or 1 - c rounded once).
        In probability mode ``brier`` / ``nll`` are the multiclass maps.
        """
        if given:
            brier = (conf - correct).mul_(valid).square_()
            q = (correct - 1).add_(conf).abs_()
            binary = [_Score([0], brier), _Score([1], q.clamp_(min=EPS).log_().mul_(valid), -1.0)]
            if not self.multiclass:
                return binary
        brier_mc = sos.sub_(p_y, alpha=2).masked_fill_(invalid, 0)  # + 1 per valid pixel below
        log_p_y = p_y.masked_fill_(invalid, 1).clamp_(min=EPS).log_()
        if not given:
            return [_Score([0, 2], brier_mc, 1.0, 1.0), _Score([1, 3], log_p_y, -1.0)]
        return binary + [_Score([2], brier_mc, 1.0, 1.0), _Score([3], log_p_y, -1.0)]

    def _cells(self, conf: Tensor, valid: Tensor, correct: Tensor) -> Tensor:
        """Histogram cell of every pixel, int32 [B*r*W]: (image * (n+1) + bin) * 2 + correct; ignored pixels
        get bin n (dropped at commit). conf float64 [B,r,W] (float32 values); valid, correct float32 0/1.

        bin = bucket [e_i, e_i+1) of the float32 ``edges`` (1.0 in the last bin): t = n conf is exact in
        float64, and the bucket is floor(t) unless t lies within ``_margin`` of an integer (a confidence
        on or next to an edge); those few pixels are bucketized against the edges.
        """
        b, n = conf.shape[0], self.n_bins
        t = conf.mul(n).clamp_(0.5, n - 0.5)  # [0, 1) -> bin 0, (n-1, n] -> bin n-1: neither is near an edge
        bin_ = t.trunc()  # = floor for t > 0, and 2x cheaper on the CPU
        t.sub_(bin_)  # the fraction of t
        if n > 1 and t.numel() and bool(_near_integer(t, self._margin)):
            near = (t < self._margin).logical_or_(t > 1 - self._margin)
            idx = torch.unravel_index(near.view(-1).nonzero().squeeze(1), near.shape)
            bucket = torch.bucketize(conf[idx].float(), self.edges.to(conf.device), right=True) - 1
            bin_[idx] = bucket.clamp_(0, n - 1).to(bin_.dtype)
        cell = bin_.float().sub_(n).mul_(valid).add_(n)  # ignored pixels: bin n; float32 from here: exact small ints
        offset = torch.arange(0, 2 * b * (n + 1), 2 * (n + 1), device=conf.device, dtype=cell.dtype).view(b, 1, 1)
        return cell.mul_(2).add_(correct).add_(offset).view(-1).int()

    def _commit(self, part: _Partial, given: bool) -> None:
        """Fold one update's per-image sums into the states."""
        hist, conf = part.hist[:, :-1], part.conf_sum[:, :-1]  # without the ignored pixels' bin
        count, n_correct, conf_sum = hist.sum(2), hist[..., 1], conf.sum(2)
        self.bin_count += count.sum(0)
        self.bin_correct += n_correct.sum(0)
        self.bin_confidence += conf_sum.sum(0)
        self.pixel_sum += part.scores.sum(1)
        has = part.n_valid > 0
        per_image = torch.cat([_errors(count, n_correct, conf_sum, part.n_valid), part.scores / part.n_valid])
        self.image_sum += per_image[:, has].sum(1)
        self.n_images += has.sum()
        self.modes_used[int(given)] = 1

    # ----------------------------------------------------------------- compute
    def compute(self) -> dict[str, Any]:
        """ece, mce, brier, nll, brier_multiclass, nll_multiclass (NaN when nothing was seen), accuracy,
        mean_confidence, n_pixels, n_images, confidence mode, average, and the pooled reliability bins:
        bin_edges [n+1], bin_count, bin_accuracy, bin_confidence [n] (NaN for empty bins)."""
        used = [m for m, c in zip(MODES, self.modes_used.tolist()) if c]
        if len(used) > 1:
            raise ShiftbenchError("CalibrationMetrics was updated both with and without a confidence; "
                                  "use one accumulator per confidence source")
        count = self.bin_count.double()
        n = count.sum()
        if self.average == "pixels":
            gap = (self.bin_correct.double() - self.bin_confidence).abs()
            mce = torch.where(count > 0, gap / count, -torch.inf).amax() if n else torch.tensor(torch.nan)
            errors = torch.stack([gap.sum() / n, mce.to(gap)])
            scores = self.pixel_sum / n
        else:
            errors, scores = (self.image_sum / self.n_images.double()).split([len(ERRORS), len(SCORES)])
        out: dict[str, Any] = dict(zip(ERRORS + SCORES, (errors.tolist() + scores.tolist())))
        if used == ["given"] and not self.multiclass:
            out.update(brier_multiclass=float("nan"), nll_multiclass=float("nan"))
        out.update(
            accuracy=(self.bin_correct.sum() / n).item(),
            mean_confidence=(self.bin_confidence.sum() / n).item(),
            n_pixels=int(n.item()),
            n_images=int(self.n_images.item()),
            confidence=used[0] if used else None,
            average=self.average,
            bin_edges=self.edges.double(),
            bin_count=self.bin_count.cpu(),
            bin_accuracy=(self.bin_correct / count).cpu(),
            bin_confidence=(self.bin_confidence / count).cpu(),
        )
        return out


def _near_integer(frac: Tensor, margin: float) -> Tensor:
    """Whether any fraction in [0, 1) lies within ``margin`` of 0 or 1 (one aminmax, non-empty ``frac``)."""
    low, high = torch.aminmax(frac)
    return (low < margin) | (high > 1 - margin)


def _errors(count: Tensor, n_correct: Tensor, conf_sum: Tensor, n_valid: Tensor) -> Tensor:
    """Per-image ECE and MCE [2,B] from per-image bins [B,n] (0/0 for an image without valid pixels)."""
    gap = (n_correct.double() - conf_sum).abs()
    ece = gap.sum(1) / n_valid
    mce = torch.where(count > 0, gap / count, 0.0).amax(1)
    return torch.stack([ece, mce])
