"""The accelerator paths against the CPU: corruptions, metrics and one run of the runner on CUDA.

Skipped without a GPU; ``benchmarks/device_check.sh`` runs them on one. ``SHIFTBENCH_TEST_DEVICE=cpu``
points them at the CPU instead, to check this file itself on a machine without a GPU (the comparisons
are then trivial).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from corruptions import CORRUPTIONS, SEVERITIES, corrupt
from tests.test_corruptions_api import DETERMINISTIC, RANDOM, _images

DEVICE = torch.device(os.environ.get("SHIFTBENCH_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_runs_on_the_device_like_on_the_cpu(name):
    """Shape, dtype, device and range; each sample's draws independent of its batch; jpeg_compression (coded on
    the host) equal to the CPU's, the other deterministic corruptions within the fidelity contract's bounds of
    the CPU (mean <= 0.5, 99th percentile <= 2 gray levels); random ones of the CPU's strength: the streams
    differ between devices, so mean |corrupted - clean| over 64 samples within 30 % (frost, one of 5 textures
    per sample, and spatter at severity 1 vary most: two such means of other seeds on the CPU differ by 4-7 %
    (1 sd), at most 19 % in 190 pairs)."""
    x = _images(64, 96, 136, seed=3)
    seeds = torch.arange(11, 11 + len(x))
    for severity in SEVERITIES:
        y = corrupt(x.to(DEVICE), name, severity, seed=seeds.to(DEVICE))
        assert y.shape == x.shape and y.dtype == x.dtype and y.device.type == DEVICE.type
        assert bool(torch.isfinite(y).all()) and float(y.min()) >= 0 and float(y.max()) <= 1
        alone = corrupt(x[2:3].to(DEVICE), name, severity, seed=seeds[2:3].to(DEVICE))
        # the same draws; kernels may round differently for another batch size (cuDNN picks per shape)
        assert float((alone - y[2:3]).abs().gt(1e-4).float().mean()) <= 1e-3, (name, severity)
        cpu, y = corrupt(x, name, severity, seed=seeds), y.cpu()
        if name == "jpeg_compression":
            assert torch.equal(y, cpu), severity
        elif name in DETERMINISTIC:
            diff = (y - cpu).abs().mul(255)
            assert float(diff.mean()) <= 0.5 and float(diff.quantile(0.99)) <= 2, (name, severity)
        else:
            assert name in RANDOM
            ours, theirs = float((y - x).abs().mean()), float((cpu - x).abs().mean())
            assert ours == pytest.approx(theirs, rel=0.3), (name, severity)


def test_metrics_on_the_device_equal_the_cpu():
    from shiftbench.metrics import CalibrationMetrics, ConditionalMetrics, SegmentationMetrics, UncertaintyHistogram

    g = torch.Generator().manual_seed(5)
    probs = torch.randn(3, 7, 45, 61, generator=g).mul(2).softmax(1)
    target = torch.randint(0, 7, (3, 45, 61), generator=g)
    target[0, :5] = 255
    unc = torch.rand(target.shape, generator=g)
    pred = probs.argmax(1)
    for make, args in ((lambda: SegmentationMetrics(7), (pred, target)),
                       (lambda: CalibrationMetrics(7), (probs, target)),
                       (lambda: CalibrationMetrics(7, average="images"), (probs, target, 1 - unc)),
                       (lambda: ConditionalMetrics(patch_size=4, thresholds=21), (pred, target, unc)),
                       (lambda: UncertaintyHistogram(bins=20), (unc, target))):
        cpu, dev = make(), make()
        cpu.update(*args)
        dev.update(*(a.to(DEVICE) for a in args))
        for name, value in cpu.state_dict().items():
            got = dev.state_dict()[name]
            if name == "bin_confidence":  # exact sums of the same float32 confidences: atomics cannot reorder them
                assert torch.equal(got, value), type(cpu).__name__
            elif value.is_floating_point():
                torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-9)
            else:
                assert torch.equal(got, value), (type(cpu).__name__, name)


def test_a_run_on_the_device_is_close_to_the_cpu_run(tmp_path):
    """The tiny runner suite on the device and on the CPU: the same rows, counts identical, scores close
    (model forwards round differently on a GPU: cuDNN, TF32 convolutions)."""
    from runner_fixture import make_suite

    from shiftbench.cli import main

    suite = make_suite(tmp_path / "suite", count=2, size=(48, 64), corruptions=("fog", "jpeg_compression"))
    for device in ("cpu", DEVICE.type):
        assert main(["run", str(suite), "--out", str(tmp_path / device), "--quiet", "--device", device]) == 0
    cpu, dev = (pd.read_csv(tmp_path / d / "results.csv") for d in ("cpu", DEVICE.type))
    keys = ["split", "model", "estimator", "corruption", "severity"]
    pd.testing.assert_frame_equal(cpu[keys], dev[keys])
    assert (cpu.n_pixels == dev.n_pixels).all()
    # six other run seeds on the CPU (other corruption and MC-dropout streams, as on a GPU) kept every column within
    # rtol 0.02, atol 0.01 but the binary NLL of an uncertainty (a few confident wrong pixels), which moved 6.3 %
    for column, rtol in (("miou", 0.02), ("ece", 0.02), ("brier", 0.02), ("nll", 0.15), ("au_pavpu", 0.02)):
        assert np.allclose(dev[column], cpu[column], rtol=rtol, atol=0.01), column
