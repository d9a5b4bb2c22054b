"""Measure the fidelity contract of the 19 corruptions against imagecorruptions 1.1.2; print Markdown.

    python benchmarks/fidelity.py [--draws 8] [--sizes 97x160,128x128] [--corruptions all] [--per-severity]

On scikit-image's photos (astronaut, coffee, chelsea, rocket) at each size:
- deterministic corruptions: |ours - reference| in gray levels, ours truncated to uint8 like the
  reference; the mean and the 99th percentile, worst over photos, sizes and severities
  (contract: <= 0.5 and <= 2);
- random corruptions: per severity, mean |corrupted - clean| and SSIM(clean, corrupted) averaged
  over photos, sizes and ``--draws`` seeds each, ours relative to the reference's; the worst
  severity is shown (contract: within 10 %). frost averages over its 5 textures equally on both
  sides (draws // 4 seeds per texture and image), since they differ 2x in strength.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from corruptions import CORRUPTIONS, SEVERITIES, Rng, corrupt  # noqa: E402
from tests.reference import photo, reference, to_tensor, to_uint8  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
DETERMINISTIC = ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression",
                 "gaussian_blur", "saturate")


def strength(clean: np.ndarray, corrupted: np.ndarray) -> tuple[float, float]:
    """(mean |corrupted - clean| in gray levels, SSIM(clean, corrupted))."""
    from skimage.metrics import structural_similarity

    change = np.abs(corrupted.astype(np.float64) - clean).mean()
    return change, structural_similarity(clean, corrupted, channel_axis=-1, data_range=255)


def balanced_frost_seeds(texture_of, start: int, per_texture: int) -> list[int]:
    """The first ``per_texture`` seeds from ``start`` on that draw each of the 5 frost textures."""
    found: dict[int, list[int]] = {i: [] for i in range(5)}
    seed = start
    while min(map(len, found.values())) < per_texture:
        texture = texture_of(seed)
        if len(found[texture]) < per_texture:
            found[texture].append(seed)
        seed += 1
    return sorted(s for seeds in found.values() for s in seeds)


def reference_frost_texture(seed: int) -> int:
    np.random.seed(seed)
    return int(np.random.randint(5))


def seeds_for(name: str, severity: int, k: int, draws: int) -> tuple[list[int], list[int]]:
    """(our seeds, reference seeds) for the k-th (photo, size)."""
    if name != "frost":
        seeds = [1000 * r + k for r in range(draws)]
        return seeds, seeds

    def ours(seed: int) -> int:
        return int(Rng([seed], name, severity, torch.device("cpu")).randint(0, 5)[0])

    per_texture = max(1, draws // 4)
    return (balanced_frost_seeds(ours, 1000 * k, per_texture),
            balanced_frost_seeds(reference_frost_texture, 1000 * k, per_texture))


def deterministic_row(name: str, images: list[np.ndarray]) -> dict[int, tuple[float, float]]:
    """Per severity: (worst mean |diff|, worst p99 |diff|) over the images."""
    rows = {}
    for severity in SEVERITIES:
        stats = []
        for image in images:
            diff = np.abs(to_uint8(corrupt(to_tensor(image), name, severity)).astype(np.float64)
                          - reference(image, name, severity))
            stats.append((diff.mean(), np.percentile(diff, 99)))
        rows[severity] = tuple(np.max(stats, 0))
    return rows


def random_row(name: str, images: list[np.ndarray], draws: int) -> dict[int, tuple[float, ...]]:
    """Per severity: (our change, reference change, our SSIM, reference SSIM), averaged."""
    rows = {}
    for severity in SEVERITIES:
        ours, ref = [], []
        for k, image in enumerate(images):
            our_seeds, ref_seeds = seeds_for(name, severity, k, draws)
            ref += [strength(image, reference(image, name, severity, seed=s)) for s in ref_seeds]
            ours += [strength(image, to_uint8(corrupt(to_tensor(image), name, severity, seed=s))) for s in our_seeds]
        (oc, os_), (rc, rs) = np.mean(ours, 0), np.mean(ref, 0)
        rows[severity] = (oc, rc, os_, rs)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=8, help="seeds per photo and size for random corruptions (>= 4)")
    parser.add_argument("--sizes", default="97x160,128x128", help="comma-separated HxW sizes (>= 32)")
    parser.add_argument("--corruptions", default="all", help="comma-separated names, or all")
    parser.add_argument("--per-severity", action="store_true", help="one row per severity instead of the worst")
    args = parser.parse_args(argv)
    if args.draws < 4:
        parser.error(f"--draws must be >= 4 (the contract averages over 4 or more seeds), got {args.draws}")
    text = args.sizes
    try:
        args.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
        assert all(len(s) == 2 and min(s) >= 32 for s in args.sizes)
    except (ValueError, AssertionError):
        parser.error(f"--sizes must look like 97x160,128x128 with sides >= 32, got {text!r}")
    args.names = CORRUPTIONS if args.corruptions == "all" else tuple(args.corruptions.split(","))
    unknown = [n for n in args.names if n not in CORRUPTIONS]
    if unknown:
        parser.error(f"unknown corruption(s) {', '.join(unknown)}; valid: {', '.join(CORRUPTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # many small images: one thread is fastest and spares a shared machine
    images = [photo(p, s) for p in PHOTOS for s in args.sizes]
    sizes = ", ".join(f"{h}x{w}" for h, w in args.sizes)
    print(f"imagecorruptions 1.1.2 vs shiftbench; photos {', '.join(PHOTOS)} at {sizes}; "
          f"random corruptions: {args.draws} seeds per photo and size (frost: draws // 4 per texture); "
          f"{platform.machine()}, torch {torch.__version__}, CPU\n")
    print("| corruption | kind | severity | mean abs diff | p99 abs diff | change: ours / ref | SSIM: ours / ref |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.names:
        start = time.perf_counter()
        if name in DETERMINISTIC:
            rows = deterministic_row(name, images)
            cells = {s: f"{m:.3f} | {p:.1f} | | " for s, (m, p) in rows.items()}
            worst = max(rows, key=lambda s: (rows[s][1], rows[s][0]))
            kind = "deterministic"
        else:
            rows = random_row(name, images, args.draws)
            cells = {s: f" | | {oc:.2f} / {rc:.2f} ({oc / rc - 1:+.1%}) | {os_:.3f} / {rs:.3f} ({os_ / rs - 1:+.1%})"
                     for s, (oc, rc, os_, rs) in rows.items()}
            worst = max(rows, key=lambda s: max(abs(rows[s][0] / rows[s][1] - 1), abs(rows[s][2] / rows[s][3] - 1)))
            kind = "random"
        for severity in (SEVERITIES if args.per_severity else (worst,)):
            label = str(severity) if args.per_severity else f"worst: {severity}"
            print(f"| {name} | {kind} | {label} | {cells[severity]} |", flush=True)
        print(f"measured {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
