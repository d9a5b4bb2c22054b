"""Speed of the 19 corruptions (``make bench``): shiftbench vs imagecorruptions 1.1.2 on the same machine.

- per corruption, all 5 severities on one photo (astronaut) at SHIFTBENCH_BENCH_SIZE (default
  1208x1920, A2D2): ours timed by pytest-benchmark, the reference once; ``extra_info`` holds the
  reference's seconds and the speed-up ratio;
- the aggregate over all 95 (corruption, severity) pairs and the median per-corruption ratio;
- on CUDA (skipped without it): a batch of 8 at that size, images/s per corruption.

The reference at full size takes minutes (glass_blur ~150 s); set SHIFTBENCH_BENCH_SIZE=256x384 for
a quick run. ``python benchmarks/speed.py`` prints the same measurements as a Markdown table.
Nothing here asserts a time.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest
import torch

from corruptions import CORRUPTIONS, SEVERITIES, corrupt

pytestmark = pytest.mark.bench

CUDA_BATCH = 8


def bench_size() -> tuple[int, int]:
    """(H, W) from SHIFTBENCH_BENCH_SIZE=HxW, default 1208x1920."""
    text = os.environ.get("SHIFTBENCH_BENCH_SIZE", "1208x1920")
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"SHIFTBENCH_BENCH_SIZE must look like 1208x1920, got {text!r}") from None
    if min(h, w) < 32:
        raise ValueError(f"SHIFTBENCH_BENCH_SIZE must be at least 32x32, got {text!r}")
    return h, w


def bench_image(size: tuple[int, int]) -> np.ndarray:
    """The astronaut photo resized to size (uint8 HxWx3)."""
    from tests.reference import photo

    return photo("astronaut", size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(name: str, x: torch.Tensor) -> None:
    """All 5 severities of ``name`` on x (one call each), finished on the device."""
    for severity in SEVERITIES:
        corrupt(x, name, severity, seed=severity)
    sync(x.device)


def reference_seconds(name: str, image: np.ndarray) -> float:
    """Wall time of the reference on all 5 severities of one uint8 image."""
    from tests.reference import reference

    reference(image, name, 1)  # imports and caches out of the timing
    start = time.perf_counter()
    for severity in SEVERITIES:
        reference(image, name, severity, seed=severity)
    return time.perf_counter() - start


def ours_seconds(name: str, x: torch.Tensor, rounds: int = 3) -> float:
    """Best wall time of :func:`run_ours` over ``rounds`` after one warm-up (caches, kernels)."""
    run_ours(name, x)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run_ours(name, x)
        best = min(best, time.perf_counter() - start)
    return best


_REFERENCE: dict[str, float] = {}  # seconds per corruption, filled by the per-corruption benchmarks


@pytest.fixture(scope="module")
def cpu_image():
    from tests.reference import to_tensor

    image = bench_image(bench_size())
    return image, to_tensor(image)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_cpu_speed_vs_reference(benchmark, cpu_image, name):
    image, x = cpu_image
    _REFERENCE[name] = reference_seconds(name, image)
    benchmark.pedantic(run_ours, args=(name, x), rounds=3, iterations=1, warmup_rounds=1)
    ours = benchmark.stats.stats.min
    benchmark.extra_info.update(size="x".join(map(str, x.shape[-2:])), threads=torch.get_num_threads(),
                                reference_s=round(_REFERENCE[name], 4), ratio=round(_REFERENCE[name] / ours, 2))


def test_cpu_all_95_pairs_vs_reference(benchmark, cpu_image):
    """All 19 x 5 pairs once per round; the reference total is the sum of the per-corruption timings
    above (measured here for any corruption that was not run above)."""
    image, x = cpu_image
    for name in CORRUPTIONS:
        if name not in _REFERENCE:
            _REFERENCE[name] = reference_seconds(name, image)

    def all_pairs() -> None:
        for name in CORRUPTIONS:
            run_ours(name, x)

    benchmark.pedantic(all_pairs, rounds=1, iterations=1, warmup_rounds=1)
    total = sum(_REFERENCE.values())
    benchmark.extra_info.update(reference_s=round(total, 2), ratio=round(total / benchmark.stats.stats.min, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_cuda_images_per_second(benchmark, name):
    from tests.reference import to_tensor

    x = to_tensor(bench_image(bench_size())).cuda().repeat(CUDA_BATCH, 1, 1, 1)
    benchmark.pedantic(run_ours, args=(name, x), rounds=5, iterations=1, warmup_rounds=1)
    images = CUDA_BATCH * len(SEVERITIES)
    benchmark.extra_info.update(batch=CUDA_BATCH, images_per_s=round(images / benchmark.stats.stats.median, 1),
                                device=torch.cuda.get_device_name())


def median_ratio(reference: dict[str, float], ours: dict[str, float]) -> float:
    return statistics.median(reference[n] / ours[n] for n in ours)
