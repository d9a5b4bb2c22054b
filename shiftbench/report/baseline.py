"""The calibration regression gate: a baseline of a run's metrics, and a direction-aware comparison.

Compared values: per split x model x estimator, on clean data (``clean``) and, per severity s, the
mean over the corruption types run at s (``severity s``), of every metric in
:data:`DEFAULT_TOLERANCES`. A value *regresses* when it is worse than the baseline by more than its
absolute tolerance: ``run - baseline > tol`` for lower-is-better metrics (ECE, MCE, Brier, NLL),
``baseline - run > tol`` for higher-is-better ones (mIoU, conditional peaks, AU-PAvPU).
Improvements never fail.

Missing values (NaN, e.g. a peak that is undefined because no patch is inaccurate): NaN vs NaN is
equal; a number that became NaN is a regression (the metric can no longer be computed); a NaN that
became a number is reported (``now defined``) but does not fail.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shiftbench import io
from shiftbench.errors import ShiftbenchError, comma_items, counted, file_problem
from shiftbench.report.aggregate import severity_means
from shiftbench.report.load import Run
from shiftbench.report.schema import METRICS

FORMAT, VERSION = "shiftbench-baseline", 1
#: metric -> default absolute tolerance (values are fractions: 0.005 = half a percentage point)
DEFAULT_TOLERANCES: dict[str, float] = {
    "ece": 0.005,
    "mce": 0.02,  # a maximum over bins: one sparse bin moves it, so it gets more room
    "brier": 0.005,
    "nll": 0.02,
    "miou": 0.005,
    "au_pavpu": 0.005,
    "peak_p_accurate_certain": 0.005,
    "peak_p_uncertain_inaccurate": 0.005,
    "peak_pavpu": 0.005,
}
#: float noise allowed on top of a tolerance (a change of exactly ``tol`` passes)
_EPS = 1e-12

Key = tuple[str, str, str, str, str]  # split, model, estimator, condition, metric


@dataclass(frozen=True)
class Change:
    """One compared value."""

    key: Key
    baseline: float | None  # None: the value is new (not in the baseline)
    current: float
    tolerance: float
    status: str  # one of STATUSES

    @property
    def delta(self) -> float:
        if self.baseline is None or not (math.isfinite(self.baseline) and math.isfinite(self.current)):
            return math.nan
        return self.current - self.baseline

    @property
    def failed(self) -> bool:
        return self.status in FAILING


#: every status a compared value can have; the failing ones
STATUSES = ("same", "better", "worse (within tolerance)", "REGRESSED", "BECAME NaN", "now defined", "new")
FAILING = {"REGRESSED", "BECAME NaN"}


# ------------------------------------------------------------------ values of a run
def condition_name(severity: int) -> str:
    return "clean" if severity == 0 else f"severity {severity}"


def run_values(run: Run, metrics: tuple[str, ...] = tuple(DEFAULT_TOLERANCES)) -> dict[Key, float]:
    """``{(split, model, estimator, condition, metric): value}``: clean, and means over corruptions per severity."""
    frame = severity_means(run.results, list(metrics))
    out: dict[Key, float] = {}
    for row in frame.itertuples(index=False):
        for metric in metrics:
            key = (row.split, row.model, row.estimator, condition_name(int(row.severity)), metric)
            out[key] = float(getattr(row, metric))
    return out


def coverage(run: Run) -> dict[str, dict[str, list]]:
    """Per split: the corruptions and severities run and the (corruption/severity) conditions among them
    (what the per-severity means average over: a condition that failed is missing from them)."""
    out = {}
    for split in run.splits:
        rows = run.corrupted[run.corrupted["split"] == split]
        out[split] = {"corruptions": sorted(set(rows["corruption"])),
                      "severities": sorted(int(s) for s in set(rows["severity"])),
                      "conditions": sorted({f"{c}/{int(s)}" for c, s in zip(rows["corruption"], rows["severity"])})}
    return out


def _conditions(cov: dict[str, list]) -> list[str]:
    """A coverage's conditions; baselines written before they were recorded held every pair."""
    if "conditions" in cov:
        return list(cov["conditions"])
    return sorted(f"{c}/{s}" for c in cov.get("corruptions", []) for s in cov.get("severities", []))


def check_complete(run: Run) -> None:
    """Refuse a run whose sweep had failed conditions: its means would silently average over fewer."""
    failed = run.summary.get("failed") or []
    if failed:
        names = ", ".join(str(f.get("condition", f)) if isinstance(f, dict) else str(f) for f in failed[:3])
        raise ShiftbenchError(f"{run.root}: {counted(len(failed), 'condition')} failed in its sweep ({names}"
                              f"{', ...' if len(failed) > 3 else ''}; summary.json says why); its means would "
                              "leave them out: fix and re-run them first")


# ------------------------------------------------------------------ baseline files
def make_baseline(run: Run) -> dict[str, Any]:
    """The baseline of a run: suite identity, coverage and the values, nested split/model/estimator/condition."""
    suite = {"name": run.suite_name, "digest": run.digest}
    if run.comparable is not None:
        suite["comparable"] = run.comparable
    values: dict[str, Any] = {}
    for (split, model, est, cond, metric), v in run_values(run).items():
        values.setdefault(split, {}).setdefault(model, {}).setdefault(est, {}).setdefault(cond, {})[metric] = _dump(v)
    return {"format": FORMAT, "version": VERSION,
            "suite": suite,
            "coverage": coverage(run),
            "source": {"run": str(run.root), "git_commit": run.summary.get("git_commit"),
                       "versions": run.summary.get("versions")},
            "values": values}


def write_baseline(run: Run, path: str | Path) -> dict[str, Any]:
    baseline = make_baseline(run)
    io.write_json(path, baseline)
    return baseline


def read_baseline(path: str | Path) -> dict[str, Any]:
    """Load and validate a baseline file (one-line errors for a missing, unreadable or foreign file)."""
    path = Path(path)
    if why := file_problem(path):
        raise ShiftbenchError(f"baseline {str(path)!r} {why}; give a baseline file written by --write-baseline")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShiftbenchError(f"baseline {path}: unreadable JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ShiftbenchError(f"baseline {path}: not a shiftbench baseline (expected \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise ShiftbenchError(f"baseline {path}: version {data.get('version')!r} is not supported (expected {VERSION})")
    for field in ("suite", "coverage", "values"):
        if not isinstance(data.get(field), dict):
            raise ShiftbenchError(f"baseline {path}: missing or malformed {field!r}")
    return data


def baseline_values(baseline: dict[str, Any]) -> dict[Key, float]:
    """Flatten the nested ``values`` of a baseline."""
    out: dict[Key, float] = {}
    try:
        for split, models in baseline["values"].items():
            for model, ests in models.items():
                for est, conds in ests.items():
                    for cond, metrics in conds.items():
                        for metric, v in metrics.items():
                            out[(split, model, est, cond, metric)] = _load(v)
    except (AttributeError, TypeError, ValueError):
        raise ShiftbenchError("baseline: malformed 'values' (expected split/model/estimator/condition/metric: "
                              "number)") from None
    return out


def _dump(v: float) -> float | str | None:
    """JSON has no NaN or infinity: NaN -> null, +-inf -> "inf" / "-inf"."""
    if math.isnan(v):
        return None
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _load(v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, str) and v in ("inf", "-inf"):
        return float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(v)
    return float(v)


# ------------------------------------------------------------------ comparison
def parse_tolerances(text: str | None) -> dict[str, float]:
    """``"ece=0.005,nll=0.02"`` -> the defaults with those entries replaced."""
    tolerances = dict(DEFAULT_TOLERANCES)
    for item in comma_items(text, "--tolerance", "METRIC=VALUE,... e.g. ece=0.005,nll=0.02") if text else ():
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in tolerances:
            raise ShiftbenchError(f"--tolerance {item!r}: expected METRIC=VALUE with METRIC one of "
                                  f"{', '.join(tolerances)}")
        try:
            tol = float(value)
        except ValueError:
            tol = math.nan
        if not (math.isfinite(tol) and tol >= 0):
            raise ShiftbenchError(f"--tolerance {item!r}: the tolerance must be a finite number >= 0")
        tolerances[name] = tol
    return tolerances


def check_identity(run: Run, baseline: dict[str, Any]) -> None:
    """Refuse a baseline of another suite, of values that are not comparable (another dataset, metrics settings,
    seed or limit: ``comparable``; models and estimators may differ) or of other corruptions / severities.
    A baseline or run without ``comparable`` (an older shiftbench) must match the whole suite digest."""
    suite = baseline["suite"]
    if suite.get("name") != run.suite_name:
        raise ShiftbenchError(f"baseline is of suite {suite.get('name')!r}, the run of suite {run.suite_name!r}; "
                              "compare runs of the same suite, or write a new baseline with --write-baseline")
    theirs, ours = suite.get("comparable"), run.comparable
    if isinstance(theirs, dict) and ours is not None:
        theirs, ours = _shared({**RECORD_DEFAULTS, **theirs}, {**RECORD_DEFAULTS, **ours})
        if theirs != ours:
            where, old, new = _first_difference(theirs, ours)
            raise ShiftbenchError(f"the run's {where} is {new}, the baseline's {old}: its values are not comparable "
                                  "(dataset, metrics settings, seed, --limit and amp must match; models and estimators "
                                  "may differ): run with the baseline's, or write a new baseline with --write-baseline")
    elif suite.get("digest") != run.digest:
        recorded = (("the baseline", isinstance(theirs, dict)), ("the run", ours is not None))
        older = " and ".join(name for name, has in recorded if not has)
        raise ShiftbenchError(f"baseline is of suite {suite.get('name')!r} (digest {str(suite.get('digest'))[:12]}), "
                              f"the run of suite {run.suite_name!r} (digest {run.digest[:12]}); {older} was written "
                              "by an older shiftbench, so the whole suite file, seed and --limit must match (the "
                              "digest covers all three): compare runs of the same suite, or write a new baseline "
                              "with --write-baseline from a run of this shiftbench (then models and estimators may "
                              "differ)")
    have = coverage(run)
    for split, cov in baseline["coverage"].items():
        if split not in have:
            continue
        lacking = sorted(set(_conditions(cov)) - set(have[split]["conditions"]))
        if lacking:
            raise ShiftbenchError(f"the run lacks {counted(len(lacking), 'condition')} of the baseline on split "
                                  f"{split!r}, e.g. {lacking[0]}; its means over corruptions would not be comparable: run the "
                                  "same conditions")
        if _conditions(have[split]) != _conditions(cov):
            raise ShiftbenchError(
                f"baseline averages split {split!r} over corruptions {','.join(cov.get('corruptions', [])) or 'none'} "
                f"at severities {','.join(map(str, cov.get('severities', []))) or 'none'}; the run has "
                f"{','.join(have[split]['corruptions']) or 'none'} at "
                f"{','.join(map(str, have[split]['severities'])) or 'none'}; run the same conditions")


#: fields of ``comparable`` that older records lack, with the value such a run had
RECORD_DEFAULTS = {"amp": False}


def _shared(old: Any, new: Any) -> tuple[Any, Any]:
    """Both JSON values restricted, at every level of nesting, to the keys both hold: a setting one shiftbench
    records and another does not, or an eval group one run has and the other lacks (its rows are new or
    missing, and said so), is not a difference of the shared values."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return old, new
    pairs = {k: _shared(old[k], new[k]) for k in old.keys() & new.keys()}
    return {k: a for k, (a, _) in pairs.items()}, {k: b for k, (_, b) in pairs.items()}


def _first_difference(old: Any, new: Any, where: str = "") -> tuple[str, str, str]:
    """The dotted path of the first (in key order) value that differs between two JSON objects, and both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key, _ABSENT) != new.get(key, _ABSENT):
                return _first_difference(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{where}.{key}".lstrip("."))
    return where or "identity", _show(old), _show(new)


_ABSENT = object()


def _show(value: Any) -> str:
    text = "absent" if value is _ABSENT else json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def compare(current: dict[Key, float], reference: dict[Key, float], tolerances: dict[str, float]) -> list[Change]:
    """Every value of ``current`` against ``reference``; a reference key the run lacks is an error."""
    missing = [k for k in reference if k not in current and k[4] in tolerances]
    if missing:
        raise ShiftbenchError(f"the run lacks {counted(len(missing), 'value')} of the baseline, e.g. "
                              f"{'/'.join(missing[0])}; run the baseline's models, estimators and conditions")
    changes = []
    for key, value in current.items():
        tol = tolerances[key[4]]
        if key not in reference:
            changes.append(Change(key, None, value, tol, "new"))
        else:
            changes.append(Change(key, reference[key], value, tol, _status(key[4], reference[key], value, tol)))
    return changes


def _status(metric: str, old: float, new: float, tol: float) -> str:
    if math.isnan(old) or math.isnan(new):
        return "same" if math.isnan(old) and math.isnan(new) else ("BECAME NaN" if math.isnan(new) else "now defined")
    if old == new:
        return "same"
    worse = (old - new) if METRICS[metric].higher_is_better else (new - old)
    if worse <= 0:
        return "better"
    return "worse (within tolerance)" if worse <= tol + _EPS else "REGRESSED"


def format_changes(changes: list[Change], every: bool = False, most: int = 20) -> str:
    """A fixed-width table of the values that changed (``every``: of all), a summary line, and one line per
    failing value (at most ``most``) naming what regressed."""
    header = ("split", "model", "estimator", "condition", "metric", "baseline", "run", "change", "tol", "status")
    rows = [(*c.key, _num(c.baseline), _num(c.current), _signed(c.delta), f"{c.tolerance:g}", c.status)
            for c in changes if every or c.status != "same"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    numeric = {5, 6, 7, 8}
    lines = ["  ".join(str(v).rjust(w) if i in numeric else str(v).ljust(w)
                       for i, (v, w) in enumerate(zip(r, widths))).rstrip() for r in [header, *rows]]
    failing = [c for c in changes if c.failed]
    named = [f"  {c.status}: {'/'.join(c.key)} {_num(c.baseline)} -> {_num(c.current)}"
             + (f" ({_signed(c.delta)}, tolerance {c.tolerance:g})" if math.isfinite(c.delta) else "")
             for c in failing[:most]]
    if len(failing) > most:
        named.append(f"  ... and {len(failing) - most} more")
    table = "\n".join(lines) + "\n" if rows else ""
    return table + summary_line(changes) + "\n" + "".join(line + "\n" for line in named)


def summary_line(changes: list[Change]) -> str:
    counts = {s: sum(c.status == s for c in changes) for s in STATUSES}
    failed = sum(counts[s] for s in FAILING)
    parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return f"{'FAIL' if failed else 'PASS'}: {len(changes)} values compared ({parts})"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.6g}"


def _signed(v: float) -> str:
    return "" if math.isnan(v) else f"{v:+.3g}"
