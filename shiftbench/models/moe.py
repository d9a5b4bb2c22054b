"""Model-level mixture of experts: frozen experts, a gate on their ASPP features, a combination rule.

Combination rules (``combine``), for expert logits z_i ``[B,K,H,W]`` and gate weights w:

- ``probs`` (default; the paper's Eq. 1): P = sum_i w_i softmax(z_i), computed in log space as
  log P = logsumexp_i(log w_i + log_softmax(z_i)). A classwise gate's weights differ per class,
  so sum_k P_k != 1; P is renormalised over classes. With the final conv, the conv maps
  log P (valid logits) to new logits: P' = softmax(conv(log P)).
- ``logits`` (the authors' code): z = sum_i w_i z_i, then the optional final conv, then softmax.

Weights are ``[B,E]`` (simple gate: w_i per image) or ``[B,E,K]`` (classwise: w_ik).
State-dict layout as the authors': ``expert1.*``, ``expert2.*``, ..., ``gate.*``, ``final_conv.*``
(a 3x3 KxK conv without bias, initialised to the identity).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from shiftbench.errors import ShiftbenchError
from shiftbench.models import checks
from shiftbench.models.gates import build_gate


def _weights_as(weights: Tensor, ref: Tensor) -> Tensor:
    """Gate weights ``[B,E]`` or ``[B,E,K]`` as ``[E,B,1|K,1,1]`` to broadcast over ``[E,B,K,H,W]``."""
    w = weights.movedim(1, 0)
    return w.reshape(*w.shape[:2], -1, 1, 1).to(ref.dtype)


def combine_probs(logits: Tensor, weights: Tensor, final_conv: nn.Module | None,
                  log_probs: Tensor | None = None) -> Tensor:
    """log P ``[B,K,H,W]`` from expert logits ``[E,B,K,H,W]``: P = sum_i w_i softmax(z_i) (renormalised).
    ``log_probs``: log_softmax(logits, dim=2) when the caller already has it (several MoEs share experts)."""
    log_w = torch.log(_weights_as(weights, logits).clamp_min(torch.finfo(logits.dtype).tiny))
    log_p = logsumexp0(log_w + (torch.log_softmax(logits, dim=2) if log_probs is None else log_probs))
    if weights.dim() == 3:
        log_p = torch.log_softmax(log_p, dim=1)
    return log_p if final_conv is None else torch.log_softmax(final_conv(log_p), dim=1)


def combine_logits(logits: Tensor, weights: Tensor, final_conv: nn.Module | None,
                   log_probs: Tensor | None = None) -> Tensor:
    """log P ``[B,K,H,W]`` with z = sum_i w_i z_i, optional final conv, softmax (``log_probs`` unused)."""
    z = (_weights_as(weights, logits) * logits).sum(0)
    return torch.log_softmax(z if final_conv is None else final_conv(z), dim=1)


def logsumexp0(x: Tensor) -> Tensor:
    """log sum_i exp(x_i) over dim 0: m + log sum_i exp(x_i - m), m = max_i x_i.

    ``torch.logsumexp`` without its guard for infinite maxima, which costs it 40 % more time on the CPU;
    bitwise equal to it for finite x (here: clamped log-weights plus log-softmaxes). An infinite x
    gives NaN or Inf either way, which the runner's check fails the condition on."""
    m = x.amax(0)
    return (x - m).exp_().sum(0).log_().add_(m)


#: rule(logits [E,B,K,H,W], weights, final_conv, log_probs or None) -> log P [B,K,H,W]
COMBINE: dict[str, Callable[[Tensor, Tensor, nn.Module | None, Tensor | None], Tensor]] = {
    "probs": combine_probs, "logits": combine_logits,
}


class MoEHead(nn.Module):
    """The trainable part of an MoE: gate (+ final conv) and the combination rule.

    forward(features: list of E ASPP maps ``[B,C,h,w]``, logits ``[E,B,K,H,W]``)
    -> (log-probabilities ``[B,K,H,W]``, gate weights ``[B,E]`` or ``[B,E,K]``).
    """

    def __init__(self, gate: str, experts: int, channels: int, classes: int, grid: tuple[int, int],
                 final_conv: bool = False, combine: str = "probs"):
        super().__init__()
        if combine not in COMBINE:
            raise ShiftbenchError(f"unknown combine rule {combine!r}; allowed: {', '.join(COMBINE)}")
        experts, channels = checks.count(experts, "experts"), checks.count(channels, "channels")
        self.gate = build_gate(gate, experts * channels, experts, classes, grid)
        self.kind, self.combine, self.grid, self.experts_n = gate, combine, tuple(grid), experts
        self.channels, self.classes = channels, classes
        self.final_conv = nn.Conv2d(classes, classes, 3, 1, 1, bias=False) if final_conv else None
        if self.final_conv is not None:  # start as the identity: training can only move it from "no conv"
            nn.init.dirac_(self.final_conv.weight)

    def forward(self, features: Sequence[Tensor], logits: Tensor, log_probs: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """``log_probs``: the experts' log_softmax(logits, dim=2), if the caller has it."""
        e, c, k = self.experts_n, self.channels, self.classes
        if logits.dim() != 5 or logits.shape[0] != e or logits.shape[2] != k:
            raise ShiftbenchError(f"logits must be [E,B,K,H,W] with E = {e} experts and K = {k} classes, "
                                  f"got {list(logits.shape)}")
        if len(features) != e:
            raise ShiftbenchError(f"this MoE has {e} experts, got {len(features)} feature maps; give one per expert")
        want = (logits.shape[1], c, *features[0].shape[-2:])
        bad = next((i for i, f in enumerate(features) if f.shape != want), None)
        if bad is not None:
            raise ShiftbenchError(f"feature map {bad} is {list(features[bad].shape)}; each must be [B,C,h,w] with the "
                                  f"logits' B = {want[0]}, C = {c} channels and the same h, w as map 0")
        if log_probs is not None and log_probs.shape != logits.shape:
            raise ShiftbenchError(f"log_probs is {list(log_probs.shape)}; it must be log_softmax(logits, dim=2), "
                                  f"of the logits' shape {list(logits.shape)}")
        device = next(self.parameters()).device
        bad = next((t for t in (logits, log_probs, *features) if t is not None and t.device != device), None)
        if bad is not None:
            raise ShiftbenchError(f"the MoE head is on {device}, its inputs on {bad.device}; move them with .to({device})")
        weights = self.gate(torch.cat(list(features), 1)).float()
        log_p = COMBINE[self.combine](logits.float(), weights, self.final_conv, log_probs)
        return log_p, weights


class MixtureOfExperts(MoEHead):
    """Experts + head in one module, the authors' layout (``expert{i}.*``, ``gate.*``, ``final_conv.*``).

    Experts are frozen: no gradients, and :meth:`train` keeps them in eval mode, so BatchNorm
    statistics and dropout stay as trained. forward(x) -> (log P ``[B,K,H,W]``, weights, expert
    logits ``[E,B,K,H,W]``), each expert run once.
    """

    def __init__(self, experts: Sequence[nn.Module], gate: str, classes: int, grid: tuple[int, int],
                 final_conv: bool = False, combine: str = "probs", channels: int | None = None):
        if not experts:
            raise ShiftbenchError("experts: empty; a MixtureOfExperts needs at least one expert")
        widths = sorted({e.classifier.aspp.project[0].out_channels for e in experts})
        counts = sorted({e.classes for e in experts})
        if len(widths) > 1:
            raise ShiftbenchError(f"the experts' ASPP maps differ in width ({widths} channels); a gate needs "
                                  "experts of one feature width")
        if channels not in (None, widths[0]):
            raise ShiftbenchError(f"channels={channels!r}, but the experts' ASPP maps have {widths[0]}; "
                                  "leave channels out or give that width")
        if counts != [classes]:
            raise ShiftbenchError(f"the experts predict {counts} classes, the MoE classes={classes}; "
                                  "every expert must predict the MoE's classes")
        channels = widths[0]
        super().__init__(gate, len(experts), channels, classes, grid, final_conv, combine)
        for i, expert in enumerate(experts, 1):
            expert.requires_grad_(False)
            self.add_module(f"expert{i}", expert)
        self.train(False)

    @property
    def experts(self) -> list[nn.Module]:
        return [getattr(self, f"expert{i}") for i in range(1, self.experts_n + 1)]

    def train(self, mode: bool = True) -> "MixtureOfExperts":
        super().train(mode)
        for expert in self.experts:
            expert.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            outs = [expert.forward_features(x) for expert in self.experts]
        logits = torch.stack([z for _, z in outs])
        log_p, weights = super().forward([f for f, _ in outs], logits)
        return log_p, weights, logits
