"""Benchmarks of the metrics (``make bench``): update throughput, constant memory, torchmetrics side by side.

Numbers go to pytest-benchmark's table and ``extra_info`` (Mpixel/s, bytes); nothing here asserts a time.
"""

import gc
import os
import time

import pytest
import torch

from shiftbench.metrics import CalibrationMetrics, ConditionalMetrics, Outcome

pytestmark = pytest.mark.bench

B, K, H, W = 4, 38, 1208, 1920  # the batch: 4 A2D2 frames, 38 classes
PIXELS = B * H * W


def _rss() -> int:
    """Resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _batch(b=B, k=K, h=H, w=W, seed=0):
    """Probabilities (softmax of random logits, computed in place), labels with an ignored band, uncertainty."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(b, k, h, w, generator=g).mul_(3).softmax(1)
    target = torch.randint(0, k, (b, h, w), generator=g)
    target[:, : h // 20] = 255
    unc = torch.rand(b, h, w, generator=g)
    return probs, target, unc, probs.max(1).indices


@pytest.fixture(scope="module")
def big():
    data = _batch()
    yield data
    del data
    gc.collect()


def _throughput(benchmark, fn):
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    best = benchmark.stats.stats.min
    benchmark.extra_info.update(pixels=PIXELS, mpixel_per_s_best=round(PIXELS / best / 1e6, 2),
                                threads=torch.get_num_threads())


MODES = {  # mode -> (CalibrationMetrics options, confidence given)
    "given_no_multiclass": (dict(multiclass=False), True),  # every estimator of a model but the first
    "given": ({}, True),  # the first estimator of a model: the multiclass Brier/NLL too
    "probability": ({}, False),  # confidence = top-label probability
}


@pytest.mark.parametrize("outcome", ["none", "built_in_step", "prebuilt"])
@pytest.mark.parametrize("mode", list(MODES))
def test_bench_calibration_and_conditional(benchmark, big, mode, outcome):
    """CalibrationMetrics + ConditionalMetrics on one batch, the prediction passed in.

    outcome: ``none`` = each accumulator builds its own masks from ``pred``; ``built_in_step`` = one
    Outcome shared by both, built inside the timed step (a model with one estimator); ``prebuilt`` = the
    cost of each further estimator of a model, whose Outcome the runner already has."""
    probs, target, unc, pred = big
    options, given = MODES[mode]
    cal, cond = CalibrationMetrics(K, **options), ConditionalMetrics()
    conf = 1 - unc if given else None
    shared = Outcome(pred, target)
    shared.patches(cond.patch_size), shared.n_valid, shared.safe_target, shared.check_target(K)

    def step():
        if outcome == "none":
            cal.update(probs, target, conf, pred=pred)
            cond.update(pred, target, unc)
            return
        o = Outcome(pred, target) if outcome == "built_in_step" else shared
        cal.update(probs, target, conf, outcome=o)
        cond.update(pred, target, unc, outcome=o)

    _throughput(benchmark, step)


def test_bench_calibration_computing_the_prediction(benchmark, big):
    """Without ``pred``: CalibrationMetrics takes max(1) of the probabilities itself."""
    probs, target, unc, _ = big
    cal = CalibrationMetrics(K)
    _throughput(benchmark, lambda: cal.update(probs, target, 1 - unc))


@pytest.mark.parametrize("part", ["calibration", "conditional"])
def test_bench_each_accumulator(benchmark, big, part):
    probs, target, unc, pred = big
    if part == "calibration":
        acc, conf = CalibrationMetrics(K), 1 - unc
        _throughput(benchmark, lambda: acc.update(probs, target, conf, pred=pred))
    else:
        acc = ConditionalMetrics()
        _throughput(benchmark, lambda: acc.update(pred, target, unc))


def test_bench_torchmetrics_calibration_error_side_by_side(benchmark, big):
    """torchmetrics' MulticlassCalibrationError on the same batch: time of update + compute, and its state,
    which keeps every pixel's confidence and correctness (8 bytes a pixel, growing with every update)."""
    from torchmetrics.classification import MulticlassCalibrationError

    probs, target, _, pred = big
    ours = CalibrationMetrics(K)
    t0 = time.perf_counter()
    ours.update(probs, target, pred=pred)
    ours_ece = ours.compute()["ece"]
    ours_s = time.perf_counter() - t0
    ref = MulticlassCalibrationError(K, n_bins=15, norm="l1", ignore_index=255)
    rss0 = _rss()

    def step():
        ref.reset()
        ref.update(probs, target)
        return ref.compute()

    ece = benchmark.pedantic(step, rounds=2, iterations=1)
    state = sum(t.numel() * t.element_size() for name in ("confidences", "accuracies") for t in getattr(ref, name))
    benchmark.extra_info.update(
        torchmetrics_mpixel_per_s_best=round(PIXELS / benchmark.stats.stats.min / 1e6, 2),
        torchmetrics_state_bytes_per_update=state, torchmetrics_rss_growth_bytes=_rss() - rss0,
        shiftbench_seconds_update_compute=round(ours_s, 3),
        shiftbench_state_bytes=sum(t.numel() * t.element_size() for t in ours.state_dict().values()),
        ece_torchmetrics=float(ece), ece_shiftbench=ours_ece)


def test_bench_memory_constant_from_10_to_1000_updates(benchmark):
    """Peak RSS and state size after 10 and after 1000 updates of a small batch (2x38x64x128)."""
    probs, target, unc, pred = _batch(b=2, h=64, w=128, seed=1)
    conf = 1 - unc
    cal, cond = CalibrationMetrics(K, average="images"), ConditionalMetrics()

    def step():
        cal.update(probs, target, conf, pred=pred)
        cond.update(pred, target, unc)

    def state_bytes():
        return sum(t.numel() * t.element_size() for acc in (cal, cond) for t in acc.state_dict().values())

    for _ in range(10):
        step()
    gc.collect()
    rss_10, bytes_10, peak = _rss(), state_bytes(), 0
    for _ in range(990):
        step()
        peak = max(peak, _rss())
    benchmark.extra_info.update(rss_after_10=rss_10, peak_rss_11_to_1000=peak, rss_growth=peak - rss_10,
                                state_bytes_after_10=bytes_10, state_bytes_after_1000=state_bytes())
    assert state_bytes() == bytes_10  # the states never grow
    benchmark.pedantic(step, rounds=5, iterations=1)
