"""Read a run directory (``docs/run-format.md``) into a :class:`Run`, with one-line errors."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from shiftbench.errors import ShiftbenchError, counted
from shiftbench.report.schema import CLEAN, REQUIRED_CURVE_COLUMNS, REQUIRED_RESULT_COLUMNS

TEXT_COLUMNS = ("split", "model", "kind", "estimator", "corruption")


@dataclass
class Run:
    """The parts of a run directory the report and the check use."""

    root: Path
    results: pd.DataFrame
    summary: dict[str, Any]
    manifest: dict[str, Any]
    curves: pd.DataFrame | None = None
    maps: list[Path] = field(default_factory=list)

    @property
    def suite_name(self) -> str:
        return str(self.manifest.get("suite") or self.summary.get("suite", {}).get("name", ""))

    @property
    def digest(self) -> str:
        return str(self.manifest.get("digest") or self.summary.get("suite", {}).get("digest", ""))

    @property
    def comparable(self) -> dict[str, Any] | None:
        """What makes the run's values comparable (``Suite.comparable``); None for a run of an older shiftbench."""
        value = self.manifest.get("comparable")
        return value if isinstance(value, dict) else None

    @property
    def models(self) -> dict[str, str]:
        """``{model: kind}`` in suite order (summary.json), else in order of appearance."""
        kinds = dict(zip(self.results["model"], self.results["kind"]))
        order = [m for m in self.summary.get("models", {}) if m in kinds]
        return {m: kinds[m] for m in order + [m for m in kinds if m not in order]}

    @property
    def estimators(self) -> list[str]:
        return list(dict.fromkeys(self.results["estimator"]))

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(self.results["split"]))

    @property
    def corrupted_splits(self) -> list[str]:
        """Split groups that have corrupted conditions."""
        return list(dict.fromkeys(self.corrupted["split"]))

    @property
    def clean(self) -> pd.DataFrame:
        return self.results[self.results["corruption"] == CLEAN]

    @property
    def corrupted(self) -> pd.DataFrame:
        return self.results[self.results["corruption"] != CLEAN]

    @property
    def severities(self) -> list[int]:
        """Corrupted severities present, ascending."""
        return sorted(int(s) for s in self.corrupted["severity"].unique())

    @property
    def classes(self) -> list[str]:
        return list(self.summary.get("classes") or [])

    @property
    def gallery(self) -> list[str] | None:
        """``metrics.gallery`` of the suite as run (``suite.yaml``); None when that file cannot say."""
        try:
            suite = yaml.safe_load((self.root / "suite.yaml").read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            return None
        if not isinstance(suite, dict):
            return None
        metrics = suite.get("metrics") or {}
        ids = metrics.get("gallery", []) if isinstance(metrics, dict) else None
        if isinstance(ids, str):
            return [ids]
        return [str(i) for i in ids] if isinstance(ids, list) else None


def load_run(path: str | Path, curves: bool = True, maps: bool = True) -> Run:
    """Load results (CSV, else Parquet), summary.json, manifest.json and, optionally, curves and maps."""
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise ShiftbenchError(f"run directory {str(root)!r} {what}; give the --out folder of `shiftbench run`")
    results = _read_results(root)
    summary = _read_json(root / "summary.json", required=False)
    manifest = _read_json(root / "manifest.json", required=False)
    if not summary and not manifest:
        raise ShiftbenchError(f"{root}: neither summary.json nor manifest.json found; not a finished "
                              "shiftbench run directory")
    run = Run(root=root, results=results, summary=summary, manifest=manifest)
    if curves and (root / "curves.parquet").exists():
        run.curves = _read_curves(root / "curves.parquet")
    if maps and (root / "maps").is_dir():
        run.maps = sorted((root / "maps").glob("*/*.npz"))
    return run


def _read_results(root: Path) -> pd.DataFrame:
    csv, parquet = root / "results.csv", root / "results.parquet"
    try:
        if csv.exists():
            df = _read_csv(csv)
        elif parquet.exists():
            df = pd.read_parquet(parquet)
        elif not (root / "manifest.json").exists():  # a run writes it first: this folder never held one
            raise ShiftbenchError(f"{root}: not a shiftbench run directory (no manifest.json); give the --out "
                                  "folder of `shiftbench run`")
        else:
            raise ShiftbenchError(f"{root}: no results.csv or results.parquet; the run has not finished "
                                  "(run `shiftbench run` again to complete it)")
    except ShiftbenchError:
        raise
    except Exception as exc:
        raise ShiftbenchError(f"{csv if csv.exists() else parquet}: unreadable ({type(exc).__name__}: {exc})") from None
    _require_columns(df, REQUIRED_RESULT_COLUMNS, csv if csv.exists() else parquet)
    if df.empty:
        failed = _failed(root)
        why = (f": all its {counted(len(failed), 'condition')} failed, the first {failed[0].get('condition')}: "
               f"{failed[0].get('reason')} (summary.json's failed)") if failed else ""
        raise ShiftbenchError(f"{root}: results table has no rows{why}")
    for col in TEXT_COLUMNS:
        df[col] = df[col].astype(str)
    df["severity"] = df["severity"].astype(int)
    return df


def _read_csv(path: Path) -> pd.DataFrame:
    """Names stay strings (a model may be called ``NA``); numbers read ``nan``/empty as NaN. A file that ends
    mid-line was cut short (the runner writes whole files, ending in a newline) and is refused."""
    if _ends_mid_line(path):
        raise ShiftbenchError(f"{path}: ends in the middle of a line (cut short?); run `shiftbench run` on the "
                              "same suite and --out again to rewrite the tables from its saved states")
    header = pd.read_csv(path, nrows=0).columns
    numeric = [c for c in header if c not in TEXT_COLUMNS]
    return pd.read_csv(path, keep_default_na=False, dtype={c: str for c in TEXT_COLUMNS if c in header},
                       na_values={c: ["", "nan", "NaN", "NA", "null"] for c in numeric})


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def _read_curves(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_parquet(path)
    except Exception as exc:
        raise ShiftbenchError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    _require_columns(df, REQUIRED_CURVE_COLUMNS, path)
    for col in ("split", "model", "estimator", "corruption", "curve"):
        df[col] = df[col].astype(str)
    df["severity"] = df["severity"].astype(int)
    return df


def _require_columns(df: pd.DataFrame, required: tuple[str, ...], path: Path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ShiftbenchError(f"{path}: missing column(s) {', '.join(missing)}; see docs/run-format.md "
                              "for the columns a run writes")


def _failed(root: Path) -> list[dict[str, Any]]:
    """summary.json's failed conditions (``[{condition, reason}]``), or [] when it cannot say."""
    try:
        failed = _read_json(root / "summary.json", required=False).get("failed")
    except ShiftbenchError:
        return []
    return [f for f in failed if isinstance(f, dict)] if isinstance(failed, list) else []


def _read_json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise ShiftbenchError(f"{path}: not found")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShiftbenchError(f"{path}: unreadable JSON ({type(exc).__name__}: {one_line_exc(exc)})") from None
    if not isinstance(data, dict):
        raise ShiftbenchError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def one_line_exc(exc: BaseException) -> str:
    return " ".join(str(exc).split())
