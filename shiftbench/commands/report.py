"""``shiftbench report RUN_DIR``: paper-ready figures and tables (Markdown, LaTeX, HTML) from a run."""

from __future__ import annotations

import argparse

from shiftbench.errors import ShiftbenchError, comma_items


def _items(text: str, option: str, expected: str) -> list[str]:
    """:func:`comma_items` for argparse's ``type=``: its refusal as argparse's one-line error."""
    try:
        return comma_items(text, option, expected)
    except ShiftbenchError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None


def _severity_list(text: str) -> list[int]:
    items = _items(text, "--sweep-severities", "comma-separated severities, e.g. 0,3,5")
    try:
        values = [int(v) for v in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated severities, e.g. 0,3,5") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected severities >= 0 (0 = clean), e.g. 0,3,5")
    return values


def _name_list(text: str) -> list[str]:
    return _items(text, "--gallery-models", "comma-separated model names or 'all'")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `shiftbench run`")
    parser.add_argument("--format", default="pdf", choices=("pdf", "png", "svg"),
                        help="figure format; a PNG is always written beside it (default: pdf)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN_DIR/report)")
    parser.add_argument("--threshold", type=float, default=0.5, metavar="T",
                        help="uncertainty threshold for the conditional metrics vs severity (default: 0.5)")
    parser.add_argument("--sweep-severities", type=_severity_list, default=None, metavar="S,S",
                        help="severities of the threshold-sweep figure, 0 = clean (default: clean and the worst)")
    parser.add_argument("--gallery-models", type=_name_list, default=None, metavar="M,M",
                        help="models in the uncertainty-map gallery, or 'all' (default: the first of each kind)")


def main(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from shiftbench.errors import counted
    from shiftbench.report.build import build_report

    report = build_report(args.run_dir, out=args.out, fmt=args.format, threshold=args.threshold,
                          sweep_severities=args.sweep_severities, gallery_models=args.gallery_models)
    for warning in report.warnings:
        print(f"warning: {warning}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"report: {counted(len(report.figures), 'figure')}, {counted(len(report.tables), 'table')} -> "
          f"{report.out / 'report.html'}")
    return 0
