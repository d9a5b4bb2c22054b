"""Outcome: the correctness masks the metrics of one model share, and arithmetic masking of ignored pixels."""

import numpy as np
import pytest
import torch

from shiftbench.errors import ShiftbenchError
from shiftbench.metrics import (CalibrationMetrics, ConditionalMetrics, Outcome, SegmentationMetrics,
                                UncertaintyHistogram)
from shiftbench.metrics import base as metrics_base

IGNORE = 255
B, K, H, W = 3, 5, 13, 10


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(B, K, H, W, generator=g).mul_(2).softmax(1)
    target = torch.randint(0, K, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < 0.2] = IGNORE
    target[1, :4] = IGNORE
    u = torch.rand(B, H, W, generator=g)
    return probs, target, u, probs.max(1).indices


def _states(acc):
    return {k: v.clone() for k, v in acc.state_dict().items()}


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_masks_match_their_definition():
    probs, target, _, pred = _inputs()
    o = Outcome(pred, target, IGNORE)
    t, p = target.numpy(), pred.numpy()
    valid = t != IGNORE
    assert np.array_equal(o.valid.numpy(), valid.astype(np.float32))
    assert np.array_equal(o.correct.numpy(), (valid & (p == t)).astype(np.float32))
    assert np.array_equal(o.invalid.numpy(), ~valid)
    assert o.n_valid.tolist() == valid.sum((1, 2)).tolist()
    assert np.array_equal(o.safe_target.numpy(), np.where(valid, t, 0))
    n_valid, n_correct = o.patches(4)
    assert n_valid.shape == (B, 4, 3)
    for i in range(B):
        for r in range(4):
            for c in range(3):
                block = (i, slice(4 * r, 4 * r + 4), slice(4 * c, 4 * c + 4))
                assert n_valid[i, r, c] == valid[block].sum()
                assert n_correct[i, r, c] == (valid & (p == t))[block].sum()
    with pytest.raises(ShiftbenchError, match="correctness needs pred"):
        Outcome(None, target, IGNORE).correct


def test_for_pred_shares_the_label_masks_and_recomputes_correctness():
    probs, target, u, pred = _inputs(5)
    base = Outcome(None, target, IGNORE)
    base.valid, base.invalid, base.check_target(K)
    other = (pred + 1) % K
    o = base.for_pred(other)
    assert o.valid is base.valid and o.invalid is base.invalid and o.pred is other
    fresh = Outcome(other, target, IGNORE)
    assert torch.equal(o.correct, fresh.correct) and torch.equal(o.n_valid, fresh.n_valid)
    assert all(torch.equal(a, b) for a, b in zip(o.patches(2), fresh.patches(2)))
    assert not torch.equal(o.correct, Outcome(pred, target, IGNORE).correct)


@pytest.mark.parametrize("chunk", [None, 2 * 10 * 4])
def test_a_shared_outcome_gives_the_same_states_as_none(monkeypatch, chunk):
    if chunk:
        monkeypatch.setitem(metrics_base.CHUNK_PIXELS, "cpu", chunk)  # several row chunks
    probs, target, u, pred = _inputs(1)
    o = Outcome(pred, target, IGNORE)
    pairs = [
        (lambda a: a.update(pred, target), lambda a: a.update(pred, target, outcome=o), SegmentationMetrics(K)),
        (lambda a: a.update(probs, target, 1 - u, pred=pred), lambda a: a.update(probs, target, 1 - u, outcome=o),
         CalibrationMetrics(K)),
        (lambda a: a.update(probs, target, pred=pred), lambda a: a.update(probs, target, outcome=o),
         CalibrationMetrics(K, n_bins=7, average="images")),
        (lambda a: a.update(pred, target, u), lambda a: a.update(pred, target, u, outcome=o),
         ConditionalMetrics(patch_size=3)),
        (lambda a: a.update(u, target), lambda a: a.update(u, target, outcome=o), UncertaintyHistogram()),
    ]
    for plain, shared, acc in pairs:
        plain(acc)
        want = _states(acc)
        acc.reset()
        shared(acc)
        _equal(_states(acc), want)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 7.0, -3.0])
def test_garbage_on_ignored_pixels_changes_nothing(garbage):
    """Ignored pixels are masked by arithmetic on the fast path; anything there (NaN included) must not leak."""
    probs, target, u, pred = _inputs(2)
    ignored = target == IGNORE
    dirty_u = u.masked_fill(ignored, garbage)
    dirty_probs = probs.masked_fill(ignored[:, None], garbage)
    runs = [
        (CalibrationMetrics(K), lambda a, x: a.update(probs, target, 1 - x, pred=pred), u, dirty_u),
        (CalibrationMetrics(K), lambda a, x: a.update(x, target, pred=pred), probs, dirty_probs),
        (ConditionalMetrics(), lambda a, x: a.update(pred, target, x), u, dirty_u),
        (UncertaintyHistogram(), lambda a, x: a.update(x, target), u, dirty_u),
    ]
    for acc, update, clean, dirty in runs:
        update(acc, clean)
        want = _states(acc)
        acc.reset()
        update(acc, dirty)
        _equal(_states(acc), want)


def test_garbage_on_a_valid_pixel_is_refused_and_leaves_the_state_unchanged():
    probs, target, u, pred = _inputs(3)
    i = torch.nonzero(target != IGNORE)[0].tolist()
    bad = u.clone()
    bad[tuple(i)] = float("nan")
    for acc, update in ((CalibrationMetrics(K), lambda a: a.update(probs, target, 1 - bad, pred=pred)),
                        (ConditionalMetrics(), lambda a: a.update(pred, target, bad)),
                        (UncertaintyHistogram(), lambda a: a.update(bad, target))):
        before = _states(acc)
        with pytest.raises(ShiftbenchError, match="holds values"):
            update(acc)
        _equal(_states(acc), before)


def test_an_outcome_of_other_labels_is_refused():
    probs, target, u, pred = _inputs(4)
    other = target.clone()
    other[0, 0, 0] = (int(other[0, 0, 0]) + 1) % K
    o = Outcome(pred, other, IGNORE)
    with pytest.raises(ShiftbenchError, match="another target"):
        CalibrationMetrics(K).update(probs, target, 1 - u, outcome=o)
    with pytest.raises(ShiftbenchError, match="another target"):
        ConditionalMetrics().update(pred, target, u, outcome=o)
    with pytest.raises(ShiftbenchError, match="ignore_index"):
        UncertaintyHistogram(ignore_index=0).update(u, target, outcome=Outcome(pred, target, IGNORE))
    with pytest.raises(ShiftbenchError, match="correctness needs pred"):
        CalibrationMetrics(K).update(probs, target, 1 - u, outcome=Outcome(None, target, IGNORE))
    same = Outcome(pred, target.clone(), IGNORE)  # equal labels in another tensor are fine
    CalibrationMetrics(K).update(probs, target, 1 - u, outcome=same)


def test_an_outcome_of_another_pred_is_refused():
    probs, target, u, pred = _inputs(5)
    other = (pred + 1) % K
    with pytest.raises(ShiftbenchError, match="ConditionalMetrics: outcome was computed for another pred"):
        ConditionalMetrics().update(other, target, u, outcome=Outcome(pred, target, IGNORE))
    with pytest.raises(ShiftbenchError, match="SegmentationMetrics: outcome was computed for another pred"):
        SegmentationMetrics(K).update(other, target, outcome=Outcome(pred, target, IGNORE))
    ConditionalMetrics().update(pred.clone(), target, u, outcome=Outcome(pred, target, IGNORE))  # equal: fine


def test_negative_class_ids_are_refused_by_the_metrics_that_do_not_know_k():
    probs, target, u, pred = _inputs(6)
    bad = target.masked_fill(target == 0, -5)
    for update in (lambda: ConditionalMetrics().update(pred, bad, u), lambda: UncertaintyHistogram().update(u, bad)):
        with pytest.raises(ShiftbenchError, match=r"target holds values in \[-5, .*\]; expected class ids >= 0 or "
                                                  r"ignore_index 255"):
            update()
    with pytest.raises(ShiftbenchError, match=r"pred holds values in \[-1, .*\]; expected class ids >= 0"):
        ConditionalMetrics().update(pred - 1, target, u)


def test_labels_of_any_integer_dtype_give_the_int64_confusion_matrix():
    g = torch.Generator().manual_seed(7)
    k = 19  # >= 16: target * K + pred overflows uint8
    pred, target = torch.randint(0, k, (2, 9, 8), generator=g), torch.randint(0, k, (2, 9, 8), generator=g)
    target[0, :3] = IGNORE
    ref = SegmentationMetrics(k)
    ref.update(pred, target)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        m = SegmentationMetrics(k)
        m.update(pred.to(dtype), target.to(dtype))
        assert torch.equal(m.confmat, ref.confmat), dtype


def test_the_probabilities_a_shared_outcome_saw_are_checked_once_and_others_again(monkeypatch):
    from shiftbench.metrics import calibration

    probs, target, u, pred = _inputs(8)
    o = Outcome(pred, target, IGNORE)
    calls, real = [], calibration._check_simplex
    monkeypatch.setattr(calibration, "_check_simplex", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):  # three estimators of one model
        CalibrationMetrics(K).update(probs, target, 1 - u, outcome=o)
    assert len(calls) == 1  # one row chunk, checked for the first estimator only
    with pytest.raises(ShiftbenchError, match="probs summed over the classes"):
        CalibrationMetrics(K).update(probs * 0.5, target, 1 - u, outcome=o)  # other probabilities: checked


def test_numpy_arrays_and_foreign_objects_are_one_line():
    probs, target, u, pred = _inputs(9)
    for call, match in ((lambda: SegmentationMetrics(K).update(pred.numpy(), target), "pred must be an integer tensor"),
                        (lambda: Outcome(pred, target.numpy()), "target must be an integer tensor"),
                        (lambda: CalibrationMetrics(K).update(probs.numpy(), target), "got ndarray"),
                        (lambda: UncertaintyHistogram().update(u.numpy(), target), "uncertainty must be a float"),
                        (lambda: SegmentationMetrics(K).merge(3), r"cannot merge int\(\) into SegmentationMetrics")):
        with pytest.raises(ShiftbenchError, match=match) as exc:
            call()
        assert "\n" not in str(exc.value)
