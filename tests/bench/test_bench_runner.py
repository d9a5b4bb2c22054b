"""Cost of one condition of a sweep (corrupt + every model + every estimator and accumulator)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runner_fixture import make_suite  # noqa: E402

from shiftbench.models.zoo import ModelZoo  # noqa: E402
from shiftbench.runner.conditions import Condition  # noqa: E402
from shiftbench.runner.data import open_split  # noqa: E402
from shiftbench.runner.dist import World  # noqa: E402
from shiftbench.runner.sweep import (Accumulators, MetricWorker, Timer, predict, run_condition,  # noqa: E402
                                     sweep_conditions, thread_split)
from shiftbench.seeding import model_seeds  # noqa: E402
from shiftbench.suite import load_suite  # noqa: E402


@pytest.mark.bench
@pytest.mark.parametrize("corruption", ["clean", "fog"])
def test_bench_one_condition(benchmark, tmp_path, corruption):
    """8 synthetic 128x256 images through the 4 tiny models of the runner fixture (14 estimator rows)."""
    suite = load_suite(make_suite(tmp_path, count=4, size=(128, 256)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    zoo = ModelZoo.from_suite(suite, device)
    plan = {m.name: m.estimators for m in suite.models}
    data = open_split(suite, "id", World())
    cond = Condition("id", corruption, 0 if corruption == "clean" else 3)
    timer = Timer(device)
    benchmark.pedantic(run_condition, args=(zoo, suite, plan, cond, data, device, timer), rounds=3, iterations=1)
    total = sum(timer.seconds.values())
    benchmark.extra_info.update({k: round(v / total, 3) for k, v in timer.seconds.items()})


@pytest.mark.bench
@pytest.mark.parametrize("overlap", [False, True])
def test_bench_sweep_with_and_without_the_metric_worker(benchmark, tmp_path, overlap):
    """clean + fog/3 on the same 8 images, the estimators and metrics after the forwards (False) or on a
    worker thread alongside them (True: the torch threads split half and half, as ``run.overlap: auto``)."""
    suite = load_suite(make_suite(tmp_path, count=4, size=(128, 256)))
    device = torch.device("cpu")
    zoo = ModelZoo.from_suite(suite, device)
    plan = {m.name: m.estimators for m in suite.models}
    splits = {"id": open_split(suite, "id", World())}
    conds = [Condition("id", "clean", 0), Condition("id", "fog", 3)]
    timer = Timer(device)
    before = torch.get_num_threads()
    forward, metrics = thread_split(overlap, device)

    def sweep_both():
        torch.set_num_threads(forward)
        try:
            with MetricWorker(metrics) as worker:
                return [r for _, _, r in sweep_conditions(zoo, suite, plan, conds, splits, device, timer, worker)]
        finally:
            torch.set_num_threads(before)

    assert benchmark.pedantic(sweep_both, rounds=3, iterations=1) == [None, None]
    benchmark.extra_info.update(threads=[forward, metrics])


@pytest.fixture(scope="module")
def demo_batch():
    """The committed demo zoo and one batch of 16 demo images (128x256)."""
    suite = load_suite(Path(__file__).resolve().parents[2] / "suites" / "demo.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    zoo = ModelZoo.from_suite(suite, device)
    batch = next(iter(open_split(suite, "id", World()).batches(16)))
    return suite, zoo, batch, device


@pytest.mark.bench
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("part", ["forward", "estimators_metrics"])
def test_bench_demo_batch(benchmark, demo_batch, part, threads):
    """The two halves of a demo batch that `run.overlap` puts on two threads: every model's forward
    (exact: one image at a time), or the estimators + accumulators of its 24 model x estimator pairs."""
    suite, zoo, batch, device = demo_batch
    x = batch.images.to(device).float().div_(255)
    seeds = model_seeds(0, batch.ids)
    plan = {m.name: m.estimators for m in suite.models}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if part == "forward":
            benchmark.pedantic(_synced(lambda: predict(zoo, x, seeds)), rounds=3, iterations=1, warmup_rounds=1)
        else:
            preds, labels = predict(zoo, x, seeds), batch.labels.to(device)
            benchmark.pedantic(_synced(lambda: Accumulators(suite, plan, device).update(preds, labels)),
                               rounds=3, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(before)


def _synced(fn):
    """fn, then a CUDA synchronisation where a GPU runs it (so that its work is timed)."""
    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    return run
