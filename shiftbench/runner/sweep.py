"""The sweep of conditions: load -> corrupt -> forward -> estimators -> accumulators.

For every batch the images are corrupted once on the device, every expert and MC pass
runs once (:class:`shiftbench.models.zoo.ModelZoo`), and every model variant and
estimator is derived from those outputs. Accumulator states are summed over batches
and ranks; nothing here grows with the number of images. On the CPU a
:class:`MetricWorker` thread runs a batch's estimators and metrics while the next batch
runs through the models.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
from torch import Tensor

from corruptions import corrupt
from shiftbench.metrics import (CalibrationMetrics, ConditionalMetrics, Outcome, SegmentationMetrics,
                                UncertaintyHistogram)
from shiftbench.errors import Terminated
from shiftbench.models.checks import ImagesOutOfRange
from shiftbench.runner.conditions import Condition
from shiftbench.runner.data import Batch, SplitData
from shiftbench.seeding import corruption_seeds, model_seeds
from shiftbench.uncertainty import ESTIMATORS, Prediction, share_members

IGNORE = 255


class ConditionFailed(RuntimeError):
    """A condition that cannot produce results (e.g. a model emitted NaN); the sweep goes on."""


class Timer:
    """Wall time per stage; synchronises CUDA so GPU work is charged to the stage that queued it.
    Thread-safe: with a :class:`MetricWorker` the stages of two threads overlap (and sum to more than
    the wall time)."""

    STAGES = ("data", "corruption", "forward", "estimators_metrics", "io")

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[stage] += elapsed


class Accumulators:
    """Every accumulator of one condition: per model a SegmentationMetrics, per (model,
    estimator) a CalibrationMetrics, a ConditionalMetrics and an UncertaintyHistogram."""

    def __init__(self, suite, plan: dict[str, tuple[str, ...]], device: torch.device):
        m, k = suite.metrics, suite.dataset.classes
        self.plan, self.device = plan, device
        self.n_images = 0
        self.confidence = m.calibration_confidence
        self.segmentation = {name: SegmentationMetrics(k, ignore_index=IGNORE).to(device) for name in plan}
        # the multiclass Brier/NLL depend on the model only: one estimator per model carries them
        self.calibration = {(name, e): CalibrationMetrics(k, n_bins=m.n_bins, ignore_index=IGNORE,
                                                          average=m.calibration_average,
                                                          multiclass=e == ests[0]).to(device)
                            for name, ests in plan.items() for e in ests}
        self.conditional = {(name, e): ConditionalMetrics(patch_size=m.patch_size,
                                                          accuracy_threshold=m.accuracy_threshold,
                                                          thresholds=m.thresholds, threshold_range=m.threshold_range,
                                                          ignore_index=IGNORE).to(device)
                            for name, ests in plan.items() for e in ests}
        self.histogram = {(name, e): UncertaintyHistogram(ignore_index=IGNORE).to(device)
                          for name, ests in plan.items() for e in ests}

    def all(self) -> Iterator[tuple[str, Any]]:
        for name, acc in self.segmentation.items():
            yield f"segmentation/{name}", acc
        for family in ("calibration", "conditional", "histogram"):
            for (name, e), acc in getattr(self, family).items():
                yield f"{family}/{name}/{e}", acc

    #: device types on which an update that runs out of memory is undone and redone in two halves
    OOM_RETRY = ("cuda",)

    def update(self, preds: dict[str, Prediction], labels: Tensor) -> dict[str, dict[str, Tensor]]:
        """Update every accumulator; returns the uncertainty maps per model and estimator.

        On CUDA out-of-memory the states are put back as they were before this batch and the batch is
        updated in two halves (recursively), so no image is counted twice; a single image that does not
        fit fails the condition."""
        if labels.device.type not in self.OOM_RETRY:
            return self._update(preds, labels)
        saved = (self.n_images, [{n: getattr(acc, n).clone() for n in acc.state_names} for _, acc in self.all()])
        try:
            return self._update(preds, labels)
        except torch.cuda.OutOfMemoryError as exc:
            self.n_images = saved[0]
            for (_, acc), state in zip(self.all(), saved[1]):
                for name, value in state.items():
                    setattr(acc, name, value)
            if labels.shape[0] == 1:
                raise ConditionFailed("out of memory in the estimators and metrics on a single image: "
                                      f"{_oom_reason(exc)}") from exc
            for pred in preds.values():
                pred.__dict__.pop("terms", None)  # the shared intermediates of the whole batch: free them
            torch.cuda.empty_cache()
            h = labels.shape[0] // 2
            halves = (slice(0, h), slice(h, None))
            parts = [self.update(_slice_predictions(preds, rows), labels[rows]) for rows in halves]
            return {m: {e: torch.cat([p[m][e] for p in parts]) for e in parts[0][m]} for m in parts[0]}

    def _update(self, preds: dict[str, Prediction], labels: Tensor) -> dict[str, dict[str, Tensor]]:
        maps: dict[str, dict[str, Tensor]] = {}
        self.n_images += labels.shape[0]
        share_members(preds.values())
        labels_only = Outcome(None, labels, IGNORE)
        for name, ests in self.plan.items():
            pred = preds[name]
            label_pred = pred.terms.top[1]  # argmax(probs), shared with the estimators
            outcome = labels_only.for_pred(label_pred)  # the masks every metric of this model shares
            self.segmentation[name].update(label_pred, labels, outcome=outcome)
            maps[name] = {}
            for e in ests:
                u = ESTIMATORS[e](pred)
                maps[name][e] = u
                conf = 1.0 - u if self.confidence == "uncertainty" else None
                self.calibration[name, e].update(pred.probs, labels, confidence=conf, outcome=outcome)
                self.conditional[name, e].update(label_pred, labels, u, outcome=outcome)
                self.histogram[name, e].update(u, labels, outcome=outcome)
        return maps

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {name: {k: v.cpu() for k, v in acc.state_dict().items()} for name, acc in self.all()}

    def all_reduce(self) -> None:
        for _, acc in self.all():
            acc.all_reduce()


def check_finite(preds: dict[str, Prediction]) -> None:
    """Raise :class:`ConditionFailed` naming the models whose probabilities are NaN or Inf.

    One sum per model (at least float32): NaN and Inf propagate into it, probabilities in [0, 1] cannot
    overflow it, and it is 20x cheaper on the CPU than ``isfinite(probs).all()``."""
    flags = torch.stack([_sum32(p.probs) for p in preds.values()]).isfinite()
    if bool(flags.all()):
        return
    bad = [n for n, ok in zip(preds, flags.tolist()) if not ok]
    raise ConditionFailed(f"{'model' if len(bad) == 1 else 'models'} {', '.join(bad)} produced NaN or Inf "
                          "probabilities")


def _sum32(x: Tensor) -> Tensor:
    return x.sum(dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.sum()


def predict(zoo, x: Tensor, seeds: list[int], exact: bool = True) -> dict[str, Prediction]:
    """Every model's prediction for ``x``. ``exact``: one image at a time, so a sample's outputs are
    bitwise the same whatever batch (and rank) it is in; convolution kernels otherwise round
    differently for different batch sizes (~1e-7 relative)."""
    if not exact or x.shape[0] == 1:
        return zoo(x, seeds)
    parts = [zoo(x[i:i + 1], seeds[i:i + 1]) for i in range(x.shape[0])]
    memo: dict[tuple[int, ...], Tensor] = {}
    return {n: _cat_predictions([p[n] for p in parts], memo) for n in parts[0]}


def forward_batch(zoo, cond: Condition, batch: Batch, seed: int, device: torch.device, timer: Timer,
                  exact: bool = True) -> tuple[Tensor, dict[str, Prediction]]:
    """Corrupt (once) and run every model on one batch; halves the batch on CUDA out-of-memory."""
    try:
        with timer("data"):
            x = batch.images.to(device, non_blocking=True).float().div_(255)
        if not cond.is_clean:
            with timer("corruption"):
                seeds = corruption_seeds(seed, batch.ids)  # on the host, where corrupt reads them
                x = corrupt(x, cond.corruption, cond.severity, seed=seeds)
        with timer("forward"):
            try:
                preds = predict(zoo, x, model_seeds(seed, batch.ids), exact)
            except ImagesOutOfRange as exc:  # a corruption gone wrong: this condition fails, the others run
                raise ConditionFailed(f"the {'clean' if cond.is_clean else 'corrupted'} images of {batch.ids[0]}"
                                      f"{' ...' if len(batch.ids) > 1 else ''}: {exc}") from None
        return x, preds
    except torch.cuda.OutOfMemoryError as exc:
        if len(batch.ids) == 1:
            raise ConditionFailed(f"out of memory on a single image ({batch.ids[0]}): {_oom_reason(exc)}") from exc
        torch.cuda.empty_cache()
        h = len(batch.ids) // 2
        halves = [Batch(batch.images[s], batch.labels[s], batch.ids[s]) for s in (slice(0, h), slice(h, None))]
        parts = [forward_batch(zoo, cond, b, seed, device, timer, exact) for b in halves]
        x = torch.cat([p[0] for p in parts])
        memo: dict[tuple[int, ...], Tensor] = {}
        preds = {n: _cat_predictions([p[1][n] for p in parts], memo) for n in parts[0][1]}
        return x, preds


def _oom_reason(exc: BaseException) -> str:
    """The first line of a CUDA out-of-memory error (its text goes on to list the allocator's state)."""
    return str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"


def _slice_predictions(preds: dict[str, Prediction], rows: slice) -> dict[str, Prediction]:
    """Every prediction restricted to images ``rows``; a tensor several models share stays shared."""
    memo: dict[tuple[int, int], Tensor] = {}

    def cut(x: Tensor | None, dim: int) -> Tensor | None:
        if x is None:
            return None
        if (id(x), dim) not in memo:
            memo[id(x), dim] = x[(slice(None),) * dim + (rows,)]
        return memo[id(x), dim]

    return {n: Prediction(probs=cut(p.probs, 0), members=cut(p.members, 1), gate=cut(p.gate, 0))
            for n, p in preds.items()}


def _cat_predictions(parts: list[Prediction], memo: dict[tuple[int, ...], Tensor]) -> Prediction:
    """Concatenate per-part predictions along the batch. Tensors that several models share in every part
    (the experts' probabilities under an ensemble and its MoEs) are concatenated once and stay shared."""
    def cat(xs: list[Tensor | None], dim: int) -> Tensor | None:
        if xs[0] is None:
            return None
        key = (dim, *map(id, xs))
        if key not in memo:
            memo[key] = torch.cat(xs, dim)
        return memo[key]

    return Prediction(probs=cat([p.probs for p in parts], 0), members=cat([p.members for p in parts], 1),
                      gate=cat([p.gate for p in parts], 0))


class MetricWorker:
    """Runs each batch's estimators and metrics (a job) on one background thread with ``threads`` torch
    threads of its own, while the caller runs the next batch through the models: at most one job in flight.
    ``threads=0``: no thread; a job runs at once in the caller. A job's exception is raised by the next
    :meth:`submit` or :meth:`wait`."""

    def __init__(self, threads: int = 0):
        self._pool = (ThreadPoolExecutor(1, "shiftbench-metrics", initializer=torch.set_num_threads, initargs=(threads,))
                      if threads else None)
        self._job: Future | None = None

    @property
    def threaded(self) -> bool:
        return self._pool is not None

    @property
    def idle(self) -> bool:
        """No job running or waiting to be collected by :meth:`wait`."""
        return self._job is None or self._job.done()

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        if self._pool is None:
            job()
        else:
            self._job = self._pool.submit(job)

    def wait(self) -> None:
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # lets a job in flight finish (a kill loses it: nothing was saved)

    def __enter__(self) -> MetricWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def thread_split(overlap: bool | str, device: torch.device) -> tuple[int, int]:
    """(torch threads for the forwards, for the worker running estimators + metrics; 0 = no worker).

    ``overlap="auto"`` overlaps on the CPU with 2 or more threads: the metrics get half of them. The
    forwards of small models scale badly with threads (1.34x from one to two on the demo), so two streams
    of one thread each finish sooner than one stream of two. On CUDA the GPU work of both threads would
    queue on one stream and two batches would be held in memory; ``auto`` keeps one thread there."""
    n = torch.get_num_threads()
    on = device.type == "cpu" and n >= 2 if overlap == "auto" else bool(overlap)
    if not on:
        return n, 0
    metrics = max(1, n // 2)
    return max(1, n - metrics), metrics


class _ConditionRun:
    """One condition's accumulators, and why it failed (set by a job on the worker)."""

    def __init__(self, cond: Condition, accs: Accumulators, gallery: set[str],
                 save_map: Callable[[str, dict[str, np.ndarray]], None] | None, timer: Timer):
        self.cond, self.accs, self.gallery, self.save_map, self.timer = cond, accs, gallery, save_map, timer
        self.reason: str | None = None

    def update(self, batch: Batch, preds: dict[str, Prediction]) -> None:
        """The job of one batch: estimators, accumulators and the gallery maps."""
        try:
            with self.timer("estimators_metrics"):
                check_finite(preds)
                labels = batch.labels.to(self.accs.device, non_blocking=True)
                maps = self.accs.update(preds, labels)
        except ConditionFailed as exc:
            self.reason = str(exc)
            return
        if self.gallery & set(batch.ids):
            with self.timer("io"):
                for b, sid in enumerate(batch.ids):
                    if sid in self.gallery:
                        self.save_map(sid, _gallery_arrays(batch, b, preds, maps))

    def result(self) -> tuple[Condition, Accumulators | None, str | None]:
        return self.cond, None if self.reason else self.accs, self.reason


def sweep_conditions(zoo, suite, plan: dict[str, tuple[str, ...]], conditions: list[Condition],
                     splits: dict[str, SplitData], device: torch.device, timer: Timer,
                     worker: MetricWorker | None = None, on_batch: Callable[[], None] = lambda: None,
                     save_map: Callable[[Condition], Callable[[str, dict[str, np.ndarray]], None]] | None = None
                     ) -> Iterator[tuple[Condition, Accumulators | None, str | None]]:
    """Sweep ``conditions`` in order over this rank's images; yields (condition, its not yet reduced
    accumulators, None), or (condition, None, reason) for a failed one, with no job in flight.

    Batch k's estimators and metrics run on ``worker`` while batch k+1 runs through the models; a
    condition's last batch overlaps the next condition's first forwards, so a condition is yielded after
    them. ``save_map(cond)`` gives the writer of that condition's gallery maps (clean conditions only)."""
    worker = worker or MetricWorker(0)
    pending: _ConditionRun | None = None  # the condition whose last batch is on the worker
    for cond in conditions:
        gallery = set(suite.metrics.gallery) if cond.is_clean and save_map is not None else set()
        run = _ConditionRun(cond, Accumulators(suite, plan, device), gallery,
                            save_map(cond) if gallery else None, timer)
        split = splits[cond.split]
        if split.forks_workers:  # fork DataLoader processes with no job running on the worker thread
            worker.wait()
        for batch in _timed(split.batches(suite.run.batch_size), timer, "data"):
            try:
                _, preds = forward_batch(zoo, cond, batch, suite.run.seed, device, timer, suite.run.exact)
            except ConditionFailed as exc:
                worker.wait()
                run.reason = run.reason or str(exc)
            yield from _finished(pending, worker)
            pending = None
            worker.wait()  # run.reason is now up to date
            if run.reason:
                break
            worker.submit(lambda run=run, batch=batch, preds=preds: run.update(batch, preds))
            del preds  # only the job holds this batch's outputs now: not kept alive through the next forward
            on_batch()
        yield from _finished(pending, worker)  # still pending if this condition had no batch on this rank
        pending = run
        if not worker.threaded:
            yield from _finished(pending, worker)
            pending = None
    yield from _finished(pending, worker)


T = TypeVar("T")

#: set by the run's SIGTERM handler. Its exception can be lost (raised inside a fork hook while a DataLoader
#: starts its workers, it is only printed), so the sweep also stops at the next batch once this is set.
TERMINATE = threading.Event()


def _timed(items: Iterable[T], timer: Timer, stage: str) -> Iterator[T]:
    """``items``, with the time spent producing each one (reading, decoding, waiting for a DataLoader worker)
    charged to ``stage``."""
    it = iter(items)
    while True:
        if TERMINATE.is_set():
            raise Terminated("SIGTERM")
        with timer(stage):
            item = next(it, _END)
        if item is _END:
            return
        yield item


_END = object()


def _finished(run: _ConditionRun | None, worker: MetricWorker
              ) -> Iterator[tuple[Condition, Accumulators | None, str | None]]:
    """``run``'s result once the worker has no job in flight (nothing for None)."""
    if run is not None:
        worker.wait()
        yield run.result()


def run_condition(zoo, suite, plan: dict[str, tuple[str, ...]], cond: Condition, data: SplitData,
                  device: torch.device, timer: Timer) -> Accumulators:
    """Sweep one condition in the calling thread; its accumulators (raises :class:`ConditionFailed`)."""
    (_, accs, reason), = sweep_conditions(zoo, suite, plan, [cond], {cond.split: data}, device, timer)
    if reason:
        raise ConditionFailed(reason)
    return accs


def _gallery_arrays(batch: Batch, b: int, preds: dict[str, Prediction], maps: dict[str, dict[str, Tensor]]
                    ) -> dict[str, np.ndarray]:
    arrays = {"image": batch.images[b].permute(1, 2, 0).cpu().numpy(),
              "label": batch.labels[b].cpu().numpy().astype(np.int16),
              "sample_id": np.array(batch.ids[b])}
    for name, pred in preds.items():
        if name in maps:
            arrays[f"pred__{name}"] = pred.probs[b].argmax(0).cpu().numpy().astype(np.int16)
            for e, u in maps[name].items():
                arrays[f"unc__{name}__{e}"] = u[b].cpu().numpy().astype(np.float16)
    return arrays
