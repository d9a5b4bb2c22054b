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
from shiftbench.runner.sweep import Timer, run_condition  # noqa: E402
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
