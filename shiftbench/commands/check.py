"""``shiftbench check RUN_DIR --baseline B.json``: the calibration regression gate (exit 1 on a regression)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `shiftbench run`")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--baseline", metavar="BASELINE.json", help="compare the run with this baseline")
    mode.add_argument("--write-baseline", metavar="BASELINE.json", help="write the run's values as a baseline")
    parser.add_argument("--tolerance", default=None, metavar="M=V,...",
                        help="absolute tolerances replacing the defaults, e.g. ece=0.005,nll=0.02 "
                             "(defaults: ece 0.005, mce 0.02, brier 0.005, nll 0.02, miou, au_pavpu and the "
                             "peaks 0.005)")
    parser.add_argument("--verbose", action="store_true", help="print every compared value, not only those that "
                                                               "changed")


def main(args: argparse.Namespace) -> int:
    from shiftbench.report import baseline as bl
    from shiftbench.report.load import load_run

    tolerances = bl.parse_tolerances(args.tolerance)
    run = load_run(args.run_dir, curves=False, maps=False)
    bl.check_complete(run)
    if args.write_baseline:
        written = bl.write_baseline(run, args.write_baseline)
        n = len(bl.baseline_values(written))
        print(f"wrote baseline {args.write_baseline}: {n} values of suite {run.suite_name!r} "
              f"(digest {run.digest[:12]})")
        return 0
    reference = bl.read_baseline(args.baseline)
    bl.check_identity(run, reference)
    changes = bl.compare(bl.run_values(run), bl.baseline_values(reference), tolerances)
    print(bl.format_changes(changes, every=args.verbose), end="")
    return 1 if any(c.failed for c in changes) else 0
