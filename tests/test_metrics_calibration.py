"""CalibrationMetrics against a brute force (loops over pixels) and torchmetrics."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

from shiftbench.errors import ShiftbenchError
from shiftbench.metrics import CalibrationMetrics
from shiftbench.metrics import base as metrics_base

IGNORE = 255
KEYS = ("ece", "mce", "brier", "nll", "brier_multiclass", "nll_multiclass")


# --------------------------------------------------------------------------- brute force


def _pixel(p, y, given, edges, n_bins):
    """(bin, confidence, correct, brier, nll, brier_mc, nll_mc) of one pixel, by the definitions."""
    k = len(p)
    pred = max(range(k), key=lambda j: (p[j], -j))  # first maximal class
    correct = int(pred == y)
    conf = float(np.float32(given)) if given is not None else float(p[pred])
    b = max(i for i in range(n_bins) if conf >= edges[i])  # [e_i, e_i+1); 1.0 falls in the last bin
    brier_mc = sum((float(p[j]) - (j == y)) ** 2 for j in range(k))
    nll_mc = -math.log(max(float(p[y]), 1e-12))
    if given is None:
        return b, conf, correct, brier_mc, nll_mc, brier_mc, nll_mc
    brier = (conf - correct) ** 2
    nll = -math.log(max(conf if correct else 1 - conf, 1e-12))
    return b, conf, correct, brier, nll, brier_mc, nll_mc


def _summary(rows, n_bins):
    """ece, mce, brier, nll, brier_mc, nll_mc of a list of pixel tuples."""
    count, hits, confs = np.zeros(n_bins), np.zeros(n_bins), np.zeros(n_bins)
    for b, conf, correct, *_ in rows:
        count[b] += 1
        hits[b] += correct
        confs[b] += conf
    n = count.sum()
    full = count > 0
    ece = np.abs(hits - confs).sum() / n
    mce = np.max(np.abs(hits[full] / count[full] - confs[full] / count[full]))
    return [ece, mce] + [np.mean([r[i] for r in rows]) for i in range(3, 7)], (count, hits, confs)


def brute_calibration(probs, target, conf=None, n_bins=15, average="pixels"):
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32).double().numpy()  # torchmetrics' edges
    p, t = probs.double().numpy(), target.numpy()
    c = None if conf is None else conf.numpy()
    images = []
    for i in range(t.shape[0]):
        rows = [_pixel(p[i, :, y, x], t[i, y, x], None if c is None else c[i, y, x], edges, n_bins)
                for y in range(t.shape[1]) for x in range(t.shape[2]) if t[i, y, x] != IGNORE]
        images.append(rows)
    pooled = [r for rows in images for r in rows]
    if not pooled:
        return None
    values, bins = _summary(pooled, n_bins)
    if average == "images":
        values = list(np.mean([_summary(rows, n_bins)[0] for rows in images if rows], axis=0))
    return dict(zip(KEYS, values)), bins


def _random(b=2, k=5, h=7, w=9, seed=0, scale=3.0, ignore=0.2):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(b, k, h, w, generator=g, dtype=torch.float64) * scale).softmax(1).float()
    target = torch.randint(0, k, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < ignore] = IGNORE
    return probs, target


def _check(result, want):
    values, (count, hits, confs) = want
    for key in KEYS:
        assert result[key] == pytest.approx(values[key], rel=1e-5, abs=1e-7), key
    assert result["ece"] == pytest.approx(values["ece"], abs=1e-12)  # the bins are exact
    assert result["mce"] == pytest.approx(values["mce"], abs=1e-12)
    np.testing.assert_array_equal(result["bin_count"].numpy(), count)
    full = count > 0
    np.testing.assert_allclose(result["bin_accuracy"].numpy()[full], hits[full] / count[full], atol=1e-12)
    np.testing.assert_allclose(result["bin_confidence"].numpy()[full], confs[full] / count[full], atol=1e-12)
    assert np.isnan(result["bin_accuracy"].numpy()[~full]).all()


def _run(probs, target, conf=None, **kw):
    m = CalibrationMetrics(probs.shape[1], **kw)
    m.update(probs, target, conf)
    return m.compute()


# --------------------------------------------------------------------------- against the brute force


@pytest.mark.parametrize("average", ["pixels", "images"])
@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("n_bins", [15, 1])  # one bin: ECE = MCE = |mean confidence - accuracy|
def test_random_inputs_match_brute_force(average, given, n_bins):
    probs, target = _random(b=3, seed=1)
    conf = torch.rand(target.shape, generator=torch.Generator().manual_seed(2)) if given else None
    result = _run(probs, target, conf, average=average, n_bins=n_bins)
    _check(result, brute_calibration(probs, target, conf, n_bins=n_bins, average=average))
    if n_bins == 1:
        assert result["ece"] == pytest.approx(result["mce"], rel=1e-12)
    assert result["confidence"] == ("given" if given else "probability")
    assert result["n_pixels"] == int((target != IGNORE).sum())


@pytest.mark.parametrize("average", ["pixels", "images"])
def test_without_multiclass_the_given_confidence_scores_are_unchanged(average):
    probs, target = _random(b=3, seed=4)
    conf = torch.rand(target.shape, generator=torch.Generator().manual_seed(5))
    full, lean = _run(probs, target, conf, average=average), _run(probs, target, conf, average=average,
                                                                  multiclass=False)
    want, _ = brute_calibration(probs, target, conf, average=average)
    for key in ("ece", "mce", "brier", "nll"):
        assert lean[key] == full[key], key
        assert lean[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert math.isnan(lean["brier_multiclass"]) and math.isnan(lean["nll_multiclass"])
    prob_mode = _run(probs, target, average=average, multiclass=False)  # there brier/nll are the multiclass ones
    assert prob_mode["brier_multiclass"] == prob_mode["brier"] == pytest.approx(want["brier_multiclass"], rel=1e-5)
    with pytest.raises(ValueError):
        CalibrationMetrics(5).merge(CalibrationMetrics(5, multiclass=False))


def test_confidences_exactly_on_bin_edges_zero_and_one():
    n_bins = 15
    edges = torch.linspace(0, 1, n_bins + 1)
    below = torch.nextafter(edges, torch.tensor(-1.0)).clamp(0, 1)
    above = torch.nextafter(edges, torch.tensor(2.0)).clamp(0, 1)
    conf = torch.cat([edges, below, above, torch.tensor([0.0, 1.0, 1.0, 0.0])]).view(1, 4, -1)
    probs, target = _random(b=1, k=3, h=4, w=conf.shape[2], seed=3, ignore=0.0)
    result = _run(probs, target, conf, n_bins=n_bins)
    _check(result, brute_calibration(probs, target, conf, n_bins=n_bins))
    assert result["bin_count"].sum() == conf.numel()


@pytest.mark.parametrize("n_bins", [15, 10, 7, 3, 100])
def test_bins_within_a_few_ulps_of_every_edge(n_bins):
    # the bin comes from float32 n * conf; values within 8 ulps of an edge (float32 and exact i/n) must
    # still land where a search against torchmetrics' float32 edges puts them
    edges = torch.linspace(0, 1, n_bins + 1)
    exact = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    centres = torch.cat([edges, exact.float()])
    conf, up, down = [centres], centres.clone(), centres.clone()
    for _ in range(8):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-1.0))
        conf += [up, down]
    conf = torch.cat(conf).clamp(0, 1).view(1, 1, -1)
    target = torch.zeros(conf.shape, dtype=torch.long)
    m = CalibrationMetrics(2, n_bins=n_bins)
    m.update(torch.full((1, 2, 1, conf.shape[2]), 0.5), target, conf)
    want = torch.bincount((torch.bucketize(conf.view(-1), edges, right=True) - 1).clamp(0, n_bins - 1),
                          minlength=n_bins)
    assert torch.equal(m.bin_count, want)


def test_probability_mode_with_edge_and_one_hot_probabilities():
    # two classes: the top-label probability is exactly an edge >= 1/2, or exactly 1 (one-hot)
    top = torch.cat([torch.linspace(0, 1, 16)[8:], torch.ones(4)])
    probs = torch.stack([top, 1 - top]).view(1, 2, 3, 4)
    target = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 1], [0, 1, 1, 0]])[None]
    result = _run(probs, target)
    _check(result, brute_calibration(probs, target))
    assert result["nll"] == pytest.approx(brute_calibration(probs, target)[0]["nll"])  # -log(1e-12) terms


def test_single_class_and_constant_target():
    probs, _ = _random(b=2, k=4, seed=4, ignore=0)
    target = torch.full((2, 7, 9), 2)
    _check(_run(probs, target), brute_calibration(probs, target))
    one = torch.ones(1, 1, 3, 3)
    result = _run(one, torch.zeros(1, 3, 3, dtype=torch.long))
    assert result["ece"] == 0 and result["brier"] == 0 and result["nll"] == 0 and result["accuracy"] == 1


def test_all_pixels_ignored_gives_nan_not_zero():
    probs, _ = _random()
    target = torch.full((2, 7, 9), IGNORE)
    for average in ("pixels", "images"):
        result = _run(probs, target, average=average)
        assert all(math.isnan(result[k]) for k in KEYS), average
        assert result["n_pixels"] == 0 and result["n_images"] == 0


def test_images_average_skips_images_without_valid_pixels():
    probs, target = _random(b=3, seed=5)
    target[1] = IGNORE
    result = _run(probs, target, average="images")
    _check(result, brute_calibration(probs, target, average="images"))
    assert result["n_images"] == 2


def test_chunked_update_equals_one_chunk(monkeypatch):
    probs, target = _random(b=2, h=23, w=9, seed=6)
    conf = torch.rand(target.shape, generator=torch.Generator().manual_seed(7))
    whole = _run(probs, target, conf, average="images")
    monkeypatch.setitem(metrics_base.CHUNK_PIXELS, "cpu", 2 * 9 * 4)  # 4 rows per chunk, the last one 3
    chunked = _run(probs, target, conf, average="images")
    for key in KEYS:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-15)


def test_an_images_bin_sums_are_exact_so_cudas_atomics_cannot_reorder_them():
    # On CUDA the weighted bincount behind an image's reliability-bin sums adds by float atomics in no fixed
    # order. The sums are exact all the same: the accumulator's confidences are float32 (update() makes them
    # so), a top-label probability >= 1/K >= 2^-6 (K <= 64) is a multiple of 2^-29 and 1 - u of a float32
    # u in [0, 1] one of 2^-24, so up to 2^24 pixels of them in one cell (a 1208x1920 frame has 2^21.1) add
    # in float64 without rounding, whatever the order. Here 2^22 in one cell, in three orders.
    g = torch.Generator().manual_seed(11)
    n = 2**22
    top = (torch.rand(n, generator=g) * (1 - 1 / 38) + 1 / 38).float()  # K = 38, A2D2's classes
    u = torch.rand(n, generator=g)
    u[: n // 4] = 1 - torch.rand(n // 4, generator=g) * 1e-6  # confidences 1 - u near 0
    cell = torch.zeros(n, dtype=torch.int32)
    order = torch.randperm(n, generator=g)
    for conf, quantum in ((top, 2.0 ** -29), (1.0 - u, 2.0 ** -24)):
        conf = conf.double()
        ticks = conf / quantum
        assert torch.equal(ticks, ticks.round()), quantum
        exact = float(ticks.long().sum()) * quantum  # an int64 sum, exactly representable: < 2^53 ticks
        for weights in (conf, conf.flip(0), conf[order]):
            assert float(torch.bincount(cell, weights, minlength=1)[0]) == exact
    # what the float32 premise buys: float64 confidences of the same range do round, order by order
    arbitrary = torch.rand(n, generator=g, dtype=torch.float64)
    sums = {float(torch.bincount(cell, w, minlength=1)[0]) for w in (arbitrary, arbitrary.flip(0), arbitrary[order])}
    assert len(sums) > 1


def test_given_pred_is_used_as_the_prediction():
    probs, target = _random(seed=8)
    m = CalibrationMetrics(5)
    m.update(probs, target, pred=probs.argmax(1))
    a, b = m.compute(), _run(probs, target)
    for key in KEYS:
        assert a[key] == pytest.approx(b[key], rel=1e-12)


# --------------------------------------------------------------------------- against torchmetrics


@pytest.mark.parametrize("n_bins", [15, 10, 7])
def test_ece_mce_equal_torchmetrics_on_the_same_pixels(n_bins):
    probs, target = _random(b=2, k=6, h=16, w=16, seed=9, scale=2.0)
    result = _run(probs, target, n_bins=n_bins)
    valid = target != IGNORE
    flat = probs.permute(0, 2, 3, 1)[valid]
    for norm, key in (("l1", "ece"), ("max", "mce")):
        ref = MulticlassCalibrationError(6, n_bins=n_bins, norm=norm)(flat, target[valid]).item()
        assert result[key] == pytest.approx(ref, abs=1e-6), key


def test_given_confidence_ece_equals_torchmetrics_binary_calibration():
    probs, target = _random(b=2, k=4, h=16, w=16, seed=10)
    conf = torch.rand(target.shape, generator=torch.Generator().manual_seed(11))
    result = _run(probs, target, conf)
    valid = target != IGNORE
    correct = (probs.argmax(1) == target)[valid].long()
    for norm, key in (("l1", "ece"), ("max", "mce")):
        ref = BinaryCalibrationError(n_bins=15, norm=norm)(conf[valid], correct).item()
        assert result[key] == pytest.approx(ref, abs=1e-6), key


def test_confidence_one_is_in_the_last_bin():
    # torchmetrics puts conf == 1.0 into an extra (n+1)-th bin; the bins close the last one at 1
    probs = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 1, 2).contiguous()
    result = _run(probs, torch.tensor([[[0, 1]]]))
    assert result["bin_count"][-1] == 2 and result["bin_count"][:-1].sum() == 0


# --------------------------------------------------------------------------- merge, persistence, errors


def test_merge_equals_one_accumulator_updated_with_both(tmp_path):
    (p1, t1), (p2, t2) = _random(seed=12), _random(seed=13)
    a, b, both = CalibrationMetrics(5), CalibrationMetrics(5), CalibrationMetrics(5)
    a.update(p1, t1)
    b.update(p2, t2)
    both.update(p1, t1)
    both.update(p2, t2)
    merged = a.merge(b).state_dict()
    for name, value in both.state_dict().items():
        assert torch.equal(merged[name], value), name
    torch.save(both.state_dict(), tmp_path / "s.pt")
    loaded = CalibrationMetrics(5).load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert loaded.compute()["ece"] == both.compute()["ece"]


@pytest.mark.parametrize("average", ["pixels", "images"])
def test_merge_in_another_grouping_counts_exactly_and_sums_up_to_rounding(average):
    """Float64 addition is not associative: a merge of (1) and (2, 3) equals one accumulator updated with 1, 2, 3
    in every count, and in every float sum and result to ~1e-16 relative (docs/metrics.md)."""
    batches = [_random(seed=s) for s in (21, 22, 23)]
    first, rest, every = (CalibrationMetrics(5, average=average) for _ in range(3))
    first.update(*batches[0])
    for probs, target in batches[1:]:
        rest.update(probs, target)
    for probs, target in batches:
        every.update(probs, target)
    merged = first.merge(rest)
    for name, value in every.state_dict().items():
        got = merged.state_dict()[name]
        if value.is_floating_point():
            torch.testing.assert_close(got, value, rtol=1e-15, atol=0)
        else:
            assert torch.equal(got, value), name
    for key in ("ece", "mce", "brier", "nll"):
        assert merged.compute()[key] == pytest.approx(every.compute()[key], rel=1e-15, abs=0), key


def test_mixing_confidence_modes_is_refused():
    probs, target = _random()
    m = CalibrationMetrics(5)
    m.update(probs, target)
    before = m.state_dict()
    with pytest.raises(ShiftbenchError, match="updated without a confidence before; use one accumulator per"):
        m.update(probs, target, torch.rand(target.shape))  # refused at once, the state unchanged
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    given = CalibrationMetrics(5)
    given.update(probs, target, torch.rand(target.shape))
    with pytest.raises(ShiftbenchError, match="both with and without a confidence"):  # merged: found at compute
        m.merge(given).compute()


@pytest.mark.parametrize("change, match", [
    (dict(target=torch.full((2, 7, 9), 7)), r"target holds values in \[7, 7\]; expected class ids in \[0, 4\]"),
    (dict(conf=torch.full((2, 7, 9), 1.5)), r"confidence holds values in \[1.5, 1.5\]"),
    (dict(conf=torch.full((2, 7, 9), float("nan"))), "confidence holds NaN; expected values in"),
    (dict(probs=torch.rand(2, 4, 7, 9)), r"probs must be a float tensor \[B,K,H,W\] = \[2, 5, 7, 9\]"),
    (dict(probs=torch.randn(2, 5, 7, 9) * 5), "probs summed over the classes holds values"),  # logits
    (dict(probs=torch.full((2, 5, 7, 9), 0.4)), r"probs summed over the classes holds values in \[2, 2\]; expected 1"),
    (dict(probs="half"), r"probs summed over the classes holds values in \[0.5, 0.5\]"),
    (dict(probs="softmax over the batch"), "probs summed over the classes holds values"),
    (dict(probs="negative"), r"probs \(the smallest per pixel\) holds values in \[-0.29"),
    (dict(pred=torch.full((2, 7, 9), 5)), r"pred holds values in \[5, 5\]; expected class ids in \[0, 4\]"),
    (dict(conf=torch.rand(2, 7, 8)), r"confidence must be a float tensor \[2, 7, 9\]"),
    (dict(target=torch.zeros(2, 7, 9)), "target must be an integer tensor"),
])
def test_bad_inputs_are_refused_and_leave_the_state_unchanged(change, match):
    probs, target = _random()
    m = CalibrationMetrics(5)
    before = m.state_dict()
    args = {"probs": probs, "target": target, "conf": None, "pred": None, **change}
    made = {"half": probs * 0.5, "softmax over the batch": (probs * 9).softmax(0),
            "negative": probs + torch.tensor([-0.3, 0.3, 0, 0, 0]).view(1, 5, 1, 1)}
    if isinstance(args["probs"], str):
        args["probs"] = made[args["probs"]]
    with pytest.raises(ShiftbenchError, match=match) as exc:
        m.update(args["probs"], args["target"], args["conf"], pred=args["pred"])
    assert "\n" not in str(exc.value)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("kw, match", [
    (dict(n_bins=0), "n_bins must be a positive integer"),
    (dict(average="batch"), "average='batch' is not one of pixels, images"),
    (dict(num_classes=0), "num_classes must be a positive integer"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ShiftbenchError, match=match):
        CalibrationMetrics(**{"num_classes": 5, **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_probabilities_of_every_float_dtype_pass_the_sum_check(dtype):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 38, 9, 11, generator=g) * 4
    target = torch.randint(0, 38, (2, 9, 11), generator=g)
    m = CalibrationMetrics(38)
    m.update(logits.to(dtype).softmax(1), target)  # the K = 38 roundings of a half-precision softmax included
    assert m.compute()["n_pixels"] == 2 * 9 * 11


def test_a_top_probability_is_allowed_the_rounding_the_sum_check_allows():
    """A half-precision pixel (1.0, 0, ...) rounded up to 1 + 2^-10 passes the sum check, so its top-label
    probability must pass as well; 1.01 fails both."""
    probs = torch.zeros(1, 4, 1, 2, dtype=torch.float16)
    probs[0, 0] = 1 + 2 ** -10
    m = CalibrationMetrics(4)
    m.update(probs, torch.zeros(1, 1, 2, dtype=torch.long))
    assert m.compute()["n_pixels"] == 2
    probs[0, 0] = 1.01
    with pytest.raises(ShiftbenchError, match=r"^probs summed over the classes holds values in \[1.00977, 1.00977\]"):
        CalibrationMetrics(4).update(probs, torch.zeros(1, 1, 2, dtype=torch.long))


def test_labels_of_any_integer_dtype_give_the_int64_result():
    probs, target = _random(k=20)
    target[target == IGNORE] = 19
    ref = CalibrationMetrics(20)
    ref.update(probs, target)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        m = CalibrationMetrics(20)
        m.update(probs, target.to(dtype))
        assert m.compute()["ece"] == ref.compute()["ece"] and m.compute()["nll"] == ref.compute()["nll"]
