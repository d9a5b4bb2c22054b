"""The data layer: the synthetic street scenes and the A2D2 / Cityscapes loaders.

Every dataset yields ``(image float32 [3,H,W] in [0,1], label int64 [H,W] with 255 = ignore,
sample id str)``. Submodules import torch; this module stays light.
"""

from __future__ import annotations

from typing import Any, Callable

#: dataset name -> {number of classes -> "module:attribute" holding the class names}
_CLASS_NAMES = {
    "synthetic": {11: "shiftbench.data.synthetic:CLASSES_11"},
    "a2d2": {11: "shiftbench.data.a2d2:class_names", 38: "shiftbench.data.a2d2:class_names"},
    "cityscapes": {19: "shiftbench.data.cityscapes:CLASSES_19"},
}


def class_names(dataset: str, classes: int) -> tuple[str, ...]:
    """The class names of ``dataset`` under its ``classes``-class scheme (index = class id)."""
    import importlib

    from shiftbench.errors import ShiftbenchError

    schemes = _CLASS_NAMES.get(dataset)
    if schemes is None:
        raise ShiftbenchError(f"dataset {dataset!r} is not one of {', '.join(_CLASS_NAMES)}")
    if classes not in schemes:
        raise ShiftbenchError(f"{dataset} has no {classes}-class scheme; allowed: {', '.join(map(str, schemes))}")
    module, attr = schemes[classes].split(":")
    value = getattr(importlib.import_module(module), attr)
    return tuple(value(classes) if callable(value) else value)


def _synthetic(spec: Any, split: str):
    from shiftbench.data.synthetic import SyntheticStreetScenes, check_split
    from shiftbench.errors import ShiftbenchError

    domain, _, part = split.rpartition("_")
    if not domain:
        raise ShiftbenchError(f"synthetic split {split!r} is not <domain>_<part>, e.g. highway_test")
    check_split(domain, part)
    return SyntheticStreetScenes(domain, part, spec.count[part], seed=spec.seed, size=tuple(spec.size or (128, 256)))


def _a2d2(spec: Any, split: str):
    from pathlib import Path

    from shiftbench.data.a2d2 import A2D2Dataset, read_split

    pairs = read_split(Path(spec.split_dir) / f"{split}_gt.txt", spec.root)
    return A2D2Dataset(pairs, root=spec.root, classes=spec.classes, size=spec.size,
                       labels=spec.labels)


def _cityscapes(spec: Any, split: str):
    from shiftbench.data.cityscapes import CityscapesDataset

    return CityscapesDataset(spec.root, split, size=spec.size)


#: dataset name -> opener(dataset spec, split name) -> torch Dataset
OPENERS: dict[str, Callable[[Any, str], Any]] = {"synthetic": _synthetic, "a2d2": _a2d2, "cityscapes": _cityscapes}


def open_split(suite: Any, split: str):
    """The torch Dataset of split ``split`` of a suite's dataset (``suite.dataset`` or the spec itself):
    synthetic ``<domain>_<part>``, A2D2 ``<split_dir>/<split>_gt.txt``, Cityscapes ``train|val|test``."""
    from shiftbench.errors import ShiftbenchError

    spec = getattr(suite, "dataset", suite)
    if not isinstance(split, str):
        raise ShiftbenchError(f"split must be a split name (str), e.g. highway_test; got {split!r}")
    if spec.name not in OPENERS:
        raise ShiftbenchError(f"dataset {spec.name!r} is not one of {', '.join(OPENERS)}")
    return OPENERS[spec.name](spec, split)
