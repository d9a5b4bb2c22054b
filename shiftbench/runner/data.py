"""Evaluation data of a sweep: each split group loaded once, sharded across ranks.

A split group (``dataset.eval.id = [highway_test, urban_test]``) is the concatenation of its
splits. ``--limit N`` keeps N images per group, taken evenly from its splits. A group that
fits in the cache budget (``run.cache``; ``auto``: half the available memory) is decoded once
and kept in memory, images and labels as uint8, for every condition; a larger one is decoded
again for every condition. Both go through a DataLoader with ``run.workers`` processes.
Images that cannot be read are skipped, counted and named.
"""

from __future__ import annotations

import collections
import math
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from shiftbench.errors import ShiftbenchError
from shiftbench.runner.dist import World

CACHE_BYTES = 4 << 30


def limited_indices(lengths: list[int], limit: int | None) -> list[tuple[int, int]]:
    """(dataset, index) pairs of a concatenation, at most ``limit`` taken evenly from the parts: the first
    ceil(limit / parts) of each part, the last parts cut to ``limit`` in all; what short parts lack is taken,
    evenly again, from the parts that have more."""
    if limit is None:
        return [(d, i) for d, n in enumerate(lengths) for i in range(n)]
    quota = [min(n, math.ceil(limit / max(len(lengths), 1))) for n in lengths]
    while sum(quota) < limit and (spare := [d for d, n in enumerate(lengths) if quota[d] < n]):
        extra = math.ceil((limit - sum(quota)) / len(spare))
        for d in spare:
            quota[d] = min(lengths[d], quota[d] + extra)
    picked = [(d, i) for d, n in enumerate(quota) for i in range(n)]
    return picked[:limit]


@dataclass
class Batch:
    images: Tensor  # uint8 [B,3,H,W]
    labels: Tensor  # int64 [B,H,W] (uint8 or int64 in a SplitData cache)
    ids: list[str]


@dataclass
class SplitData:
    """One split group's images for this rank."""

    name: str
    datasets: list[Dataset]
    index: list[tuple[int, int]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    cache: Batch | None = None
    workers: int = 0  # DataLoader processes that decode the group's images

    def __len__(self) -> int:
        return len(self.index)

    def load(self, k: int) -> tuple[Tensor, Tensor, str] | dict[str, str]:
        """Image k as (uint8 image, label (uint8 where the ids fit), sample id), or, if it cannot be read, the
        record of the skip ({file, reason}: the path of the file that cannot be read, the image or its label, as the
        dataset lists it); pure, so that DataLoader workers can call it (what they skip comes back in the batch; a
        1208x1920 sample crosses from a worker in 9 MB of shared memory, not 25)."""
        d, i = self.index[k]
        try:
            image, label, sid = self.datasets[d][i]
        except ShiftbenchError as exc:  # unreadable image: skip it, name it
            path = getattr(exc, "path", None)  # set by errors.file_error; else the image's place in the group
            if path is None:
                return {"file": f"{self.name}:{d}:{i}", "reason": str(exc)}
            return {"file": path, "reason": exc.reason}
        image = image.mul(255).round_().to(torch.uint8) if image.is_floating_point() else image
        return image, label.to(_label_dtype(label)), sid

    def _keep(self, items: list) -> list:
        """The readable items; the skipped ones are recorded (once per file, however many conditions stream it)."""
        for item in items:
            if isinstance(item, dict) and item not in self.skipped:
                self.skipped.append(item)
        return [x for x in items if not isinstance(x, dict)]

    def _readable(self, batch_size: int, workers: int) -> Iterator[list]:
        """The readable items, in index order, ``batch_size`` indices at a time (decoded by ``workers`` processes)."""
        loader = DataLoader(_Indexed(self), batch_size=batch_size, num_workers=workers, collate_fn=list,
                            pin_memory=False)
        for items in loader:
            yield self._keep(items)

    def fill_cache(self, workers: int = 0) -> None:
        """Decode the group once into one uint8 image tensor and one label tensor (uint8 while the ids fit)."""
        images = labels = None
        ids: list[str] = []
        for items in self._readable(8, workers):
            for image, label, sid in items:
                if images is None:  # sized by the first readable image; filled in place, no second copy
                    images = torch.empty((len(self), *image.shape), dtype=torch.uint8)
                    labels = torch.empty((len(self), *label.shape), dtype=label.dtype)  # load() chose it
                if image.shape != images.shape[1:] or label.shape != labels.shape[1:]:
                    raise _size_error(self.name, [tuple(images.shape[-2:]), tuple(image.shape[-2:])])
                if labels.dtype == torch.uint8 and label.dtype != torch.uint8:
                    labels = labels.long()
                images[len(ids)], labels[len(ids)] = image, label
                ids.append(sid)
        if images is None:
            images, labels = torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, 1, 1, dtype=torch.uint8)
        self.cache = Batch(images[:len(ids)], labels[:len(ids)], ids)

    def batches(self, batch_size: int, workers: int | None = None) -> Iterator[Batch]:
        """The group's batches: uint8 images, int64 labels. Streamed groups are decoded again by ``workers``
        DataLoader processes (default: the group's ``workers``)."""
        if self.cache is not None:
            for s in range(0, len(self.cache.ids), batch_size):
                yield Batch(self.cache.images[s:s + batch_size], self.cache.labels[s:s + batch_size].long(),
                            self.cache.ids[s:s + batch_size])
            return
        for items in self._readable(batch_size, self.workers if workers is None else workers):
            if items:
                yield _collate(items, self.name)

    @property
    def cache_bytes(self) -> int:
        """Bytes the cached images and labels hold (0 when streamed)."""
        return 0 if self.cache is None else self.cache.images.nbytes + self.cache.labels.nbytes

    @property
    def forks_workers(self) -> bool:
        """Whether each sweep of the group starts DataLoader processes (streamed, with workers)."""
        return self.cache is None and self.workers > 0

    def n_batches(self, batch_size: int) -> int:
        n = len(self.cache.ids) if self.cache is not None else len(self)
        return math.ceil(n / batch_size)


def _label_dtype(label: Tensor) -> torch.dtype:
    """uint8 for ids in 0..255 (255 = ignore), else int64: the cache keeps labels in 1 byte, not 8."""
    return torch.uint8 if label.numel() == 0 or (int(label.min()) >= 0 and int(label.max()) <= 255) else torch.int64


def _size_error(name: str, sizes: list[tuple[int, ...]]) -> ShiftbenchError:
    return ShiftbenchError(f"split {name!r}: images differ in size ({', '.join(map(str, sorted(set(sizes))[:3]))}); "
                           "set dataset.size to resize them to one size")


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
        raise _size_error(name, list(sizes))
    return Batch(torch.stack([i for i, _, _ in items]), torch.stack([lab.long() for _, lab, _ in items]),
                 [s for _, _, s in items])


def open_split(suite, group: str, world: World, cache_bytes: int | None = None, workers: int = 0) -> SplitData:
    """The images of split group ``group`` that this rank evaluates (rank r: r, r+W, ...); decoded once (by
    ``workers`` DataLoader processes) and kept in memory if they fit in ``cache_bytes`` (default
    ``CACHE_BYTES``), else streamed, by the same workers, for every condition."""
    from shiftbench.data import open_split as open_dataset

    datasets = [open_dataset(suite, s) for s in suite.dataset.eval[group]]
    index = limited_indices([len(d) for d in datasets], suite.run.limit)
    _refuse_repeated_ids(group, suite.dataset.eval[group], datasets, index)
    data = SplitData(group, datasets, index[world.rank::world.size], workers=workers)
    limit = CACHE_BYTES if cache_bytes is None else cache_bytes
    if len(data) and limit > 0 and _estimate_bytes(data) <= limit:
        data.fill_cache(workers)
    return data


def _refuse_repeated_ids(group: str, splits: list[str], datasets: list[Dataset], index: list[tuple[int, int]]) -> None:
    """One image per sample id in a group (every rank checks the whole group, from the file names alone): an
    image's corruption noise and its saved gallery map are keyed by its id, so a repeated id would give two images
    the same noise and keep one map of the two."""
    seen: dict[str, int] = {}
    for d, i in index:
        sid = datasets[d].sample_id(i) if hasattr(datasets[d], "sample_id") else None
        if sid is None:
            continue
        if sid in seen:
            where = (f"in split {splits[d]!r} twice" if seen[sid] == d
                     else f"in splits {splits[seen[sid]]!r} and {splits[d]!r}")
            raise ShiftbenchError(f"dataset.eval.{group}: sample id {sid!r} occurs {where}; each image's corruption "
                                  "noise and saved map are keyed by its id, so a group must hold each id once (list "
                                  "each split once, and splits without shared file names)")
        seen[sid] = d


def open_splits(suite, todo: list, world: World, budget: int, workers: int) -> dict[str, SplitData]:
    """The split groups the conditions ``todo`` sweep, in suite order. The groups swept more than once
    are cached, most conditions first, while they fit in what is left of ``budget`` bytes; a group swept once
    is streamed (decoded once either way)."""
    sweeps = collections.Counter(c.split for c in todo)
    groups = [g for g in suite.dataset.eval if sweeps[g]]
    opened: dict[str, SplitData] = {}
    for g in sorted(groups, key=lambda g: -sweeps[g]):
        opened[g] = open_split(suite, g, world, cache_bytes=budget if sweeps[g] > 1 else 0, workers=workers)
        budget -= opened[g].cache_bytes
    return {g: opened[g] for g in groups}


def _estimate_bytes(data: SplitData) -> int:
    """Bytes of the cached images and labels of the whole group, from its first readable image."""
    for d, i in data.index[:8]:
        try:
            image, label, _ = data.datasets[d][i]
        except ShiftbenchError:
            continue
        return len(data) * (image.numel() + label.numel() * _label_dtype(label).itemsize)
    return 0


def cache_budget(setting: float | str, world: World) -> int:
    """Bytes of decoded images this rank may keep: ``run.cache`` GiB, or for ``auto`` half of the memory
    available now (``MemAvailable``), shared by the node's ranks; ``CACHE_BYTES`` where that is unknown."""
    if setting != "auto":
        return int(float(setting) * 2**30)
    available = _available_memory()
    return CACHE_BYTES if available is None else available // (2 * max(world.local_size, 1))


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


MAX_AUTO_WORKERS = 8


def loader_workers(setting: int | str, device: torch.device, world: World) -> int:
    """DataLoader processes that decode images: ``run.workers``, or for ``auto`` on CUDA one per CPU of this
    rank but one (at most ``MAX_AUTO_WORKERS``, and ``SHM_PER_WORKER`` of free /dev/shm each), so decoding
    runs while the GPU computes; on the CPU 0, as the forwards already use the cores."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    shm = _shared_memory_free()  # workers hand their tensors over in /dev/shm: a container's 64 MB takes none
    by_shm = MAX_AUTO_WORKERS if shm is None else shm // (SHM_PER_WORKER * max(world.local_size, 1))
    return max(0, min(MAX_AUTO_WORKERS, cpus // max(world.local_size, 1) - 1, by_shm))


#: /dev/shm a DataLoader worker may fill: two batches of 8 samples of 1208x1920 in flight are 150 MB
SHM_PER_WORKER = 512 << 20


def _shared_memory_free() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
