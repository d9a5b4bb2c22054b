"""ConditionalMetrics against a brute force (loops over patches and thresholds) and the paper's 4x4 example."""

import math

import numpy as np
import pytest
import torch

from shiftbench.errors import ShiftbenchError
from shiftbench.metrics import ConditionalMetrics
from shiftbench.metrics import base as metrics_base

IGNORE = 255
CURVES = ("p_accurate_certain", "p_uncertain_inaccurate", "pavpu")
COUNTS = ("n_ac", "n_au", "n_ic", "n_iu")


def brute_conditional(pred, target, unc, thresholds, patch=4, acc_threshold=0.5):
    """Counts per threshold by looping over patches; partial border patches are kept, empty ones dropped."""
    p, t, u = pred.numpy(), target.numpy(), unc.numpy()
    patches = []  # (accurate, float32 mean uncertainty)
    for i in range(t.shape[0]):
        for y0 in range(0, t.shape[1], patch):
            for x0 in range(0, t.shape[2], patch):
                pix = [(y, x) for y in range(y0, min(y0 + patch, t.shape[1]))
                       for x in range(x0, min(x0 + patch, t.shape[2])) if t[i, y, x] != IGNORE]
                if not pix:
                    continue
                n_correct = sum(int(p[i, y, x] == t[i, y, x]) for y, x in pix)
                mean = np.float32(sum(float(u[i, y, x]) for y, x in pix) / len(pix))
                patches.append((n_correct / len(pix) > acc_threshold, mean))
    counts = {k: [] for k in COUNTS}
    for thr in thresholds:
        t32 = np.float32(thr)
        cert = [(acc, m <= t32) for acc, m in patches]
        counts["n_ac"].append(sum(a and c for a, c in cert))
        counts["n_au"].append(sum(a and not c for a, c in cert))
        counts["n_ic"].append(sum(not a and c for a, c in cert))
        counts["n_iu"].append(sum(not a and not c for a, c in cert))
    return {k: np.array(v) for k, v in counts.items()}, len(patches)


def _ratio(num, den):
    return np.array([a / b if b else math.nan for a, b in zip(num, den)])


def _check(result, brute):
    counts, n_patches = brute
    for key in COUNTS:
        np.testing.assert_array_equal(result[key].numpy(), counts[key], err_msg=key)
    ac, au, ic, iu = (counts[k] for k in COUNTS)
    want = {
        "p_accurate_certain": _ratio(ac, ac + ic),
        "p_uncertain_inaccurate": _ratio(iu, ic + iu),
        "pavpu": _ratio(ac + iu, np.full(len(ac), n_patches)),
    }
    thresholds = result["thresholds"].numpy()
    for name, curve in want.items():
        np.testing.assert_allclose(result[name].numpy(), curve, rtol=1e-15, equal_nan=True, err_msg=name)
        if np.isnan(curve).all():
            assert math.isnan(result[f"peak_{name}"]) and math.isnan(result[f"peak_{name}_threshold"])
        else:
            i = int(np.nanargmax(curve))
            assert result[f"peak_{name}"] == curve[i]
            assert result[f"peak_{name}_threshold"] == thresholds[i]
    au = np.trapezoid(want["pavpu"], thresholds) / (thresholds[-1] - thresholds[0]) if n_patches else math.nan
    assert result["au_pavpu"] == pytest.approx(au, rel=1e-12, nan_ok=True)
    assert result["n_patches"] == n_patches


def _random(b=2, h=9, w=10, k=3, seed=0, ignore=0.2):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, (b, h, w), generator=g)
    pred = torch.where(torch.rand(b, h, w, generator=g) < 0.6, target, torch.randint(0, k, (b, h, w), generator=g))
    target[torch.rand(b, h, w, generator=g) < ignore] = IGNORE
    return pred, target, torch.rand(b, h, w, generator=g)


def _run(pred, target, unc, **kw):
    m = ConditionalMetrics(**kw)
    m.update(pred, target, unc)
    return m.compute()


# --------------------------------------------------------------------------- the paper's illustration


def test_paper_4x4_example_exact_fractions():
    label = torch.tensor([[1, 2, 5, 7], [6, 4, 3, 3], [10, 9, 5, 0], [8, 6, 4, 4]])[None]
    pred = torch.tensor([[1, 2, 4, 7], [5, 6, 3, 3], [10, 9, 4, 0], [8, 7, 3, 4]])[None]
    unc = torch.tensor([[.1, .3, .6, .3], [.7, .6, .2, .1], [.2, .4, .5, .3], [.1, .7, .6, .2]])[None]
    result = _run(pred, label, unc, patch_size=2, accuracy_threshold=0.5)
    j = 40
    assert result["thresholds"][j].item() == pytest.approx(0.4, abs=1e-15)
    assert result["p_accurate_certain"][j].item() == 2 / 3
    assert result["p_uncertain_inaccurate"][j].item() == 1 / 2
    assert result["pavpu"][j].item() == 3 / 4
    assert [result[k][j].item() for k in COUNTS] == [2, 0, 1, 1]


# --------------------------------------------------------------------------- against the brute force


@pytest.mark.parametrize("patch", [1, 2, 4, 5, 12])  # 12: one patch larger than the 9x10 image
@pytest.mark.parametrize("acc_threshold", [0.5, 0.3])
@pytest.mark.parametrize("thresholds", [21, 2])
def test_random_inputs_match_brute_force(patch, acc_threshold, thresholds):
    pred, target, unc = _random(seed=patch)
    result = _run(pred, target, unc, patch_size=patch, accuracy_threshold=acc_threshold, thresholds=thresholds)
    assert len(result["thresholds"]) == thresholds
    _check(result, brute_conditional(pred, target, unc, result["thresholds"].numpy(), patch, acc_threshold))


def test_uncertainties_exactly_on_the_grid_zero_and_one():
    pred, target, _ = _random(b=1, h=6, w=101, seed=3, ignore=0.0)
    grid = torch.linspace(0, 1, 101, dtype=torch.float64).float()
    unc = torch.stack([grid, torch.nextafter(grid, torch.tensor(2.0)).clamp(0, 1),
                       torch.nextafter(grid, torch.tensor(-1.0)).clamp(0, 1), torch.zeros(101), torch.ones(101),
                       grid.flip(0)]).view(1, 6, 101)
    for patch in (1, 2):
        result = _run(pred, target, unc, patch_size=patch)
        _check(result, brute_conditional(pred, target, unc, result["thresholds"].numpy(), patch))


def test_a_narrower_grid_keeps_the_patches_outside_it():
    """The authors' grid 0.01, 0.03, ..., 0.99: patches below its first threshold are certain at every
    threshold, patches above its last uncertain at every one (they still count in N, n_au and n_iu), and
    AU-PAvPU is the trapezoid divided by the range, the mean PAvPU over it."""
    pred, target, _ = _random(b=2, h=8, w=12, seed=11, ignore=0.1)
    g = torch.Generator().manual_seed(12)
    unc = torch.rand(2, 8, 12, generator=g)
    unc[0, :4] = 0.995 + 0.005 * torch.rand(4, 12, generator=g)  # whole 4x4 patches above 0.99
    unc[1, :4] = 0.005 * torch.rand(4, 12, generator=g)  # and below 0.01
    for patch in (1, 4):
        result = _run(pred, target, unc, patch_size=patch, thresholds=50, threshold_range=(0.01, 0.99))
        np.testing.assert_allclose(result["thresholds"].numpy(), 0.01 + 0.02 * np.arange(50), rtol=0, atol=1e-15)
        brute = brute_conditional(pred, target, unc, result["thresholds"].numpy(), patch)
        assert brute[0]["n_au"][-1] + brute[0]["n_iu"][-1] > 0 and brute[0]["n_ac"][0] + brute[0]["n_ic"][0] > 0
        _check(result, brute)
    pavpu = result["pavpu"].numpy()  # 49 equal steps: the trapezoid's mean height
    assert result["au_pavpu"] == pytest.approx((pavpu[1:-1].sum() + (pavpu[0] + pavpu[-1]) / 2) / 49, rel=1e-12)


def test_sizes_not_divisible_keep_partial_patches(monkeypatch):
    pred, target, unc = _random(b=2, h=11, w=7, seed=4)
    result = _run(pred, target, unc, patch_size=4)
    assert result["n_patches"] <= 2 * 3 * 2
    _check(result, brute_conditional(pred, target, unc, result["thresholds"].numpy(), 4))
    monkeypatch.setitem(metrics_base.CHUNK_PIXELS, "cpu", 2 * 7 * 5)  # 5 rows -> chunks of 4 rows
    chunked = _run(pred, target, unc, patch_size=4)
    for key in COUNTS:
        assert torch.equal(chunked[key], result[key])


def test_single_class_and_all_accurate():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    unc = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(5))
    result = _run(target.clone(), target, unc, thresholds=11)
    _check(result, brute_conditional(target, target, unc, result["thresholds"].numpy()))
    assert np.isnan(result["p_uncertain_inaccurate"].numpy()).all()  # no inaccurate patch: undefined, not 0
    assert math.isnan(result["peak_p_uncertain_inaccurate"])
    assert result["p_accurate_certain"][-1] == 1 and result["pavpu"][-1] == 1


def test_all_pixels_ignored_gives_nan():
    pred, target, unc = _random(seed=6)
    target[:] = IGNORE
    result = _run(pred, target, unc)
    _check(result, brute_conditional(pred, target, unc, result["thresholds"].numpy()))
    assert all(np.isnan(result[c].numpy()).all() for c in CURVES)
    assert math.isnan(result["au_pavpu"]) and math.isnan(result["mean_uncertainty"]) and result["n_patches"] == 0


def test_mean_uncertainty_over_valid_pixels():
    pred, target, unc = _random(seed=7)
    valid = target != IGNORE
    assert _run(pred, target, unc)["mean_uncertainty"] == pytest.approx(unc[valid].double().mean().item(), rel=1e-12)


# --------------------------------------------------------------------------- merge, persistence, errors


def test_merge_and_state_dict_round_trip(tmp_path):
    (p1, t1, u1), (p2, t2, u2) = _random(seed=8), _random(seed=9)
    a, b, both = ConditionalMetrics(), ConditionalMetrics(), ConditionalMetrics()
    a.update(p1, t1, u1)
    b.update(p2, t2, u2)
    both.update(p1, t1, u1)
    both.update(p2, t2, u2)
    merged = a.merge(b)
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in both.state_dict().items())
    torch.save(merged.state_dict(), tmp_path / "c.pt")
    loaded = ConditionalMetrics().load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    assert torch.equal(loaded.compute()["n_ac"], both.compute()["n_ac"])
    with pytest.raises(ShiftbenchError, match="same settings"):
        a.merge(ConditionalMetrics(patch_size=2))
    with pytest.raises(ShiftbenchError, match=r"threshold_range=\(0.01, 0.99\).*same settings"):
        a.merge(ConditionalMetrics(threshold_range=(0.01, 0.99)))


@pytest.mark.parametrize("kw, match", [
    (dict(patch_size=0), "patch_size must be a positive integer"),
    (dict(accuracy_threshold=1.0), r"accuracy_threshold must be a number in \[0, 1\)"),
    (dict(accuracy_threshold=None), r"accuracy_threshold must be a number in \[0, 1\); got None"),
    (dict(patch_size=True), "patch_size must be a positive integer; got True"),
    (dict(ignore_index="255"), r"ignore_index must be an integer \(the label of ignored pixels, e.g. 255\); got '255'"),
    (dict(thresholds=1), "thresholds must be an integer >= 2"),
    (dict(threshold_range=(0.5, 0.2)), r"threshold_range must be two numbers lo < hi in \[0, 1\].*got \(0.5, 0.2\)"),
    (dict(threshold_range=(0.0, 1.5)), "threshold_range must be two numbers"),
    (dict(threshold_range=0.5), "threshold_range must be two numbers"),
    (dict(threshold_range=(0, 1, 2)), "threshold_range must be two numbers"),
    (dict(threshold_range=(False, True)), "threshold_range must be two numbers"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ShiftbenchError, match=match):
        ConditionalMetrics(**kw)


def test_bad_inputs_are_refused_and_leave_the_state_unchanged():
    pred, target, unc = _random(seed=10)
    m = ConditionalMetrics()
    target[0, 0, 0], bad = 0, unc.clone()
    bad[0, 0, 0] = -0.5
    with pytest.raises(ShiftbenchError, match=r"^uncertainty holds values in \[-0.5, 0.99\d*\]; expected normalised"):
        m.update(pred, target, bad)
    with pytest.raises(ShiftbenchError, match=r"uncertainty must be a float tensor \[2, 9, 10\]"):
        m.update(pred, target, unc[:, :5])
    with pytest.raises(ShiftbenchError, match="pred has shape"):
        m.update(pred[:1], target, unc)
    assert m.hist.sum() == 0 and m.n_pixels == 0
    nan_on_ignored = unc.masked_fill(target == IGNORE, float("nan"))
    m.update(pred, target, nan_on_ignored)  # ignored pixels are not looked at
    assert m.n_pixels == int((target != IGNORE).sum())
