"""``shiftbench run SUITE.yaml``: clean + corruptions x severities through every model of a suite."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", help="suite file, e.g. suites/demo.yaml")
    p.add_argument("--out", help="run directory (default: the suite's run.out)")
    p.add_argument("--limit", type=int, help="at most N images per split group, taken evenly from its splits (quick runs)")
    p.add_argument("--corruptions", help="comma-separated corruption names, 'all' or 'none'")
    p.add_argument("--severities", help="comma-separated severities, e.g. 1,3")
    p.add_argument("--batch-size", type=int, help="images per batch (results do not depend on it)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (auto: cuda if available)")
    p.add_argument("--overlap", choices=("auto", "true", "false"),
                   help="estimators and metrics on a worker thread alongside the forwards (auto: on the CPU)")
    p.add_argument("--workers", help="DataLoader processes decoding images: a number or auto (auto: on CUDA)")
    p.add_argument("--cache", help="GiB of decoded images to keep in memory: a number or auto (half the free memory)")
    p.add_argument("--force", action="store_true", help="discard a different suite's run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def apply_overrides(raw: dict, args: argparse.Namespace) -> dict:
    """The suite's YAML with the command-line overrides written into it (validated again after)."""
    import copy

    from shiftbench.errors import ShiftbenchError, comma_items

    raw = copy.deepcopy(raw)
    run = raw.setdefault("run", {}) or {}
    raw["run"] = run
    corr = raw.setdefault("corruptions", {}) or {}
    raw["corruptions"] = corr
    if args.out is not None:
        run["out"] = args.out
    if args.limit is not None:
        run["limit"] = args.limit
    if args.batch_size is not None:
        run["batch_size"] = args.batch_size
    if args.device is not None:
        run["device"] = args.device
    if args.overlap is not None:
        run["overlap"] = {"true": True, "false": False}.get(args.overlap, args.overlap)
    for key in ("workers", "cache"):  # "auto" or a number; the suite check says what else is allowed
        value = getattr(args, key)
        if value is not None:
            run[key] = _number(value)
    if args.corruptions is not None:
        names = comma_items(args.corruptions, "--corruptions", "comma-separated corruption names, 'all' or 'none'")
        corr["names"] = names[0] if names in (["all"], ["none"]) else names
    if args.severities is not None:
        items = comma_items(args.severities, "--severities", "a comma-separated list of 1..5, e.g. 1,3,5")
        try:
            corr["severities"] = [int(s) for s in items]
        except ValueError:
            raise ShiftbenchError(f"--severities: {args.severities!r} is not a comma-separated list of 1..5") from None
        if corr.get("names") == "none":
            raise ShiftbenchError("--severities: has no effect with no corruptions (--corruptions none or the suite's "
                                  "corruptions.names: none); give corruption names, or leave --severities out")
    return raw


def _number(text: str) -> int | float | str:
    """``text`` as an int or a float where it reads as one, else as given (for the suite check to refuse)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shiftbench.runner import run_suite
    from shiftbench.suite import SuiteError, load_suite, parse_suite

    suite = load_suite(args.suite)
    try:
        suite = parse_suite(apply_overrides(suite.raw, args), Path(args.suite).resolve().parent, Path(args.suite))
    except SuiteError as exc:
        raise SuiteError(f"{args.suite} (with command-line overrides): {exc}") from None
    report = run_suite(suite, force=args.force, progress=not args.quiet)
    return 1 if report.get("failed") else 0
