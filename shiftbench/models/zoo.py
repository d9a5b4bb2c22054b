"""The evaluation entry point: every model of a suite from one pass through each expert.

``ModelZoo.from_suite(suite)(x [B,3,H,W], seeds int64 [B])`` returns
``{model name: shiftbench.uncertainty.Prediction}``. Each expert runs once per batch; the
ensembles, single-expert models and every MoE variant (simple/classwise gate, with/without
final conv, either combination rule) are derived from those shared passes. The MC-dropout
baseline runs its backbone once and its head for the T keyed passes. Probabilities are
float32 even under autocast.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from shiftbench.errors import ShiftbenchError, one_line
from shiftbench.models import checks
from shiftbench.models.backbones import backbone_spec
from shiftbench.models.checkpoints import (check_classes, checkpoint_problem, load_strict, read_checkpoint,
                                          weights_digest)
from shiftbench.models.deeplab import DeepLabV3Plus
from shiftbench.models.gates import grid_from_state
from shiftbench.models.moe import MoEHead
from shiftbench.suite import ENV_VARIABLE
from shiftbench.uncertainty import Prediction


_EXPERT_KEY = re.compile(r"expert\d+\.")
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm state that is not a weight
_EVAL_STATISTICS = ("running_mean", "running_var")  # what of it an evaluating BatchNorm reads


@dataclass
class _Shared:
    """One batch's expert passes, with member stacks cached per tuple of expert names."""

    features: dict[str, Tensor]
    logits: dict[str, Tensor]
    probs: dict[str, Tensor]
    stacks: dict[tuple[str, ...], tuple[Tensor, Tensor]] = field(default_factory=dict)
    log_stacks: dict[tuple[str, ...], Tensor] = field(default_factory=dict)

    def stack(self, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """(logits, probs) ``[E,B,K,H,W]`` of ``names``; built once per batch and reused."""
        if names not in self.stacks:
            self.stacks[names] = (torch.stack([self.logits[n] for n in names]),
                                  torch.stack([self.probs[n] for n in names]))
        return self.stacks[names]

    def log_probs(self, names: tuple[str, ...]) -> Tensor:
        """log_softmax of the logits stack of ``names`` over the classes, once per batch for every MoE."""
        if names not in self.log_stacks:
            self.log_stacks[names] = torch.log_softmax(self.stack(names)[0], dim=2)
        return self.log_stacks[names]


def _predict_expert(zoo: "ModelZoo", name: str, x: Tensor, seeds: list[int], shared: _Shared) -> Prediction:
    return Prediction(probs=shared.probs[zoo.members[name][0]])


def _predict_ensemble(zoo: "ModelZoo", name: str, x: Tensor, seeds: list[int], shared: _Shared) -> Prediction:
    _, probs = shared.stack(zoo.members[name])
    return Prediction(probs=probs.mean(0), members=probs)


def _predict_moe(zoo: "ModelZoo", name: str, x: Tensor, seeds: list[int], shared: _Shared) -> Prediction:
    names = zoo.members[name]
    logits, probs = shared.stack(names)
    head = zoo.heads[name]
    log_probs = shared.log_probs(names) if head.combine == "probs" else None
    log_p, weights = head([shared.features[n].float() for n in names], logits, log_probs)
    return Prediction(probs=log_p.exp(), members=probs, gate=weights)


def _predict_mc(zoo: "ModelZoo", name: str, x: Tensor, seeds: list[int], shared: _Shared) -> Prediction:
    with zoo.autocast(x):
        logits = zoo.singles[name].mc_logits(x, seeds, zoo.passes[name])
    members = torch.softmax(logits.float(), dim=2)
    return Prediction(probs=members.mean(0), members=members)


def _predict_custom(zoo: "ModelZoo", name: str, x: Tensor, seeds: list[int], shared: _Shared) -> Prediction:
    with zoo.autocast(x):
        logits = zoo.singles[name](x)
    if isinstance(logits, Mapping) and "out" in logits:  # torchvision's segmentation models: {"out", "aux"}
        logits = logits["out"]
    if not isinstance(logits, Tensor):
        keys = f" with keys {', '.join(map(repr, logits))}" if isinstance(logits, Mapping) else ""
        raise ShiftbenchError(f"model {name!r} returned a {type(logits).__name__}{keys}; a custom model must return "
                              f"logits [B,{zoo.classes},H,W] (or a dict holding them under 'out', as torchvision's do)")
    if logits.dim() != 4 or logits.shape[1] != zoo.classes or logits.shape[-2:] != x.shape[-2:]:
        raise ShiftbenchError(f"model {name!r} returned {list(logits.shape)}; a custom model must map "
                              f"[B,3,H,W] images to logits [B,{zoo.classes},H,W]")
    return Prediction(probs=torch.softmax(logits.float(), dim=1))


PREDICTORS: dict[str, Callable[["ModelZoo", str, Tensor, list[int], _Shared], Prediction]] = {
    "expert": _predict_expert, "ensemble": _predict_ensemble, "moe": _predict_moe,
    "mc_dropout": _predict_mc, "custom": _predict_custom,
}


class ModelZoo(nn.Module):
    """All models of a suite; ``forward(x, seeds)`` -> ``{name: Prediction}``.

    experts: the shared expert bank (name -> DeepLabV3Plus).
    heads:   MoE name -> MoEHead (gate + final conv + combine rule).
    singles: MC-dropout and custom models, name -> module.
    kinds / members / passes: each model's kind, its experts, its MC passes.
    notes:   what building the zoo chose that a user should know (logged by the runner).

    An MoE file that carries its experts (the authors' ``expert{i}.*``) with the same weights as the
    bank's expert but other BatchNorm statistics (the authors' gate training leaves the experts in
    train mode, which updates them) gets its own copy of that expert, ``name@moe``: it is evaluated
    as it was trained, at the cost of one more expert forward. MoE files carrying the same copy share it.
    """

    def __init__(self, classes: int, amp: bool = False):
        super().__init__()
        self.classes, self.amp = classes, amp
        self.experts = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.singles = nn.ModuleDict()
        self.kinds: dict[str, str] = {}
        self.members: dict[str, tuple[str, ...]] = {}
        self.passes: dict[str, int] = {}
        self.notes: list[str] = []
        self.digests: dict[str, str] = {}  # bank expert -> weights_digest, for the MoE files that record theirs
        self.folder: Path | None = None  # the suite file's folder, where custom factories may live
        self.factory_digests: dict[str, str] = {}  # custom model without a checkpoint -> weights_digest

    def autocast(self, x: Tensor) -> torch.autocast:
        dtype = torch.float16 if x.device.type == "cuda" else torch.bfloat16
        return torch.autocast(x.device.type, dtype=dtype, enabled=self.amp)

    @torch.no_grad()
    def expert_passes(self, x: Tensor, names: Sequence[str]) -> _Shared:
        """One forward of each named expert: ASPP features, logits and float32 probabilities."""
        feats, logits = {}, {}
        with self.autocast(x):
            for n in names:
                feats[n], logits[n] = self.experts[n].forward_features(x)
        probs = {n: torch.softmax(z.float(), dim=1) for n, z in logits.items()}
        return _Shared(feats, {n: z.float() for n, z in logits.items()}, probs)

    @torch.no_grad()
    def forward(self, x: Tensor, seeds: Tensor | Sequence[int], names: Sequence[str] | None = None
                ) -> dict[str, Prediction]:
        """Predictions of ``names`` (default: all models) for images ``x [B,3,H,W]`` in [0,1]
        and per-sample seeds ``[B]`` (the MC-dropout masks)."""
        checks.images(x)
        if isinstance(names, str):
            raise ShiftbenchError(f"names must be a list of model names, got the string {names!r} "
                                  f"(write names=[{names!r}])")
        names = list(self.kinds) if names is None else list(names)
        for n in names:
            if n not in self.kinds:
                raise ShiftbenchError(f"no model named {n!r}; models: {', '.join(self.kinds)}")
        seeds = checks.seeds(seeds, x.shape[0])
        lo, hi = torch.aminmax(x)
        if not bool((lo >= 0) & (hi <= 1)):  # the batch's one sync; NaN fails both comparisons
            seen = f"values in [{float(lo):g}, {float(hi):g}]" if lo.isfinite() & hi.isfinite() else "NaN or Inf"
            raise checks.ImagesOutOfRange(f"x holds {seen}; images must lie in [0,1] "
                                          "(convert uint8 images with x.float() / 255)")
        used = list(dict.fromkeys(e for n in names if self.kinds[n] in ("expert", "ensemble", "moe")
                                  for e in self.members[n]))
        shared = self.expert_passes(x, used)
        return {n: PREDICTORS[self.kinds[n]](self, n, x, seeds, shared) for n in names}

    def train(self, mode: bool = True) -> "ModelZoo":
        """A zoo only evaluates: it stays in eval mode."""
        return super().train(False)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_suite(cls, suite: Any, device: str | torch.device = "cpu", names: Sequence[str] | None = None,
                   amp: bool | None = None) -> "ModelZoo":
        """Build the suite's models (or ``names``) and load their checkpoints onto ``device``."""
        zoo = cls(suite.dataset.classes, suite.run.amp if amp is None else amp)
        zoo.folder = Path(suite.path).parent if getattr(suite, "path", None) else None
        specs = [suite.model(n) for n in names] if names is not None else list(suite.models)
        _check_files(suite, specs)
        moe_files = {m.name: _read(m.checkpoint, f"models.{m.name}.checkpoint") for m in specs if m.kind == "moe"}
        embedded = _embedded_experts(specs, moe_files)
        for e in dict.fromkeys(e for m in specs if m.kind in ("expert", "ensemble", "moe") for e in m.experts):
            with _naming(f"experts.{e}"):
                zoo.experts[e] = load_expert(suite.experts[e], suite.dataset.classes, embedded.get(e, []))
        for m in specs:
            zoo.kinds[m.name], zoo.members[m.name] = m.kind, tuple(m.experts)
            with _naming(f"models.{m.name}"):
                BUILDERS[m.kind](zoo, m, moe_files.get(m.name))
            if m.kind == "moe":
                zoo.members[m.name] = _own_copies(zoo, m, moe_files[m.name]["state_dict"], suite.dataset.classes)
        return zoo.to(device).eval().requires_grad_(False)


@contextlib.contextmanager
def _naming(entry: str):
    """Errors raised while building suite entry ``entry`` (``models.moe_simple``) start with it."""
    try:
        yield
    except ShiftbenchError as exc:
        if str(exc).startswith(("models.", "experts.")):
            raise
        raise ShiftbenchError(f"{entry}: {exc}") from None


def _check_files(suite: Any, specs: Sequence[Any]) -> None:
    """Every checkpoint the ``specs`` load must be a readable file that looks like a torch checkpoint
    (:func:`checkpoint_problem`): one line naming all that are not, in suite order, with the environment
    variable their path came from (``${A2D2_CHECKPOINTS}``) and its value."""
    experts = dict.fromkeys(e for m in specs for e in m.experts if m.kind in ("expert", "ensemble", "moe"))
    index = {m.name: i for i, m in enumerate(suite.models)}
    fields = [(f"experts.{e}.checkpoint", suite.experts[e].checkpoint, ("experts", e)) for e in experts]
    fields += [(f"models.{m.name}.checkpoint", m.checkpoint, ("models", index[m.name])) for m in specs]
    bad = [(where, path, why, raw) for where, path, raw in fields
           if path is not None and isinstance(path, (str, os.PathLike)) and (why := checkpoint_problem(path))]
    if not bad:
        return
    variables = {}
    for *_, (section, key) in bad:
        try:
            text = getattr(suite, "raw", {})[section][key]["checkpoint"]
        except (KeyError, IndexError, TypeError):
            continue
        names = ENV_VARIABLE.findall(text) if isinstance(text, str) else []
        variables.update((v, os.environ.get(v, "")) for v in names)
    came_from = "; ".join(f"{v}={value}" for v, value in variables.items())
    hint = f" (the paths come from {came_from}: is it the checkpoints' folder?)" if came_from else ""
    if len(bad) == 1:
        where, path, why, _ = bad[0]
        raise ShiftbenchError(f"{where}: checkpoint {path} {why}{hint}")
    named = ", ".join(f"{where} ({path}: {why})" for where, path, why, _ in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise ShiftbenchError(f"{len(bad)} of {len(fields) - sum(p is None for _, p, _ in fields)} checkpoint files cannot "
                          f"be read: {named}{more}{hint}")


def _read(path: Any, where: str) -> dict[str, Any]:
    """The checkpoint at ``path``; errors name the suite field ``where`` it came from."""
    if path is None:
        raise ShiftbenchError(f"{where}: missing; this model needs a checkpoint (train it with `shiftbench train`)")
    return read_checkpoint(path, where=where)


def _embedded_experts(specs: Sequence[Any], files: dict[str, dict[str, Any]]
                      ) -> dict[str, list[tuple[str, dict[str, Tensor]]]]:
    """Expert weights carried inside MoE files (the authors' ``expert{i}.*``), per expert name."""
    out: dict[str, list[tuple[str, dict[str, Tensor]]]] = {}
    for m in specs:
        if m.kind != "moe":
            continue
        for i, e in enumerate(m.experts, 1):
            if sub := _carried(files[m.name]["state_dict"], i):
                out.setdefault(e, []).append((f"{m.checkpoint} (expert{i}.*)", sub))
    return out


def _carried(state: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    """The weights of expert ``i`` (1-based) an MoE state carries as ``expert{i}.*``, prefix removed."""
    prefix = f"expert{i}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _is_statistic(module: nn.Module, key: str, leaves: tuple[str, ...] = _STATISTICS) -> bool:
    """Whether state key ``key`` of ``module`` is a BatchNorm statistic (one of ``leaves``)."""
    owner, _, leaf = key.rpartition(".")
    return leaf in leaves and isinstance(module.get_submodule(owner), nn.modules.batchnorm._BatchNorm)


def _same_outputs(model: nn.Module, sub: dict[str, Tensor]) -> bool:
    """Whether ``sub``, whose parameters :func:`load_expert` found equal to ``model``'s, also holds the
    same running mean and variance, the only statistics an evaluating BatchNorm reads."""
    own = model.state_dict()
    return all(torch.equal(sub[k], own[k]) for k in own if _is_statistic(model, k, _EVAL_STATISTICS))


def _own_copies(zoo: "ModelZoo", spec: Any, state: dict[str, Tensor], classes: int) -> tuple[str, ...]:
    """The bank names an MoE's experts run as: the shared expert, or its own copy where the MoE file
    carries the expert with other BatchNorm statistics (see :class:`ModelZoo`)."""
    names = []
    for i, e in enumerate(spec.experts, 1):
        sub = _carried(state, i)
        same = e if not sub else next((n for n in zoo.experts if (n == e or n.startswith(f"{e}@"))
                                       and _same_outputs(zoo.experts[n], sub)), None)
        if same is not None:
            names.append(same)
            continue
        copy = DeepLabV3Plus(zoo.experts[e].backbone_name, classes, normalize=zoo.experts[e].normalize)
        load_strict(copy, sub, f"{spec.checkpoint} (expert{i}.*)")
        name = f"{e}@{spec.name}"
        zoo.experts[name] = copy
        names.append(name)
        zoo.notes.append(f"model {spec.name}: {spec.checkpoint} carries expert {e!r} with its own BatchNorm "
                         f"statistics (a gate trained with the experts in train mode); it runs that copy as "
                         f"{name!r}, one more expert forward per image")
    return tuple(names)


def load_expert(spec: Any, classes: int, embedded: list[tuple[str, dict[str, Tensor]]]) -> DeepLabV3Plus:
    """An expert from its checkpoint, or from the weights an MoE file carries; weights carried
    by MoE files must equal the expert's own (the experts are frozen and shared), but for BatchNorm
    statistics, with which an MoE gets its own copy (:func:`_own_copies`)."""
    model = DeepLabV3Plus(spec.backbone, classes, normalize=spec.normalize)
    if spec.checkpoint is not None:
        file = _read(spec.checkpoint, f"experts.{spec.name}.checkpoint")
        source, state = str(spec.checkpoint), file["state_dict"]
        _agree(file["meta"], {"normalize": spec.normalize}, source, f"experts.{spec.name}")
    elif embedded:
        source, state = embedded[0]
    else:
        raise ShiftbenchError(f"experts.{spec.name}.checkpoint: missing; give the expert's checkpoint "
                              "(or an MoE checkpoint that carries its weights)")
    check_classes(state, classes, source)
    load_strict(model, state, source)
    own = model.state_dict()
    for other, sub in embedded:
        if other == source:
            continue
        if sub.keys() != own.keys():
            load_strict(DeepLabV3Plus(spec.backbone, classes, normalize=spec.normalize), sub, other)  # names the keys
        differ = [k for k in own if not torch.equal(sub[k], own[k]) and not _is_statistic(model, k)]
        if differ:
            raise ShiftbenchError(f"{other} carries weights for expert {spec.name!r} that differ from {source} "
                                  f"(e.g. {differ[0]}); the experts are frozen, so both must be the same weights "
                                  "(BatchNorm statistics may differ)")
    return model


def _agree(meta: dict[str, Any], spec: dict[str, Any], source: str, where: str) -> None:
    """Refuse a checkpoint whose ``meta`` (written by ``shiftbench train``) records another value for a
    field the suite sets: weights are only right with the set-up they were trained with. Files without
    the field (the authors') are taken as the suite says."""
    for field_, value in spec.items():
        if field_ in meta and meta[field_] != value:
            raise ShiftbenchError(f"{source} was trained with {field_}: {_yaml(meta[field_])}, the suite says "
                                  f"{where}.{field_}: {_yaml(value)}; set it as trained")


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"[{', '.join(map(str, value))}]" if isinstance(value, (list, tuple)) else str(value)


def _build_moe(zoo: ModelZoo, spec: Any, file: dict[str, Any] | None) -> None:
    assert file is not None
    source, meta = str(spec.checkpoint), file["meta"]
    state = {k: v for k, v in file["state_dict"].items() if not _EXPERT_KEY.match(k)}
    _agree(meta, {"gate": spec.gate, "combine": spec.combine, "final_conv": spec.final_conv}, source,
           f"models.{spec.name}")
    trained = meta.get("experts")
    if isinstance(trained, list) and any(trained.index(e) != i for i, e in enumerate(spec.experts) if e in trained):
        # the gate's i-th weight belongs to the i-th expert it was trained with: a recorded name in another
        # slot is refused; names it does not record are another suite's (a rename), which only the user can map
        _agree({"experts": trained}, {"experts": list(spec.experts)}, source, f"models.{spec.name}")
    recorded = meta.get("expert_digests")
    if isinstance(recorded, list) and len(recorded) == len(spec.experts):
        for i, (e, digest) in enumerate(zip(spec.experts, recorded)):
            if digest != _digest(zoo, e):
                raise ShiftbenchError(f"{source}: its gate was trained on other weights of expert {e!r} (position "
                                      f"{i + 1}) than the suite loads now (retrained since?); retrain the gate "
                                      f"(shiftbench train --only {spec.name}) or load the expert it was trained on")
    check_classes(state, zoo.classes, source)
    grid = tuple(meta["gate_grid"]) if "gate_grid" in meta else grid_from_state(state, source)
    channels = backbone_spec(zoo.experts[spec.experts[0]].backbone_name).aspp
    head = MoEHead(spec.gate, len(spec.experts), channels, zoo.classes, grid, spec.final_conv, spec.combine)
    load_strict(head, state, source)
    zoo.heads[spec.name] = head


def _digest(zoo: ModelZoo, expert: str) -> str:
    """:func:`weights_digest` of a bank expert, computed once per zoo."""
    if expert not in zoo.digests:
        zoo.digests[expert] = weights_digest(zoo.experts[expert].state_dict())
    return zoo.digests[expert]


def _build_mc(zoo: ModelZoo, spec: Any, file: dict[str, Any] | None) -> None:
    model = DeepLabV3Plus(spec.backbone, zoo.classes, dropout=spec.dropout, mc_dropout=True, normalize=spec.normalize)
    file = _read(spec.checkpoint, f"models.{spec.name}.checkpoint")
    _agree(file["meta"], {"normalize": spec.normalize}, str(spec.checkpoint), f"models.{spec.name}")
    state = file["state_dict"]
    check_classes(state, zoo.classes, str(spec.checkpoint))
    load_strict(model, state, str(spec.checkpoint))
    zoo.singles[spec.name], zoo.passes[spec.name] = model, spec.passes


def import_factory(path: str, folder: str | os.PathLike | None = None) -> Callable[..., nn.Module]:
    """``package.module:function`` -> the function; one-line errors when it does not import. A module found
    neither on ``sys.path`` nor in the current folder is looked for in ``folder`` (the suite file's)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ShiftbenchError(f"factory {path!r} is not of the form package.module:function")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if folder is None or exc.name != module_name.split(".")[0]:
                raise
            sys.path.append(os.fspath(folder))  # last, so that it shadows no installed package
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove(os.fspath(folder))
    except Exception as exc:  # any import-time failure is the user's module
        raise ShiftbenchError(f"factory {path!r}: cannot import {module_name!r} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ShiftbenchError(f"factory {path!r}: module {module_name!r} has no function {attr!r}")
    return fn


def _build_custom(zoo: ModelZoo, spec: Any, file: dict[str, Any] | None) -> None:
    factory = import_factory(spec.factory, zoo.folder)
    try:
        inspect.signature(factory).bind(**spec.kwargs)
    except TypeError as exc:
        raise ShiftbenchError(f"models.{spec.name}.kwargs: {exc} (factory {spec.factory!r})") from None
    except ValueError:  # no signature to check (a builtin): the call below says what is wrong
        pass
    try:
        model = factory(**spec.kwargs)
    except Exception as exc:  # the user's code: one line, not a traceback
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ShiftbenchError(f"factory {spec.factory!r} raised {type(exc).__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise ShiftbenchError(f"factory {spec.factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    # its tensors (a module's extra state, get_extra_state, may be any object)
    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, Tensor)}
    if lazy := [k for k, v in tensors.items() if nn.parameter.is_lazy(v)]:
        raise ShiftbenchError(f"factory {spec.factory!r} returned a model with uninitialized (lazy) weights "
                              f"({', '.join(lazy[:3])}); initialize them in the factory (call the model once on "
                              "a dummy batch, then load or seed its weights)")
    if spec.checkpoint is not None:
        load_strict(model, _read(spec.checkpoint, f"models.{spec.name}.checkpoint")["state_dict"], str(spec.checkpoint))
    else:  # weights from the factory itself: recorded, so that a run is not resumed with other ones
        try:
            zoo.factory_digests[spec.name] = weights_digest(tensors)
        except Exception as exc:  # a tensor kind with no bytes to read (meta, say): the user's model, one line
            raise ShiftbenchError(f"models.{spec.name}: cannot take a digest of the weights its factory made "
                                  f"({type(exc).__name__}: {one_line(exc)}); give it a checkpoint") from None
    zoo.singles[spec.name] = model


BUILDERS: dict[str, Callable[[ModelZoo, Any, dict[str, Any] | None], None]] = {
    "expert": lambda zoo, spec, file: None, "ensemble": lambda zoo, spec, file: None,
    "moe": _build_moe, "mc_dropout": _build_mc, "custom": _build_custom,
}
