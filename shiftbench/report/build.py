"""``build_report``: every figure and table of a run, written atomically, plus report.md and report.html.

Layout of the output folder::

    OUT/figures/<name>.<format> and <name>.png
    OUT/tables/<name>.md and <name>.tex
    OUT/report.md, OUT/report.html

Figures and tables an earlier report wrote into OUT that this one does not write are removed
(``OUT/.shiftbench-report.json`` lists them); other files in OUT are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

from shiftbench import io
from shiftbench.errors import ShiftbenchError, counted
from shiftbench.report import aggregate, document, figures, tables
from shiftbench.report.load import Run, load_run
from shiftbench.report.style import RC, method_colours

FORMATS = ("pdf", "png", "svg")


@dataclass
class FigureFile:
    family: str
    name: str
    title: str
    caption: str
    files: list[Path]  # relative to the output folder; the PNG last


@dataclass
class Report:
    """What was written: figures, tables (with their files) and notes on what was skipped."""

    out: Path
    run: Run
    figures: list[FigureFile] = field(default_factory=list)
    tables: list[tuple[tables.Table, list[Path]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what a reader of the figures must know (failures)


def build_report(run_dir: str | Path, out: str | Path | None = None, fmt: str = "pdf", threshold: float = 0.5,
                 sweep_severities: list[int] | None = None, gallery_models: list[str] | None = None) -> Report:
    """Render every figure and table of the run in ``run_dir`` into ``out`` (default ``run_dir/report``)."""
    if fmt not in FORMATS:
        raise ShiftbenchError(f"--format {fmt!r}: not supported; choose one of {', '.join(FORMATS)}")
    run = load_run(run_dir)
    report = Report(out=Path(out) if out is not None else run.root / "report", run=run)
    ctx = figures.Context(run=run, colours=method_colours(list(run.models)), threshold=threshold,
                          sweep_severities=_sweep_severities(run, sweep_severities),
                          gallery_models=_gallery_models(run, gallery_models))
    _check_threshold(run, threshold)
    report.warnings = run_warnings(run)
    _write_tables(report)
    with matplotlib.rc_context(RC):
        for family, draw in figures.FIGURES.items():
            for item in draw(ctx):
                if isinstance(item, figures.Note):
                    report.notes.append(item.text)
                else:
                    report.figures.append(_save(report.out, family, item, fmt))
    io.write_text(report.out / "report.md", document.markdown(report))
    io.write_text(report.out / "report.html", document.html_page(report))
    _remove_stale(report)
    return report


#: in OUT: the files the last report wrote there, so that the next one removes only its own leftovers
WRITTEN = ".shiftbench-report.json"


def _remove_stale(report: Report) -> None:
    """Remove the figures and tables the previous report in ``out`` wrote (listed in :data:`WRITTEN`) that
    this one did not (a split this run lacks, another format), so that no file of another run passes for
    one of this run's; files shiftbench did not write are never touched. Then list this report's files."""
    import json

    written = sorted({rel.as_posix() for f in report.figures for rel in f.files}
                     | {rel.as_posix() for _, files in report.tables for rel in files})
    record = report.out / WRITTEN
    try:
        before = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        before = []
    for rel in set(before if isinstance(before, list) else []) - set(written):
        path = report.out / str(rel)
        if path.parent.name in ("figures", "tables") and path.parent.parent == report.out:  # nowhere else
            path.unlink(missing_ok=True)
    io.write_json(record, written)


def run_warnings(run: Run) -> list[str]:
    """Failed conditions and skipped files from summary.json, one sentence each: the tables and figures
    average over the conditions that finished, so a missing one shifts a mean without showing."""
    out = []
    failed = run.summary.get("failed") or []
    if failed:
        listed = "; ".join(f"{f.get('condition')} ({f.get('reason')})" for f in failed[:5])
        more = f"; and {len(failed) - 5} more (summary.json)" if len(failed) > 5 else ""
        out.append(f"{counted(len(failed), 'condition')} failed and are left out of every table and figure, including "
                   f"the means over corruptions at their severity: {listed}{more}")
    skipped = run.summary.get("skipped_files") or []
    if skipped:
        were = "was" if len(skipped) == 1 else "were"
        out.append(f"{counted(len(skipped), 'unreadable image')} {were} skipped in every condition (named in "
                   "summary.json)")
    return out


def _write_tables(report: Report) -> None:
    built, notes = tables.build_tables(report.run)
    report.notes += notes
    for table in built:
        files = [Path("tables") / f"{table.name}.md", Path("tables") / f"{table.name}.tex"]
        io.write_text(report.out / files[0], tables.to_markdown(table))
        io.write_text(report.out / files[1], tables.to_latex(table))
        report.tables.append((table, files))


#: per format, the metadata that would stamp the time of writing into the file (the same run must give the
#: same bytes); PNG carries none by default
_NO_DATE = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}


def _save(out: Path, family: str, item: figures.Rendered, fmt: str) -> FigureFile:
    """Save one figure as PNG and ``fmt`` (atomically) and release it.

    The layout is solved once, on the PNG, and then frozen for the vector format.
    """
    files = [Path("figures") / f"{item.name}.{f}" for f in dict.fromkeys((fmt, "png"))]
    for rel in reversed(files):
        with io.atomic_path(out / rel) as tmp:
            item.figure.savefig(tmp, format=rel.suffix[1:], metadata=_NO_DATE.get(rel.suffix[1:]))
        item.figure.set_layout_engine("none")
    item.figure.clear()
    return FigureFile(family, item.name, item.title, item.caption, files)


def _check_threshold(run: Run, threshold: float) -> None:
    """Refuse a threshold outside [0, 1] or the run's grid before anything is written."""
    if not 0.0 <= threshold <= 1.0:
        raise ShiftbenchError(f"--threshold {threshold}: must lie in [0, 1] (normalised uncertainty)")
    if run.curves is not None:
        aggregate.at_threshold(run.curves, threshold)


def _sweep_severities(run: Run, chosen: list[int] | None) -> list[int]:
    """Default: clean and the worst severity; a chosen severity must be in the run."""
    available = sorted({0, *run.severities})
    if chosen is None:
        return available[:1] + available[-1:] if len(available) > 1 else available
    missing = [s for s in chosen if s not in available]
    if missing:
        raise ShiftbenchError(f"--sweep-severities {','.join(map(str, missing))}: not in this run; it has "
                              f"{', '.join(map(str, available))} (0 = clean)")
    return list(dict.fromkeys(chosen))


def _gallery_models(run: Run, chosen: list[str] | None) -> list[str]:
    """Default: the first model of each kind (the paper's Table 1: baseline, ensemble, one MoE)."""
    if chosen is None:
        firsts: dict[str, str] = {}
        for model, kind in run.models.items():
            firsts.setdefault(kind, model)
        return list(firsts.values())
    if chosen == ["all"]:
        return list(run.models)
    unknown = [m for m in chosen if m not in run.models]
    if unknown:
        raise ShiftbenchError(f"--gallery-models {','.join(unknown)}: not in this run; choose from "
                              f"{', '.join(run.models)} or 'all'")
    return chosen
