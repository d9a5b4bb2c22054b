"""MoE gates: the experts' ASPP features (concatenated) -> softmax weights over the E experts.

One gate head: conv 3x3 -> 1 channel, ReLU, adaptive average pooling to a fixed ``grid``,
flatten, FC -> 128, ReLU, FC -> E, softmax over experts. The simple gate is one head
(keys ``gate.conv1.*``, ``gate.fc1.*``, ``gate.fc2.*``, as in the authors' ``GateLayerSimple``);
the classwise gate is K heads, one per class (keys ``gate.gates.{k}.conv1.*``, ...).

Any input size: the authors flatten the conv map itself, so their FC input is fixed to the
feature map of one image size (912x912 at output stride 16 -> 57x57 = 3249). Here the map is
first pooled to ``grid``; with ``grid`` = that map size, the authors' weights load unchanged
and at that image size the pooling is the identity (same flatten order: row-major).
The K heads of a classwise gate run as one grouped computation (conv with K output channels,
batched matrix products), not a loop over classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftbench.errors import ShiftbenchError
from shiftbench.models import checks

HIDDEN = 128


class GateHead(nn.Module):
    """One set of gate parameters: conv1 [1,C,3,3], fc1 [128, gh*gw], fc2 [E,128]."""

    def __init__(self, channels: int, experts: int, grid: tuple[int, int], hidden: int = HIDDEN):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 1, 3, 1, 1)
        self.fc1 = nn.Linear(grid[0] * grid[1], hidden)
        self.fc2 = nn.Linear(hidden, experts)


def gate_weights(features: Tensor, heads: list[GateHead], grid: tuple[int, int]) -> Tensor:
    """Weights ``[B,G,E]`` of ``G`` heads for features ``[B,C,h,w]``.

    w_g = softmax_E(fc2_g(relu(fc1_g(flatten(pool_grid(relu(conv1_g(features))))))))
    """
    conv_w = torch.cat([h.conv1.weight for h in heads])                          # [G,C,3,3]
    conv_b = torch.cat([h.conv1.bias for h in heads])                            # [G]
    maps = F.relu(F.conv2d(features, conv_w, conv_b, padding=1))                 # [B,G,h,w]
    flat = F.adaptive_avg_pool2d(maps, grid).flatten(2)                          # [B,G,F]
    w1 = torch.stack([h.fc1.weight for h in heads])                              # [G,128,F]
    b1 = torch.stack([h.fc1.bias for h in heads])                                # [G,128]
    hidden = F.relu(torch.einsum("bgf,ghf->bgh", flat, w1) + b1)
    w2 = torch.stack([h.fc2.weight for h in heads])                              # [G,E,128]
    b2 = torch.stack([h.fc2.bias for h in heads])                                # [G,E]
    return torch.softmax(torch.einsum("bgh,geh->bge", hidden, w2) + b2, dim=-1)


class SimpleGate(GateHead):
    """One weight per expert: features ``[B,C,h,w]`` -> ``[B,E]``."""

    def __init__(self, channels: int, experts: int, classes: int, grid: tuple[int, int]):
        super().__init__(channels, experts, grid)
        self.grid = tuple(grid)

    def forward(self, features: Tensor) -> Tensor:
        return gate_weights(features, [self], self.grid)[:, 0]


class ClasswiseGate(nn.Module):
    """One weight per expert and class: features ``[B,C,h,w]`` -> ``[B,E,K]``."""

    def __init__(self, channels: int, experts: int, classes: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = tuple(grid)
        self.gates = nn.ModuleList([GateHead(channels, experts, grid) for _ in range(classes)])

    def forward(self, features: Tensor) -> Tensor:
        return gate_weights(features, list(self.gates), self.grid).transpose(1, 2)


GATES: dict[str, type[nn.Module]] = {"simple": SimpleGate, "classwise": ClasswiseGate}


def build_gate(kind: str, channels: int, experts: int, classes: int, grid: tuple[int, int]) -> nn.Module:
    """A registered gate; ``channels`` = E x the experts' ASPP channels."""
    if kind not in GATES:
        raise ShiftbenchError(f"unknown gate type {kind!r}; allowed: {', '.join(GATES)}")
    return GATES[kind](checks.count(channels, "gate channels"), checks.count(experts, "experts"),
                       checks.count(classes, "classes"), checks.grid(grid, "gate grid"))


def grid_from_state(state: dict[str, Tensor], source: str) -> tuple[int, int]:
    """The square grid of a gate state dict without a recorded grid (the authors' files):
    ``fc1`` has ``gh*gw`` inputs, e.g. 3249 = 57x57 for their 912x912 crops."""
    key = next((k for k in state if k.endswith("fc1.weight")), None)
    if key is None:
        raise ShiftbenchError(f"{source}: no gate weights (gate.fc1.weight or gate.gates.0.fc1.weight) found")
    n = state[key].shape[1]
    side = round(n ** 0.5)
    if side * side != n:
        raise ShiftbenchError(f"{source}: gate FC input {n} is not a square grid and the checkpoint does not "
                              "record its grid; add meta.gate_grid = [h, w] to the file")
    return side, side
