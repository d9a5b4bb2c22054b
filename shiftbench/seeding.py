"""Seeds keyed per sample.

Every random draw in shiftbench (corruption noise, MC-dropout masks) is derived from
a key that depends only on the run seed and the sample's identity, never on batch
size, position in the batch, or the number of processes. Keys are 63-bit integers
from BLAKE2b, stable across Python versions and machines (``hash()`` is not).
"""

from __future__ import annotations

import hashlib

import torch

_MASK63 = (1 << 63) - 1


def key(*parts: object) -> int:
    """A stable non-negative 63-bit integer from any printable parts."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def sample_seeds(seed: int, sample_ids: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sample seeds, int64 [B], from the run seed and each sample's id string."""
    return torch.tensor([key(seed, sid) for sid in sample_ids], dtype=torch.int64, device=device)


def model_seeds(seed: int, sample_ids: list[str]) -> list[int]:
    """The seeds of the models' randomness (MC-dropout masks) for each sample, as the runner draws them."""
    return [key(seed, "model", sid) for sid in sample_ids]


def corruption_seeds(seed: int, sample_ids: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """The seeds of the corruptions' randomness for each sample, int64 [B], as the runner draws them."""
    return torch.tensor([key(seed, "corruption", sid) for sid in sample_ids], dtype=torch.int64, device=device)
