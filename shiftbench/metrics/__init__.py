"""Streaming, exact metrics in constant memory (see :mod:`shiftbench.metrics.base`).

``SegmentationMetrics`` (mIoU, IoU, pixel accuracy), ``CalibrationMetrics`` (ECE, MCE, Brier,
NLL, reliability bins) and ``ConditionalMetrics`` (p(accurate|certain), p(uncertain|inaccurate),
PAvPU over a threshold grid, peaks, AU-PAvPU) and ``UncertaintyHistogram`` (distribution and mean of
an uncertainty map). ``Outcome`` holds the correctness masks of one prediction, computed once and
passed to every metric of the same model (``update(..., outcome=o)``).
"""

from shiftbench.metrics.base import Accumulator
from shiftbench.metrics.calibration import CalibrationMetrics
from shiftbench.metrics.conditional import ConditionalMetrics
from shiftbench.metrics.histogram import UncertaintyHistogram
from shiftbench.metrics.outcome import Outcome
from shiftbench.metrics.segmentation import SegmentationMetrics

__all__ = ["Accumulator", "CalibrationMetrics", "ConditionalMetrics", "Outcome", "SegmentationMetrics", "UncertaintyHistogram"]
