"""The report's tables: the paper's Table 2 and Table 3 layouts and a robustness summary.

A :class:`Table` holds numbers; :func:`to_markdown`, :func:`to_latex` (booktabs) and
:func:`to_html` render it with the best value of every column in bold (direction-aware, compared
at the displayed precision, so ties are all bold). Values are shown as ``value * scale``
(``scale = 100`` for percentages); a missing value is an em dash.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from shiftbench.report import aggregate
from shiftbench.report.load import Run
from shiftbench.report.schema import CALIBRATION, METRICS, PEAKS
from shiftbench.report.style import ESTIMATOR_STYLES, estimator_label

MISSING = "—"
#: Table 3's columns (the paper's Table 3: segmentation quality and calibration)
TABLE3_METRICS = ("miou",) + CALIBRATION
#: Table 2's columns (the paper's Table 2: conditional-metric peaks and AU-PAvPU)
TABLE2_METRICS = PEAKS + ("au_pavpu",)
#: the robustness summary's metrics: clean, mean over corruptions (mPC style), relative (rPC style)
ROBUSTNESS_METRICS = ("miou", "ece", "au_pavpu")


@dataclass(frozen=True)
class Column:
    """One numeric column: its header, which way is better and how it is printed."""

    label: str
    higher_is_better: bool
    scale: float = 1.0
    decimals: int = 3
    group: str = ""

    @classmethod
    def of(cls, metric: str, group: str = "") -> "Column":
        m = METRICS[metric]
        return cls(m.unit_label, m.higher_is_better, m.scale, m.decimals, group)

    def text(self, value: float) -> str:
        return MISSING if not math.isfinite(value) else f"{value * self.scale:.{self.decimals}f}"


@dataclass
class Table:
    """Rows of ``(index labels, values)`` under labelled columns; ``index`` names the label columns."""

    name: str
    title: str
    caption: str
    index: tuple[str, ...]
    columns: list[Column]
    rows: list[tuple[tuple[str, ...], list[float]]] = field(default_factory=list)

    def best(self) -> list[set[int]]:
        """Per column, the rows holding its best displayed value (empty for fewer than two values)."""
        out = []
        for j, col in enumerate(self.columns):
            shown = {i: round(v[j] * col.scale, col.decimals) for i, (_, v) in enumerate(self.rows)
                     if math.isfinite(v[j])}
            if len(shown) < 2:
                out.append(set())
                continue
            target = (max if col.higher_is_better else min)(shown.values())
            out.append({i for i, s in shown.items() if s == target})
        return out


# ------------------------------------------------------------------ builders
def _method_order(run: Run, keys: pd.DataFrame) -> list[tuple[str, str]]:
    """(estimator, model) pairs: estimators in the style table's order, models in suite order."""
    est_rank = {e: i for i, e in enumerate(ESTIMATOR_STYLES)}
    model_rank = {m: i for i, m in enumerate(run.models)}
    pairs = set(zip(keys["estimator"], keys["model"]))
    return sorted(pairs, key=lambda p: (est_rank.get(p[0], len(est_rank)), p[0], model_rank.get(p[1], 0)))


def _lookup(frame: pd.DataFrame, metrics) -> dict[tuple[str, str], list[float]]:
    return {(r.estimator, r.model): [float(getattr(r, m)) for m in metrics] for r in frame.itertuples()}


def _assemble(run: Run, name: str, title: str, caption: str, columns: list[Column],
              blocks: list[dict[tuple[str, str], list[float]]]) -> Table:
    """Rows for every (estimator, model) seen in any block; a block missing a row gives NaNs."""
    widths = [len(next(iter(b.values()), [])) for b in blocks]
    keys = pd.DataFrame([k for b in blocks for k in b], columns=["estimator", "model"])
    table = Table(name, title, caption, ("Estimator", "Model"), columns)
    for est, model in _method_order(run, keys):
        values = [v for b, w in zip(blocks, widths) for v in b.get((est, model), [math.nan] * w)]
        table.rows.append(((estimator_label(est), model), values))
    return table


def table2(run: Run, split: str) -> Table:
    """The paper's Table 2: peaks of the conditional metrics and AU-PAvPU, mean over the corrupted data."""
    frame = aggregate.corrupted_means(run.corrupted[run.corrupted["split"] == split], TABLE2_METRICS)
    cols = [Column.of(m, "Peak") for m in PEAKS] + [Column.of("au_pavpu", "Area")]
    caption = (f"Split {split}: peaks over the threshold sweep{_grid_words(run)} of p(accurate|certain), "
               "p(uncertain|inaccurate) and PAvPU, and the area under the PAvPU curve, each averaged over every "
               "corruption and severity (in %). Best per column in bold. A 100 % peak occurs where very few patches "
               "are certain or inaccurate at the peak threshold.")
    return _assemble(run, f"table2_{split}", f"Conditional metrics under corruption ({split})", caption, cols,
                     [_lookup(frame, TABLE2_METRICS)])


def _grid_words(run: Run) -> str:
    """' (t = 0.01, 0.03, ..., 0.99: 50 points)': the run's threshold grid, read from curves.parquet (the peaks
    depend on it; the shipped suites sweep the paper authors' grid); '' for a run without curves."""
    if run.curves is None:
        return ""
    t = np.unique(run.curves.loc[run.curves["curve"] == "conditional", "x"].to_numpy(dtype=float))
    if t.size < 3:
        return f" (t = {', '.join(f'{v:g}' for v in t)})" if t.size else ""
    return f" (t = {t[0]:g}, {t[1]:g}, ..., {t[-1]:g}: {t.size} points)"


def table3(run: Run) -> Table:
    """The paper's Table 3 layout: mIoU, ECE, MCE, Brier, NLL on clean data per split and corrupted (mean)."""
    cols, blocks = [], []
    for split in run.splits:
        clean = run.clean[run.clean["split"] == split]
        cols += [Column.of(m, f"clean {split}") for m in TABLE3_METRICS]
        blocks.append(_lookup(clean, TABLE3_METRICS))
    for split in run.corrupted_splits:
        cols += [Column.of(m, f"corrupted {split} (mean)") for m in TABLE3_METRICS]
        frame = aggregate.corrupted_means(run.corrupted[run.corrupted["split"] == split], TABLE3_METRICS)
        blocks.append(_lookup(frame, TABLE3_METRICS))
    caption = ("Segmentation quality and calibration per estimator and method: on clean data of each split and "
               "averaged over every corruption and severity. mIoU, ECE and MCE in %; lower is better except mIoU. "
               "Best per column in bold.")
    return _assemble(run, "table3", "Performance and calibration", caption, cols, blocks)


def robustness(run: Run, split: str) -> Table:
    """Clean value, mean over all corruptions and severities (mPC style) and their ratio (rPC style)."""
    corr = aggregate.corrupted_means(run.corrupted[run.corrupted["split"] == split], ROBUSTNESS_METRICS)
    clean = run.clean[run.clean["split"] == split]
    clean_lut, corr_lut = _lookup(clean, ROBUSTNESS_METRICS), _lookup(corr, ROBUSTNESS_METRICS)
    cols, block = [], {}
    for m in ROBUSTNESS_METRICS:
        info = METRICS[m]
        unit = " (%)" if info.scale == 100 else ""
        cols += [Column(f"clean{unit}", info.higher_is_better, info.scale, info.decimals, info.label),
                 Column(f"corrupted{unit}", info.higher_is_better, info.scale, info.decimals, info.label),
                 Column("relative (%)", info.higher_is_better, 100, 1, info.label)]
    for key in set(clean_lut) | set(corr_lut):
        c0, c1 = clean_lut.get(key, [math.nan] * 3), corr_lut.get(key, [math.nan] * 3)
        block[key] = [v for j in range(len(ROBUSTNESS_METRICS)) for v in (c0[j], c1[j], _ratio(c1[j], c0[j]))]
    caption = (f"Split {split}: clean value, mean over every corruption and severity (mPC style), and that mean "
               "relative to clean (rPC = corrupted / clean, in %). For mIoU and AU-PAvPU higher is better, for "
               "ECE lower. Best per column in bold.")
    return _assemble(run, f"robustness_{split}", f"Robustness summary ({split})", caption, cols, [block])


def _ratio(num: float, den: float) -> float:
    return num / den if math.isfinite(num) and math.isfinite(den) and den != 0 else math.nan


def build_tables(run: Run) -> tuple[list[Table], list[str]]:
    """Every table the run supports, and a note for each one it cannot have."""
    tables, notes = [table3(run)], []
    if not run.corrupted_splits:
        notes.append("Table 2 and the robustness summary need corrupted conditions; this run has none.")
    for split in run.corrupted_splits:
        tables += [table2(run, split), robustness(run, split)]
    return tables, notes


# ------------------------------------------------------------------ renderers
def _groups(columns: list[Column]) -> list[tuple[str, int]]:
    """Consecutive runs of the same group: ``[(group, span), ...]``."""
    out: list[tuple[str, int]] = []
    for col in columns:
        if out and out[-1][0] == col.group:
            out[-1] = (col.group, out[-1][1] + 1)
        else:
            out.append((col.group, 1))
    return out


def _cells(table: Table) -> list[tuple[tuple[str, ...], list[tuple[str, bool]]]]:
    """Per row: its labels and ``(text, is_best)`` per value."""
    best = table.best()
    return [(labels, [(col.text(v), i in best[j]) for j, (col, v) in enumerate(zip(table.columns, values))])
            for i, (labels, values) in enumerate(table.rows)]


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table; grouped headers as ``group: label``."""
    head = list(table.index) + [f"{c.group}: {c.label}" if c.group else c.label for c in table.columns]
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in head) + " |",
             "|" + "|".join([":--"] * len(table.index) + ["--:"] * len(table.columns)) + "|"]
    for labels, values in _cells(table):
        cells = [lab.replace("|", "\\|") for lab in labels] + [f"**{t}**" if b else t for t, b in values]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "|": r"$|$",
                  MISSING: "--"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_group_header(table: Table) -> list[str]:
    """The ``\\multicolumn`` row over grouped columns and its ``\\cmidrule``s (none without groups)."""
    groups = _groups(table.columns)
    if not any(g for g, _ in groups):
        return []
    cells, rules, start = [""] * len(table.index), [], len(table.index) + 1
    for group, span in groups:
        cells.append(rf"\multicolumn{{{span}}}{{c}}{{{latex_escape(group)}}}")
        if group:
            rules.append(rf"\cmidrule(lr){{{start}-{start + span - 1}}}")
        start += span
    return [" & ".join(cells) + r" \\", " ".join(rules)]


#: more columns than this (row labels included) make a LaTeX table page-wide and scaled
WIDE_COLUMNS = 9


def to_latex(table: Table) -> str:
    """A booktabs ``table`` environment: grouped headers with cmidrules, a rule between estimators.

    The first index label (the estimator) is printed once per block of rows. A table of more than
    ``WIDE_COLUMNS`` columns is a ``table*`` (both columns of a two-column paper), shrunk to the text width
    where it is wider (``\\resizebox``, graphicx), since it overflows a column at any font size a paper allows.
    """
    wide = len(table.index) + len(table.columns) > WIDE_COLUMNS
    env = "table*" if wide else "table"
    lines = ([r"% needs \usepackage{booktabs}" + (r" and \usepackage{graphicx}" if wide else "")]
             + [rf"\begin{{{env}}}[t]", r"\centering", r"\small", rf"\caption{{{latex_escape(table.caption)}}}",
                rf"\label{{tab:{table.name}}}"]
             + ([r"\resizebox{\ifdim\width>\textwidth\textwidth\else\width\fi}{!}{%"] if wide else [])
             + [rf"\begin{{tabular}}{{{'l' * len(table.index)}{'r' * len(table.columns)}}}", r"\toprule"])
    lines += _latex_group_header(table)
    lines.append(" & ".join(latex_escape(h) for h in list(table.index) + [c.label for c in table.columns])
                 + r" \\")
    lines.append(r"\midrule")
    previous = None
    for labels, values in _cells(table):
        if previous is not None and labels[0] != previous:
            lines.append(r"\midrule")
        shown = ["" if labels[0] == previous else labels[0], *labels[1:]]
        cells = [latex_escape(c) for c in shown]
        cells += [rf"\textbf{{{latex_escape(t)}}}" if b else latex_escape(t) for t, b in values]
        lines.append(" & ".join(cells) + r" \\")
        previous = labels[0]
    lines += [r"\bottomrule", r"\end{tabular}" + ("}" if wide else ""), rf"\end{{{env}}}"]
    return "\n".join(lines) + "\n"


def to_html(table: Table) -> str:
    """A plain HTML table with grouped headers (colspan) and ``<b>`` for the best values."""
    esc = html.escape
    rows = ["<table>", "<thead>"]
    groups = _groups(table.columns)
    if any(g for g, _ in groups):
        cells = "".join(f'<th colspan="{span}">{esc(g)}</th>' for g, span in groups)
        rows.append(f'<tr><th colspan="{len(table.index)}"></th>{cells}</tr>')
    rows.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in list(table.index) + [c.label for c in table.columns])
                + "</tr>")
    rows.append("</thead>")
    rows.append("<tbody>")
    for labels, values in _cells(table):
        cells = [f"<td>{esc(lab)}</td>" for lab in labels]
        cells += [f'<td class="num">{"<b>" + esc(t) + "</b>" if b else esc(t)}</td>' for t, b in values]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows += ["</tbody>", "</table>"]
    return "\n".join(rows) + "\n"
