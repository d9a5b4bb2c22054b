"""Print the speed table (Markdown) of the 19 corruptions: shiftbench vs imagecorruptions 1.1.2.

    python benchmarks/speed.py [--size 1208x1920] [--corruptions fog,frost] [--threads 2] [--device cpu]
    python benchmarks/speed.py --device cuda --batch 8     # images/s on a GPU, no reference

Per corruption: the 5 severities on the astronaut photo, ours (best of 3 after a warm-up) and the
reference (once), their ratio; then the aggregate over all pairs measured and the median ratio.
The same measurement as ``make bench`` (tests/bench/test_bench_corruptions.py). With
``--reference-cache FILE`` the reference's timings are kept in FILE and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from corruptions import CORRUPTIONS, SEVERITIES  # noqa: E402
from tests.bench.test_bench_corruptions import (  # noqa: E402
    bench_image, median_ratio, ours_seconds, reference_seconds,
)
from shiftbench.io import write_json  # noqa: E402
from tests.reference import to_tensor  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1208x1920", help="HxW of the test image (default 1208x1920)")
    parser.add_argument("--corruptions", default="all", help="comma-separated names, or all")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: images/s only)")
    parser.add_argument("--batch", type=int, default=8, help="batch size on cuda")
    parser.add_argument("--reference-cache", type=Path, default=None,
                        help="JSON file of the reference's seconds per size and corruption: reused where "
                             "present, measured and added otherwise (the reference does not change)")
    args = parser.parse_args(argv)
    text = args.size
    try:
        args.size = tuple(int(v) for v in text.lower().split("x"))
        assert len(args.size) == 2 and min(args.size) >= 32
    except (ValueError, AssertionError):
        parser.error(f"--size must look like 1208x1920 with sides >= 32, got {text!r}")
    names = CORRUPTIONS if args.corruptions == "all" else tuple(args.corruptions.split(","))
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        parser.error(f"unknown corruption(s) {', '.join(unknown)}; valid: {', '.join(CORRUPTIONS)}")
    args.names = names
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def load_cache(path: Path | None) -> dict[str, float]:
    if path is None or not path.exists():
        return {}
    return json.loads(path.read_text())


def cpu_table(args: argparse.Namespace) -> None:
    image = bench_image(args.size)
    x = to_tensor(image)
    ours, ref = {}, {}
    cache = load_cache(args.reference_cache)
    size_key = f"{args.size[0]}x{args.size[1]}"
    print(f"CPU, {args.size[0]}x{args.size[1]}, {torch.get_num_threads()} torch threads; {machine()}\n")
    print("| corruption | shiftbench, 5 severities (s) | imagecorruptions (s) | speed-up |")
    print("|---|---:|---:|---:|")
    for name in args.names:
        key = f"{size_key}/{name}"
        if key not in cache:
            cache[key] = reference_seconds(name, image)
            if args.reference_cache is not None:
                write_json(args.reference_cache, cache)
        ref[name] = cache[key]
        ours[name] = ours_seconds(name, x)
        print(f"| {name} | {ours[name]:.3g} | {ref[name]:.3g} | {ref[name] / ours[name]:.1f}x |", flush=True)
    total_ours, total_ref = sum(ours.values()), sum(ref.values())
    print(f"| **all {len(ours) * len(SEVERITIES)} pairs** | {total_ours:.3g} | {total_ref:.4g} | "  # 3-4 digits
          f"{total_ref / total_ours:.1f}x |")
    print(f"\nmedian per-corruption speed-up: {median_ratio(ref, ours):.1f}x")


def cuda_table(args: argparse.Namespace) -> None:
    x = to_tensor(bench_image(args.size)).cuda().repeat(args.batch, 1, 1, 1)
    print(f"CUDA {torch.cuda.get_device_name()}, batch {args.batch} at {args.size[0]}x{args.size[1]}\n")
    print("| corruption | images/s |")
    print("|---|---:|")
    rates = []
    for name in args.names:
        seconds = ours_seconds(name, x, rounds=5)
        rates.append(args.batch * len(SEVERITIES) / seconds)
        print(f"| {name} | {rates[-1]:.0f} |", flush=True)
    print(f"\nmean over corruptions: {sum(rates) / len(rates):.0f} images/s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    (cuda_table if args.device == "cuda" else cpu_table)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
