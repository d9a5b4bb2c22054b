"""Segmentation quality from a confusion matrix: mIoU, per-class IoU, pixel accuracy."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from shiftbench.metrics.base import Accumulator, check_count, check_labels
from shiftbench.metrics.outcome import Outcome


class SegmentationMetrics(Accumulator):
    """Confusion matrix ``confmat[t, p]`` (int64 [K,K]: target class t, predicted class p) over valid pixels.

    ``compute()``: IoU_k = TP_k / (TP_k + FP_k + FN_k) (NaN for a class absent from both target
    and prediction), ``miou`` = mean of the defined IoUs, ``pixel_accuracy`` = trace / total.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        num_classes = check_count("num_classes", num_classes)
        super().__init__(num_classes=num_classes, ignore_index=ignore_index)
        self.num_classes, self.ignore_index = num_classes, self.config["ignore_index"]
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.int64))

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, *, outcome: Outcome | None = None) -> None:
        """pred [B,H,W] predicted classes (argmax of the probabilities), target [B,H,W] (``ignore_index`` = ignore);
        ``outcome``: the :class:`~shiftbench.metrics.outcome.Outcome` of ``pred`` and ``target``, if the caller has it."""
        check_labels("target", target)
        check_labels("pred", pred, target.shape)
        outcome = Outcome.resolve(outcome, pred, target, self.ignore_index, "SegmentationMetrics")
        self._follow(target)
        k = self.num_classes
        outcome.check_target(k)
        outcome.check_pred(k)
        # ignored pixels go to a dropped extra bin k*k
        cell = (outcome.safe_target * k + pred).masked_fill_(outcome.invalid, k * k)
        self.confmat += torch.bincount(cell.reshape(-1), minlength=k * k + 1)[: k * k].view(k, k)

    def compute(self) -> dict[str, Any]:
        cm = self.confmat.double()
        tp = cm.diagonal()
        iou = tp / (cm.sum(0) + cm.sum(1) - tp)  # 0/0 -> NaN: class neither present nor predicted
        total = cm.sum()
        return {
            "miou": iou.nanmean().item(),
            "iou": iou.cpu(),
            "pixel_accuracy": (tp.sum() / total).item(),
            "n_pixels": int(self.confmat.sum()),
            "confusion_matrix": self.confmat.cpu(),
        }
