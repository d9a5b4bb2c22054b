"""Train a suite's models in order: experts on their own splits, the MC-dropout baselines on
``train.splits``, then the gates of every MoE on ``train.splits`` with the experts frozen.

Each checkpoint is written atomically as ``{"state_dict", "meta"}``; ``meta`` records the model,
the suite (name and digest), the training settings, the validation mIoU per epoch and the
package versions. An MoE checkpoint holds only its gate (and final conv); its experts come
from the expert checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset

from shiftbench.data import open_split
from shiftbench.errors import ShiftbenchError
from shiftbench.models.backbones import backbone_spec, feature_grid, load_imagenet
from shiftbench.models.checkpoints import read_checkpoint, save_checkpoint, weights_digest
from shiftbench.models.deeplab import DeepLabV3Plus
from shiftbench.models.moe import MoEHead
from shiftbench.models.training import GateJob, InMemory, Stage, init_seed, train_gates, train_segmenter
from shiftbench.models.zoo import load_expert

TRAINABLE = ("mc_dropout", "moe")
PROBE_IMAGES = 2


# ---------------------------------------------------------------------------- data


class Splits:
    """The suite's splits by name, each rendered / read once and kept in memory for all stages."""

    def __init__(self, suite: Any, workers: int = 0):
        self.suite, self.workers, self.cache = suite, workers, {}

    def __call__(self, splits: Sequence[str]) -> Dataset | None:
        """The named splits concatenated (None when none are named)."""
        if not splits:
            return None
        for s in splits:
            if s not in self.cache:
                self.cache[s] = InMemory(open_split(self.suite, s), self.workers)
        parts = [self.cache[s] for s in splits]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)


# ---------------------------------------------------------------------------- plan


def _targets(suite: Any, only: Sequence[str] | None) -> tuple[list[Any], list[Any]]:
    """(experts, models) to train: all trainable ones, or those named in ``only``."""
    experts = [e for e in suite.experts.values() if e.train]
    models = [m for m in suite.models if m.kind in TRAINABLE]
    if only is None:
        return experts, models
    allowed = [e.name for e in experts] + [m.name for m in models]
    for name in only:
        if name not in allowed:
            raise ShiftbenchError(f"--only: {name!r} is not a trainable expert or model of suite {suite.name!r}; "
                                  f"trainable: {', '.join(allowed) or 'none'} (experts need train splits; "
                                  f"models of kind {' or '.join(TRAINABLE)})")
    return [e for e in experts if e.name in only], [m for m in models if m.name in only]


#: meta the trainer reports but does not save: the same seed must give the same checkpoint bytes
_NOT_SAVED = ("seconds",)


def _save(path: Path, state: dict, meta: dict) -> None:
    """Write a checkpoint whose meta leaves out what differs between two identical trainings (wall time)."""
    save_checkpoint(path, state, {k: v for k, v in meta.items() if k not in _NOT_SAVED})


def _target_path(checkpoint: Path | None, name: str, out: Path | None, where: str) -> Path:
    """Where a trained model is written; checked (its folder can be created and written) before any training, so
    that a bad path fails at once."""
    if out is not None:
        path, named = out / (checkpoint.name if checkpoint is not None else f"{name}.pt"), f"--out {out}"
    elif checkpoint is None:
        raise ShiftbenchError(f"{where}.checkpoint: missing; give a path to write to, or use --out DIR")
    else:
        path, named = checkpoint, f"{where}.checkpoint"
    if path.is_dir():
        raise ShiftbenchError(f"{named}: {path} is a folder; a checkpoint needs a file path")
    folder = next(p for p in path.parents if p.exists())
    if not folder.is_dir():
        raise ShiftbenchError(f"{named}: {folder} is a file, not a folder to write {path.name} into")
    _check_writable(path.parent, named, path.name)
    return path


def _check_writable(folder: Path, named: str, name: str) -> None:
    """Create ``folder`` as the save will, and write and remove a probe file in it; the folders created for the
    check are removed again, so a call that fails later leaves nothing behind."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ShiftbenchError(f"{named}: cannot write {name} into {folder} ({exc.strerror or exc}); give a folder "
                              "that can be created and written") from None
    finally:
        for p in missing:
            with contextlib.suppress(OSError):
                p.rmdir()


def _stage(suite: Any, name: str) -> Stage:
    t = suite.train
    s = getattr(t, name)
    return Stage(s.epochs, s.lr, s.weight_decay, t.batch_size, t.seed)


def data_probe(ds: Dataset, n: int = PROBE_IMAGES) -> str:
    """sha256 of the first ``n`` samples (image float32 bytes, label int64 bytes, id): recorded in a
    checkpoint, it tells whether today's data (e.g. the synthetic generator) is what it saw."""
    h = hashlib.sha256()
    for i in range(min(n, len(ds))):
        x, y, sid = ds[i]
        h.update(x.float().contiguous().numpy().tobytes())
        h.update(y.long().contiguous().numpy().tobytes())
        h.update(str(sid).encode())
    return h.hexdigest()


def _meta(suite: Any, data: Splits, kind: str, name: str, stage: Stage, splits: Sequence[str], stats: dict,
          **extra: Any) -> dict:
    return {"kind": kind, "name": name, "classes": suite.dataset.classes, "dataset": suite.dataset.name,
            "suite": suite.name, "suite_digest": suite.digest(), "seed": stage.seed, "epochs": stage.epochs,
            "lr": stage.lr, "weight_decay": stage.weight_decay, "batch_size": stage.batch_size,
            "train_splits": list(splits), "data_probe": {s: data_probe(data([s])) for s in splits}, **stats, **extra}


# ---------------------------------------------------------------------------- stages


def _segmenter(data: Splits, name: str, model: DeepLabV3Plus, pretrained: Path | None, splits: Sequence[str],
               val: Sequence[str], stage: Stage, device: torch.device, quiet: bool, where: str) -> dict:
    if pretrained is not None:
        state = read_checkpoint(pretrained, where=f"{where}.pretrained")["state_dict"]
        load_imagenet(model.backbone, state, model.backbone_name, str(pretrained))
    return train_segmenter(model, data(splits), data(val), stage, name, device, quiet)


def _gate_jobs(suite: Any, models: Sequence[Any], experts: dict[str, DeepLabV3Plus]) -> list[GateJob]:
    jobs = []
    for m in models:
        backbones = {experts[e].backbone_name for e in m.experts}
        specs = [backbone_spec(b) for b in backbones]
        if len({s.aspp for s in specs}) > 1:
            raise ShiftbenchError(f"models.{m.name}: its experts' ASPP widths differ ({', '.join(sorted(backbones))}); "
                                  "a gate needs experts with the same feature width")
        init_seed(suite.train.seed, m.name)
        size = suite.dataset.size
        grid = feature_grid(size) if size else specs[0].gate_grid
        head = MoEHead(m.gate, len(m.experts), specs[0].aspp, suite.dataset.classes, grid, m.final_conv, m.combine)
        jobs.append(GateJob(m.name, head, tuple(m.experts)))
    return jobs


def train_suite(suite: Any, only: Sequence[str] | None = None, out: Path | None = None,
                device: str | torch.device = "cpu", quiet: bool = False,
                log: Callable[[str], None] = print, workers: int = 2) -> dict[str, dict]:
    """Train the suite's experts, MC-dropout baselines and gates (or those in ``only``); write
    their checkpoints (into ``out`` when given); returns ``{name: meta}``. ``workers``
    processes render / read each split once into memory."""
    if suite.train is None:
        raise ShiftbenchError("train: missing; the suite needs a train section to train its models")
    device = torch.device(device)
    experts, models = _targets(suite, only)
    for e in experts:  # every target path before any training: a bad one fails at once, not hours later
        _target_path(e.checkpoint, e.name, out, f"experts.{e.name}")
    for m in (m for m in models if m.kind in ("mc_dropout", "moe")):
        _target_path(m.checkpoint, m.name, out, f"models.{m.name}")
    data = Splits(suite, workers)
    classes, results = suite.dataset.classes, {}
    trained: dict[str, DeepLabV3Plus] = {}
    for e in experts:
        path = _target_path(e.checkpoint, e.name, out, f"experts.{e.name}")
        init_seed(suite.train.seed, e.name)
        model = DeepLabV3Plus(e.backbone, classes, normalize=e.normalize)
        stage = _stage(suite, "experts")
        stats = _segmenter(data, e.name, model, e.pretrained, e.train, e.val, stage, device, quiet, f"experts.{e.name}")
        results[e.name] = _meta(suite, data, "expert", e.name, stage, e.train, stats, backbone=e.backbone,
                                normalize=e.normalize)
        _save(path, model.state_dict(), results[e.name])
        trained[e.name] = model
        log(f"{e.name}: wrote {path}")
    if any(m.kind == "mc_dropout" for m in models) and not suite.train.splits:
        raise ShiftbenchError("train.splits: empty; the MC-dropout baseline trains on these splits")
    for m in (m for m in models if m.kind == "mc_dropout"):
        path = _target_path(m.checkpoint, m.name, out, f"models.{m.name}")
        init_seed(suite.train.seed, m.name)
        model = DeepLabV3Plus(m.backbone, classes, dropout=m.dropout, mc_dropout=True, normalize=m.normalize)
        stage = _stage(suite, "baseline")
        stats = _segmenter(data, m.name, model, m.pretrained, suite.train.splits, suite.train.val, stage, device, quiet,
                           f"models.{m.name}")
        results[m.name] = _meta(suite, data, "mc_dropout", m.name, stage, suite.train.splits, stats,
                                backbone=m.backbone, dropout=m.dropout, passes=m.passes,
                                normalize=m.normalize)
        _save(path, model.state_dict(), results[m.name])
        log(f"{m.name}: wrote {path}")
    moes = [m for m in models if m.kind == "moe"]
    if moes:
        results.update(_train_moes(suite, data, moes, trained, out, device, quiet, log))
    return results


def _train_moes(suite: Any, data: Splits, moes: Sequence[Any], trained: dict[str, DeepLabV3Plus], out: Path | None,
                device: torch.device, quiet: bool, log: Callable[[str], None]) -> dict[str, dict]:
    if not suite.train.splits:
        raise ShiftbenchError("train.splits: empty; the gates train on these splits")
    paths = {m.name: _target_path(m.checkpoint, m.name, out, f"models.{m.name}") for m in moes}
    names = dict.fromkeys(e for m in moes for e in m.experts)
    experts = {n: trained.get(n) or load_expert(suite.experts[n], suite.dataset.classes, []) for n in names}
    digests = {n: weights_digest(e.state_dict()) for n, e in experts.items()}  # what each gate was trained on
    jobs = _gate_jobs(suite, moes, experts)
    stage = _stage(suite, "gates")
    stats = train_gates(experts, jobs, data(suite.train.splits), data(suite.train.val), stage, device, quiet)
    results = {}
    for m, job in zip(moes, jobs):
        results[m.name] = _meta(suite, data, "moe", m.name, stage, suite.train.splits, stats[m.name], gate=m.gate,
                                final_conv=m.final_conv, combine=m.combine, gate_grid=list(job.head.grid),
                                experts=list(m.experts), expert_digests=[digests[e] for e in m.experts])
        _save(paths[m.name], job.head.state_dict(), results[m.name])
        log(f"{m.name}: wrote {paths[m.name]}")
    return results
