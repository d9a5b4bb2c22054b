"""The run directory: a manifest, one atomic state file per finished condition, and the outputs.

```
OUT/manifest.json              suite name, identity digest (and its contents, seed, limit), what makes its values
                               comparable (``Suite.comparable``), the inputs of :func:`run_inputs` and the states'
                               format: a different suite, other inputs or an older format is refused unless --force
OUT/states/<split>/<corruption>/<severity>.pt   accumulator states + per-condition meta, written atomically
OUT/maps/<split>/<sample>.npz  saved uncertainty maps (gallery)
OUT/results.csv|.parquet, curves.parquet, summary.json, run.log
```
A condition whose state file exists is finished; a killed run leaves at most temporary
files (``.*.tmp*``), which are ignored and cleaned on the next start. ``OUT/.shiftbench.lock`` holds an
advisory lock (``flock``) while a run writes the folder, so a second run into it is refused instead of
discarding or cleaning under the first; the system drops the lock when its process ends, killed or not.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from shiftbench import io
from shiftbench.errors import ShiftbenchError
from shiftbench.runner.conditions import Condition

MANIFEST = "manifest.json"
LOCK = ".shiftbench.lock"
#: version of the saved accumulator states, raised whenever a state changes shape (2: ConditionalMetrics' hist
#: gained its column of patches above the last threshold); a folder of another format is refused at the start,
#: not when its tables are written after the sweep. Manifests without the field are format 1.
STATE_FORMAT = 2
OUTPUTS = ("results.csv", "results.parquet", "curves.parquet", "summary.json")


def checkpoint_digests(suite, each: bool = True) -> tuple[str, list[str]]:
    """Each checkpoint read once: the sha256 of all their names and bytes (``run_inputs``' ``checkpoints``) and,
    with ``each``, the sha256 of each file's bytes alone, in suite order (for comparing ranks whose file names
    differ; else an empty list). A file that cannot be read counts as the bytes ``missing`` (the model zoo says
    what is wrong with it)."""
    combined, files = hashlib.sha256(), []
    for path in suite.checkpoints():
        combined.update(f"\0{path.name}\0".encode())
        hashers = [combined, hashlib.sha256()] if each else [combined]
        try:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    for h in hashers:
                        h.update(block)
        except OSError:
            for h in hashers:
                h.update(b"missing")
        files += [h.hexdigest() for h in hashers[1:]]
    return combined.hexdigest(), files


def run_inputs(suite, device_type: str = "cpu", threads: tuple[int, int] = (1, 0), world_size: int = 1,
               factory_weights: dict[str, str] | None = None, checkpoints: str | None = None) -> dict[str, Any]:
    """What changes a condition's result besides the suite file; a run is only resumed with the same:

    checkpoints  sha256 of the bytes of every checkpoint (a model retrained in place)
    factory_weights  the weights digest of each custom model without a checkpoint (its factory makes its
                 weights: another seed or file there), ``ModelZoo.factory_digests``; None when there is none
    amp, device  ``run.amp`` and the device type (CPU and CUDA draw other random streams)
    exact        ``run.exact``, and when it is false the batch size and the number of processes (they make up
                 the batches, and batched convolutions round differently)
    threads      on the CPU, the torch threads of the forwards and of the metrics (``threads`` from
                 ``thread_split``; metrics without a worker run on the forwards' threads): kernels round
                 differently with another thread count. None on CUDA.

    ``checkpoints``: the first of :func:`checkpoint_digests`, when the caller has it already.
    """
    if checkpoints is None:
        checkpoints = checkpoint_digests(suite, each=False)[0]
    forward, metrics = threads
    return {"checkpoints": checkpoints, "factory_weights": factory_weights or None, "amp": suite.run.amp,
            "device": device_type, "exact": suite.run.exact,
            "batch_size": None if suite.run.exact else suite.run.batch_size,
            "processes": None if suite.run.exact else world_size,
            "threads": [forward, metrics or forward] if device_type == "cpu" else None}


#: how a changed input is named in the refusal, and what sets it
_INPUT_WORDS = {"checkpoints": "checkpoint files (a model retrained in place?)",
                "factory_weights": "weights from the factories of custom models without a checkpoint",
                "amp": "run.amp",
                "device": "device type", "exact": "run.exact", "batch_size": "batch size (with run.exact false)",
                "processes": "number of processes (with run.exact false)",
                "threads": "torch threads [forwards, metrics] (--overlap, OMP_NUM_THREADS)"}


def changed_inputs(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """None when a run made with ``old`` inputs may be resumed with ``new`` ones, else what differs. An input
    ``old`` lacks was not recorded (an earlier shiftbench) and is not compared."""
    diffs = []
    for key, value in new.items():
        if key in old and old[key] != value:
            diffs.append(_INPUT_WORDS[key] if key in ("checkpoints", "factory_weights")
                         else f"{_INPUT_WORDS[key]} {_json(old.get(key))}, now {_json(value)}")
    return "; ".join(diffs) or None


def _json(value: Any) -> str:
    return json.dumps(value).replace(",", ", ")


def _scope_words(values: dict[str, Any], keys: Iterable[str]) -> str:
    """``seed 0, limit none`` for the ``keys`` of ``values``."""
    return ", ".join(f"{k} {'none' if values.get(k) is None else values.get(k)}" for k in keys)


#: lock descriptors this process holds. A flock belongs to the open file, which a fork shares: a DataLoader
#: worker would keep the folder locked after its run ended or was killed, so forked children close them.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._saved: dict[str, dict[str, Any]] = {}  # condition key -> payload written by this process
        self._lock_fd: int | None = None

    # ----------------------------------------------------------------- lock
    def lock(self) -> None:
        """Take the folder's advisory lock (held until :meth:`unlock` or the end of the process; forked children
        such as DataLoader workers close their copy), or refuse with the pid of the run that holds it. Without
        ``fcntl`` (Windows), or on a file system without flock, there is no lock. Taking it twice is a no-op."""
        try:
            import fcntl
        except ImportError:
            return
        if self._lock_fd is not None:
            return
        path = self.root / LOCK
        try:  # never through a symbolic link: the pid written below would overwrite the file it points to
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                         0o644)
        except OSError as exc:
            why = "it is a symbolic link; remove it" if exc.errno == errno.ELOOP else exc.strerror
            raise ShiftbenchError(f"{path}: cannot open the run folder's lock file ({why})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another process
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ShiftbenchError(f"{self.root}: another shiftbench run (pid {holder}) is writing this folder; "
                                  "wait for it to end, stop it (under torchrun stop its ranks too), or use "
                                  "another --out") from None
        except OSError:  # a file system without flock (ENOLCK, EOPNOTSUPP): run unlocked, as before the lock existed
            os.close(fd)
            return
        self._lock_fd = fd
        _HELD.add(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # for the refusal's line only
        except OSError:  # a full disk: the lock holds without the pid
            pass

    def unlock(self) -> None:
        if self._lock_fd is not None:
            _HELD.discard(self._lock_fd)
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    # ----------------------------------------------------------------- manifest
    def refuse_foreign(self, force: bool = False) -> None:
        """Refuse a folder that holds files but no run (someone's data), unless ``force``: checked before the
        lock file is made in it."""
        if (not force and self.root.is_dir() and not (self.root / MANIFEST).exists()
                and any(p.name != LOCK for p in self.root.iterdir())):
            raise ShiftbenchError(f"{self.root}: exists and is not a shiftbench run directory; "
                                  "use another --out, or --force to write into it")

    def open(self, suite_name: str, digest: str, force: bool = False, inputs: dict[str, Any] | None = None,
             scope: dict[str, Any] | None = None, contents: str | None = None,
             comparable: dict[str, Any] | None = None) -> None:
        """Create the run directory, or check that it belongs to the same suite (``digest``) run with the
        same checkpoints, precision, device and threads (``inputs``, see :func:`run_inputs`). ``scope``
        (``{"seed", "limit"}``, both part of the digest) and ``contents`` (the digest without them) let the
        refusal name the seed and limit when only they changed. ``comparable`` (``Suite.comparable``) is only
        recorded, for ``shiftbench check``."""
        manifest = self.root / MANIFEST
        self.refuse_foreign(force)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock()
        try:
            self._open_locked(manifest, suite_name, digest, force, inputs, scope, contents, comparable)
        except BaseException:
            self.unlock()
            raise

    def _open_locked(self, manifest: Path, suite_name: str, digest: str, force: bool, inputs: dict[str, Any] | None,
                     scope: dict[str, Any] | None, contents: str | None,
                     comparable: dict[str, Any] | None = None) -> None:
        if manifest.exists() and not self.holds_results():
            self.discard()  # a run that stopped before finishing anything (missing data, say): nothing to keep
        elif manifest.exists():
            old = io.read_json_object(manifest)
            if isinstance(old, str):
                problem = f"{manifest}: unreadable ({old}); use another --out, or --force to discard the run it holds"
            elif old.get("digest") != digest and scope and contents and old.get("contents") == contents:
                problem = (f"{self.root}: holds a run of suite {suite_name!r} with {_scope_words(old, scope)}; "
                           f"this run has {_scope_words(scope, scope)}: use another --out, or --force to discard it")
            elif old.get("digest") != digest:
                problem = (f"{self.root}: holds a run of a different suite ({old.get('suite', 'unknown')!r}, "
                           f"digest {str(old.get('digest'))[:12]}: another suite, or its file changed); use another "
                           "--out, or --force to discard it")
            elif old.get("format", 1) != STATE_FORMAT:
                problem = (f"{self.root}: holds states of format {old.get('format', 1)} (an older shiftbench), this "
                           f"one reads format {STATE_FORMAT}; use another --out, or --force to discard the run")
            elif inputs is not None and "inputs" in old and not isinstance(old["inputs"], dict):
                problem = (f"{self.root}: was written by an older shiftbench, which recorded its inputs as one "
                           "digest that cannot be compared with this one's; use another --out, or --force to "
                           "discard the run")
            elif inputs is not None and (diff := changed_inputs(old.get("inputs", inputs), inputs)):
                problem = (f"{self.root}: was run with other {diff}; its finished conditions would mix with new "
                           "ones: run as before, use another --out, or --force to discard it")
            else:
                problem = None
            if problem is not None:
                if not force:
                    raise ShiftbenchError(problem)
                self.discard()
        self.clean_temporaries()
        io.write_json(manifest, {"suite": suite_name, "digest": digest, **({"contents": contents} if contents else {}),
                                 **(scope or {}), **({"comparable": comparable} if comparable else {}),
                                 **({"inputs": inputs} if inputs else {}), "format": STATE_FORMAT})

    def holds_results(self) -> bool:
        """Whether the folder holds a finished condition or a results table (else there is nothing to keep)."""
        states = (p for p in (self.root / "states").rglob("*.pt") if not p.name.startswith("."))  # not temporaries
        return any(states) or any((self.root / name).exists() for name in OUTPUTS)

    def discard(self) -> None:
        """Remove the run this folder holds (another suite's, or one made with other inputs): its states,
        maps, tables, log and the report made from them."""
        self._saved.clear()
        for name in ("states", "maps", "report"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for name in OUTPUTS + (MANIFEST, "run.log", "suite.yaml"):
            (self.root / name).unlink(missing_ok=True)

    def clean_temporaries(self) -> None:
        for tmp in self.root.rglob(".*.tmp*"):
            tmp.unlink(missing_ok=True)

    # ----------------------------------------------------------------- states
    def state_path(self, cond: Condition) -> Path:
        return self.root / "states" / f"{cond.key}.pt"

    def is_done(self, cond: Condition) -> bool:
        return self.state_path(cond).exists()

    def finished(self) -> set[str]:
        """The keys (``split/corruption/severity``) of every finished condition in the folder, selected or not."""
        states = self.root / "states"
        return {p.relative_to(states).with_suffix("").as_posix() for p in states.glob("*/*/*.pt")}

    def save_state(self, cond: Condition, payload: dict[str, Any]) -> None:
        """Write a finished condition's states (atomically); this store also keeps them in memory, so the
        tables at the end of the run do not read back what it just wrote (a few hundred KB a condition)."""
        io.torch_save(payload, self.state_path(cond))
        self._saved[cond.key] = payload

    def load_state(self, cond: Condition) -> dict[str, Any]:
        if cond.key in self._saved and self.is_done(cond):
            return self._saved[cond.key]
        path = self.state_path(cond)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt state file: say which and how to recover
            raise ShiftbenchError(f"{path}: unreadable state file ({type(exc).__name__}); delete it to recompute "
                                  "that condition") from None

    def map_path(self, split: str, sample_id: str) -> Path:
        return self.root / "maps" / split / (sample_id.replace("/", "__") + ".npz")
