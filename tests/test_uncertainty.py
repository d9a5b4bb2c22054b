"""Estimators: brute force (scipy's entropy, loops over pixels), closed forms, numerics, registry."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from shiftbench.errors import ShiftbenchError
from shiftbench.uncertainty import (
    share_members,
    ESTIMATORS,
    Prediction,
    expert_variance,
    gate_entropy,
    mutual_information,
    mutual_information_stacked,
    mutual_information_weighted,
    one_minus_max_prob,
    predictive_entropy,
    predictive_entropy_stacked,
    predictive_entropy_weighted,
    softmax_entropy,
)

M, B, K, H, W = 3, 2, 5, 4, 6


def _probs(*shape, seed=0, scale=3.0, dtype=torch.float32):
    """Softmax of random logits along the class axis (dim -3), computed in ``dtype`` (sums to 1 in it)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).softmax(-3).to(dtype)


def _gate(b, e, seed=1, dtype=torch.float32):
    return torch.randn(b, e, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).softmax(1).to(dtype)


def _pixels(b, h, w):
    return [(i, y, x) for i in range(b) for y in range(h) for x in range(w)]


def _brute(fn, b=B, h=H, w=W):
    """Evaluate a per-pixel Python function into an [B,H,W] float64 array."""
    out = np.zeros((b, h, w))
    for i, y, x in _pixels(b, h, w):
        out[i, y, x] = fn(i, y, x)
    return out


def _close(got, want, tol=1e-5):
    assert got.shape == want.shape
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=tol)


# --------------------------------------------------------------------------- brute force on random inputs


def test_pe_and_mi_match_brute_force():
    mem = _probs(M, B, K, H, W, dtype=torch.float64)
    m = mem.numpy()
    pe = _brute(lambda i, y, x: entropy(m[:, i, :, y, x].mean(0)) / math.log(K))
    mi = _brute(lambda i, y, x: (entropy(m[:, i, :, y, x].mean(0))
                                 - np.mean([entropy(m[j, i, :, y, x]) for j in range(M)])) / math.log(K))
    _close(predictive_entropy(mem), pe, 1e-12)
    _close(mutual_information(mem), np.clip(mi, 0, 1), 1e-12)
    assert mi.min() > 0  # random members disagree


def test_stacked_variants_append_the_moe_output_as_a_member():
    mem, out = _probs(M, B, K, H, W), _probs(B, K, H, W, seed=5)
    stacked = torch.cat([mem, out[None]])
    _close(predictive_entropy_stacked(out, mem), predictive_entropy(stacked).double().numpy(), 1e-6)
    _close(mutual_information_stacked(out, mem), mutual_information(stacked).double().numpy(), 1e-6)


def test_weighted_variants_use_the_moe_output_and_gate_weights():
    mem, gate = _probs(M, B, K, H, W, dtype=torch.float64), _gate(B, M, dtype=torch.float64)
    out = (gate.t()[:, :, None, None, None] * mem).sum(0)  # a probability-combining MoE
    m, g, o = mem.numpy(), gate.numpy(), out.numpy()
    pe = _brute(lambda i, y, x: entropy(o[i, :, y, x]) / math.log(K))
    mi = _brute(lambda i, y, x: (entropy(o[i, :, y, x])
                                 - sum(g[i, j] * entropy(m[j, i, :, y, x]) for j in range(M))) / math.log(K))
    _close(predictive_entropy_weighted(out, mem, gate), pe, 1e-12)
    _close(mutual_information_weighted(out, mem, gate), mi, 1e-12)
    assert mi.min() >= 0  # concavity: never negative for a mixture of probabilities


def test_expert_variance_matches_brute_force_at_the_predicted_class():
    mem, out = _probs(M, B, K, H, W, dtype=torch.float64), _probs(B, K, H, W, seed=7, dtype=torch.float64)
    m, o = mem.numpy(), out.numpy()

    def ev(i, y, x):
        c = int(np.argmax(o[i, :, y, x]))
        return np.mean([(m[j, i, c, y, x] - o[i, c, y, x]) ** 2 for j in range(M)])

    _close(expert_variance(out, mem), _brute(ev), 1e-12)


def test_gate_entropy_simple_and_classwise():
    probs = _probs(B, K, H, W)
    simple = _gate(B, M)
    want = np.array([entropy(simple[i].numpy()) / math.log(M) for i in range(B)])
    _close(gate_entropy(probs, simple), np.broadcast_to(want[:, None, None], (B, H, W)), 1e-6)

    classwise = torch.randn(B, M, K, generator=torch.Generator().manual_seed(3)).softmax(1)
    p, g = probs.numpy(), classwise.numpy()
    brute = _brute(lambda i, y, x: entropy(g[i, :, int(np.argmax(p[i, :, y, x]))]) / math.log(M))
    _close(gate_entropy(probs, classwise), brute, 1e-6)


def test_single_model_estimators():
    probs = _probs(B, K, H, W)
    p = probs.double().numpy()
    _close(softmax_entropy(probs), _brute(lambda i, y, x: entropy(p[i, :, y, x]) / math.log(K)), 1e-6)
    _close(one_minus_max_prob(probs), _brute(lambda i, y, x: 1 - p[i, :, y, x].max()), 1e-7)


# --------------------------------------------------------------------------- closed forms and bounds


def test_identical_members_give_zero_mi_and_ev():
    one = _probs(1, B, K, H, W)
    same = one.expand(M, -1, -1, -1, -1)
    gate = _gate(B, M)
    for mi in (mutual_information(same), mutual_information_stacked(one[0], same),
               mutual_information_weighted(one[0], same, gate)):
        # rounding leaves -1e-8 here and there: clamped, since the metrics refuse uncertainty outside [0, 1]
        assert mi.max() < 1e-6 and mi.min() >= 0
    assert expert_variance(one[0], same).abs().max() == 0
    _close(predictive_entropy(same), softmax_entropy(one[0]).double().numpy(), 1e-6)


def test_one_hot_disagreeing_members_are_maximal():
    eye = torch.eye(K)[:, None, :, None, None].expand(K, B, K, H, W)  # member k is sure of class k
    assert torch.allclose(predictive_entropy(eye), torch.ones(B, H, W))
    assert torch.allclose(mutual_information(eye), torch.ones(B, H, W))
    uniform = eye.mean(0)  # the ensemble mean: uniform over K classes
    # stacking the (uniform) output in as member K+1 lowers MI to 1 - 1/(K+1): the paper's caveat
    assert torch.allclose(mutual_information_stacked(uniform, eye), torch.full((B, H, W), K / (K + 1)))
    assert torch.allclose(predictive_entropy_stacked(uniform, eye), torch.ones(B, H, W))
    assert torch.allclose(one_minus_max_prob(uniform), torch.full((B, H, W), 1 - 1 / K))


def test_expert_variance_bounds():
    two = torch.eye(2)[:, None, :, None, None].expand(2, B, 2, H, W)  # expert 0 says class 0, expert 1 class 1
    # the MoE is sure of a class neither expert gives any probability: the sup, 1
    none = torch.zeros(2, B, 3, H, W)
    none[:, :, 1] = 1
    sure_of_0 = torch.zeros(B, 3, H, W)
    sure_of_0[:, 0] = 1
    assert torch.equal(expert_variance(sure_of_0, none), torch.ones(B, H, W))
    # a probability mixture with the gate on expert 0: (N-1)/N = 1/2
    assert torch.equal(expert_variance(two[0], two), torch.full((B, H, W), 0.5))
    # the equal-weight mean of two disagreeing experts: 1/4
    assert torch.equal(expert_variance(two.mean(0), two), torch.full((B, H, W), 0.25))


def test_weighted_variants_mix_the_experts_not_the_output_of_a_logit_or_conv_moe():
    # The paper: "only expert outputs are taken, multiplied by the gate weights". An MoE that mixes
    # logits or ends in a conv outputs something else; its output must not enter PE/MI (weighted).
    mem, gate = _probs(M, B, K, H, W, dtype=torch.float64), _gate(B, M, dtype=torch.float64)
    out = _probs(B, K, H, W, seed=9, dtype=torch.float64)  # unrelated to the mixture
    m, g = mem.numpy(), gate.numpy()
    mix = lambda i, y, x: sum(g[i, j] * m[j, i, :, y, x] for j in range(M))
    pe = _brute(lambda i, y, x: entropy(mix(i, y, x)) / math.log(K))
    mi = _brute(lambda i, y, x: (entropy(mix(i, y, x))
                                 - sum(g[i, j] * entropy(m[j, i, :, y, x]) for j in range(M))) / math.log(K))
    _close(predictive_entropy_weighted(out, mem, gate), pe, 1e-12)
    _close(mutual_information_weighted(out, mem, gate), mi, 1e-12)
    assert mi.min() >= 0 and np.abs(pe - softmax_entropy(out).numpy()).max() > 0.05
    # two maximally uncertain experts and a sure output: the mixture is uniform, the experts agree
    flat = torch.full((2, 1, 4, 1, 1), 0.25)
    sure = torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1, 1)
    half = torch.tensor([[0.5, 0.5]])
    assert predictive_entropy_weighted(sure, flat, half).item() == pytest.approx(1.0, abs=1e-6)
    assert mutual_information_weighted(sure, flat, half).item() == pytest.approx(0.0, abs=1e-6)


def test_gate_entropy_extremes():
    probs = _probs(1, K, 2, 2)
    assert torch.equal(gate_entropy(probs, torch.tensor([[1.0, 0.0, 0.0]])), torch.zeros(1, 2, 2))
    assert torch.allclose(gate_entropy(probs, torch.full((1, 3), 1 / 3)), torch.ones(1, 2, 2))


def test_one_hot_inputs_give_no_nan_and_half_inputs_compute_in_float32():
    hot = torch.nn.functional.one_hot(torch.randint(0, K, (M, B, H, W)), K).permute(0, 1, 4, 2, 3).float()
    gate = _gate(B, M)
    pred = Prediction(probs=hot[0], members=hot, gate=gate)
    for name, est in ESTIMATORS.items():
        u = est(pred)
        assert u.shape == (B, H, W) and u.dtype == torch.float32, name
        assert torch.isfinite(u).all() and u.min() >= 0 and u.max() <= 1, name
    half = _probs(M, B, K, H, W).half()
    u = mutual_information(half)
    assert u.dtype == torch.float32
    _close(u, mutual_information(half.double()).numpy(), 1e-6)


def test_row_chunks_give_bitwise_the_same_maps(monkeypatch):
    """Entropies are computed row chunk by row chunk on the CPU; chunk size must not change a bit."""
    import shiftbench.chunks as chunks

    mem = _probs(M, B, K, 7, W, seed=5)
    out = _probs(B, K, 7, W, seed=6)
    gate = _gate(B, M)

    def maps():
        pred = Prediction(probs=out, members=mem, gate=gate)
        return {name: est(pred) for name, est in ESTIMATORS.items()}

    whole = maps()
    monkeypatch.setitem(chunks.CHUNK_PIXELS, "cpu", B * W * K * 2)  # 2 rows per chunk, the last one 1
    for name, u in maps().items():
        assert torch.equal(u, whole[name]), name


def test_nan_probabilities_stay_nan_and_do_not_spread():
    probs = _probs(B, K, H, W)
    probs[1, :, 2, 3] = float("nan")
    u = softmax_entropy(probs)
    assert torch.isnan(u[1, 2, 3])
    u[1, 2, 3] = 0
    assert torch.isfinite(u).all()


# --------------------------------------------------------------------------- registry and errors


def test_registry_names_labels_and_requirements():
    assert list(ESTIMATORS) == [
        "predictive_entropy", "mutual_information", "predictive_entropy_stacked", "predictive_entropy_weighted",
        "mutual_information_stacked", "mutual_information_weighted", "expert_variance", "gate_entropy",
        "softmax_entropy", "one_minus_max_prob"]
    assert ESTIMATORS["expert_variance"].label == "EV" and ESTIMATORS["gate_entropy"].label == "GE"
    assert ESTIMATORS["mutual_information_stacked"].label == "MI (stacked)"
    assert len({e.label for e in ESTIMATORS.values()}) == len(ESTIMATORS)
    weighted = ESTIMATORS["predictive_entropy_weighted"]
    assert weighted.needs_members and weighted.needs_gate and weighted.simple_gate_only
    assert not ESTIMATORS["softmax_entropy"].needs_members
    assert ESTIMATORS["gate_entropy"].needs_gate and not ESTIMATORS["gate_entropy"].simple_gate_only


def test_registry_refuses_misfits_with_one_line():
    probs, mem = _probs(B, K, H, W), _probs(M, B, K, H, W)
    with pytest.raises(ShiftbenchError, match=r"^estimator 'gate_entropy' needs an MoE gate; the prediction has none$"):
        ESTIMATORS["gate_entropy"](Prediction(probs, mem))
    with pytest.raises(ShiftbenchError, match="'mutual_information' needs several members"):
        ESTIMATORS["mutual_information"](Prediction(probs))
    classwise = torch.full((B, M, K), 1 / M)
    with pytest.raises(ShiftbenchError, match="needs a simple gate .* got a classwise gate"):
        ESTIMATORS["mutual_information_weighted"](Prediction(probs, mem, classwise))
    with pytest.raises(ShiftbenchError, match="classwise"):
        predictive_entropy_weighted(probs, mem, classwise)  # the plain function refuses too
    assert ESTIMATORS["gate_entropy"](Prediction(probs, mem, classwise)).shape == (B, H, W)


@pytest.mark.parametrize("call, match", [
    (lambda: predictive_entropy(torch.rand(B, K, H, W)), r"members must be a float tensor \[M,B,K,H,W\]"),
    (lambda: softmax_entropy(torch.rand(B, H, W)), r"probs must be a float tensor \[B,K,H,W\]"),
    (lambda: softmax_entropy(torch.ones(B, 1, H, W)), "at least 2 classes"),
    (lambda: expert_variance(torch.rand(B, K, H, W), torch.rand(M, B, K + 1, H, W)), "do not match probs"),
    (lambda: mutual_information_weighted(torch.rand(B, K, H, W), torch.rand(M, B, K, H, W), torch.rand(B, M + 1)),
     r"gate must be \[B,E\]"),
    (lambda: gate_entropy(torch.rand(B, K, H, W), torch.ones(B, 1)), "at least 2 experts"),
])
def test_bad_inputs_are_one_line_errors(call, match):
    with pytest.raises(ShiftbenchError, match=match) as exc:
        call()
    assert "\n" not in str(exc.value)


def test_suite_validator_uses_the_registry():
    from shiftbench.suite import ModelSpec, _estimator_misfit

    ens = ModelSpec(name="ensemble", kind="ensemble", estimators=())
    assert "needs an MoE gate" in _estimator_misfit(ESTIMATORS["gate_entropy"], ens)
    assert _estimator_misfit(ESTIMATORS["mutual_information"], ens) is None
    classwise = ModelSpec(name="moe", kind="moe", estimators=(), gate="classwise")
    assert "simple gate" in _estimator_misfit(ESTIMATORS["mutual_information_weighted"], classwise)
    assert _estimator_misfit(ESTIMATORS["expert_variance"], classwise) is None


@pytest.mark.parametrize("order", [("ensemble", "moe"), ("moe", "ensemble")])
def test_predictions_sharing_members_compute_their_entropies_once(monkeypatch, order):
    """Whichever comes first owns the shared terms; the other's PE and MI (H of the members' mean) must not
    take the owner's H(output), which for an MoE is another distribution."""
    import shiftbench.uncertainty as unc

    members = _probs(M, B, K, H, W, seed=7)
    gate = _gate(B, M, seed=8)
    moe_probs = (gate.t()[:, :, None, None, None] * members).sum(0)

    def preds():
        made = {"ensemble": Prediction(members.mean(0), members), "moe": Prediction(moe_probs, members, gate)}
        return {n: made[n] for n in order}

    plan = {"ensemble": ["predictive_entropy", "mutual_information"],
            "moe": ["predictive_entropy", "mutual_information", "mutual_information_stacked",
                    "mutual_information_weighted", "predictive_entropy_stacked"]}
    alone = {n: {e: ESTIMATORS[e](p) for e in plan[n]} for n, p in preds().items()}
    calls = []
    entropy_fn = unc._mixture_entropy  # every per-pixel entropy of [B,K,H,W] distributions goes through it
    monkeypatch.setattr(unc, "_mixture_entropy",
                        lambda parts, *w: calls.append(len(parts)) or entropy_fn(parts, *w))
    shared = preds()
    share_members(shared.values())
    together = {n: {e: ESTIMATORS[e](p) for e in plan[n]} for n, p in shared.items()}
    for n in plan:
        for e in plan[n]:
            assert torch.equal(together[n][e], alone[n][e]), (n, e)
    # M member entropies once, H(moe output), H(mean), H(gate-weighted mixture), H(stacked mean)
    assert sorted(calls) == [1] * (M + 1) + [M, M, M + 1]
    # sharing again, in the other order, must not make the two each other's peer (a recursion)
    again = preds()
    share_members(again.values())
    share_members(reversed(list(again.values())))
    for n in plan:
        for e in plan[n]:
            assert torch.equal(ESTIMATORS[e](again[n]), alone[n][e]), (n, e)


def test_entropy_fast_path_handles_zeros_and_nan():
    from shiftbench.uncertainty import _entropy

    p = _probs(B, K, H, W, seed=9)
    p[0, :, 0, 0] = torch.tensor([1.0, 0, 0, 0, 0])  # one-hot: exactly 0
    p[1, :, 1, 1] = torch.tensor([0.5, 0.5, 0, 0, 0])  # zeros in a mixed pixel: exactly log 2
    p[1, 0, 2, 2] = float("nan")
    h = _entropy(p, 1)
    assert h[0, 0, 0] == 0 and h[1, 1, 1] == torch.special.entr(p[1, :, 1, 1]).sum()
    assert torch.isnan(h[1, 2, 2])
    ok = ~torch.isnan(h)
    torch.testing.assert_close(h[ok], torch.special.entr(p).sum(1)[ok], rtol=1e-6, atol=1e-6)
