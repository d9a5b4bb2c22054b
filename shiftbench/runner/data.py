"""Evaluation data of a sweep: each split group loaded once, sharded across ranks.

A split group (``dataset.eval.id = [highway_test, urban_test]``) is the concatenation of its
splits. ``--limit N`` keeps N images per group, taken evenly from its splits. A group that
fits in ``cache_bytes`` is decoded once and kept in memory as uint8 for every condition
(the demo and most single-GPU sweeps); larger ones are streamed by a DataLoader each
condition. Images that cannot be read are skipped, counted and named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from shiftbench.errors import ShiftbenchError
from shiftbench.runner.dist import World

CACHE_BYTES = 4 << 30


def limited_indices(lengths: list[int], limit: int | None) -> list[tuple[int, int]]:
    """(dataset, index) pairs of a concatenation, at most ``limit`` taken evenly from the parts."""
    if limit is None:
        return [(d, i) for d, n in enumerate(lengths) for i in range(n)]
    per = math.ceil(limit / max(len(lengths), 1))
    picked = [(d, i) for d, n in enumerate(lengths) for i in range(min(n, per))]
    return picked[:limit]


@dataclass
class Batch:
    images: Tensor  # uint8 [B,3,H,W]
    labels: Tensor  # int64 [B,H,W]
    ids: list[str]


@dataclass
class SplitData:
    """One split group's images for this rank."""

    name: str
    datasets: list[Dataset]
    index: list[tuple[int, int]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    cache: Batch | None = None

    def __len__(self) -> int:
        return len(self.index)

    def load(self, k: int) -> tuple[Tensor, Tensor, str] | dict[str, str]:
        """Image k as (uint8 image, label, sample id), or, if it cannot be read, the record of the skip
        ({file, reason}); pure, so that DataLoader workers can call it (what they skip comes back in the batch)."""
        d, i = self.index[k]
        try:
            image, label, sid = self.datasets[d][i]
        except ShiftbenchError as exc:  # unreadable image: skip it, name it
            return {"file": f"{self.name}:{d}:{i}", "reason": str(exc)}
        return (image.mul(255).round_().to(torch.uint8) if image.is_floating_point() else image), label, sid

    def _keep(self, items: list) -> list:
        """The readable items; the skipped ones are recorded (once per file, however many conditions stream it)."""
        for item in items:
            if isinstance(item, dict) and item not in self.skipped:
                self.skipped.append(item)
        return [x for x in items if not isinstance(x, dict)]

    def fill_cache(self) -> None:
        items = self._keep([self.load(k) for k in range(len(self))])
        self.cache = _collate(items, self.name) if items else Batch(torch.zeros(0, 3, 1, 1, dtype=torch.uint8),
                                                                     torch.zeros(0, 1, 1, dtype=torch.int64), [])

    def batches(self, batch_size: int, workers: int = 0) -> Iterator[Batch]:
        if self.cache is not None:
            for s in range(0, len(self.cache.ids), batch_size):
                yield Batch(self.cache.images[s:s + batch_size], self.cache.labels[s:s + batch_size],
                            self.cache.ids[s:s + batch_size])
            return
        loader = DataLoader(_Indexed(self), batch_size=batch_size, num_workers=workers, collate_fn=list,
                            pin_memory=False)
        for items in loader:
            items = self._keep(items)
            if items:
                yield _collate(items, self.name)

    def n_batches(self, batch_size: int) -> int:
        n = len(self.cache.ids) if self.cache is not None else len(self)
        return math.ceil(n / batch_size)


class _Indexed(Dataset):
    def __init__(self, split: SplitData):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, k: int):
        return self.split.load(k)


def _collate(items: list, name: str) -> Batch:
    sizes = {tuple(img.shape[-2:]) for img, _, _ in items}
    if len(sizes) > 1:
        raise ShiftbenchError(f"split {name!r}: images differ in size ({', '.join(map(str, sorted(sizes)[:3]))}); "
                              "set dataset.size to resize them to one size")
    return Batch(torch.stack([i for i, _, _ in items]), torch.stack([lab.long() for _, lab, _ in items]),
                 [s for _, _, s in items])


def open_split(suite, group: str, world: World, cache_bytes: int | None = None) -> SplitData:
    """The images of split group ``group`` that this rank evaluates (rank r: r, r+W, ...); kept in memory
    if they fit in ``cache_bytes`` (default ``CACHE_BYTES``), else streamed each condition."""
    from shiftbench.data import open_split as open_dataset

    datasets = [open_dataset(suite, s) for s in suite.dataset.eval[group]]
    index = limited_indices([len(d) for d in datasets], suite.run.limit)
    data = SplitData(group, datasets, index[world.rank::world.size])
    if len(data) and _estimate_bytes(data) <= (CACHE_BYTES if cache_bytes is None else cache_bytes):
        data.fill_cache()
    return data


def _estimate_bytes(data: SplitData) -> int:
    """Bytes of the uint8 images and int64 labels of the whole group, from its first readable image."""
    for d, i in data.index[:8]:
        try:
            image, label, _ = data.datasets[d][i]
        except ShiftbenchError:
            continue
        return len(data) * (image.numel() + label.numel() * 8)
    return 0
