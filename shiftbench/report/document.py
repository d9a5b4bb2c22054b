"""report.md and report.html: every table and figure of a report on one page, paths relative."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from shiftbench.report import tables

if TYPE_CHECKING:
    from shiftbench.report.build import Report

#: figure family -> section heading, in report order
SECTIONS = {
    "calibration_vs_severity": "Calibration vs severity",
    "conditional_vs_severity": "Conditional metrics vs severity",
    "threshold_sweeps": "Threshold sweeps",
    "id_vs_ood": "In- vs out-of-distribution",
    "gate_entropy": "Gate entropy and routing calibration",
    "reliability": "Reliability diagrams",
    "gallery": "Uncertainty maps",
}

_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em}
th,td{padding:2px 8px;border-bottom:1px solid #ddd}thead th{border-bottom:2px solid #444}
td.num{text-align:right;font-variant-numeric:tabular-nums}figure{margin:1em 0 2em}
img{max-width:100%;border:1px solid #eee}figcaption,p.caption{font-size:0.9em;color:#444}
.note{color:#8a5a00}.warning{color:#a00;border-left:4px solid #a00;padding-left:0.5em}"""


def _facts(report: "Report") -> list[tuple[str, str]]:
    run = report.run
    summary = run.summary
    return [("Run", str(run.root)), ("Suite", f"{run.suite_name} (digest {run.digest[:12]})"),
            ("Models", ", ".join(f"{m} ({k})" for m, k in run.models.items())),
            ("Splits", ", ".join(run.splits) + (f"; corrupted: {', '.join(run.corrupted_splits)}"
                                                 if run.corrupted_splits else "; no corruptions")),
            ("Corruptions", ", ".join(sorted(set(run.corrupted["corruption"]))) or "none"),
            ("Severities", ", ".join(map(str, run.severities)) or "none"),
            ("Commit", str(summary.get("git_commit", "unknown")))]


#: what a missing cell means, said once above the tables
UNDEFINED = (f"{tables.MISSING} marks an undefined value (e.g. a peak over a sweep in which no patch is "
             "inaccurate); a mean over corruptions or severities leaves undefined values out.")


def markdown(report: "Report") -> str:
    """The report as Markdown: facts, tables (Markdown, with links to LaTeX), figures, notes."""
    out = [f"# shiftbench report: {report.run.suite_name}", ""]
    out += [f"- **{k}**: {v}" for k, v in _facts(report)] + [""]
    out += [f"> **Warning:** {w}" for w in report.warnings] + ([""] if report.warnings else [])
    out += ["## Tables", "", UNDEFINED, ""]
    for table, files in report.tables:
        out += [f"### {table.title}", "", table.caption, "", tables.to_markdown(table).rstrip(), "",
                f"LaTeX: [{files[1].as_posix()}]({files[1].as_posix()})", ""]
    for family, heading in SECTIONS.items():
        items = [f for f in report.figures if f.family == family]
        if not items:
            continue
        out += [f"## {heading}", ""]
        for fig in items:
            png, vector = fig.files[-1].as_posix(), fig.files[0].as_posix()
            out += [f"### {fig.title}", "", f"![{fig.title}]({png})", "", fig.caption
                    + ("" if vector == png else f" ([{fig.files[0].suffix[1:]}]({vector}))"), ""]
    if report.notes:
        out += ["## Not shown", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(out)


def html_page(report: "Report") -> str:
    """The same content as a single plain HTML page (no scripts, no server)."""
    esc = html.escape
    body = [f"<h1>shiftbench report: {esc(report.run.suite_name)}</h1>", "<ul>"]
    body += [f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in _facts(report)] + ["</ul>"]
    body += [f'<p class="warning"><b>Warning:</b> {esc(w)}</p>' for w in report.warnings] + ["<h2>Tables</h2>",
                                                                                             f"<p>{esc(UNDEFINED)}</p>"]
    for table, files in report.tables:
        body += [f"<h3>{esc(table.title)}</h3>", f'<p class="caption">{esc(table.caption)}</p>',
                 tables.to_html(table), f'<p>LaTeX: <a href="{esc(files[1].as_posix())}">{esc(files[1].name)}</a></p>']
    for family, heading in SECTIONS.items():
        items = [f for f in report.figures if f.family == family]
        if items:
            body.append(f"<h2>{esc(heading)}</h2>")
        for fig in items:
            png, vector = fig.files[-1].as_posix(), fig.files[0].as_posix()
            link = "" if vector == png else f' (<a href="{esc(vector)}">{esc(fig.files[0].suffix[1:])}</a>)'
            body += [f'<figure id="{esc(fig.name)}"><h3>{esc(fig.title)}</h3>',
                     f'<img src="{esc(png)}" alt="{esc(fig.title)}">',
                     f"<figcaption>{esc(fig.caption)}{link}</figcaption></figure>"]
    if report.notes:
        body += ["<h2>Not shown</h2>", "<ul>"] + [f'<li class="note">{esc(n)}</li>' for n in report.notes] + ["</ul>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>shiftbench report: {esc(report.run.suite_name)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
