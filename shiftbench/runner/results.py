"""States -> tables: ``results.csv`` / ``results.parquet`` and ``curves.parquet`` (docs/run-format.md)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from shiftbench import io
from shiftbench.errors import ShiftbenchError
from shiftbench.runner.conditions import Condition
from shiftbench.runner.store import RunStore

KEYS = ["split", "model", "kind", "estimator", "corruption", "severity"]
RESULT_COLUMNS = KEYS + [
    "n_images", "n_pixels", "miou", "pixel_accuracy", "ece", "mce", "brier", "nll", "brier_multiclass",
    "nll_multiclass", "mean_uncertainty", "au_pavpu",
    "peak_p_accurate_certain", "peak_p_accurate_certain_threshold",
    "peak_p_uncertain_inaccurate", "peak_p_uncertain_inaccurate_threshold",
    "peak_pavpu", "peak_pavpu_threshold",
]
CURVE_VALUES = ["p_accurate_certain", "p_uncertain_inaccurate", "pavpu", "n_ac", "n_au", "n_ic", "n_iu",
                "bin_confidence", "bin_accuracy", "bin_count", "count"]


def _float(v: Any) -> float:
    v = float(v.item() if isinstance(v, torch.Tensor) else v)
    return v if math.isfinite(v) else float("nan")


class _Curves:
    """curves.parquet built column by column: each block (one curve of one row) appends whole arrays."""

    def __init__(self) -> None:
        self.columns: dict[str, list[np.ndarray]] = {c: [] for c in KEYS + ["curve", "x"] + CURVE_VALUES}

    def add(self, key: dict[str, Any], curve: str, x: Tensor, **values: Tensor) -> None:
        n = len(x)
        for c, v in dict(key, curve=curve).items():
            self.columns[c].append(np.full(n, v, dtype=object if isinstance(v, str) else np.int64))
        self.columns["x"].append(x.double().numpy())
        for c in CURVE_VALUES:
            v = values.get(c)
            self.columns[c].append(np.full(n, np.nan) if v is None else _floats(v))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({c: np.concatenate(parts) if parts else np.array([]) for c, parts in self.columns.items()},
                            columns=list(self.columns))


def _floats(v: Tensor) -> np.ndarray:
    """float64 values with +-inf as NaN (like :func:`_float`)."""
    a = v.double().numpy().copy()
    a[~np.isfinite(a)] = np.nan
    return a


def condition_tables(suite, cond: Condition, payload: dict[str, Any], curves: _Curves) -> list[dict]:
    """The result rows of one finished condition; its curve blocks are appended to ``curves``."""
    from shiftbench.runner.sweep import Accumulators

    plan = {m.name: m.estimators for m in suite.models}
    kinds = {m.name: m.kind for m in suite.models}
    accs = Accumulators(suite, plan, torch.device("cpu"))
    states = payload["states"]
    for name, acc in accs.all():
        acc.load_state_dict(states[name])
    rows = []
    for model, ests in plan.items():
        seg = accs.segmentation[model].compute()
        cals = {e: accs.calibration[model, e].compute() for e in ests}
        first = cals[ests[0]]  # carries the model's multiclass Brier/NLL
        for e in ests:
            cal = dict(cals[e], brier_multiclass=first["brier_multiclass"], nll_multiclass=first["nll_multiclass"])
            con = accs.conditional[model, e].compute()
            hist = accs.histogram[model, e].compute()
            key = {"split": cond.split, "model": model, "kind": kinds[model], "estimator": e,
                   "corruption": cond.corruption, "severity": cond.severity}
            row = dict(key, n_images=int(payload["n_images"]), n_pixels=int(hist["n_pixels"]),
                       miou=_float(seg["miou"]), pixel_accuracy=_float(seg["pixel_accuracy"]),
                       mean_uncertainty=_float(hist["mean"]))
            for c in ("ece", "mce", "brier", "nll", "brier_multiclass", "nll_multiclass"):
                row[c] = _float(cal[c])
            for c in RESULT_COLUMNS:
                if c.startswith(("peak_", "au_")):
                    row[c] = _float(con[c])
            rows.append(row)
            curves.add(key, "conditional", con["thresholds"], **{
                c: con[c] for c in ("p_accurate_certain", "p_uncertain_inaccurate", "pavpu", "n_ac", "n_au", "n_ic",
                                    "n_iu")})
            n_bins = len(cal["bin_count"])
            curves.add(key, "reliability", (torch.arange(n_bins, dtype=torch.float64) + 0.5) / n_bins,
                       bin_confidence=cal["bin_confidence"], bin_accuracy=cal["bin_accuracy"],
                       bin_count=cal["bin_count"])
            curves.add(key, "histogram", hist["centres"], count=hist["counts"])
    return rows


def write_results(suite, store: RunStore, conditions: list[Condition]) -> pd.DataFrame:
    """Assemble every finished condition's states into the tables (atomically)."""
    rows, curves = [], _Curves()
    for cond in conditions:
        if store.is_done(cond):
            payload = store.load_state(cond)
            try:
                rows += condition_tables(suite, cond, payload, curves)
            except ShiftbenchError as exc:  # states of other settings or an older shiftbench: name the file
                raise ShiftbenchError(f"{store.state_path(cond)}: {exc}; delete it to recompute that condition") \
                    from None
            except (LookupError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
                raise ShiftbenchError(f"{store.state_path(cond)}: does not hold this suite's metric states "
                                      f"({type(exc).__name__}); delete it to recompute that condition") from None
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    curve_df = curves.frame()
    with io.atomic_path(store.root / "results.csv") as tmp:
        results.to_csv(tmp, index=False, float_format="%.10g")
    with io.atomic_path(store.root / "results.parquet") as tmp:
        results.to_parquet(tmp, index=False)
    with io.atomic_path(store.root / "curves.parquet") as tmp:
        curve_df.to_parquet(tmp, index=False)
    return results
