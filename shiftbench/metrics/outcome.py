"""What a prediction got right: the per-pixel masks every metric of one model and batch shares.

The runner updates a calibration, a conditional and a histogram accumulator for every
estimator of a model (up to 3 x 6 per MoE), all against the same prediction and labels.
An :class:`Outcome` computes the masks once; each accumulator's ``update(..., outcome=o)``
reads them instead of recomputing them. Without one, an accumulator builds its own.

The masks are float32 0/1 maps: on the CPU, arithmetic with them (``x * valid``) is several
times faster than masking with bool tensors (``masked_fill``, ``where``, ``sum`` of bools).
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from shiftbench.errors import ShiftbenchError
from shiftbench.metrics.base import check_labels, check_range


def _unchecked(checked: set[int | None], num_classes: int | None) -> bool:
    """Whether ids still need a check against ``num_classes`` (any count checked covers None: ids >= 0)."""
    return num_classes not in checked and not (num_classes is None and checked)


def _top(num_classes: int | None) -> float:
    return float("inf") if num_classes is None else num_classes - 1


def _ids(num_classes: int | None) -> str:
    return "class ids >= 0" if num_classes is None else f"class ids in [0, {num_classes - 1}]"


def patch_sums(x: Tensor, patch: int) -> Tensor:
    """Sums over non-overlapping patch x patch blocks, float [B,H,W] -> [B,ceil(H/p),ceil(W/p)], in x's dtype.

    Border blocks are partial when H or W is not a multiple of ``patch``: summed over the pixels they have.
    """
    return F.avg_pool2d(x.unsqueeze(1), patch, ceil_mode=True, divisor_override=1).squeeze(1)


#: the cached masks that depend on the labels only (shared by :meth:`Outcome.for_pred`)
_LABEL_ONLY = ("invalid", "valid", "safe_target", "n_valid")


class Outcome:
    """pred, target [B,H,W] class ids (``ignore_index`` in target = an ignored pixel); pred may be None
    for a metric that needs only the valid mask.

    ``valid`` = [target != ignore_index] and ``correct`` = valid * [pred == target], float32 0/1
    [B,H,W]; ``invalid`` the bool complement of valid; ``n_valid`` int64 [B] valid pixels per image.
    """

    def __init__(self, pred: Tensor | None, target: Tensor, ignore_index: int = 255) -> None:
        check_labels("target", target)
        if pred is not None:
            check_labels("pred", pred, target.shape)
        self.pred, self.target, self.ignore_index = pred, target, ignore_index
        self._checked: set[int | None] = set()  # class counts the target (the pred) was checked against
        self._checked_pred: set[int | None] = set()
        self.checked_probs: Tensor | None = None  # the probabilities CalibrationMetrics found valid with this outcome
        self._patches: dict[int, tuple[Tensor, Tensor]] = {}

    @cached_property
    def invalid(self) -> Tensor:
        return self.target == self.ignore_index

    @cached_property
    def valid(self) -> Tensor:
        return self.target.ne(self.ignore_index).float()

    @cached_property
    def correct(self) -> Tensor:
        if self.pred is None:
            raise ShiftbenchError("this Outcome was made without a prediction; correctness needs pred")
        return (self.pred == self.target).float().mul_(self.valid)

    @cached_property
    def safe_target(self) -> Tensor:
        """target with ignored pixels set to class 0, int64 (usable as an index, whatever the labels' dtype)."""
        return self.target.masked_fill(self.invalid, 0).long()

    @cached_property
    def n_valid(self) -> Tensor:
        return self.valid.sum(2).sum(1, dtype=torch.float64).long()  # float32 rows: exact below 2^24 pixels

    def check_target(self, num_classes: int | None = None) -> None:
        """Refuse target ids outside [0, num_classes - 1] (None: negative ids) on valid pixels, once per class count."""
        if _unchecked(self._checked, num_classes):
            check_range("target", self.safe_target, None, 0, _top(num_classes),
                        f"{_ids(num_classes)} or ignore_index {self.ignore_index}")
            self._checked.add(num_classes)

    def check_pred(self, num_classes: int | None = None) -> None:
        """Refuse predicted ids outside [0, num_classes - 1] (None: negative ids) on valid pixels, once per class
        count."""
        if self.pred is not None and _unchecked(self._checked_pred, num_classes):
            check_range("pred", self.pred, ~self.invalid, 0, _top(num_classes), _ids(num_classes))
            self._checked_pred.add(num_classes)

    def patches(self, patch: int) -> tuple[Tensor, Tensor]:
        """(valid, correct) pixel counts per non-overlapping patch x patch block, float [B,ceil(H/p),ceil(W/p)]
        (exact small integers; partial blocks at the right and bottom borders)."""
        if patch not in self._patches:
            self._patches[patch] = (patch_sums(self.valid, patch), patch_sums(self.correct, patch))
        return self._patches[patch]

    def for_pred(self, pred: Tensor) -> Outcome:
        """An Outcome of another prediction of the same labels, sharing the label-only masks computed so
        far (valid, invalid, safe_target, n_valid, the target check): the runner makes one per batch and
        one per model from it."""
        other = Outcome(pred, self.target, self.ignore_index)
        for name in _LABEL_ONLY:
            if name in self.__dict__:
                other.__dict__[name] = self.__dict__[name]
        other._checked = set(self._checked)
        return other

    @classmethod
    def resolve(cls, outcome: Outcome | None, pred: Tensor | None, target: Tensor, ignore_index: int,
                who: str) -> Outcome:
        """The outcome a metric's update uses: ``outcome`` (checked against ``target`` and ``ignore_index``)
        or, without one, a new Outcome of ``pred`` and ``target``."""
        if outcome is None:
            return cls(pred, target, ignore_index)
        outcome.matches(target, ignore_index, who, pred)
        return outcome

    def matches(self, target: Tensor, ignore_index: int, who: str, pred: Tensor | None = None) -> None:
        """Refuse an outcome computed for other labels, another ``pred`` (when given) or another ignore_index."""
        for name, given, own in (("target", target, self.target), ("pred", pred, self.pred)):
            if given is not None and given is not own and (
                    own is None or given.shape != own.shape or not torch.equal(given, own)):
                raise ShiftbenchError(f"{who}: outcome was computed for another {name}")
        if ignore_index != self.ignore_index:
            raise ShiftbenchError(f"{who}: outcome has ignore_index {self.ignore_index}; the metric uses {ignore_index}")
