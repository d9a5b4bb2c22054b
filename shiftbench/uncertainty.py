"""Uncertainty estimators: pure functions on probability tensors.

Every estimator returns a per-pixel map ``[B,H,W]`` in [0,1], normalised by a fixed,
data-independent bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


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
