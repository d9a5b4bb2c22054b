"""Safe checkpoint reading and writing.

Files are read with ``torch.load(..., weights_only=True)``: tensors, containers and plain
types only, so a file cannot run code. Numeric numpy scalars (the authors store their best
mIoU as ``numpy.float64``) are allowlisted; anything else that needs pickled Python objects is
refused with a message saying why. A file is a dict with ``state_dict`` (ours and the authors'),
``model_state`` (VainF/DeepLabV3Plus-Pytorch) or a bare state dict. Ours add ``meta``: plain
types only (kind, backbone, classes, suite name and digest, package versions, ...).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from shiftbench import io
from shiftbench.errors import ShiftbenchError, file_problem

STATE_KEYS = ("state_dict", "model_state")
SHOW = 5  # how many offending keys an error lists

_NP_CORE = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
_NUMPY_SAFE = [np.dtype, _NP_CORE.multiarray.scalar] + [
    type(np.dtype(t)) for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                                "float16", "float32", "float64")]
if hasattr(np, "_core"):  # numpy 2 reading a file pickled under numpy 1 (the authors pin numpy 1.17)
    _NUMPY_SAFE.append((np._core.multiarray.scalar, "numpy.core.multiarray.scalar"))


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", where: str | None = None
                    ) -> dict[str, Any]:
    """``{"state_dict": {name: tensor}, "meta": {...}}`` from a checkpoint file, loaded safely; errors start
    with ``where`` (the suite field that named the file) when given."""
    if not isinstance(path, (str, os.PathLike)):
        raise ShiftbenchError(f"{where + ': ' if where else ''}checkpoint path must be a str or os.PathLike; "
                              f"got {type(path).__name__}")
    try:
        return _load(Path(path), map_location)
    except ShiftbenchError as exc:
        if where is None:
            raise
        raise ShiftbenchError(f"{where}: {exc}") from None


#: the first bytes of what ``torch.load`` reads: a ``torch.save`` zip archive, or a legacy pickle (protocol 2+)
_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a torch checkpoint as far as its ends tell, cheaply (a few bytes at either end, no
    unpickling), or None: not a readable file, empty, neither a ``torch.save`` zip nor a legacy pickle, or a zip
    whose directory at the end is missing (a download or copy cut short). Unpickling can still fail later."""
    if why := file_problem(path):
        return why
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head.startswith(_ZIP) and not zipfile.is_zipfile(f):
                return "is cut short (a zip archive without its directory at the end: an interrupted download or copy?)"
    except OSError as exc:
        return f"cannot be opened ({exc.strerror or type(exc).__name__})"
    if not head:
        return "is empty"
    if not head.startswith((_ZIP, _PICKLE)):
        return ("is not a torch checkpoint (neither a torch.save zip archive nor a pickle; it begins with bytes "
                f"{head.hex(' ')})")
    return None


def _load(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    if why := checkpoint_problem(path):
        raise ShiftbenchError(f"checkpoint {path} {why}")
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4": refused below anyway
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)|but got (<[^>]+>)", text)
        if found is None:
            detail = next((line.strip() for line in text.splitlines() if line.startswith("Unsupported")), "")
            raise ShiftbenchError(f"checkpoint {path} is not a readable torch file ({detail or 'unpickling failed'})"
                                  ) from None
        raise ShiftbenchError(f"checkpoint {path} refused: it holds a pickled {found.group(1) or found.group(2)}, and "
                              "loading that needs arbitrary pickled code, which could run anything; re-save it as "
                              "plain tensors, e.g. torch.save({'state_dict': model.state_dict()}, path)") from None
    except Exception as exc:  # torch.load on arbitrary bytes raises anything: KeyError, IndexError, struct.error, ...
        text = str(exc).strip()
        said = isinstance(exc, (RuntimeError, OSError, EOFError, ValueError)) and text  # messages worth quoting
        detail = text.split(". ")[0].splitlines()[0] if said else type(exc).__name__
        raise ShiftbenchError(f"checkpoint {path} is not a readable torch file ({detail})") from None
    return _normalise(obj, path)


def _normalise(obj: Any, path: Path) -> dict[str, Any]:
    meta = {}
    if isinstance(obj, Mapping):
        meta = obj.get("meta", {}) if isinstance(obj.get("meta"), Mapping) else {}
        state = next((obj[k] for k in STATE_KEYS if isinstance(obj.get(k), Mapping)), obj)
    else:
        state = None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ShiftbenchError(f"checkpoint {path} holds no state dict; expected a dict with "
                              f"{' or '.join(STATE_KEYS)}, or a dict of tensors")
    state = dict(state)
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return {"state_dict": state, "meta": dict(meta)}


def load_strict(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module``; any missing/unexpected key or shape mismatch raises one
    error listing the first few of each."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} != {list(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:SHOW])}{', ...' if len(keys) > SHOW else ''}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches (checkpoint != model)", shapes)) if keys]
    if problems:
        raise ShiftbenchError(f"{source} does not fit the model: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)


def check_classes(state: Mapping[str, Tensor], classes: int, source: str) -> None:
    """Refuse a checkpoint whose classifier predicts another number of classes than the suite."""
    for name in ("classifier.classifier.3.weight", "final_conv.weight"):
        if name in state and state[name].shape[0] != classes:
            raise ShiftbenchError(f"{source} predicts {state[name].shape[0]} classes, the suite's dataset has "
                                  f"{classes}; use a checkpoint trained for {classes} classes")


def versions() -> dict[str, str]:
    """Versions of the packages that shape a checkpoint."""
    import torchvision

    from shiftbench import __version__

    return {"shiftbench": str(__version__), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__)}


def weights_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values (BatchNorm statistics included): the same
    weights give the same digest however the file holding them was written."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        t = t.to_dense() if t.layout != torch.strided else t  # sparse: its values, not how they are stored
        t = t.cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``{"state_dict", "meta"}`` atomically; ``meta`` must hold plain types only."""
    io.torch_save({"state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
                   "meta": {**meta, "versions": versions()}}, path)
