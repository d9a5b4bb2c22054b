"""A2D2 semantic segmentation (``camera_lidar_semantic``): split lists, colour labels, Dataset.

Layout of the dataset root::

    class_list.json                                  {"#rrggbb": "Name N", ...}
    <scene>/camera/cam_front_center/<ts>_camera_frontcenter_<id>.png
    <scene>/label/cam_front_center/<ts>_label_frontcenter_<id>.png   (RGB, one colour per class)

with ``<scene>`` = ``20181108_084007`` and ``<ts>`` = ``20181108084007``. Split lists (the
mixture-of-experts authors' ``<domain>_<split>_gt.txt``) name one label per line, e.g.
``highway/test/GT/20181108084007_label_frontcenter_000041947.png``; only the file name is
used to find the pair in the dataset root.

Labels (:data:`LABELS`): ``official``: every colour of ``class_list.json`` maps to its category by
name ("Car 1".."Car 4" -> "Car"), giving the 38 official categories, optionally grouped into the 11
of :data:`CLASSES_11`; a colour that matches no entry becomes 255 (ignore), never class 0.
``authors`` (38 classes only): as the mixture-of-experts authors' loader decodes them, to score their
checkpoints on the ground truth they were trained on: only each category's first instance colour
("Car 1", "Bicycle 1", ..., or the category's only colour) maps to the category; every other colour,
known or not, becomes class 0 (Car).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from shiftbench.data._io import check_size, read_png, to_sample
from shiftbench.errors import ShiftbenchError, file_error

IGNORE_INDEX = 255
SCHEMES = (38, 11)
LABELS = ("official", "authors")
CLASS_FILE = Path(__file__).with_name("a2d2_classes.yaml")
_LABEL_NAME = re.compile(r"^(\d{8})(\d{6})_label_frontcenter_(\d+)\.png$")
_INSTANCE = re.compile(r"\s+(\d+)$")  # "Car 1" -> "Car"


@dataclass(frozen=True)
class A2D2Classes:
    categories_38: tuple[str, ...]
    categories_11: tuple[str, ...]
    to_11: np.ndarray                          # uint8 [256]: 38-class id -> 11-class id (255 stays 255)
    export_11: tuple[tuple[str, str], ...]     # per 11-class: (class_list name, "#rrggbb")


@functools.lru_cache(maxsize=1)
def classes() -> A2D2Classes:
    """The class data of ``a2d2_classes.yaml``: 38 categories, 11 categories, grouping, export colours."""
    spec = yaml.safe_load(CLASS_FILE.read_text(encoding="utf-8"))
    c38, c11 = tuple(spec["categories_38"]), tuple(spec["categories_11"])
    to_11 = np.full(256, IGNORE_INDEX, np.uint8)
    for i, name in enumerate(c38):
        target = spec["map_38_to_11"][name]
        if target is not None:
            to_11[i] = c11.index(target)
    export = tuple(tuple(spec["export_11"][name]) for name in c11)
    return A2D2Classes(c38, c11, to_11, export)


def category_of(name: str) -> str:
    """The category of a class_list.json name: the name without its instance number."""
    return _INSTANCE.sub("", name.strip())


def class_names(scheme: int = 11) -> tuple[str, ...]:
    _check_scheme(scheme)
    c = classes()
    return c.categories_38 if scheme == 38 else c.categories_11


def _check_scheme(scheme) -> None:
    if scheme not in SCHEMES:
        raise ShiftbenchError(f"A2D2 classes {scheme!r} is not one of 38, 11")


# ------------------------------------------------------------------------------------ colours


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 [3,H,W] -> int32 [H,W] = R << 16 | G << 8 | B."""
    rgb = rgb.astype(np.int32)
    return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]


class ColourTable:
    """The colours of a class_list.json and the 38-class id of each; decodes colour labels with
    one 2^24-entry lookup table per (scheme, labels) (16 MiB, built on first use, not pickled)."""

    def __init__(self, keys: np.ndarray, ids: np.ndarray, first: np.ndarray | None = None):
        self.keys = keys   # int32 [n]: packed colours
        self.ids = ids     # uint8 [n]: their 38-class ids
        self.first = np.ones(len(keys), bool) if first is None else first  # bool [n]: a category's first colour
        self._luts: dict[tuple[int, str], np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {"keys": self.keys, "ids": self.ids, "first": self.first, "_luts": {}}

    def lut(self, scheme: int, labels: str = "official") -> np.ndarray:
        """uint8 [2^24]: packed colour -> class id under ``scheme`` and ``labels`` (module docstring)."""
        if (scheme, labels) not in self._luts:
            if labels == "official":
                lut = np.full(1 << 24, IGNORE_INDEX, np.uint8)
                lut[self.keys] = self.ids if scheme == 38 else classes().to_11[self.ids]
            else:
                _check_labels(scheme, labels)
                lut = np.zeros(1 << 24, np.uint8)
                lut[self.keys[self.first]] = self.ids[self.first]
            self._luts[scheme, labels] = lut
        return self._luts[scheme, labels]

    def decode(self, rgb: np.ndarray, scheme: int = 11, labels: str = "official") -> np.ndarray:
        """uint8 colour label [3,H,W] -> uint8 class ids [H,W]; unknown colours -> 255 (``authors``: 0)."""
        return self.lut(scheme, labels).take(pack_rgb(rgb))


def _check_labels(scheme: int, labels: str) -> None:
    if labels not in LABELS:
        raise ShiftbenchError(f"A2D2 labels {labels!r} is not one of {', '.join(LABELS)}")
    if labels == "authors" and scheme != 38:
        raise ShiftbenchError(f"A2D2 labels 'authors' needs classes 38, got {scheme} "
                              "(the authors' loader decodes to the 38 categories only)")


def read_class_list(root: str | os.PathLike) -> ColourTable:
    """``<root>/class_list.json`` as a :class:`ColourTable` of 38-class ids."""
    path = Path(root) / "class_list.json"
    if not path.is_file():
        raise ShiftbenchError(f"{path}: no such file; the A2D2 root must hold the dataset's class_list.json")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShiftbenchError(f"{path}: not readable JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(table, dict) or not table:
        raise ShiftbenchError(f"{path}: expected a non-empty mapping {{\"#rrggbb\": \"Name N\"}}")
    index = {name: i for i, name in enumerate(classes().categories_38)}
    keys, ids, first = [], [], []
    for colour, name in table.items():
        if not (isinstance(colour, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", colour)):
            raise ShiftbenchError(f"{path}: key {colour!r} is not a colour #rrggbb")
        category = category_of(name) if isinstance(name, str) else None
        if category not in index:
            raise ShiftbenchError(f"{path}: {colour}: {name!r} is not one of the 38 A2D2 categories "
                                  "(optionally followed by an instance number)")
        keys.append(int(colour[1:], 16))
        ids.append(index[category])
        number = _INSTANCE.search(name.strip())
        first.append(number is None or int(number.group(1)) == 1)
    return ColourTable(np.asarray(keys, np.int32), np.asarray(ids, np.uint8), np.asarray(first, bool))


# ------------------------------------------------------------------------------------ split lists


def frame_paths(root: str | os.PathLike, ts: str, frame: str) -> tuple[Path, Path]:
    """(image, label) paths of frame ``frame`` of the scene with 14-digit timestamp ``ts``."""
    scene = f"{os.fspath(root)}/{ts[:8]}_{ts[8:]}"
    return (Path(f"{scene}/camera/cam_front_center/{ts}_camera_frontcenter_{frame}.png"),
            Path(f"{scene}/label/cam_front_center/{ts}_label_frontcenter_{frame}.png"))


def read_split(list_file: str | os.PathLike, root: str | os.PathLike) -> list[tuple[Path, Path]]:
    """The (image path, label path) pairs of a split list, resolved under the dataset root.

    Each line names a label file ``<ts>_label_frontcenter_<id>.png`` (any folders before it are
    the list's own bookkeeping, e.g. ``highway/test/GT/``); blank lines are skipped.
    """
    root, list_file = Path(root), Path(list_file)
    if not root.is_dir():
        raise ShiftbenchError(f"A2D2 root {root}: no such folder (the camera_lidar_semantic folder of A2D2)")
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ShiftbenchError(f"{list_file}: no such split list") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ShiftbenchError(f"{list_file}: unreadable split list ({' '.join(str(exc).split())})") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        match = _LABEL_NAME.match(line.rsplit("/", 1)[-1])
        if match is None:
            raise ShiftbenchError(f"{list_file}:{number}: {line[:80]!r} does not name a label file "
                                  "<yyyymmddhhmmss>_label_frontcenter_<id>.png")
        date, time, frame = match.groups()
        pairs.append(frame_paths(root, date + time, frame))
    if not pairs:
        raise ShiftbenchError(f"{list_file}: empty split list, expected one label path per line")
    return pairs


# ------------------------------------------------------------------------------------ dataset


class A2D2Dataset(Dataset):
    """A2D2 frames: (image float32 [3,H,W] in [0,1], label int64 [H,W] with 255 = ignore,
    sample id ``"<scene>/<frame id>"``).

    ``pairs`` are (image, label) paths, e.g. from :func:`read_split`; ``root`` holds
    ``class_list.json``; ``classes`` is 38 or 11; ``size`` (H, W) resizes both (bilinear
    image, nearest label); ``labels`` one of :data:`LABELS` (module docstring).
    """

    def __init__(self, pairs: list[tuple[Path, Path]], root: str | os.PathLike, classes: int = 11,
                 size: tuple[int, int] | None = None, labels: str = "official"):
        _check_scheme(classes)
        _check_labels(classes, labels)
        self.labels = labels
        self.root = Path(root)
        if not self.root.is_dir():
            raise ShiftbenchError(f"A2D2 root {self.root}: no such folder (the camera_lidar_semantic folder of A2D2)")
        self.pairs = [(Path(i), Path(l)) for i, l in pairs]
        if not self.pairs:
            raise ShiftbenchError(f"A2D2 dataset under {self.root}: no (image, label) pairs given")
        self.scheme = classes
        self.size = check_size(size)
        self.table = read_class_list(self.root)

    def __len__(self) -> int:
        return len(self.pairs)

    def sample_id(self, index: int) -> str:
        image = self.pairs[index][0]
        ts, _, frame = image.stem.partition("_camera_frontcenter_")
        return f"{ts[:8]}_{ts[8:]}/{frame}" if frame else image.stem

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image_path, label_path = self.pairs[index]
        image = read_png(image_path, "rgb")
        colours = read_png(label_path, "rgb")
        if image.shape[1:] != colours.shape[1:]:
            raise file_error(label_path, f"label is {colours.shape[2]}x{colours.shape[1]} but its image "
                             f"{image_path.name} is {image.shape[2]}x{image.shape[1]} (W x H)")
        x, y = to_sample(image, self.table.decode(colours, self.scheme, self.labels), self.size)
        return x, y, self.sample_id(index)
