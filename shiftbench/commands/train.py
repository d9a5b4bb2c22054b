"""``shiftbench train SUITE.yaml``: train the experts, the MC-dropout baseline and the gates of a suite."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", help="suite file, e.g. suites/demo.yaml")
    p.add_argument("--only", help="comma-separated expert and model names to train (default: every trainable one)")
    p.add_argument("--out", help="write the checkpoints into this folder (default: the suite's checkpoint paths); "
                                 "gates train on experts trained in the same call, else on the suite's")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train (default: the suite's run.device)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice, one per core)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    import os
    import time
    from pathlib import Path

    import torch

    from shiftbench.errors import ShiftbenchError, comma_items, counted
    from shiftbench.models.trainer import train_suite
    from shiftbench.suite import load_suite

    suite = load_suite(args.suite)
    if args.threads is not None:
        cores = os.cpu_count() or 1
        if not 1 <= args.threads <= cores:
            raise ShiftbenchError(f"--threads: {args.threads} is not an integer in 1..{cores} (this machine's CPUs)")
        torch.set_num_threads(args.threads)
    device = args.device or suite.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        where = "--device cuda" if args.device else "run.device: cuda (the suite's; --device overrides it)"
        raise ShiftbenchError(f"{where}: no CUDA device is available; use --device cpu")
    only = None
    if args.only is not None:
        only = comma_items(args.only, "--only", "comma-separated expert or model names")
    start = time.perf_counter()
    if args.out == "":
        raise ShiftbenchError("--out: empty path; give the folder to write the checkpoints into, or leave --out out "
                              "to write the suite's checkpoint paths")
    results = train_suite(suite, only=only, out=Path(args.out) if args.out is not None else None, device=device,
                          quiet=args.quiet)
    print(f"{'model':<24} {'kind':<11} {'val mIoU':>9} {'seconds':>8}")
    for name, meta in results.items():
        val = meta["val_miou"][-1] if meta["val_miou"] else float("nan")
        print(f"{name:<24} {meta['kind']:<11} {val:>9.4f} {meta['seconds']:>8.1f}")
    print(f"trained {counted(len(results), 'model')} in {time.perf_counter() - start:.0f} s on {device}")
    return 0
