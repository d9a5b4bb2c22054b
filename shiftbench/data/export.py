"""Write synthetic street scenes in the on-disk formats of A2D2 and Cityscapes.

Every (domain, split) of :data:`shiftbench.data.synthetic.SPLITS` gets ``count`` scenes.

- ``a2d2``: one scene folder per (domain, split), e.g. ``20190101_100000`` for highway/train,
  camera and RGB label PNGs named as in A2D2, ``class_list.json`` with the 11 export colours
  of ``a2d2_classes.yaml`` at the root, and split lists ``split/<domain>_<split>_gt.txt`` (plus
  ``split/all_<split>_gt.txt`` = highway + urban) in the line format of the authors' lists.
- ``cityscapes``: ``leftImg8bit/<split>/<city>/<city>_<seq>_<index>_leftImg8bit.png`` and
  ``gtFine/.../*_gtFine_labelIds.png`` with the domain as the city and the split as the sequence
  (000000 train, 000001 val, 000002 test), so that no two frames share a name, as in Cityscapes.
  Each 11-class category is written as one official labelId; Cityscapes has no lane-marking class, so Lanes are written
  as road (labelId 7) and load back as ``road``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from shiftbench.data import a2d2, cityscapes
from shiftbench.data._io import write_png
from shiftbench.data.synthetic import DEFAULT_SIZE, DOMAINS, SPLITS, check_scene_size, check_split, render
from shiftbench.errors import ShiftbenchError, is_int
from shiftbench.io import write_json, write_text

SPLIT_ORDER = ("train", "val", "test")
#: folder of a split in the authors' list lines: highway/train_val/GT/..., highway/test/GT/...
LIST_FOLDER = {"train": "train_val", "val": "train_val", "test": "test"}
#: Cityscapes labelId written for each 11-class category (Person, Car, Truck, Drivable,
#: Nondrivable, Blocker, Info, Sky, Buildings, Nature, Lanes); Lanes -> road: no such class.
CITYSCAPES_LABEL_ID_11 = (24, 26, 27, 7, 8, 17, 20, 23, 11, 21, 7)
CITYSCAPES_UNLABELED = 0


def scene_timestamp(domain: str, split: str) -> str:
    """The 14-digit A2D2 timestamp of the scene holding one (domain, split): 2019-01-<d> <10+s>:00:00."""
    return f"201901{DOMAINS.index(domain) + 1:02d}{10 + SPLIT_ORDER.index(split):02d}0000"


def _lut(values: dict[int, tuple[int, ...] | int], default, channels: int) -> np.ndarray:
    """uint8 [channels, 256] lookup table: label value -> written value."""
    lut = np.empty((channels, 256), np.uint8)
    lut[:] = np.asarray(default, np.uint8).reshape(channels, 1)
    for k, v in values.items():
        lut[:, k] = v
    return lut


class A2D2Writer:
    """Scenes -> A2D2 ``camera_lidar_semantic`` layout under ``out``."""

    def __init__(self, out: Path):
        self.out = out
        export = a2d2.classes().export_11
        colours = {i: tuple(int(hex_[k:k + 2], 16) for k in (1, 3, 5)) for i, (_, hex_) in enumerate(export)}
        self.lut = _lut(colours, (0, 0, 0), 3)   # ignore / unknown -> black, not an A2D2 colour
        write_json(out / "class_list.json", {hex_: name for name, hex_ in export})
        self.lines: dict[tuple[str, str], list[str]] = {}

    def write(self, domain: str, split: str, index: int, image: np.ndarray, label: np.ndarray) -> None:
        ts = scene_timestamp(domain, split)
        image_path, label_path = a2d2.frame_paths(self.out, ts, f"{index:09d}")
        write_png(image_path, image)
        write_png(label_path, self.lut[:, label])
        self.lines.setdefault((domain, split), []).append(f"{domain}/{LIST_FOLDER[split]}/GT/{label_path.name}")

    def finish(self) -> None:
        lists = {f"{d}_{s}": lines for (d, s), lines in self.lines.items()}
        for split in SPLIT_ORDER:
            both = [line for d in ("highway", "urban") for line in self.lines.get((d, split), [])]
            if both:
                lists[f"all_{split}"] = both
        for name, lines in lists.items():
            write_text(self.out / "split" / f"{name}_gt.txt", "\n".join(lines) + "\n")


class CityscapesWriter:
    """Scenes -> Cityscapes ``leftImg8bit`` / ``gtFine`` layout under ``out``, the domain as the city."""

    def __init__(self, out: Path):
        self.out = out
        self.lut = _lut(dict(enumerate(CITYSCAPES_LABEL_ID_11)), CITYSCAPES_UNLABELED, 1)

    def write(self, domain: str, split: str, index: int, image: np.ndarray, label: np.ndarray) -> None:
        frame = f"{domain}_{SPLIT_ORDER.index(split):06d}_{index:06d}"  # the split as the sequence: unique names
        image_path, label_path = cityscapes.frame_paths(self.out, split, domain, frame)
        write_png(image_path, image)
        write_png(label_path, self.lut[0][label])

    def finish(self) -> None:
        pass


#: format name -> writer class
EXPORTERS: dict[str, Callable[[Path], A2D2Writer | CityscapesWriter]] = {
    "a2d2": A2D2Writer, "cityscapes": CityscapesWriter}


def export(fmt: str, out: str | os.PathLike, domains: tuple[str, ...] = DOMAINS, count: int = 32, seed: int = 0,
           size: tuple[int, int] = DEFAULT_SIZE, progress: bool = True) -> int:
    """Write ``count`` synthetic scenes per (domain, split) in format ``fmt``; returns the number written."""
    if fmt not in EXPORTERS:
        raise ShiftbenchError(f"format {fmt!r} is not one of {', '.join(EXPORTERS)}")
    for d in domains:
        check_split(d, SPLITS.get(d, ("test",))[0])
    if not is_int(count) or count < 1:
        raise ShiftbenchError(f"count {count!r} is not a positive integer")
    if not is_int(seed):
        raise ShiftbenchError(f"seed {seed!r} is not an integer")
    count, seed = int(count), int(seed)
    size = check_scene_size(size)  # every check before the writer creates anything
    if not os.fspath(out):
        raise ShiftbenchError("output folder: empty path; give the folder to write the tree into")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ShiftbenchError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):  # another export's files would mix with this one's
        raise ShiftbenchError(f"{out}: exists and is not empty; write the tree into a new or empty folder")
    jobs = [(d, s, i) for d in domains for s in SPLITS[d] for i in range(count)]
    from tqdm import tqdm

    writer = EXPORTERS[fmt](out)
    for domain, split, index in tqdm(jobs, desc=f"{fmt} -> {out}", unit="img", disable=not progress):
        image, label = render(domain, index, seed, size, split)
        writer.write(domain, split, index, image, label)
    writer.finish()
    return len(jobs)
