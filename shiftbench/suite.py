"""Suite files: YAML, validated into frozen dataclasses.

Every error is one line that names the field path, what was given and what is allowed,
e.g. ``models[2].gate: 'clas' is not one of simple, classwise``. Paths in a suite are
relative to the suite file's folder; ``${VAR}`` expands environment variables.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from shiftbench.errors import MAX_SIDE, ShiftbenchError, file_problem, is_unit_range

DATASETS = ("synthetic", "a2d2", "cityscapes")
CLASSES = {"synthetic": (11,), "a2d2": (38, 11), "cityscapes": (19,)}
BACKBONES = ("tiny", "resnet18", "resnet50", "resnet101")
MODEL_KINDS = ("mc_dropout", "ensemble", "moe", "expert", "custom")
GATES = ("simple", "classwise")
COMBINE = ("probs", "logits")
NORMALIZE = ("imagenet", "none")  # shiftbench.models.deeplab.NORMALIZATIONS
A2D2_LABELS = ("official", "authors")  # shiftbench.data.a2d2.LABELS
DEVICES = ("auto", "cpu", "cuda")
CONFIDENCE = ("uncertainty", "probability")
AVERAGE = ("pixels", "images")
#: upper bounds that keep the states and curves.parquet small (a grid step of 1e-4; ECE is usually on 10-20 bins)
MAX_THRESHOLDS, MAX_BINS = 10001, 1000
MAX_WORKERS = 64  # DataLoader processes per rank
SYNTHETIC_SPLITS = {"highway": ("train", "val", "test"), "urban": ("train", "val", "test"), "ambiguous": ("test",)}

#: estimators evaluated when a model does not list its own
DEFAULT_ESTIMATORS: dict[str, tuple[str, ...]] = {
    "mc_dropout": ("predictive_entropy", "mutual_information"),
    "ensemble": ("predictive_entropy", "mutual_information"),
    "moe": ("predictive_entropy_stacked", "predictive_entropy_weighted", "mutual_information_stacked",
            "mutual_information_weighted", "expert_variance", "gate_entropy"),
    "moe_classwise": ("predictive_entropy_stacked", "mutual_information_stacked", "expert_variance", "gate_entropy"),
    "expert": ("softmax_entropy", "one_minus_max_prob"),
    "custom": ("softmax_entropy", "one_minus_max_prob"),
}

#: where the data of each real dataset comes from (said when it is missing)
DATA_SOURCES = {
    "a2d2": "A2D2 semantic segmentation (camera_lidar_semantic) from https://www.a2d2.audi/ ; split lists from "
            "https://github.com/KASTEL-MobilityLab/mixtures-of-experts",
    "cityscapes": "Cityscapes leftImg8bit + gtFine from https://www.cityscapes-dataset.com/",
}


class SuiteError(ShiftbenchError):
    """A suite file that does not validate."""


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    size: tuple[int, int] | None
    classes: int
    seed: int
    count: dict[str, int]
    root: Path | None
    split_dir: Path | None
    eval: dict[str, tuple[str, ...]]
    labels: str = "official"


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    backbone: str
    checkpoint: Path | None
    train: tuple[str, ...]
    val: tuple[str, ...]
    pretrained: Path | None = None
    normalize: str = "imagenet"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str
    estimators: tuple[str, ...]
    checkpoint: Path | None = None
    backbone: str | None = None
    pretrained: Path | None = None
    dropout: float = 0.1
    passes: int = 2
    normalize: str = "imagenet"
    experts: tuple[str, ...] = ()
    gate: str | None = None
    final_conv: bool = False
    combine: str = "probs"
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    epochs: int
    lr: float
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class TrainSpec:
    seed: int
    batch_size: int
    splits: tuple[str, ...]
    val: tuple[str, ...]
    experts: StageSpec
    baseline: StageSpec
    gates: StageSpec


@dataclass(frozen=True)
class CorruptionSpec:
    names: tuple[str, ...]
    severities: tuple[int, ...]
    clean: bool
    splits: tuple[str, ...]


@dataclass(frozen=True)
class MetricsSpec:
    n_bins: int = 15
    patch_size: int = 4
    accuracy_threshold: float = 0.5
    thresholds: int = 101
    threshold_range: tuple[float, float] = (0.0, 1.0)
    calibration_confidence: str = "uncertainty"
    calibration_average: str = "pixels"
    gallery: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunSpec:
    device: str = "auto"
    batch_size: int = 8
    amp: bool = False
    seed: int = 0
    out: Path = Path("runs/suite")
    limit: int | None = None
    workers: int | str = "auto"
    cache: float | str = "auto"
    exact: bool = True
    overlap: bool | str = "auto"


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path | None
    dataset: DatasetSpec
    experts: dict[str, ExpertSpec]
    models: tuple[ModelSpec, ...]
    train: TrainSpec | None
    corruptions: CorruptionSpec
    metrics: MetricsSpec
    run: RunSpec
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise SuiteError(f"no model named {name!r}; models: {', '.join(m.name for m in self.models)}")

    def digest(self, scope: bool = True) -> str:
        """sha256 of everything that changes a condition's result (not the run section's
        device, batch size, output folder or the list of conditions to sweep); ``scope=False``:
        of the suite's contents alone, without the run's seed and limit."""
        ident = {k: v for k, v in self.raw.items() if k not in ("run", "corruptions", "train")}
        if scope:
            ident["seed"] = self.run.seed
            ident["limit"] = self.run.limit
        blob = json.dumps(ident, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def comparable(self) -> dict[str, Any]:
        """What two runs must share for ``shiftbench check`` to compare their values key by key: the dataset
        (its paths as written; of a synthetic one's counts only those of the evaluated splits), the metrics
        settings but the gallery, and the run's seed, limit and amp. Not the models, experts or estimators
        (values are matched by name), nor the conditions swept (checked apart)."""
        dataset = asdict(self.dataset)
        raw = self.raw.get("dataset") if isinstance(self.raw.get("dataset"), dict) else {}
        dataset.update(root=raw.get("root"), split_dir=raw.get("split_dir"))  # not expanded: same on every machine
        if isinstance(dataset.get("count"), dict):  # the training splits' sizes change no evaluated image
            kinds = {name.rpartition("_")[2] for names in self.dataset.eval.values() for name in names}
            dataset["count"] = {k: v for k, v in dataset["count"].items() if k in kinds}
        metrics = {k: v for k, v in asdict(self.metrics).items() if k != "gallery"}
        ident = {"dataset": dataset, "metrics": metrics, "seed": self.run.seed, "limit": self.run.limit,
                 "amp": self.run.amp}
        return json.loads(json.dumps(ident, sort_keys=True, default=str))

    def checkpoints(self) -> list[Path]:
        """Every checkpoint file the sweep loads (experts, then models), each once, in suite order."""
        paths = [e.checkpoint for e in self.experts.values()] + [m.checkpoint for m in self.models]
        return list(dict.fromkeys(p for p in paths if p is not None))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


# --------------------------------------------------------------------------- validation helpers

_MISSING = object()


class _Section:
    """A mapping at ``path`` whose fields are read (and so accounted for) one by one."""

    def __init__(self, data: Any, path: str):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise SuiteError(f"{path or 'suite'}: expected a mapping, got {_show(data)}")
        for key in data:
            if not isinstance(key, str):
                where = f"{path}." if path else ""
                raise SuiteError(f"{where}{key}: the key {_show(key)} is {_type_name(type(key))}, not a name; "
                                 f"quote it (\"{key}\") or rename it")
        self.data, self.path, self.seen = data, path, set()

    def _p(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING,
            choices: tuple | None = None, check: Callable[[Any], str | None] | None = None,
            what: str | None = None) -> Any:
        """The value of ``key``, checked; ``what`` says what is allowed when the type is wrong."""
        self.seen.add(key)
        if key not in self.data or self.data[key] is None and default is not _MISSING:
            if default is _MISSING:
                raise SuiteError(f"{self._p(key)}: missing; it is required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = what or " or ".join(_type_name(k) for k in kinds)
            raise SuiteError(f"{self._p(key)}: {_show(value)} is not {names}")
        if choices is not None and value not in choices:
            raise SuiteError(f"{self._p(key)}: {_show(value)} is not one of {', '.join(map(str, choices))}")
        if check is not None and (msg := check(value)):
            raise SuiteError(f"{self._p(key)}: {_show(value)} {msg}")
        return value

    def names(self, key: str, default: Any = _MISSING, choices: tuple | None = None) -> tuple[str, ...]:
        """A list of distinct strings (a single string is accepted as a one-element list)."""
        value = self.get(key, (list, str), default)
        if isinstance(value, str):
            value = [value]
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise SuiteError(f"{self._p(key)}[{i}]: {_show(item)} is not a string")
            if choices is not None and item not in choices:
                raise SuiteError(f"{self._p(key)}[{i}]: {_show(item)} is not one of {', '.join(choices)}")
            if item in value[:i]:  # counted twice: double weight in every mean over the list
                raise SuiteError(f"{self._p(key)}[{i}]: {_show(item)} is given twice; list each name once")
        return tuple(value)

    def sub(self, key: str, required: bool = False) -> "_Section":
        self.seen.add(key)
        if required and key not in self.data:
            raise SuiteError(f"{self._p(key)}: missing; it is required")
        return _Section(self.data.get(key), self._p(key))

    def done(self) -> None:
        unknown = [k for k in self.data if k not in self.seen]
        if unknown:
            raise SuiteError(f"{self._p(str(unknown[0]))}: unknown field; allowed: {', '.join(sorted(self.seen))}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false",
            list: "a list", dict: "a mapping"}.get(kind, kind.__name__)


def _between(value: Any, low: int, high: int) -> str | None:
    return None if low <= value <= high else f"must be between {low} and {high}"


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _unit(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


ENV_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # ${VAR} in a path field


def _expand(value: str, where: str, dataset: str | None = None) -> str:
    def repl(m: re.Match) -> str:
        var = m.group(1)
        if var not in os.environ or not os.environ[var]:
            source = f" ({DATA_SOURCES[dataset]})" if dataset in DATA_SOURCES else ""
            raise SuiteError(f"{where}: environment variable {var} is not set; set it to the folder this field "
                             f"needs, as the suite file's header says{source}")
        return os.environ[var]

    return ENV_VARIABLE.sub(repl, value)


def _path(sec: _Section, key: str, base: Path, dataset: str | None = None) -> Path | None:
    value = sec.get(key, str, None)
    if value is None:
        return None
    p = Path(os.path.expanduser(_expand(value, sec._p(key), dataset)))
    return p if p.is_absolute() else (base / p)


# --------------------------------------------------------------------------- sections


def _dataset(sec: _Section, base: Path) -> DatasetSpec:
    name = sec.get("name", str, choices=DATASETS)
    size = sec.get("size", list, None)
    if size is not None and (len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       and 32 <= v <= MAX_SIDE for v in size)):
        raise SuiteError(f"{sec._p('size')}: {_show(size)} is not [H, W] with integers 32..{MAX_SIDE}")
    if size is None and name == "synthetic":
        size = [128, 256]
    classes = sec.get("classes", int, CLASSES[name][0], choices=CLASSES[name])
    seed = sec.get("seed", int, 0)
    count_sec = sec.sub("count")
    count = {s: count_sec.get(s, int, d, check=_positive) for s, d in (("train", 512), ("val", 64), ("test", 64))}
    count_sec.done()
    root = _path(sec, "root", base, name)
    split_dir = _path(sec, "split_dir", base, name)
    if name != "synthetic" and root is None:
        raise SuiteError(f"{sec._p('root')}: missing; {name} needs its dataset folder ({DATA_SOURCES[name]})")
    if name == "a2d2" and split_dir is None:
        raise SuiteError(f"{sec._p('split_dir')}: missing; a2d2 needs the folder of split lists ({DATA_SOURCES['a2d2']})")
    labels = sec.get("labels", str, "official", choices=A2D2_LABELS)
    if labels != "official" and (name != "a2d2" or classes != 38):
        raise SuiteError(f"{sec._p('labels')}: {labels!r} needs dataset a2d2 with classes: 38 (the authors' loader "
                         f"decodes A2D2 to its 38 categories), got {name} with {classes} classes")
    eval_sec = sec.sub("eval", required=True)
    groups = {g: eval_sec.names(g) for g in list(eval_sec.data)}
    for g, splits in groups.items():
        if not splits:
            raise SuiteError(f"{eval_sec._p(g)}: empty; list the splits of group {g}, or leave the group out")
    if not groups:
        raise SuiteError(f"{eval_sec.path}: no evaluation split group; give e.g. id: [highway_test, urban_test]")
    for g, splits in groups.items():
        for i, s in enumerate(splits):
            _check_split(name, s, f"{eval_sec._p(g)}[{i}]")
    eval_sec.done()
    sec.done()
    return DatasetSpec(name, tuple(size) if size else None, classes, seed, count, root, split_dir, groups, labels)


def _check_split(dataset: str, split: str, where: str) -> None:
    if dataset == "synthetic":
        domain, _, part = split.rpartition("_")
        allowed = [f"{d}_{p}" for d, parts in SYNTHETIC_SPLITS.items() for p in parts]
        if domain not in SYNTHETIC_SPLITS or part not in SYNTHETIC_SPLITS[domain]:
            raise SuiteError(f"{where}: {split!r} is not one of {', '.join(allowed)}")
    elif dataset == "cityscapes" and split not in ("train", "val", "test"):
        raise SuiteError(f"{where}: {split!r} is not one of train, val, test")


def _experts(sec: _Section, base: Path, dataset: str) -> dict[str, ExpertSpec]:
    experts = {}
    for name in list(sec.data):
        e = sec.sub(name)
        train = e.names("train", ())
        val = e.names("val", ())
        for key, splits in (("train", train), ("val", val)):
            for i, s in enumerate(splits):
                _check_split(dataset, s, f"{e._p(key)}[{i}]")
        experts[name] = ExpertSpec(
            name=name,
            backbone=e.get("backbone", str, "resnet101", choices=BACKBONES),
            checkpoint=_path(e, "checkpoint", base),
            train=train,
            val=val,
            pretrained=_path(e, "pretrained", base),
            normalize=e.get("normalize", str, "imagenet", choices=NORMALIZE),
        )
        e.done()
    sec.done()
    return experts


_MODEL_FIELDS = {
    "mc_dropout": {"backbone", "checkpoint", "pretrained", "dropout", "passes", "normalize"},
    "ensemble": {"experts"},
    "moe": {"experts", "gate", "final_conv", "combine", "checkpoint"},
    "expert": {"experts"},
    "custom": {"factory", "kwargs", "checkpoint"},
}


def _model(sec: _Section, base: Path, experts: dict[str, ExpertSpec]) -> ModelSpec:
    name = sec.get("name", str)
    kind = sec.get("kind", str, choices=MODEL_KINDS)
    fields: dict[str, Any] = {"name": name, "kind": kind}
    for key in sec.data:
        if key not in ("name", "kind", "estimators") and key not in _MODEL_FIELDS[kind] and key in {
                f for fs in _MODEL_FIELDS.values() for f in fs}:
            raise SuiteError(f"{sec._p(key)}: not a field of a {kind} model; allowed: "
                             f"{', '.join(sorted(_MODEL_FIELDS[kind] | {'name', 'kind', 'estimators'}))}")
    if kind == "mc_dropout":
        fields.update(backbone=sec.get("backbone", str, "resnet101", choices=BACKBONES),
                      checkpoint=_path(sec, "checkpoint", base), pretrained=_path(sec, "pretrained", base),
                      dropout=sec.get("dropout", float, 0.1, check=_unit),
                      passes=sec.get("passes", int, 2, check=_positive),
                      normalize=sec.get("normalize", str, "imagenet", choices=NORMALIZE))
    if kind in ("ensemble", "moe", "expert"):
        names = sec.names("experts", choices=tuple(experts) or ("<none: define an experts section>",))
        if kind == "expert" and len(names) != 1:
            raise SuiteError(f"{sec._p('experts')}: an expert model names exactly one expert, got {len(names)}")
        if kind in ("ensemble", "moe") and len(names) < 2:
            raise SuiteError(f"{sec._p('experts')}: {kind} needs at least 2 experts, got {len(names)}")
        fields["experts"] = names
    if kind == "moe":
        fields.update(gate=sec.get("gate", str, choices=GATES), final_conv=sec.get("final_conv", bool, False),
                      combine=sec.get("combine", str, "probs", choices=COMBINE),
                      checkpoint=_path(sec, "checkpoint", base))
    if kind == "custom":
        fields.update(factory=sec.get("factory", str, check=_factory_syntax),
                      kwargs=dict(sec.get("kwargs", dict, {})), checkpoint=_path(sec, "checkpoint", base))
    family = "moe_classwise" if kind == "moe" and fields["gate"] == "classwise" else kind
    fields["estimators"] = sec.names("estimators", DEFAULT_ESTIMATORS[family])
    sec.done()
    spec = ModelSpec(**fields)
    _check_estimators(spec, sec)
    return spec


def _factory_syntax(value: str) -> str | None:
    ok = re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value)
    return None if ok else "is not of the form package.module:function"


def _check_estimators(spec: ModelSpec, sec: _Section) -> None:
    """Refuse estimators that do not fit the model (e.g. gate entropy on an ensemble)."""
    try:
        from shiftbench.uncertainty import ESTIMATORS
    except ImportError:  # estimators not built yet
        return
    for i, est in enumerate(spec.estimators):
        if est not in ESTIMATORS:
            raise SuiteError(f"{sec._p('estimators')}[{i}]: {est!r} is not one of {', '.join(ESTIMATORS)}")
        why = _estimator_misfit(ESTIMATORS[est], spec)
        if why:
            raise SuiteError(f"{sec._p('estimators')}[{i}]: estimator {est!r} {why}; model {spec.name!r} is {spec.kind}"
                             + (f" with a {spec.gate} gate" if spec.gate else ""))


def _estimator_misfit(estimator: Any, spec: ModelSpec) -> str | None:
    has_members = spec.kind in ("mc_dropout", "ensemble", "moe")
    if getattr(estimator, "needs_members", False) and not has_members:
        return "needs several members (MC passes, ensemble members or experts)"
    if getattr(estimator, "needs_gate", False) and spec.kind != "moe":
        return "needs an MoE gate"
    if getattr(estimator, "simple_gate_only", False) and spec.gate != "simple":
        return "needs a simple gate (one weight per expert)"
    return None


def _stage(sec: _Section, epochs: int, lr: float) -> StageSpec:
    stage = StageSpec(epochs=sec.get("epochs", int, epochs, check=_positive), lr=sec.get("lr", float, lr, check=_positive),
                      weight_decay=sec.get("weight_decay", float, 1e-4, check=_non_negative))
    sec.done()
    return stage


def _train(sec: _Section, dataset: str) -> TrainSpec:
    splits, val = sec.names("splits", ()), sec.names("val", ())
    for key, names in (("splits", splits), ("val", val)):
        for i, s in enumerate(names):
            _check_split(dataset, s, f"{sec._p(key)}[{i}]")
    spec = TrainSpec(
        seed=sec.get("seed", int, 0),
        batch_size=sec.get("batch_size", int, 16, check=_positive),
        splits=splits,
        val=val,
        experts=_stage(sec.sub("experts"), 10, 0.01),
        baseline=_stage(sec.sub("baseline"), 10, 0.01),
        gates=_stage(sec.sub("gates"), 3, 0.001),
    )
    sec.done()
    return spec


def _corruptions(sec: _Section, eval_groups: dict[str, tuple[str, ...]]) -> CorruptionSpec:
    from corruptions import CORRUPTIONS, SEVERITIES

    names = sec.get("names", (str, list), "all")
    if names == "all":
        names = CORRUPTIONS
    elif names in ("none", []):
        names = ()
    else:
        names = sorted(sec.names("names", choices=CORRUPTIONS), key=CORRUPTIONS.index)  # one order for every run
    severities = sec.get("severities", list, list(SEVERITIES))
    for i, s in enumerate(severities):
        if isinstance(s, bool) or s not in SEVERITIES:
            raise SuiteError(f"{sec._p('severities')}[{i}]: {_show(s)} is not one of 1, 2, 3, 4, 5")
    default_groups = ("id",) if "id" in eval_groups else tuple(eval_groups)[:1]
    groups = sec.names("splits", default_groups, choices=tuple(eval_groups))
    spec = CorruptionSpec(tuple(names), tuple(sorted(set(severities))), sec.get("clean", bool, True), groups)
    sec.done()
    return spec


def _metrics(sec: _Section) -> MetricsSpec:
    spec = MetricsSpec(
        n_bins=sec.get("n_bins", int, 15, check=lambda v: _between(v, 1, MAX_BINS)),
        patch_size=sec.get("patch_size", int, 4, check=_positive),
        accuracy_threshold=sec.get("accuracy_threshold", float, 0.5, check=_unit),
        thresholds=sec.get("thresholds", int, 101, check=lambda v: _between(v, 2, MAX_THRESHOLDS)),
        threshold_range=_threshold_range(sec),
        calibration_confidence=sec.get("calibration_confidence", str, "uncertainty", choices=CONFIDENCE),
        calibration_average=sec.get("calibration_average", str, "pixels", choices=AVERAGE),
        gallery=sec.names("gallery", ()),
    )
    sec.done()
    return spec


def _threshold_range(sec: _Section) -> tuple[float, float]:
    """metrics.threshold_range: [lo, hi] with 0 <= lo < hi <= 1, the span of the conditional metrics' grid."""
    value = sec.get("threshold_range", list, [0.0, 1.0])
    if not is_unit_range(value):
        raise SuiteError(f"{sec._p('threshold_range')}: {_show(value)} is not [lo, hi] with numbers "
                         "0 <= lo < hi <= 1 (the authors' grid: [0.01, 0.99] with thresholds: 50)")
    return float(value[0]), float(value[1])


def _auto_or_bool(value: Any) -> str | None:
    return None if value == "auto" or isinstance(value, bool) else "is not one of auto, true, false"


def _auto_or(check: Callable[[Any], str | None], allowed: str) -> Callable[[Any], str | None]:
    """``auto``, or a number that passes ``check``."""
    def auto_or(value: Any) -> str | None:
        if isinstance(value, str):
            return None if value == "auto" else f"is not auto or {allowed}"
        return check(value)
    return auto_or


def _size_gib(value: float) -> str | None:
    return None if math.isfinite(value) and value >= 0 else "must be a finite size in GiB >= 0"


def _run(sec: _Section, base: Path, name: str) -> RunSpec:
    spec = RunSpec(
        device=sec.get("device", str, "auto", choices=DEVICES),
        batch_size=sec.get("batch_size", int, 8, check=_positive),
        amp=sec.get("amp", bool, False),
        seed=sec.get("seed", int, 0),
        out=_path(sec, "out", Path.cwd()) or Path("runs") / name,
        limit=sec.get("limit", int, None, check=_positive),
        workers=sec.get("workers", (int, str), "auto",
                        check=_auto_or(lambda v: _between(v, 0, MAX_WORKERS), f"an integer 0..{MAX_WORKERS}"),
                        what=f"auto or an integer 0..{MAX_WORKERS}"),
        cache=sec.get("cache", (float, str), "auto", check=_auto_or(_size_gib, "a size in GiB >= 0"),
                      what="auto or a size in GiB >= 0"),
        exact=sec.get("exact", bool, True),
        overlap=sec.get("overlap", (bool, str), "auto", check=_auto_or_bool, what="auto, true or false"),
    )
    sec.done()
    return spec


def parse_suite(data: Any, base: Path, path: Path | None = None) -> Suite:
    """Validate a suite already read from YAML; ``base`` resolves relative paths."""
    top = _Section(data, "")
    name = top.get("name", str, path.stem if path else "suite",
                   check=lambda v: None if re.fullmatch(r"[\w.-]+", v) else "may only hold letters, digits, _ . -")
    dataset = _dataset(top.sub("dataset", required=True), base)
    experts = _experts(top.sub("experts"), base, dataset.name)
    models_raw = top.get("models", list)
    if not models_raw:
        raise SuiteError("models: empty; list at least one model")
    models = tuple(_model(_Section(m, f"models[{i}]"), base, experts) for i, m in enumerate(models_raw))
    seen: set[str] = set()
    for i, m in enumerate(models):
        if m.name in seen:
            raise SuiteError(f"models[{i}].name: {m.name!r} is used twice; model names must be unique")
        seen.add(m.name)
    train = _train(top.sub("train"), dataset.name) if "train" in top.data else None
    top.seen.add("train")
    corr = _corruptions(top.sub("corruptions"), dataset.eval)
    metrics = _metrics(top.sub("metrics"))
    run = _run(top.sub("run"), base, name)
    top.done()
    return Suite(name, path, dataset, experts, models, train, corr, metrics, run, raw=copy.deepcopy(data))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:  # the mapping's own keys; those merged in by << may be overridden
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)):  # the base class refuses unhashable keys
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_suite(path: str | os.PathLike) -> Suite:
    """Read and validate a suite file; raises :class:`SuiteError` with one line on any problem."""
    path = Path(path)
    if why := file_problem(path):
        raise SuiteError(f"{path}: suite file {why}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # safe: a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SuiteError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{path}: cannot read the suite file ({exc})") from None
    try:
        return parse_suite(data, path.resolve().parent, path)
    except SuiteError as exc:
        raise SuiteError(f"{path}: {exc}") from None
