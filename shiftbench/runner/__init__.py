"""The benchmark runner: a suite in, a run directory of states, tables and provenance out.

``run_suite(suite)`` sweeps clean data on every split group, then each corruption x
severity on the corrupted groups, through every model of the suite. Each finished
condition's accumulator states are written atomically, so a re-run (or a run killed at
any moment and started again) skips what is done and gives identical results. Under
``torchrun`` the ranks shard the images and sum their states before rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from shiftbench import io
from shiftbench.errors import ShiftbenchError, Terminated, counted, one_line
from shiftbench.runner import dist
from shiftbench.runner.conditions import Condition, enumerate_conditions
from shiftbench.runner.data import cache_budget, loader_workers, open_splits
from shiftbench.runner.store import RunStore, checkpoint_digests, run_inputs
from shiftbench.runner.sweep import TERMINATE, MetricWorker, Timer, sweep_conditions, thread_split

log = logging.getLogger("shiftbench.run")
# run.log is the main rank's (see _setup_log); without a handler the other ranks' records would reach Python's
# last-resort handler and print bare lines on their stderr (a failed condition is gathered into summary.json)
log.addHandler(logging.NullHandler())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ShiftbenchError("run.device: 'cuda' was asked for but no CUDA device is available; use cpu or auto")
    return torch.device(name)


def estimator_plan(suite) -> dict[str, tuple[str, ...]]:
    """model name -> the estimators evaluated on it."""
    return {m.name: m.estimators for m in suite.models}


def _versions() -> dict[str, str]:
    import kornia
    import numpy
    import torchvision

    from shiftbench import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "kornia": kornia.__version__, "numpy": numpy.__version__, "shiftbench": __version__}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _setup_log(path: Path, is_main: bool) -> logging.Handler | None:
    if not is_main:
        return None
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def run_suite(suite, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a suite; returns the summary written to ``summary.json``. SIGTERM ends it as Ctrl-C
    does (:class:`Terminated`): the finished conditions are kept, and run.log says so."""
    with _sigterm_interrupts():
        try:
            return _run_suite(suite, force, progress)
        except Exception as exc:  # what SIGTERM caused (a DataLoader worker killed with the group) is SIGTERM
            if TERMINATE.is_set():
                raise Terminated("SIGTERM") from exc
            raise


@contextlib.contextmanager
def _sigterm_interrupts():
    """While the block runs in the main thread, SIGTERM raises :class:`Terminated` there and sets
    ``sweep.TERMINATE``: raised inside a fork hook (a DataLoader starting its workers) the exception is only
    printed, so the sweep stops at its next batch, and what the signal caused meanwhile (a worker killed with
    the process group by torchrun or Slurm) is reported as the SIGTERM it is. DataLoader workers keep torch's
    own SIGTERM handling."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()
    TERMINATE.clear()

    def terminate(signum, frame):
        if os.getpid() != owner:  # a forked child without a handler of its own: the default, as without ours
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        # DataLoader workers signalled with the group die too; torch's SIGCHLD handler would raise that as a
        # second error while the run unwinds (a traceback from the iterator's __del__): the process is ending
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        TERMINATE.set()
        raise Terminated("SIGTERM")

    def unraisable(info):
        if isinstance(info.exc_value, Terminated):  # raised inside a fork hook, only printed: the flag carries it
            return
        if TERMINATE.is_set() and "DataLoaderIter" in getattr(info.object, "__qualname__", ""):
            return  # an iterator the signal cut short in its __init__ cannot shut down workers it never recorded
        hook(info)

    previous, hook = signal.signal(signal.SIGTERM, terminate), sys.unraisablehook
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set from C
        if not TERMINATE.is_set():  # else kept: the cut-short iterator is collected after the one-line message
            sys.unraisablehook = hook


def _run_suite(suite, force: bool, progress: bool) -> dict[str, Any]:
    from shiftbench.models.zoo import ModelZoo
    from shiftbench.runner.results import write_results

    started = time.perf_counter()
    device = resolve_device(suite.run.device)
    world = dist.init(device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    store = RunStore(suite.run.out)
    digest = suite.digest()
    threads = thread_split(suite.run.overlap, device)
    handler = None
    try:
        if world.is_main and store.root.is_dir():  # a folder in use, or not a run's, refuses before any model loads
            store.refuse_foreign(force)
            store.lock()
        zoo = ModelZoo.from_suite(suite, device)  # before the folder: a bad checkpoint leaves nothing behind
        checkpoints, files = checkpoint_digests(suite, each=world.distributed)  # each file read once per rank
        inputs = run_inputs(suite, device.type, threads, world.size, zoo.factory_digests, checkpoints)
        _same_on_every_rank(world, digest, inputs, files)
        if world.is_main:  # the main rank holds the folder's lock until the run ends
            store.open(suite.name, digest, force=force, inputs=inputs,
                       scope={"seed": suite.run.seed, "limit": suite.run.limit}, contents=suite.digest(scope=False),
                       comparable=suite.comparable())
            io.write_text(store.root / "suite.yaml", yaml.safe_dump(suite.raw, sort_keys=False))
        dist.barrier(world, "opening the run folder")
        handler = _setup_log(store.root / "run.log", world.is_main)
        timer = Timer(device)
        log.info("suite %s (%s) on %s, world size %d", suite.name, digest[:12], device, world.size)
        for note in zoo.notes:
            log.info(note)
        plan = estimator_plan(suite)
        groups = list(suite.dataset.eval)
        conditions = enumerate_conditions(groups, list(suite.corruptions.splits), list(suite.corruptions.names),
                                          list(suite.corruptions.severities), suite.corruptions.clean)
        todo = [c for c in conditions if not store.is_done(c)]
        todo = dist.broadcast_object(todo, world, "sharing the conditions left to run")
        data = {"workers": loader_workers(suite.run.workers, device, world),
                "cache_budget_bytes": cache_budget(suite.run.cache, world)}
        with timer("data"):
            splits = open_splits(suite, todo, world, data["cache_budget_bytes"], data["workers"])
        data["cached"] = {g: split.cache is not None for g, split in splits.items()}
        log.info("data: %s", data)
        failed: list[dict[str, str]] = []
        total = sum(splits[c.split].n_batches(suite.run.batch_size) for c in todo)
        shown = progress and world.is_main and total > 0  # nothing left to run: no empty bar
        bar = tqdm(total=total, desc=f"{suite.name}", unit="batch", disable=not shown, dynamic_ncols=True)
        before = torch.get_num_threads()
        torch.set_num_threads(threads[0])
        try:
            with MetricWorker(threads[1]) as worker:
                conds = sweep_conditions(zoo, suite, plan, todo, splits, device, timer, worker,
                                         on_batch=lambda: bar.update(1), save_map=lambda c: _map_writer(store, c))
                for cond, accs, reason in _announce(conds, todo, bar):
                    failure = _finish(cond, accs, reason, timer, store, world)
                    if failure:
                        failed.append({"condition": cond.key, "reason": failure})
                        log.error("condition %s failed: %s", cond.key, failure)
        finally:
            torch.set_num_threads(before)
        bar.close()
        skipped = [s for d in splits.values() for s in d.skipped]
        skipped = [s for part in dist.gather_objects(skipped, world, "gathering the skipped images") for s in part]
        failed = [f for part in dist.gather_objects(failed, world, "gathering the failed conditions") for f in part]
        failed = list({f["condition"]: f for f in failed}.values())
        summary: dict[str, Any] = {}
        if world.is_main:
            with timer("io"):
                write_results(suite, store, conditions)
            summary = _summary(suite, digest, device, world, timer, started, conditions, todo, failed, skipped,
                               threads)
            summary["conditions"]["not_selected"] = len(store.finished() - {c.key for c in conditions})
            summary["gallery_missing"] = _gallery_missing(suite, store, groups)
            summary["data"] = data
            io.write_json(store.root / "summary.json", summary)
            _print_end(summary, store.root)
        summary = dist.broadcast_object(summary, world, "sharing the summary of the run")
        return summary
    except BaseException as exc:  # what ended the run, in its log too
        if handler is not None:
            log.error(_stopped(exc))
        raise
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        store.unlock()
        dist.shutdown(world)


def _announce(conds, todo: list[Condition], bar):
    """The sweep's conditions, showing on the progress bar the one whose batches run next."""
    if todo:
        bar.set_postfix_str(todo[0].key)
    for i, item in enumerate(conds):
        if i + 1 < len(todo):
            bar.set_postfix_str(todo[i + 1].key)
        yield item


def _map_writer(store: RunStore, cond: Condition):
    """Writes one gallery sample's maps of ``cond`` atomically."""
    import numpy as np

    def save_map(sid: str, arrays: dict) -> None:
        with io.atomic_path(store.map_path(cond.split, sid)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)

    return save_map


def _finish(cond: Condition, accs, reason: str | None, timer: Timer, store: RunStore, world) -> str | None:
    """Reduce one swept condition over ranks and write its states; the failure reason, if any."""
    # every rank must agree before any collective: one failing rank fails the condition
    reasons = [r for r in dist.gather_objects(reason, world, f"ending condition {cond.key}") if r]
    if reasons:
        return reasons[0]
    with timer("io"):
        if world.distributed:
            with dist.collective(world, f"summing the states of condition {cond.key}"):
                accs.all_reduce()
        # a collective: every rank calls it
        n_images = sum(dist.gather_objects(accs.n_images, world, f"counting the images of condition {cond.key}"))
        if world.is_main:
            store.save_state(cond, {"condition": cond.key, "states": accs.state_dict(), "n_images": int(n_images)})
    return None


def _summary(suite, digest, device, world, timer, started, conditions, todo, failed, skipped,
             threads: tuple[int, int]) -> dict[str, Any]:
    wall = time.perf_counter() - started
    stages = {s: round(timer.seconds.get(s, 0.0), 3) for s in Timer.STAGES}
    outside = 1.0 - stages["forward"] / wall if wall > 0 else 0.0
    return {
        "suite": {"name": suite.name, "digest": digest, "path": str(suite.path) if suite.path else None},
        "classes": _class_names(suite),
        "models": {m.name: m.kind for m in suite.models},
        "seed": suite.run.seed,
        "device": str(device),
        "world_size": world.size,
        "torch_threads": torch.get_num_threads(),
        # the forwards' and the metric worker's threads (0: none): CPU convolutions round differently with another count
        "threads": {"forward": threads[0], "metrics": threads[1]},
        "versions": _versions(),
        "git_commit": _git_commit(),
        "wall_time_s": round(wall, 3),
        "time_s": stages,
        "outside_forward_share": round(outside, 4),
        "conditions": {"total": len(conditions), "run": len(todo), "already_done": len(conditions) - len(todo)},
        "failed": failed,
        "skipped_files": skipped,
    }


def _gallery_missing(suite, store: RunStore, groups: list[str]) -> list[str]:
    """metrics.gallery ids whose maps no split group saved (not in the data, or cut by --limit); saved on the
    clean conditions, so only checked when the suite sweeps them."""
    if not suite.corruptions.clean:
        return []
    return [sid for sid in suite.metrics.gallery if not any(store.map_path(g, sid).exists() for g in groups)]


def _class_names(suite) -> list[str]:
    from shiftbench.data import class_names

    return list(class_names(suite.dataset.name, suite.dataset.classes))


def _same_on_every_rank(world: dist.World, digest: str, inputs: dict[str, Any], files: list[str]) -> None:
    """Refuse (on every rank) a torchrun whose ranks read another suite or other weights than rank 0 (a node
    with a stale copy): their states would merge silently. Checkpoints are compared by their bytes, file by
    file in suite order (their names may differ: ``${RANK}`` in a path); thread counts may differ between
    nodes."""
    if not world.distributed:
        return
    mine = {"suite": digest, "checkpoints": files,
            **{k: v for k, v in inputs.items() if k not in ("threads", "checkpoints")}}
    ranks = dist.gather_objects(mine, world, "comparing the ranks' suite and checkpoints")
    for rank, theirs in enumerate(ranks):
        if theirs != ranks[0]:
            what = next(k for k in ranks[0] if theirs.get(k) != ranks[0][k])
            words = {"suite": "another suite file (a node with another copy?)",
                     "checkpoints": "other checkpoint bytes (a node with another copy?)",
                     "factory_weights": "other weights from its custom models' factories (a node with another "
                                        "copy, or a factory that does not seed its weights?)"}
            raise ShiftbenchError(f"rank {rank} of {world.size} reads {words.get(what, f'another {what}')} than "
                                  "rank 0: every rank must see the same suite and checkpoints")


def _print_end(summary: dict[str, Any], root: Path) -> None:
    """The end line (stdout) and the warnings: gallery ids without maps (stdout), skipped unreadable images
    (stderr); each also in run.log."""
    t, done = summary["time_s"], summary["conditions"]["already_done"]
    if summary["conditions"]["run"] == 0:  # a finished run run again: the tables are rewritten from its states
        _say(f"nothing left to run ({counted(done, 'condition')} already done); tables rewritten from the saved "
             f"states in {summary['wall_time_s']:.1f} s")
    else:
        along = " alongside them on a worker thread" if summary["threads"]["metrics"] else ""
        _say(f"{counted(summary['conditions']['run'], 'condition')} run, {done} already done, "
             f"{len(summary['failed'])} failed; wall {summary['wall_time_s']:.1f} s "
             f"(data {t['data']:.1f}, corruption {t['corruption']:.1f}, forward {t['forward']:.1f}, "
             f"estimators+metrics {t['estimators_metrics']:.1f}{along}, io {t['io']:.1f}); "
             f"{100 * summary['outside_forward_share']:.0f}% outside model forwards")
    if others := summary["conditions"].get("not_selected"):
        _say(f"note: the folder holds {counted(others, 'more finished condition')} that this command did not select; "
             "the tables hold only the selected ones (select them again, e.g. with the suite's own list, to have "
             "them back)")
    if failed := summary.get("failed"):
        first = failed[0]
        _say(f"warning: {counted(len(failed), 'condition')} failed (listed in {root / 'summary.json'} failed and in "
             f"run.log), the first: {first['condition']}: {first['reason']}", logging.WARNING, sys.stderr)
    missing = summary.get("gallery_missing") or []
    if missing:
        _say(f"warning: metrics.gallery: {counted(len(missing), 'sample id')} not among the evaluated images, so no "
             f"uncertainty maps for them: {', '.join(missing)} (check the ids and --limit)", logging.WARNING)
    skipped = summary.get("skipped_files") or []
    if skipped:
        first = skipped[0]
        _say(f"warning: {counted(len(skipped), 'unreadable image')} skipped (listed in {root / 'summary.json'} "
             f"skipped_files), the first: {first['file']}: {first['reason']}", logging.WARNING, sys.stderr)


def _say(line: str, level: int = logging.INFO, stream=None) -> None:
    """``shiftbench: <line>`` on ``stream`` (default stdout), and ``line`` in run.log at ``level`` (which names a
    warning already)."""
    print(f"shiftbench: {line}", file=stream or sys.stdout)
    log.log(level, line.removeprefix("warning: "))


def _stopped(exc: BaseException) -> str:
    """The run.log line of what ended a run early."""
    terminated = isinstance(exc, Terminated) or TERMINATE.is_set()  # the flag: what the signal caused, too
    if terminated or isinstance(exc, KeyboardInterrupt):
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        return f"{how}; the finished conditions are kept, the same command resumes"
    what = "" if isinstance(exc, ShiftbenchError) else f"{type(exc).__name__}: "
    return f"stopped by an error: {what}{one_line(str(exc))}"
