"""Cityscapes (``leftImg8bit`` + ``gtFine``): official labelId -> 19 trainIds, Dataset.

Layout of the dataset root::

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png      (one byte per pixel)

Labels use the official 19 training classes; every other labelId becomes 255 (ignore).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from shiftbench.data._io import check_size, read_png, to_sample
from shiftbench.errors import ShiftbenchError, file_error

IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")
#: the 19 training classes, in trainId order
CLASSES_19 = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
              "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
              "bicycle")
#: official labelId of each trainId (cityscapesScripts labels.py)
LABEL_IDS_19 = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
TRAIN_ID = np.full(256, IGNORE_INDEX, np.uint8)
TRAIN_ID[list(LABEL_IDS_19)] = np.arange(19, dtype=np.uint8)
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def frame_paths(root: str | os.PathLike, split: str, city: str, stem: str) -> tuple[Path, Path]:
    """(image, label) paths of frame ``<city>_<seq>_<frame>`` (``stem``) in ``split``."""
    root = Path(root)
    return (root / "leftImg8bit" / split / city / f"{stem}{IMAGE_SUFFIX}",
            root / "gtFine" / split / city / f"{stem}{LABEL_SUFFIX}")


def list_frames(root: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """All (image, label) pairs of a split, sorted by city and frame."""
    root = Path(root)
    if split not in SPLITS:
        raise ShiftbenchError(f"Cityscapes split {split!r} is not one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise ShiftbenchError(f"Cityscapes root {root}: no such folder (it holds leftImg8bit/ and gtFine/)")
    images = root / "leftImg8bit" / split
    if not images.is_dir():
        raise ShiftbenchError(f"{images}: no such folder; the Cityscapes root must hold leftImg8bit/{split}/<city>/")
    pairs = [frame_paths(root, split, p.parent.name, p.name[: -len(IMAGE_SUFFIX)])
             for p in sorted(images.glob(f"*/*{IMAGE_SUFFIX}"))]
    if not pairs:
        raise ShiftbenchError(f"{images}: no <city>/*{IMAGE_SUFFIX} images")
    return pairs


class CityscapesDataset(Dataset):
    """Cityscapes frames of one split: (image float32 [3,H,W] in [0,1], label int64 [H,W] with the
    19 trainIds and 255 = ignore, sample id ``"<city>/<city>_<seq>_<frame>"``).
    ``size`` (H, W) resizes both (bilinear image, nearest label)."""

    def __init__(self, root: str | os.PathLike, split: str, size: tuple[int, int] | None = None):
        self.root, self.split = Path(root), split
        self.size = check_size(size)
        self.pairs = list_frames(self.root, split)

    def __len__(self) -> int:
        return len(self.pairs)

    def sample_id(self, index: int) -> str:
        image = self.pairs[index][0]
        return f"{image.parent.name}/{image.name[: -len(IMAGE_SUFFIX)]}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image_path, label_path = self.pairs[index]
        image = read_png(image_path, "rgb")
        label_ids = read_png(label_path, "ids")[0]
        if image.shape[1:] != label_ids.shape:
            raise file_error(label_path, f"label is {label_ids.shape[1]}x{label_ids.shape[0]} but its image "
                             f"{image_path.name} is {image.shape[2]}x{image.shape[1]} (W x H)")
        x, y = to_sample(image, TRAIN_ID[label_ids], self.size)
        return x, y, self.sample_id(index)
