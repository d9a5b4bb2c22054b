"""What the report and the check read from a run directory: column names and metric facts.

The run format itself is fixed in ``docs/run-format.md``; this module is the one place the
report side names its columns, so a format change is a change here.
"""

from __future__ import annotations

from dataclasses import dataclass

CLEAN = "clean"

#: columns of ``results.csv`` that identify a row (one row per key)
KEYS = ("split", "model", "estimator", "corruption", "severity")
#: columns the report and the check cannot work without
REQUIRED_RESULT_COLUMNS = KEYS + ("kind", "miou", "ece", "mce", "brier", "nll", "au_pavpu",
                                  "peak_p_accurate_certain", "peak_p_uncertain_inaccurate", "peak_pavpu")
#: columns of ``curves.parquet``
CURVE_KEYS = KEYS + ("curve", "x")
CONDITIONAL_COUNTS = ("n_ac", "n_au", "n_ic", "n_iu")
CONDITIONAL = ("p_accurate_certain", "p_uncertain_inaccurate", "pavpu")
REQUIRED_CURVE_COLUMNS = CURVE_KEYS + CONDITIONAL + CONDITIONAL_COUNTS + (
    "bin_confidence", "bin_accuracy", "bin_count", "count")


@dataclass(frozen=True)
class Metric:
    """How a metric is named, which way is better, and how a table shows it (``value * scale``)."""

    label: str
    higher_is_better: bool
    scale: float = 1.0
    decimals: int = 3

    @property
    def unit_label(self) -> str:
        return f"{self.label} (%)" if self.scale == 100 else self.label


#: every metric the report shows or the check compares, keyed by its results.csv column
METRICS: dict[str, Metric] = {
    "miou": Metric("mIoU", True, 100, 2),
    "pixel_accuracy": Metric("Pixel acc.", True, 100, 2),
    "ece": Metric("ECE", False, 100, 2),
    "mce": Metric("MCE", False, 100, 2),
    "brier": Metric("Brier", False, 1, 4),
    "nll": Metric("NLL", False, 1, 3),
    "au_pavpu": Metric("AU-PAvPU", True, 100, 2),
    "peak_p_accurate_certain": Metric("p(acc|cert)", True, 100, 2),
    "peak_p_uncertain_inaccurate": Metric("p(unc|inacc)", True, 100, 2),
    "peak_pavpu": Metric("PAvPU", True, 100, 2),
    # conditional metrics read off the curves at a fixed threshold
    "p_accurate_certain": Metric("p(acc|cert)", True, 100, 2),
    "p_uncertain_inaccurate": Metric("p(unc|inacc)", True, 100, 2),
    "pavpu": Metric("PAvPU", True, 100, 2),
}

CALIBRATION = ("ece", "mce", "brier", "nll")
PEAKS = ("peak_p_accurate_certain", "peak_p_uncertain_inaccurate", "peak_pavpu")
