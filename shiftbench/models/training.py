"""Training loops: a DeepLabv3+ on its data (experts, the MC-dropout baseline), gates on frozen experts.

Seeded and deterministic on CPU: the initial weights, the batch order, the flips and the
training dropout all come from ``torch`` generators seeded with
``shiftbench.seeding.key(seed, <stage>, <name>, ...)``.

- Segmenters: SGD (momentum 0.9, Nesterov) with the poly schedule lr * (1 - i/N)^0.9
  (DeepLabv3+'s), cross-entropy ignoring label 255, random horizontal flips.
- Gates: Adam on the gate (+ final conv) only, negative log-likelihood of the combined output on
  a random window of each batch (:func:`loss_window`; the gate itself sees the whole image);
  the experts run once per batch, in eval mode and without gradients, for all gates at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from shiftbench.errors import ShiftbenchError
from shiftbench.models.deeplab import DeepLabV3Plus
from shiftbench.models.moe import MoEHead
from shiftbench.seeding import key

IGNORE = 255
POLY_POWER = 0.9
MOMENTUM = 0.9
GATE_LOSS_WINDOW = 0.5  # the gates' loss sees a random half-height, half-width window per batch
FINAL_CONV_MARGIN = 1   # the final 3x3 conv's reach


@dataclass(frozen=True)
class Stage:
    """One training stage's settings (the suite's ``train.experts`` / ``baseline`` / ``gates``)."""

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    seed: int


# ---------------------------------------------------------------------------- metrics


def confusion_matrix(pred: Tensor, label: Tensor, classes: int) -> Tensor:
    """int64 ``[K,K]``, rows = label, columns = prediction, pixels labelled 255 skipped."""
    valid = label != IGNORE
    idx = label[valid] * classes + pred[valid]
    return torch.bincount(idx, minlength=classes * classes).view(classes, classes)


def miou(conf: Tensor) -> float:
    """mean over classes with a non-empty union of IoU_k = TP_k / (TP_k + FP_k + FN_k)."""
    tp = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if bool(present.any()) else float("nan")


# ---------------------------------------------------------------------------- data


class InMemory(Dataset):
    """A dataset rendered once and held in memory: images as uint8 when that is lossless
    (x == round(255 x) / 255, as for 8-bit renders), else float32; labels as uint8 when <= 255."""

    def __init__(self, ds: Dataset, workers: int = 0):
        xs, ys, self.ids = [], [], []
        for x, y, ids in DataLoader(ds, batch_size=32, num_workers=workers):
            q = (x * 255).round()
            xs.append(q.to(torch.uint8) if torch.equal(q / 255, x) else x)
            ys.append(y.to(torch.uint8) if int(y.max()) <= 255 and int(y.min()) >= 0 else y)
            self.ids += list(ids)
        lossless = all(x.dtype == torch.uint8 for x in xs)
        self.x = torch.cat(xs if lossless else [x.float() / 255 if x.dtype == torch.uint8 else x for x in xs])
        self.y = torch.cat(ys if all(y.dtype == torch.uint8 for y in ys) else [y.long() for y in ys])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, str]:
        x = self.x[i]
        return (x.float() / 255 if x.dtype == torch.uint8 else x), self.y[i].long(), self.ids[i]


def _loader(ds: Dataset, batch_size: int, seed: int, shuffle: bool) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=g, num_workers=0)


def _flip(x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Flip each sample horizontally with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x, y = x.clone(), y.clone()
    x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
    return x, y


@torch.no_grad()
def evaluate(predict: Callable[[Tensor], Tensor], ds: Dataset, classes: int, batch_size: int,
             device: torch.device) -> float:
    """mIoU of ``predict(x) -> [B,K,H,W]`` scores (argmax) on ``ds``."""
    conf = torch.zeros(classes, classes, dtype=torch.int64, device=device)
    for x, y, _ in _loader(ds, batch_size, 0, shuffle=False):
        y = y.to(device)
        conf += confusion_matrix(predict(x.to(device)).argmax(1), y, classes)
    return miou(conf.cpu())


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, leave=True, dynamic_ncols=True)


# ---------------------------------------------------------------------------- segmenters


def _steps(loader: DataLoader, stage: Stage, name: str) -> int:
    """Optimiser steps of a training stage (full batches only); a split too small for one batch is refused."""
    if len(loader) == 0:
        n = len(loader.dataset)  # type: ignore[arg-type]
        raise ShiftbenchError(f"{name}: {n} training image(s) make no full batch of {stage.batch_size}; "
                              f"give train.batch_size <= {n} or more training images")
    return stage.epochs * len(loader)


def init_seed(seed: int, name: str) -> None:
    """Seed the global RNG before building model ``name`` (its initial weights)."""
    torch.manual_seed(key(seed, "init", name))


def train_segmenter(model: DeepLabV3Plus, train: Dataset, val: Dataset | None, stage: Stage, name: str,
                    device: torch.device, quiet: bool = False) -> dict:
    """Train ``model`` in place; returns ``{"val_miou": [per epoch], "seconds": ...}``."""
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=stage.lr, momentum=MOMENTUM, nesterov=True,
                          weight_decay=stage.weight_decay)
    loader = _loader(train, stage.batch_size, key(stage.seed, "order", name), shuffle=True)
    steps = _steps(loader, stage, name)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (1 - i / steps) ** POLY_POWER)
    flips = torch.Generator().manual_seed(key(stage.seed, "flip", name))
    torch.manual_seed(key(stage.seed, "dropout", name))
    history: list[float] = []
    start = time.perf_counter()
    with _progress(steps, name, quiet) as bar:
        for _ in range(stage.epochs):
            model.train()
            for x, y, _ in loader:
                x, y = _flip(x, y, flips)
                loss = F.cross_entropy(model(x.to(device)), y.to(device), ignore_index=IGNORE)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", val_mIoU=f"{history[-1]:.3f}" if history else "-")
            if val is not None:
                model.eval()
                history.append(evaluate(model, val, model.classes, stage.batch_size, device))
                bar.set_postfix(loss=f"{loss.item():.3f}", val_mIoU=f"{history[-1]:.3f}")
    model.eval()
    return {"val_miou": history, "seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------------------- gates


@dataclass
class GateJob:
    """One MoE head to train on the named experts (in the head's expert order)."""

    name: str
    head: MoEHead
    experts: tuple[str, ...]


def _expert_passes(experts: dict[str, DeepLabV3Plus], names: Iterable[str], x: Tensor
                   ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    feats, logits = {}, {}
    with torch.no_grad():
        for n in names:
            feats[n], logits[n] = experts[n].forward_features(x)
    return feats, logits


def loss_window(size: Sequence[int], g: torch.Generator, fraction: float = GATE_LOSS_WINDOW,
                margin: int = FINAL_CONV_MARGIN) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """A random window of ``fraction`` of the height and width, for the gates' loss.

    Returns (outer, inner): ``outer`` adds ``margin`` pixels on every side (clipped at the image
    border), ``inner`` selects the window inside ``outer``. The MoE output on ``outer`` is exact
    on ``inner`` (the final 3x3 conv sees its true neighbours; at the border both pad with zeros),
    so the loss only subsamples pixels, 1/fraction^2 fewer for the combination and final conv.
    """
    (h, w), out, ins = size, [], []
    for n in (h, w):
        k = max(1, round(n * fraction))
        a = int(torch.randint(0, n - k + 1, (1,), generator=g))
        lo, hi = max(a - margin, 0), min(a + k + margin, n)
        out.append(slice(lo, hi))
        ins.append(slice(a - lo, a - lo + k))
    return (out[0], out[1]), (ins[0], ins[1])


def train_gates(experts: dict[str, DeepLabV3Plus], jobs: Sequence[GateJob], train: Dataset,
                val: Dataset | None, stage: Stage, device: torch.device, quiet: bool = False) -> dict[str, dict]:
    """Train every job's head on frozen experts (eval mode, no grad), sharing one expert pass per
    batch among all heads; returns ``{name: {"val_miou": [...], "seconds": ...}}``."""
    for e in experts.values():
        e.to(device).eval().requires_grad_(False)
    used = list(dict.fromkeys(n for j in jobs for n in j.experts))
    opts = {}
    for j in jobs:
        j.head.to(device).train()
        opts[j.name] = torch.optim.Adam(j.head.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
    loader = _loader(train, stage.batch_size, key(stage.seed, "order", "gates"), shuffle=True)
    steps = _steps(loader, stage, "gates")
    scheds = {n: torch.optim.lr_scheduler.LambdaLR(o, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
              for n, o in opts.items()}
    flips = torch.Generator().manual_seed(key(stage.seed, "flip", "gates"))
    windows = torch.Generator().manual_seed(key(stage.seed, "window", "gates"))
    history: dict[str, list[float]] = {j.name: [] for j in jobs}
    start = time.perf_counter()
    with _progress(steps, "gates: " + ", ".join(j.name for j in jobs), quiet) as bar:
        for _ in range(stage.epochs):
            for x, y, _ in loader:
                x, y = _flip(x, y, flips)
                feats, logits = _expert_passes(experts, used, x.to(device))
                outer, inner = loss_window(y.shape[-2:], windows)
                y = y[(..., *outer)][(..., *inner)].to(device)
                stacks: dict[tuple[str, ...], Tensor] = {}
                losses = {}
                for j in jobs:
                    if j.experts not in stacks:
                        stacks[j.experts] = torch.stack([logits[n][(..., *outer)] for n in j.experts])
                    log_p, _ = j.head([feats[n] for n in j.experts], stacks[j.experts])
                    loss = F.nll_loss(log_p[(..., *inner)], y, ignore_index=IGNORE)
                    opts[j.name].zero_grad(set_to_none=True)
                    loss.backward()
                    opts[j.name].step()
                    scheds[j.name].step()
                    losses[j.name] = loss.item()
                bar.update()
                bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.3f}")
            if val is not None:
                for name, score in _validate_gates(experts, jobs, val, stage.batch_size, device).items():
                    history[name].append(score)
                bar.set_postfix(val_mIoU=" ".join(f"{h[-1]:.3f}" for h in history.values()))
    for j in jobs:
        j.head.eval()
    secs = round(time.perf_counter() - start, 1)
    return {j.name: {"val_miou": history[j.name], "seconds": secs} for j in jobs}


@torch.no_grad()
def _validate_gates(experts: dict[str, DeepLabV3Plus], jobs: Sequence[GateJob], val: Dataset, batch_size: int,
                    device: torch.device) -> dict[str, float]:
    used = list(dict.fromkeys(n for j in jobs for n in j.experts))
    classes = next(iter(experts.values())).classes
    confs = {j.name: torch.zeros(classes, classes, dtype=torch.int64, device=device) for j in jobs}
    for j in jobs:
        j.head.eval()
    for x, y, _ in _loader(val, batch_size, 0, shuffle=False):
        feats, logits = _expert_passes(experts, used, x.to(device))
        for j in jobs:
            log_p, _ = j.head([feats[n] for n in j.experts], torch.stack([logits[n] for n in j.experts]))
            confs[j.name] += confusion_matrix(log_p.argmax(1), y.to(device), classes)
    for j in jobs:
        j.head.train()
    return {n: miou(c.cpu()) for n, c in confs.items()}

