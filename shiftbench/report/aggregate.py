"""Reductions of a run's tables: means over corruptions, pooled curves, values at a threshold.

Means skip NaN (a mean is NaN only when every value is): an undefined peak on one corruption
(no inaccurate patch, say) does not blank the whole severity.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from shiftbench.errors import ShiftbenchError
from shiftbench.report.schema import CLEAN, CONDITIONAL, CONDITIONAL_COUNTS, KEYS

METHOD = ("split", "model", "estimator")


def severity_means(results: pd.DataFrame, metrics: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Per split x model x estimator x severity: clean (severity 0) and the mean over corruptions.

    ``value[s] = mean_c value(c, s)`` over the corruption types c run at severity s.
    Returns the columns ``split, model, estimator, severity, *metrics``.
    """
    return (results.groupby(list(METHOD) + ["severity"], sort=False)[list(metrics)].mean()
            .reset_index())


def corrupted_means(results: pd.DataFrame, metrics: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Per split x model x estimator: the mean over every corrupted condition (corruption x severity)."""
    corrupted = results[results["corruption"] != CLEAN]
    return corrupted.groupby(list(METHOD), sort=False)[list(metrics)].mean().reset_index()


def conditional_from_counts(n_ac, n_au, n_ic, n_iu) -> dict[str, np.ndarray]:
    """Mukhoti & Gal's conditional metrics from patch counts (arrays over thresholds).

    p(accurate|certain) = n_ac / (n_ac + n_ic), p(uncertain|inaccurate) = n_iu / (n_ic + n_iu),
    PAvPU = (n_ac + n_iu) / (n_ac + n_au + n_ic + n_iu); 0/0 is NaN.
    """
    n_ac, n_au, n_ic, n_iu = (np.asarray(a, dtype=float) for a in (n_ac, n_au, n_ic, n_iu))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"p_accurate_certain": n_ac / (n_ac + n_ic),
                "p_uncertain_inaccurate": n_iu / (n_ic + n_iu),
                "pavpu": (n_ac + n_iu) / (n_ac + n_au + n_ic + n_iu)}


def pooled_conditional(curves: pd.DataFrame) -> pd.DataFrame:
    """The conditional curves of the union of the given conditions: counts summed per threshold.

    ``curves`` holds the ``conditional`` rows of one method; returns ``x`` and the three metrics.
    """
    counts = curves.groupby("x", sort=True)[list(CONDITIONAL_COUNTS)].sum()
    out = pd.DataFrame(conditional_from_counts(*(counts[c].to_numpy() for c in CONDITIONAL_COUNTS)))
    out.insert(0, "x", counts.index.to_numpy())
    return out


def pooled_reliability(curves: pd.DataFrame) -> pd.DataFrame:
    """Reliability bins of the union of conditions: counts summed, confidence and accuracy count-weighted.

    ``conf_b = sum_i n_ib conf_ib / sum_i n_ib`` (likewise accuracy); empty bins are dropped.
    """
    df = curves[curves["bin_count"] > 0].assign(
        wc=lambda d: d["bin_count"] * d["bin_confidence"], wa=lambda d: d["bin_count"] * d["bin_accuracy"])
    g = df.groupby("x", sort=True)[["bin_count", "wc", "wa"]].sum()
    return pd.DataFrame({"x": g.index.to_numpy(), "bin_confidence": (g["wc"] / g["bin_count"]).to_numpy(),
                         "bin_accuracy": (g["wa"] / g["bin_count"]).to_numpy(),
                         "bin_count": g["bin_count"].to_numpy()})


def curve_peaks(curve: pd.DataFrame, metric: str) -> tuple[float, float]:
    """``(max, argmax x)`` of a curve column, NaN skipped; ``(nan, nan)`` when all are NaN."""
    y = curve[metric].to_numpy(dtype=float)
    if not np.isfinite(y).any():
        return float("nan"), float("nan")
    i = int(np.nanargmax(y))
    return float(y[i]), float(curve["x"].to_numpy()[i])


def at_threshold(curves: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The conditional metrics of every condition at the grid threshold nearest to ``threshold``.

    Raises when the nearest grid point is further than half a grid step away (a coarse grid).
    Returns the key columns, ``x`` (that grid point) and ``p_accurate_certain, p_uncertain_inaccurate, pavpu``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ShiftbenchError(f"--threshold {threshold}: must lie in [0, 1] (normalised uncertainty)")
    cond = curves[curves["curve"] == "conditional"]
    grid = np.unique(cond["x"].to_numpy(dtype=float))
    if grid.size == 0:
        raise ShiftbenchError("curves.parquet has no conditional rows")
    nearest = grid[np.abs(grid - threshold).argmin()]
    step = np.diff(grid).max() if grid.size > 1 else 0.0
    if abs(nearest - threshold) > step / 2 + 1e-9:
        raise ShiftbenchError(f"--threshold {threshold}: outside the run's threshold grid "
                              f"[{grid[0]:g}, {grid[-1]:g}]")
    rows = cond[np.isclose(cond["x"].to_numpy(dtype=float), nearest)]
    return rows[list(KEYS) + ["x"] + list(CONDITIONAL)].reset_index(drop=True)
