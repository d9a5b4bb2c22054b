"""The Accumulator base (states, merge, persistence, all_reduce) and SegmentationMetrics."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shiftbench.errors import ShiftbenchError
from shiftbench.metrics import (Accumulator, CalibrationMetrics, ConditionalMetrics, SegmentationMetrics,
                                UncertaintyHistogram)

IGNORE = 255


def _labels(b=2, h=6, w=7, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < 0.2] = IGNORE
    return torch.randint(0, k, (b, h, w), generator=g), target


# --------------------------------------------------------------------------- SegmentationMetrics


def test_segmentation_matches_brute_force():
    k = 4
    pred, target = _labels(k=k)
    cm = np.zeros((k, k), dtype=np.int64)
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t != IGNORE:
            cm[t, p] += 1
    iou = [cm[c, c] / (cm[c].sum() + cm[:, c].sum() - cm[c, c]) for c in range(k)]
    m = SegmentationMetrics(k)
    m.update(pred, target)
    result = m.compute()
    np.testing.assert_array_equal(result["confusion_matrix"].numpy(), cm)
    np.testing.assert_allclose(result["iou"].numpy(), iou, rtol=1e-15)
    assert result["miou"] == pytest.approx(np.mean(iou), rel=1e-15)
    assert result["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum(), rel=1e-15)


def test_segmentation_absent_classes_are_nan_and_skipped():
    m = SegmentationMetrics(3)
    m.update(torch.tensor([[[0, 0, 1]]]), torch.tensor([[[0, 1, 1]]]))
    result = m.compute()
    assert math.isnan(result["iou"][2]) and result["miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    empty = SegmentationMetrics(3)
    empty.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), IGNORE))
    assert math.isnan(empty.compute()["miou"]) and math.isnan(empty.compute()["pixel_accuracy"])


@pytest.mark.parametrize("pred, target, match", [
    (torch.tensor([[[0, 4]]]), torch.tensor([[[0, 1]]]), r"pred holds values in \[0, 4\]; expected class ids in \[0, 3\]"),
    (torch.tensor([[[0, 1]]]), torch.tensor([[[-1, 1]]]), r"target holds values in \[-1, 1\]"),
    (torch.tensor([[[0, 1]]]), torch.tensor([[0, 1]]), r"target must be an integer tensor \[B,H,W\]"),
    (torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[0, 1]]]), "pred must be an integer tensor"),
])
def test_segmentation_bad_inputs(pred, target, match):
    m = SegmentationMetrics(4)
    with pytest.raises(ShiftbenchError, match=match):
        m.update(pred, target)
    assert m.confmat.sum() == 0


# --------------------------------------------------------------------------- the base class


class _Tiny(Accumulator):
    def __init__(self, size=3):
        super().__init__(size=size)
        self.add_state("total", torch.zeros(size, dtype=torch.int64))
        self.add_state("peak", torch.full((), -math.inf, dtype=torch.float64), reduce="max")


def test_states_reset_merge_and_reductions():
    a, b = _Tiny(), _Tiny()
    a.total += torch.tensor([1, 2, 3])
    a.peak.fill_(2.0)
    b.total += 1
    b.peak.fill_(5.0)
    a.merge(b)
    assert a.total.tolist() == [2, 3, 4] and a.peak.item() == 5.0
    a.reset()
    assert a.total.tolist() == [0, 0, 0] and a.peak.item() == -math.inf
    assert a.state_names == ("total", "peak") and repr(a) == "_Tiny(size=3)"
    with pytest.raises(ShiftbenchError, match=r"cannot merge _Tiny\(size=4\) into _Tiny\(size=3\)"):
        a.merge(_Tiny(4))
    with pytest.raises(ValueError, match="reduce='mean' is not one of sum, max, min"):
        a.add_state("x", torch.zeros(1), reduce="mean")
    with pytest.raises(ValueError, match="already defined"):
        a.add_state("total", torch.zeros(1))


@pytest.mark.parametrize("make", [
    lambda i, f: CalibrationMetrics(i(11), n_bins=i(15), ignore_index=i(255)),
    lambda i, f: ConditionalMetrics(patch_size=i(4), accuracy_threshold=f(0.5), thresholds=i(101), ignore_index=i(255),
                                    threshold_range=(f(0.25), i(1))),
    lambda i, f: SegmentationMetrics(i(11), ignore_index=i(255)),
    lambda i, f: UncertaintyHistogram(bins=i(50), ignore_index=i(255)),
])
def test_numpy_settings_are_plain_numbers(make):
    """Settings read from numpy or pandas hold their Python values, so such a metric merges with one built
    from literals and prints them plainly."""
    plain, numpy = make(int, float), make(np.int64, np.float32)
    assert numpy.config == plain.config and repr(numpy) == repr(plain)
    plain_values = [x for v in numpy.config.values() for x in (v if isinstance(v, tuple) else (v,))]
    assert all(type(v) in (int, float, str, bool) for v in plain_values)
    assert type(numpy.ignore_index) is int
    numpy.merge(plain)
    with pytest.raises(ShiftbenchError, match="must be a positive integer; got np.True_"):
        make(np.bool_, float)


def test_an_empty_batch_changes_no_count_or_sum():
    """B = 0 (e.g. a rank whose shard ran out) is a no-op for every accumulator, not an internal error."""
    k = 4
    pred, target = _labels(k=k)
    probs = torch.softmax(torch.randn(2, k, 6, 7, generator=torch.Generator().manual_seed(1)), 1)
    u = torch.rand(2, 6, 7, generator=torch.Generator().manual_seed(2))
    e_probs, e_labels, e_u = probs[:0], target[:0], u[:0]
    cases = [
        (lambda: SegmentationMetrics(k, ignore_index=IGNORE), lambda m, p, t, x, v: m.update(x, t)),
        (lambda: CalibrationMetrics(k, ignore_index=IGNORE), lambda m, p, t, x, v: m.update(p, t)),
        (lambda: CalibrationMetrics(k, ignore_index=IGNORE, average="images"),
         lambda m, p, t, x, v: m.update(p, t, confidence=1 - v)),
        (lambda: ConditionalMetrics(ignore_index=IGNORE), lambda m, p, t, x, v: m.update(x, t, v)),
        (lambda: UncertaintyHistogram(ignore_index=IGNORE), lambda m, p, t, x, v: m.update(v, t)),
    ]
    for make, update in cases:
        empty_first, plain = make(), make()
        update(empty_first, e_probs, e_labels, pred[:0], e_u)
        update(empty_first, probs, target, pred, u)
        update(plain, probs, target, pred, u)
        for name in plain.state_names:
            assert torch.equal(getattr(empty_first, name), getattr(plain, name)), (type(plain).__name__, name)


def test_state_dict_round_trip_with_weights_only(tmp_path):
    pred, target = _labels()
    m = SegmentationMetrics(4)
    m.update(pred, target)
    torch.save(m.state_dict(), tmp_path / "s.pt")
    loaded = SegmentationMetrics(4).load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(loaded.confmat, m.confmat)
    with pytest.raises(ShiftbenchError, match=r"state 'confmat' is torch.int64 \[4, 4\]; expected torch.int64 \[5, 5\]"):
        SegmentationMetrics(5).load_state_dict(m.state_dict())
    with pytest.raises(ShiftbenchError, match=r"state has keys \['x'\]; expected \['confmat'\]"):
        SegmentationMetrics(4).load_state_dict({"x": torch.zeros(1)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_states_follow_the_inputs_to_the_gpu():
    pred, target = _labels()
    unc = torch.rand(target.shape, generator=torch.Generator().manual_seed(1))
    probs = torch.randn(2, 4, 6, 7, generator=torch.Generator().manual_seed(2)).softmax(1)
    for make, args in ((lambda: SegmentationMetrics(4), (pred, target)),
                       (lambda: CalibrationMetrics(4), (probs, target, 1 - unc)),
                       (lambda: ConditionalMetrics(patch_size=2), (pred, target, unc))):
        cpu, gpu = make(), make()
        cpu.update(*args)
        gpu.update(*(a.cuda() for a in args))
        assert gpu.device.type == "cuda"
        for name, value in cpu.state_dict().items():
            torch.testing.assert_close(gpu.state_dict()[name], value, rtol=1e-6, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        accs = _shard_accumulators(rank)
        for acc in accs:
            acc.all_reduce()
        torch.save([acc.state_dict() for acc in accs], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _shard_accumulators(rank: int):
    """The three accumulators updated with shard ``rank`` of a small synthetic batch."""
    g = torch.Generator().manual_seed(100 + rank)
    probs = torch.randn(2, 4, 5, 6, generator=g).softmax(1)
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    unc = torch.rand(2, 5, 6, generator=g)
    seg, cal, cond = SegmentationMetrics(4), CalibrationMetrics(4, average="images"), ConditionalMetrics(patch_size=2)
    seg.update(probs.argmax(1), target)
    cal.update(probs, target, 1 - unc)
    cond.update(probs.argmax(1), target, unc)
    return [seg, cal, cond]


def test_all_reduce_outside_torchrun_is_a_no_op():
    assert not torch.distributed.is_initialized()
    for acc in _shard_accumulators(0):
        before = acc.state_dict()
        assert acc.all_reduce() is acc
        assert all(torch.equal(acc.state_dict()[k], v) for k, v in before.items()), type(acc).__name__


def test_all_reduce_over_two_gloo_processes(tmp_path):
    out = str(tmp_path / "state")
    # fork: the children need not import torch again (spawn costs seconds per process)
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
    want = [a.merge(b) for a, b in zip(_shard_accumulators(0), _shard_accumulators(1))]
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for acc, state in zip(want, got):
            for name, value in acc.state_dict().items():
                assert torch.equal(state[name], value), (type(acc).__name__, name)


# --------------------------------------------------------------------------- UncertaintyHistogram


def test_uncertainty_histogram_matches_brute_force():
    _, target = _labels(h=9, w=11)
    g = torch.Generator().manual_seed(3)
    unc = torch.rand(target.shape, generator=g)
    unc[0, 0, :4] = torch.tensor([0.0, 1.0, 0.5, 0.1])  # edges, 0 and 1
    target[0, 0, :4] = 0
    hist = UncertaintyHistogram(bins=10)
    hist.update(unc, target)
    result = hist.compute()
    values = [float(u) for u, t in zip(unc.flatten().tolist(), target.flatten().tolist()) if t != IGNORE]
    want = np.zeros(10, dtype=np.int64)
    for u in values:
        want[min(int(np.float64(u) * 10), 9)] += 1
    np.testing.assert_array_equal(result["counts"].numpy(), want)
    assert result["mean"] == pytest.approx(np.mean(values), rel=1e-12) and result["n_pixels"] == len(values)
    np.testing.assert_allclose(result["centres"].numpy(), np.arange(10) / 10 + 0.05)
    with pytest.raises(ShiftbenchError, match=r"uncertainty holds values in \[-1, -1\]"):
        hist.update(torch.full(target.shape, -1.0), torch.zeros_like(target))
    assert hist.counts.sum() == len(values)
    empty = UncertaintyHistogram()
    empty.update(unc, torch.full_like(target, IGNORE))
    assert math.isnan(empty.compute()["mean"]) and empty.compute()["n_pixels"] == 0
