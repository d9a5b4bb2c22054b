"""Uncertainty estimators: pure functions on probability tensors.

Every estimator returns a per-pixel map ``[B,H,W]`` in [0,1], normalised by a fixed,
data-independent bound (log K, log E, ...), never by a statistic of the data.

Shapes: ``probs`` [B,K,H,W] (the evaluated predictive distribution), ``members``
[M,B,K,H,W] (MC passes, ensemble members, MoE experts), ``gate`` [B,E] (simple gate) or
[B,E,K] (classwise gate), E = M. Entropies use ``0 log 0 = 0``, so one-hot inputs give exact
zeros, never NaN. Half-precision inputs are computed in float32; float64 inputs stay float64.

:data:`ESTIMATORS` maps each estimator's name to an :class:`Estimator`: a function
``(Prediction) -> Tensor [B,H,W]``, what it needs from the model (members, a gate, a
simple gate) and a short label for tables and plots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from shiftbench.chunks import row_chunks
from shiftbench.errors import ShiftbenchError

#: sup of (1/N) sum_i (P_i(c) - P(c))^2 over all admissible inputs (P, P_i distributions, c = argmax P):
#: each term is at most max(P(c), 1 - P(c))^2 <= 1, and P one-hot at c with every P_i(c) = 0 reaches 1.
EV_BOUND = 1.0


@dataclass
class Prediction:
    """What one model variant predicts for a batch; the input of every estimator.

    probs:   [B,K,H,W] the model's predictive distribution, the one that is evaluated
             (MC-dropout mean, ensemble mean, MoE output, a single model's softmax).
    members: [M,B,K,H,W] the member distributions it was built from (MC passes,
             ensemble members, MoE experts), or None for a single deterministic model.
    gate:    MoE gate weights, [B,E] (simple gate) or [B,E,K] (classwise gate); else None.
    """

    probs: Tensor
    members: Tensor | None = None
    gate: Tensor | None = None

    @cached_property
    def terms(self) -> Terms:
        """The shared intermediate quantities of this prediction (computed on first use, then kept)."""
        return Terms(self.probs, self.members, self.gate)


# --------------------------------------------------------------------------- helpers


def _dtype(x: Tensor) -> torch.dtype:
    """The working precision: float64 for float64 inputs, else float32 (half floats are too coarse)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _working(x: Tensor) -> Tensor:
    return x.to(_dtype(x))


def _ordered_sum(xs: Sequence[Tensor]) -> Tensor:
    """xs[0] + xs[1] + ... in that order (a new tensor). A ``torch.sum`` over a stacked dimension may
    reorder the additions depending on the tensor's shape, i.e. on the batch size; this never does."""
    out = xs[0].clone()
    for x in xs[1:]:
        out.add_(x)
    return out


def _entropy(p: Tensor, dim: int) -> Tensor:
    """Shannon entropy -sum p log p along ``dim`` (nats), with 0 log 0 = 0, summed in class order.

    Computed as sum p log max(p, tiny) (tiny = the smallest normal float): a zero probability adds
    an exact 0 (one-hot inputs give exact zeros), a NaN stays NaN, and no second pass is needed.
    """
    p = _working(p)
    return _ordered_sum(p.clamp(min=torch.finfo(p.dtype).tiny).log_().mul_(p).unbind(dim)).neg_()


def _mixture_entropy(parts: Sequence[Tensor], weights: Tensor | None = None) -> Tensor:
    """H((1/n) sum_i parts_i) per pixel for n distributions [B,K,H,W] -> [B,H,W] (n = 1: H(parts_0));
    with ``weights`` [n,B] (one weight per part and sample, e.g. a simple gate): H(sum_i w_i parts_i).

    One class plane of one row chunk at a time (:func:`shiftbench.chunks.row_chunks`): the mixture and
    its log are small temporaries instead of [B,K,H,W] tensors (2-3x faster on the CPU), and every
    pixel adds its K terms in class order whatever the batch or chunk shape. The mixture sums the
    parts in their order and divides by n, as ``stack(parts).mean(0)`` does.
    """
    first, n = parts[0], len(parts)
    b, k, h, w = first.shape
    dtype = _dtype(first)
    tiny = torch.finfo(dtype).tiny
    out = torch.zeros(b, h, w, dtype=dtype, device=first.device)
    if weights is not None:
        weights = weights.to(dtype)[:, :, None, None]  # [n,B,1,1]
    for rows in row_chunks((b, h, w), first.device):
        acc = out[:, rows]
        for c in range(k):
            if weights is not None:
                q = torch.mul(first[:, c, rows], weights[0])  # a new tensor: the parts are never written
                for part, wi in zip(parts[1:], weights[1:]):
                    q.addcmul_(part[:, c, rows], wi)
                acc.addcmul_(q, q.clamp(min=tiny).log_())
                continue
            q = first[:, c, rows].to(dtype)
            if n > 1:
                q = torch.add(q, parts[1][:, c, rows])  # a new tensor: the parts are never written
                for part in parts[2:]:
                    q.add_(part[:, c, rows])
                q.div_(n)
            acc.addcmul_(q, q.clamp(min=tiny).log_())
    return out.neg_()


def _log_k(probs: Tensor) -> float:
    k = probs.shape[1]
    if k < 2:
        raise ShiftbenchError(f"probabilities have {k} class; entropies need at least 2 classes (normalised by log K)")
    return math.log(k)


def _check_probs(probs: Tensor) -> None:
    if probs.dim() != 4 or not probs.is_floating_point():
        raise ShiftbenchError(f"probs must be a float tensor [B,K,H,W]; got {probs.dtype} {list(probs.shape)}")


def _check_members(members: Tensor, probs: Tensor | None = None) -> None:
    if members.dim() != 5 or not members.is_floating_point() or members.shape[0] < 1:
        raise ShiftbenchError(f"members must be a float tensor [M,B,K,H,W] with M >= 1; "
                              f"got {members.dtype} {list(members.shape)}")
    if probs is not None and members.shape[1:] != probs.shape:
        raise ShiftbenchError(f"members {list(members.shape)} do not match probs {list(probs.shape)} "
                              "(expected [M, *probs.shape])")


def _unit(x: Tensor) -> Tensor:
    """Clamp float rounding (e.g. MI = -1e-8) into [0,1]."""
    return x.clamp_(0.0, 1.0)


class Terms:
    """The intermediate quantities the estimators share, each computed at most once per prediction.

    The runner evaluates up to six estimators on one MoE output; PE and MI (stacked) need the same
    entropies, EV and the classwise gate entropy the same argmax. ``Prediction.terms`` holds one.
    Shapes as in :class:`Prediction`; every map is [B,H,W] (member entropies [M,B,H,W]), in nats.
    """

    def __init__(self, probs: Tensor | None = None, members: Tensor | None = None, gate: Tensor | None = None):
        if probs is not None:
            _check_probs(probs)
        if members is not None:
            _check_members(members, probs)
        self.probs, self.members, self.gate = probs, members, gate
        self.peer: Terms | None = None  # holds the same members tensor: its member-only terms are ours

    @cached_property
    def entropy(self) -> Tensor:
        """H(P)."""
        return _mixture_entropy([self.probs])

    @cached_property
    def top(self) -> tuple[Tensor, Tensor]:
        """(max_k P(k), first maximal class); ``max(dim)`` is much faster than ``argmax`` on CPU."""
        top, c = self.probs.max(1)
        return _working(top), c

    @cached_property
    def member_entropies(self) -> Tensor:
        """H(P_i) for every member, [M,B,H,W], one member and row chunk at a time."""
        if self.peer is not None:
            return self.peer.member_entropies
        return torch.stack([_mixture_entropy([m]) for m in self.members])

    @cached_property
    def mean_entropy(self) -> Tensor:
        """H(P̄), P̄ = (1/M) sum_i P_i."""
        if self.peer is not None:
            return self.peer.mean_entropy
        return _mixture_entropy(list(self.members))

    @cached_property
    def weighted_entropy(self) -> Tensor:
        """H(sum_i w_i P_i), w the simple gate: the gate-weighted mixture of the experts (equal to the MoE
        output only for an MoE that mixes probabilities without a final conv, the paper's Eq. 1)."""
        w = _simple_gate(self.gate, self.members, "the weighted mixture")  # [E,B]
        return _mixture_entropy(list(self.members), w)

    @cached_property
    def stacked_entropy(self) -> Tensor:
        """H(P̄'), P̄' = (sum_i P_i + P) / (M+1): the output appended as member M+1."""
        return _mixture_entropy([*self.members, self.probs])

    @property
    def log_k(self) -> float:
        return _log_k(self.members[0] if self.probs is None else self.probs)


def share_members(preds: Iterable[Prediction]) -> None:
    """Let predictions that hold the very same members tensor (an ensemble and the MoEs built on the
    same experts) compute its member entropies once: each later one takes the first one's terms.
    Peers always point at terms without a peer, so calling it again, in any order, makes no cycle."""
    owners: dict[int, Terms] = {}
    for pred in preds:
        if pred.members is not None:
            root = pred.terms
            while root.peer is not None:
                root = root.peer
            owner = owners.setdefault(id(pred.members), root)  # ids are unique while both live
            if owner is not root:
                pred.terms.peer = owner


def _simple_gate(gate: Tensor | None, members: Tensor, who: str) -> Tensor:
    """The gate as [E,B] weights; refuses a missing or classwise gate with one line."""
    if gate is None:
        raise ShiftbenchError(f"{who} needs an MoE gate; the prediction has none")
    if gate.dim() == 3:
        raise ShiftbenchError(f"{who} needs a simple gate [B,E] (one weight per expert); "
                              f"got a classwise gate {list(gate.shape)}")
    m, b = members.shape[:2]
    if gate.dim() != 2 or tuple(gate.shape) != (b, m):
        raise ShiftbenchError(f"{who}: gate must be [B,E] = [{b},{m}] (one weight per expert); got {list(gate.shape)}")
    return _working(gate).t()


# --------------------------------------------------------------------------- the formulas, on shared terms
# Each public estimator below is one of these on a fresh Terms; the registry passes Prediction.terms.


def _pe(t: Terms) -> Tensor:
    return _unit(t.mean_entropy / t.log_k)


def _mi(t: Terms) -> Tensor:
    member_mean = _ordered_sum(t.member_entropies).div_(t.members.shape[0])
    return _unit((t.mean_entropy - member_mean) / t.log_k)


def _pe_stacked(t: Terms) -> Tensor:
    return _unit(t.stacked_entropy / t.log_k)


def _mi_stacked(t: Terms) -> Tensor:
    mean_entropy = _ordered_sum([*t.member_entropies, t.entropy]).div_(t.members.shape[0] + 1)
    return _unit((t.stacked_entropy - mean_entropy) / t.log_k)


def _pe_weighted(t: Terms) -> Tensor:
    _simple_gate(t.gate, t.members, "predictive_entropy_weighted")
    return _unit(t.weighted_entropy / t.log_k)


def _mi_weighted(t: Terms) -> Tensor:
    w = _simple_gate(t.gate, t.members, "mutual_information_weighted")  # [E,B]
    member_mean = _ordered_sum(w[:, :, None, None] * t.member_entropies)
    return _unit((t.weighted_entropy - member_mean) / t.log_k)


def _ev(t: Terms) -> Tensor:
    top, c = t.top
    idx = c[None, :, None].expand(t.members.shape[0], -1, 1, -1, -1)
    at_c = t.members.gather(2, idx).squeeze(2).to(top.dtype)  # [N,B,H,W]
    return _unit(_ordered_sum((at_c - top).square_()).div_(at_c.shape[0] * EV_BOUND))


def _ge(t: Terms) -> Tensor:
    probs, gate = t.probs, t.gate
    if gate is None:
        raise ShiftbenchError("gate_entropy needs an MoE gate; the prediction has none")
    b, k, h, w = probs.shape
    if gate.dim() not in (2, 3) or gate.shape[0] != b or (gate.dim() == 3 and gate.shape[2] != k):
        raise ShiftbenchError(f"gate_entropy: gate must be [B,E] or [B,E,K] with B={b}, K={k}; got {list(gate.shape)}")
    e = gate.shape[1]
    if e < 2:
        raise ShiftbenchError(f"gate_entropy needs at least 2 experts (normalised by log E); the gate has {e}")
    ent = _entropy(gate, 1) / math.log(e)  # [B] or [B,K]
    if gate.dim() == 2:
        return _unit(ent[:, None, None].expand(b, h, w).clone())
    return _unit(ent.gather(1, t.top[1].view(b, -1)).view(b, h, w))


def _se(t: Terms) -> Tensor:
    return _unit(t.entropy / t.log_k)


def _msp(t: Terms) -> Tensor:
    return _unit(1.0 - t.top[0])


# --------------------------------------------------------------------------- ensembles / MC dropout


def predictive_entropy(members: Tensor) -> Tensor:
    """PE = H(P̄) / log K with P̄ = (1/M) sum_i P_i.  members [M,B,K,H,W] -> [B,H,W]."""
    return _pe(Terms(members=members))


def mutual_information(members: Tensor) -> Tensor:
    """MI = (H(P̄) - (1/M) sum_i H(P_i)) / log K.  members [M,B,K,H,W] -> [B,H,W].

    0 <= MI <= H(P̄) <= log K (Jensen); float rounding below 0 is clamped.
    """
    return _mi(Terms(members=members))


# --------------------------------------------------------------------------- MoE: stacked, weighted, EV, gate


def predictive_entropy_stacked(probs: Tensor, members: Tensor) -> Tensor:
    """PE with the MoE output appended as member M+1: H((sum_i P_i + P) / (M+1)) / log K.  -> [B,H,W]."""
    return _pe_stacked(Terms(probs, members))


def mutual_information_stacked(probs: Tensor, members: Tensor) -> Tensor:
    """MI over the M experts plus the MoE output: (H(P̄') - (sum_i H(P_i) + H(P)) / (M+1)) / log K.  -> [B,H,W]."""
    return _mi_stacked(Terms(probs, members))


def predictive_entropy_weighted(probs: Tensor, members: Tensor, gate: Tensor | None) -> Tensor:
    """PE of the gate-weighted mixture of the experts: H(sum_i w_i P_i) / log K, w [B,E] the simple gate.

    That mixture is the MoE output P itself for an MoE that mixes probabilities without a final conv
    (the paper's Eq. 1); for one that mixes logits or ends in a conv it is not, and the paper's
    definition ("only expert outputs are taken, multiplied by the gate weights") is what counts.
    """
    return _pe_weighted(Terms(probs, members, gate))


def mutual_information_weighted(probs: Tensor, members: Tensor, gate: Tensor | None) -> Tensor:
    """MI of the gate-weighted mixture: (H(sum_i w_i P_i) - sum_i w_i H(P_i)) / log K, w [B,E] the simple gate.

    >= 0 by concavity of H (float rounding clamped into [0,1]), whatever the MoE does after its gate.
    """
    return _mi_weighted(Terms(probs, members, gate))


def expert_variance(probs: Tensor, members: Tensor) -> Tensor:
    """EV = (1/N) sum_i (P_i(c) - P(c))^2 / EV_BOUND at c = argmax_k P(k).  -> [B,H,W].

    P the MoE output [B,K,H,W], P_i the N experts [N,B,K,H,W]. EV_BOUND = 1 is the sup over all
    admissible inputs (P one-hot at c, every P_i(c) = 0; reachable when the MoE combines logits
    or ends in a conv). For P = sum_i w_i P_i the sup is (N-1)/N, for an equal-weight mean 1/4.
    """
    return _ev(Terms(probs, members))


def gate_entropy(probs: Tensor, gate: Tensor | None) -> Tensor:
    """Routing uncertainty H(w) / log E.  -> [B,H,W].

    Simple gate w [B,E]: one value per image, broadcast over pixels. Classwise gate w [B,E,K]:
    the entropy of the expert weights of the class the MoE predicts at each pixel (argmax of P).
    """
    return _ge(Terms(probs, gate=gate))


# --------------------------------------------------------------------------- single deterministic model


def softmax_entropy(probs: Tensor) -> Tensor:
    """H(P) / log K of one model's softmax.  [B,K,H,W] -> [B,H,W]."""
    return _se(Terms(probs))


def one_minus_max_prob(probs: Tensor) -> Tensor:
    """1 - max_k P(k).  [B,K,H,W] -> [B,H,W].

    Kept unscaled (its sup is 1 - 1/K, within [0,1]) so that 1 - u is the top-label probability, the
    confidence of the probability mode (to 1 ulp: 1 - (1 - p) rounds p below 1/2).
    """
    return _msp(Terms(probs))


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Estimator:
    """An estimator as the suite and the runner see it: ``(Prediction) -> Tensor [B,H,W]``.

    needs_members: needs member distributions (MC passes, ensemble members or experts);
    needs_gate: needs an MoE gate; simple_gate_only: refuses a classwise gate.
    """

    name: str
    label: str
    fn: Callable[[Prediction], Tensor]
    needs_members: bool = False
    needs_gate: bool = False
    simple_gate_only: bool = False

    def misfit(self, pred: Prediction) -> str | None:
        """Why this estimator cannot run on ``pred`` (one phrase), or None."""
        if self.needs_members and pred.members is None:
            return "needs several members (MC passes, ensemble members or experts); the prediction has none"
        if self.needs_gate and pred.gate is None:
            return "needs an MoE gate; the prediction has none"
        if self.simple_gate_only and pred.gate is not None and pred.gate.dim() != 2:
            return f"needs a simple gate [B,E] (one weight per expert); got a classwise gate {list(pred.gate.shape)}"
        return None

    def __call__(self, pred: Prediction) -> Tensor:
        why = self.misfit(pred)
        if why:
            raise ShiftbenchError(f"estimator {self.name!r} {why}")
        return self.fn(pred)


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("predictive_entropy", "PE", lambda p: _pe(p.terms), needs_members=True),
    Estimator("mutual_information", "MI", lambda p: _mi(p.terms), needs_members=True),
    Estimator("predictive_entropy_stacked", "PE (stacked)",
              lambda p: _pe_stacked(p.terms), needs_members=True, needs_gate=True),
    Estimator("predictive_entropy_weighted", "PE (weighted)",
              lambda p: _pe_weighted(p.terms),
              needs_members=True, needs_gate=True, simple_gate_only=True),
    Estimator("mutual_information_stacked", "MI (stacked)",
              lambda p: _mi_stacked(p.terms), needs_members=True, needs_gate=True),
    Estimator("mutual_information_weighted", "MI (weighted)",
              lambda p: _mi_weighted(p.terms),
              needs_members=True, needs_gate=True, simple_gate_only=True),
    Estimator("expert_variance", "EV", lambda p: _ev(p.terms), needs_members=True,
              needs_gate=True),
    Estimator("gate_entropy", "GE", lambda p: _ge(p.terms), needs_gate=True),
    Estimator("softmax_entropy", "SE", lambda p: _se(p.terms)),
    Estimator("one_minus_max_prob", "1-MSP", lambda p: _msp(p.terms)),
)}
