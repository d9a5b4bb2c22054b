"""The runner end to end on a tiny suite (random tiny models, 48x64 synthetic scenes)."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from runner_fixture import make_suite, suite_dict, write_checkpoints
from shiftbench.cli import main
from shiftbench.errors import ShiftbenchError, Terminated
from shiftbench.runner.results import RESULT_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(count=2, size=(48, 64))


def run(suite: Path, out: Path, *extra: str) -> int:
    return main(["run", str(suite), "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    return make_suite(tmp_path_factory.mktemp("suite"), **SMALL)


@pytest.fixture(scope="module")
def base(suite, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "base"
    assert run(suite, out) == 0
    return out


def test_outputs_follow_the_run_format(base):
    for name in ("manifest.json", "suite.yaml", "results.csv", "results.parquet", "curves.parquet", "summary.json",
                 "run.log"):
        assert (base / name).stat().st_size > 0, name
    res = pd.read_csv(base / "results.csv")
    assert list(res.columns) == RESULT_COLUMNS
    # conditions: id/clean, ood/clean, id/fog/2, id/gaussian_noise/2; estimators 2 + 2 + 6 + 4 per condition
    assert len(res) == 4 * 14
    assert set(zip(res.split, res.corruption, res.severity)) == {
        ("id", "clean", 0), ("ood", "clean", 0), ("id", "fog", 2), ("id", "gaussian_noise", 2)}
    assert res[res.split == "id"].n_images.eq(4).all() and res[res.split == "ood"].n_images.eq(2).all()
    assert res.n_pixels.eq(res.n_images * 48 * 64).all()  # synthetic labels have no ignore pixels
    assert res[["miou", "ece", "brier", "nll", "au_pavpu"]].notna().all().all()
    assert pd.read_parquet(base / "results.parquet").equals(res) or np.allclose(
        pd.read_parquet(base / "results.parquet").select_dtypes("number"), res.select_dtypes("number"), equal_nan=True)
    curves = pd.read_parquet(base / "curves.parquet")
    assert set(curves.curve) == {"conditional", "reliability", "histogram"}
    assert len(curves[curves.curve == "conditional"]) == 4 * 14 * 11  # thresholds: 11 in the fixture
    summary = json.loads((base / "summary.json").read_text())
    assert summary["conditions"] == {"total": 4, "run": 4, "already_done": 0, "not_selected": 0}
    assert summary["failed"] == [] and summary["skipped_files"] == []
    assert set(summary["time_s"]) == {"data", "corruption", "forward", "estimators_metrics", "io"}
    assert 0 <= summary["outside_forward_share"] <= 1
    assert summary["classes"][0] == "Person" and summary["models"]["moe_simple"] == "moe"
    assert summary["torch_threads"] == torch.get_num_threads()
    assert summary["gallery_missing"] == []
    log = (base / "run.log").read_text()  # the end line too, not only the start
    assert re.search(r" INFO 4 conditions run, 0 already done, 0 failed; wall ", log), log
    maps = np.load(base / "maps" / "id" / "highway__test__000000.npz")
    assert maps["image"].shape == (48, 64, 3) and maps["image"].dtype == np.uint8
    assert maps["unc__moe_simple__gate_entropy"].dtype == np.float16
    assert set(np.unique(maps["pred__ensemble"])) <= set(range(11))
    assert (base / "maps" / "ood" / "ambiguous__test__000001.npz").exists()


def test_multiclass_scores_are_the_models_and_match_a_direct_computation(suite, base):
    from shiftbench.models.zoo import ModelZoo
    from shiftbench.runner.data import open_split
    from shiftbench.runner.dist import World
    from shiftbench.suite import load_suite

    res = pd.read_csv(base / "results.csv")
    per_model = res.groupby(["split", "corruption", "severity", "model"])[["brier_multiclass", "nll_multiclass"]]
    assert per_model.nunique().eq(1).all().all()  # carried by one estimator, the same on every row of a model
    assert res[["brier_multiclass", "nll_multiclass"]].notna().all().all()
    s = load_suite(suite)
    zoo = ModelZoo.from_suite(s, torch.device("cpu"))
    brier, nll, n = 0.0, 0.0, 0
    for batch in open_split(s, "id", World()).batches(4):
        with torch.no_grad():
            p = zoo(batch.images.float() / 255, [0] * len(batch.ids))["ensemble"].probs.double()
        onehot = torch.nn.functional.one_hot(batch.labels, p.shape[1]).permute(0, 3, 1, 2).double()
        brier += float(((p - onehot) ** 2).sum(1).sum())
        nll += float(-p.gather(1, batch.labels[:, None]).clamp_min(1e-12).log().sum())
        n += batch.labels.numel()
    rows = res[(res.split == "id") & (res.corruption == "clean") & (res.model == "ensemble")]
    assert rows.brier_multiclass.to_numpy() == pytest.approx(brier / n, rel=1e-5)
    assert rows.nll_multiclass.to_numpy() == pytest.approx(nll / n, rel=1e-5)


def test_a_smaller_selection_says_the_tables_leave_the_other_finished_conditions_out(suite, base, tmp_path, capsys):
    """The tables hold what the command selected; the other finished states stay, are counted in the end line
    and summary.json, and come back into the tables when selected again."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    full = pd.read_csv(base / "results.csv")
    corrupted = full[full["corruption"] != "clean"][["split", "corruption", "severity"]].drop_duplicates()
    assert run(suite, copy, "--corruptions", "none") == 0
    out = capsys.readouterr().out
    assert (f"note: the folder holds {len(corrupted)} more finished conditions that this command did not select; "
            "the tables hold only the selected ones") in out
    assert json.loads((copy / "summary.json").read_text())["conditions"]["not_selected"] == len(corrupted) > 0
    assert set(pd.read_csv(copy / "results.csv")["corruption"]) == {"clean"}
    assert run(suite, copy) == 0
    assert "more finished" not in capsys.readouterr().out
    assert (copy / "results.csv").read_bytes() == (base / "results.csv").read_bytes()


def test_rerun_skips_finished_conditions(suite, base, capsys):
    before = (base / "results.csv").read_bytes()
    assert run(suite, base) == 0
    assert "nothing left to run (4 conditions already done)" in capsys.readouterr().out
    summary = json.loads((base / "summary.json").read_text())
    assert summary["conditions"]["run"] == 0 and summary["conditions"]["already_done"] == 4
    assert (base / "results.csv").read_bytes() == before
    assert main(["run", str(suite), "--out", str(base)]) == 0  # with progress: no empty bar
    out, err = capsys.readouterr()
    assert "nothing left to run" in out and "batch" not in err, err


def test_batch_size_does_not_change_results(suite, base, tmp_path):
    assert run(suite, tmp_path / "bs3", "--batch-size", "3") == 0
    assert (tmp_path / "bs3" / "results.csv").read_bytes() == (base / "results.csv").read_bytes()


@pytest.mark.parametrize("overlap", ["true", "false"])
def test_killed_run_resumes_to_identical_results(suite, base, tmp_path, monkeypatch, overlap):
    import shiftbench.runner.sweep as sweep

    real = sweep.forward_batch
    seen = []

    def dies_in_third_condition(zoo, cond, *args, **kwargs):
        if cond.key not in seen:
            seen.append(cond.key)
        if len(seen) == 3:
            raise KeyboardInterrupt  # the process is killed mid-condition (the metric worker may be busy)
        return real(zoo, cond, *args, **kwargs)

    reference = base
    if overlap == "false":  # the forwards round as on 2 threads, not as base's 1 + 1
        reference = tmp_path / "reference"
        assert run(suite, reference, "--overlap", overlap) == 0
    monkeypatch.setattr(sweep, "forward_batch", dies_in_third_condition)
    out = tmp_path / "killed"
    assert run(suite, out, "--overlap", overlap) == 130
    saved = len(list((out / "states").rglob("*.pt")))
    # with the worker, the second condition's last batch is still on it when the third one's first forward
    # starts, so only the first condition was written
    assert saved == (1 if overlap == "true" else 2) and not (out / "results.csv").exists()
    monkeypatch.setattr(sweep, "forward_batch", real)
    assert run(suite, out, "--overlap", overlap) == 0
    assert json.loads((out / "summary.json").read_text())["conditions"]["already_done"] == saved
    assert (out / "results.csv").read_bytes() == (reference / "results.csv").read_bytes()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def _with_run(suite: Path, folder: Path, **run_fields) -> Path:
    """A copy of ``suite`` (beside its checkpoints) with fields of its run section replaced."""
    data = yaml.safe_load(suite.read_text())
    data["run"].update(run_fields)
    path = suite.parent / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_metric_worker_overlap_gives_the_sequential_results(suite, tmp_path):
    """With the estimators and metrics on a worker thread (2 threads: 1 + 1) the results are those of the
    sequential sweep on 1 thread, byte for byte, and the summary says how the threads were split.
    (run.overlap in the suite file for the one, the --overlap override for the other.)"""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert run(_with_run(suite, tmp_path / "seq", overlap=False), tmp_path / "seq") == 0
        torch.set_num_threads(2)
        assert run(suite, tmp_path / "overlap", "--overlap", "true") == 0
        assert torch.get_num_threads() == 2  # given back after the sweep
    finally:
        torch.set_num_threads(before)
    seq, over = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("seq", "overlap"))
    assert seq["threads"] == {"forward": 1, "metrics": 0} and over["threads"] == {"forward": 1, "metrics": 1}
    assert over["torch_threads"] == 2
    assert (tmp_path / "overlap" / "results.csv").read_bytes() == (tmp_path / "seq" / "results.csv").read_bytes()
    for npz in (tmp_path / "seq" / "maps").rglob("*.npz"):
        a, b = np.load(npz), np.load(tmp_path / "overlap" / npz.relative_to(tmp_path / "seq"))
        assert all(np.array_equal(a[k], b[k]) for k in a.files), npz.name


def test_without_the_worker_a_batch_is_freed_before_the_next_forward(suite, tmp_path, monkeypatch):
    """Peak memory (on a GPU) is one batch's model outputs: nothing holds them through the next forward."""
    import weakref

    import shiftbench.runner.sweep as sweep

    real, alive = sweep.forward_batch, []

    def watched(*args, **kwargs):
        assert not [r for r in alive if r() is not None], "the previous batch's outputs are still alive"
        x, preds = real(*args, **kwargs)
        alive[:] = [weakref.ref(p.probs) for p in preds.values()]
        return x, preds

    monkeypatch.setattr(sweep, "forward_batch", watched)
    assert run(suite, tmp_path / "seq", "--overlap", "false") == 0


@pytest.mark.parametrize("overlap, device, threads, expected", [
    ("auto", "cpu", 2, (1, 1)), ("auto", "cpu", 4, (2, 2)), ("auto", "cpu", 3, (2, 1)), ("auto", "cpu", 1, (1, 0)),
    ("auto", "cuda", 4, (4, 0)), (False, "cpu", 2, (2, 0)), (True, "cpu", 1, (1, 1)), (True, "cuda", 2, (1, 1))])
def test_thread_split(overlap, device, threads, expected):
    from shiftbench.runner.sweep import thread_split

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert thread_split(overlap, torch.device(device)) == expected
    finally:
        torch.set_num_threads(before)


def test_reading_each_batch_is_charged_to_data():
    from shiftbench.runner.sweep import Timer, _timed

    timer, charged = Timer(torch.device("cpu")), []

    def batches():
        for k in range(3):
            charged.append(timer.seconds["data"])
            time.sleep(0.01)  # a batch that takes a while to read
            yield k

    assert list(_timed(batches(), timer, "data")) == [0, 1, 2]
    assert charged[0] == 0 and charged[1] > charged[0] and charged[2] > charged[1] and timer.seconds["data"] >= 0.03


def test_metric_worker_runs_jobs_in_order_on_its_threads_and_reraises():
    from shiftbench.runner.sweep import MetricWorker

    seen = []
    with MetricWorker(1) as worker:
        for i in range(3):
            worker.submit(lambda i=i: seen.append((i, torch.get_num_threads())))
        worker.wait()
        assert seen == [(0, 1), (1, 1), (2, 1)]
        worker.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            worker.wait()
        worker.wait()  # raised once
    with MetricWorker(0) as inline:
        assert not inline.threaded
        inline.submit(lambda: seen.append("now"))
        assert seen[-1] == "now"


def test_sigkill_at_any_moment_resumes_to_identical_results(suite, base, tmp_path):
    """A real SIGKILL of `shiftbench run` (no cleanup code runs): at start-up, after each finished condition
    and while the tables are written. Every file under its final name must be complete, and the resumed run's
    results.csv byte-identical to the uninterrupted one."""
    import signal
    import time

    out = tmp_path / "sigkill"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "shiftbench", "run", str(suite), "--out", str(out), "--quiet"]
    n_states = lambda: len(list((out / "states").rglob("[!.]*.pt"))) if (out / "states").exists() else 0  # noqa: E731
    writing = lambda: bool(list(out.glob(".results.*"))) or (out / "results.csv").exists()  # noqa: E731
    moments = [lambda: (out / "manifest.json").exists(), lambda: n_states() >= 1, lambda: n_states() >= 2,
               lambda: n_states() >= 4 and writing()]
    killed = 0
    for moment in moments:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and not moment() and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait(timeout=60)
        for path in (out / "states").rglob("[!.]*.pt") if (out / "states").exists() else []:
            torch.load(path, weights_only=True)  # complete: a half-written state would not load
        for name in ("manifest.json", "summary.json"):
            if (out / name).exists():
                json.loads((out / name).read_text())
    assert killed >= 3  # the last moment may pass between two polls
    assert run(suite, out) == 0
    assert (out / "results.csv").read_bytes() == (base / "results.csv").read_bytes()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def _other_suite_beside_a_run(suite: Path, out: Path) -> Path:
    """A run of ``suite`` (clean only) in ``out``, and a different suite (one more MC-dropout pass) to refuse."""
    other = yaml.safe_load(suite.read_text())
    other["models"][0]["passes"] = 3
    path = suite.parent / f"other_{out.parent.name}.yaml"
    path.write_text(yaml.safe_dump(other))
    assert run(suite, out, "--corruptions", "none") == 0
    return path


def test_a_different_suite_is_refused_unless_forced(suite, base, tmp_path, capsys):
    out = tmp_path / "run"
    path = _other_suite_beside_a_run(suite, out)
    capsys.readouterr()
    assert run(path, out, "--corruptions", "none") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different suite" in err and "--force" in err
    assert run(suite, out, "--corruptions", "none", "--limit", "1") == 2  # the same suite file, another scope
    assert (f"{out}: holds a run of suite 'tiny' with seed 0, limit none; this run has seed 0, limit 1: use another "
            "--out, or --force") in capsys.readouterr().err
    assert run(path, out, "--corruptions", "none", "--limit", "1") == 2  # contents and limit: another suite
    assert "holds a run of a different suite ('tiny', digest " in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "inputs": "9f" * 32}))  # an older shiftbench's
    assert run(suite, out, "--corruptions", "none") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("was written by an older shiftbench, which recorded its "
                                                       "inputs as one digest that cannot be compared with this one's; "
                                                       "use another --out, or --force to discard the run")
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "report").mkdir()
    (out / "report" / "report.md").write_text("a report of the other suite")
    assert run(path, out, "--corruptions", "none", "--force") == 0
    assert not (out / "report").exists()  # nothing of the discarded run is left to be mistaken for this one
    log = (out / "run.log").read_text()
    assert log.count("suite tiny") == 1, log


def test_a_run_that_finished_nothing_does_not_block_its_folder(tmp_path, capsys):
    path = make_suite(tmp_path / "suite", **SMALL)
    bad = yaml.safe_load(path.read_text())
    bad["models"][0]["checkpoint"] = "nope.pt"
    bad_path = path.with_name("bad.yaml")
    bad_path.write_text(yaml.safe_dump(bad))
    out = tmp_path / "run"
    assert run(bad_path, out, "--corruptions", "none") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "models.baseline.checkpoint: checkpoint" in err and "nope.pt not found" in err
    assert not out.exists()  # the models are built before the run folder is made
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"suite": "tiny", "digest": "0" * 64}))  # a run that finished nothing
    assert run(path, out, "--corruptions", "none") == 0  # the mended suite (another digest) takes the folder
    assert (out / "results.csv").exists()


def test_a_damaged_run_folder_is_named_in_one_line(tmp_path, capsys):
    path = make_suite(tmp_path / "suite", **SMALL)
    out = tmp_path / "run"
    assert run(path, out, "--corruptions", "none") == 0
    state = next((out / "states").rglob("*.pt"))
    torch.save({"x": torch.zeros(1)}, state)  # a torch file, but not a condition's states
    capsys.readouterr()
    assert run(path, out, "--corruptions", "none") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{state}: does not hold this suite's metric states" in err
    state.unlink()
    assert run(path, out, "--corruptions", "none") == 0
    payload = torch.load(state, weights_only=True)  # as an older shiftbench saved it: one threshold column fewer
    key = next(k for k in payload["states"] if k.startswith("conditional/"))
    hist = payload["states"][key]["hist"]
    payload["states"][key]["hist"] = hist[:, :-1].clone()
    torch.save(payload, state)
    capsys.readouterr()
    assert run(path, out, "--corruptions", "none") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("(saved with other settings?); delete it to recompute that condition")
    n = hist.shape[1]
    assert f"{state}: ConditionalMetrics: state 'hist' is torch.int64 [2, {n - 1}]; expected torch.int64 [2, {n}]" in err
    state.unlink()
    for text in ("[1]", "{not json", "\xff\xfe"):
        (out / "manifest.json").write_bytes(text.encode("latin-1"))
        assert run(path, out, "--corruptions", "none") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "manifest.json: unreadable (" in err and "--force" in err, err
    assert run(path, out, "--corruptions", "none", "--force") == 0


def test_a_run_folder_of_an_older_state_format_is_refused_before_the_sweep(tmp_path, capsys):
    """A manifest without 'format' (shiftbench before format 2) holds states of other shapes: refused at the
    start, not after sweeping the rest when its tables are written; --force discards it."""
    import json

    path = make_suite(tmp_path / "suite", **SMALL)
    out = tmp_path / "run"
    assert run(path, out, "--corruptions", "none") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == 2
    del manifest["format"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "results.csv").unlink()
    before = {p: p.stat().st_mtime_ns for p in (out / "states").rglob("*.pt")}
    capsys.readouterr()
    assert run(path, out, "--corruptions", "fog", "--severities", "1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds states of format 1 (an older shiftbench), this one reads format 2" in err
    assert {p: p.stat().st_mtime_ns for p in (out / "states").rglob("*.pt")} == before  # nothing swept
    assert not (out / "results.csv").exists()
    assert run(path, out, "--corruptions", "none", "--force") == 0
    assert json.loads((out / "manifest.json").read_text())["format"] == 2


def test_a_checkpoint_retrained_in_place_or_amp_toggled_is_not_resumed(tmp_path, capsys):
    """Same suite file, other model bytes (or precision, or device type): finished conditions must not mix in."""
    from shiftbench.runner.store import run_inputs
    from shiftbench.suite import load_suite

    path = make_suite(tmp_path / "suite", **SMALL)
    out = tmp_path / "run"
    assert run(path, out, "--corruptions", "none") == 0
    write_checkpoints(path.parent, seed=1)  # the same files, new weights
    capsys.readouterr()
    assert run(path, out, "--corruptions", "none") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was run with other checkpoint files (a model retrained in place?)" in err
    assert "--force" in err
    assert run(path, out, "--corruptions", "none", "--force") == 0
    assert run(path, out, "--corruptions", "none") == 0  # same inputs again: resumes (nothing to do)
    data = yaml.safe_load(path.read_text())
    data["run"]["amp"] = True
    path.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert run(path, out, "--corruptions", "none") == 2
    assert "was run with other run.amp false, now true;" in capsys.readouterr().err
    suite = load_suite(path)
    assert run_inputs(suite, "cpu") != run_inputs(suite, "cuda")
    assert run_inputs(suite, "cpu", (1, 0)) == run_inputs(suite, "cpu", (1, 1))  # metrics on the forward's 1 thread
    assert run_inputs(suite, "cuda", (2, 0)) == run_inputs(suite, "cuda", (1, 0))  # threads do not round GPU kernels
    assert run_inputs(suite, "cpu", world_size=1) == run_inputs(suite, "cpu", world_size=2)  # exact: per image
    from shiftbench.runner.store import changed_inputs

    now = run_inputs(suite, "cpu")
    earlier = {k: v for k, v in now.items() if k != "processes"}  # a folder from before it was recorded
    assert changed_inputs(earlier, {**now, "processes": 3}) is None
    assert changed_inputs(earlier, {**now, "amp": not now["amp"]}).startswith("run.amp")
    import dataclasses

    inexact = dataclasses.replace(suite, run=dataclasses.replace(suite.run, exact=False))
    assert run_inputs(inexact, "cpu", world_size=1) != run_inputs(inexact, "cpu", world_size=2)  # other batches


def test_a_custom_model_whose_factory_makes_other_weights_is_not_resumed(tmp_path, capsys):
    """A custom model without a checkpoint takes its weights from its factory (a seed, a file of its own): the
    run records their digest, so a factory changed between two runs is refused, not mixed in."""
    path = make_suite(tmp_path / "suite", **SMALL)
    (path.parent / "own_weights.py").write_text(
        "import torch\nfrom torch import nn\n\ndef build(seed=0):\n    torch.manual_seed(seed)\n"
        "    return nn.Conv2d(3, 11, 1)\n")
    data = yaml.safe_load(path.read_text())
    data["models"] = [{"name": "own", "kind": "custom", "factory": "own_weights:build", "kwargs": {"seed": 0}}]
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    assert run(path, out, "--corruptions", "none") == 0
    (path.parent / "own_weights.py").write_text(  # the suite file unchanged, the factory's seed changed
        "import torch\nfrom torch import nn\n\ndef build(seed=0):\n    torch.manual_seed(seed + 1)\n"
        "    return nn.Conv2d(3, 11, 1)\n")
    capsys.readouterr()
    code = subprocess.run([sys.executable, "-m", "shiftbench", "run", str(path), "--out", str(out), "--quiet",
                           "--corruptions", "none"], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))  # a fresh process imports the new factory
    assert code.returncode == 2, code.stderr
    assert "was run with other weights from the factories of custom models without a checkpoint;" in code.stderr


def test_another_thread_split_or_exactness_is_not_resumed(tmp_path, capsys, monkeypatch):
    """CPU kernels round differently with another thread count, batched forwards with another batch size:
    a run resumed so would mix conditions of two roundings (seen: an overlap-auto sweep killed and resumed
    with --overlap false gave a results.csv unlike either uninterrupted run)."""
    import torch

    path = make_suite(tmp_path / "suite", **SMALL)
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # what thread_split reads; not set for real
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert run(path, out, "--corruptions", "none", "--overlap", "true") == 0
    assert json.loads((out / "manifest.json").read_text())["inputs"]["threads"] == [1, 1]
    capsys.readouterr()
    assert run(path, out, "--corruptions", "none", "--overlap", "false") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("was run with other torch threads [forwards, metrics] (--overlap, OMP_NUM_THREADS) [1, 1], now [2, 2]; "
            "its finished conditions would mix with new ones: run as before") in err
    assert run(path, out, "--corruptions", "none", "--overlap", "true") == 0  # as before: resumes
    data = yaml.safe_load(path.read_text())
    data["run"]["exact"] = False
    path.write_text(yaml.safe_dump(data))
    assert run(path, out, "--corruptions", "none", "--overlap", "true") == 2
    err = capsys.readouterr().err
    assert "run.exact true, now false; batch size (with run.exact false) null, now " in err


def test_a_temporary_state_left_by_a_kill_does_not_block_a_takeover(tmp_path):
    """A folder holding only the temporary of its first state write (killed mid-write) has nothing to keep:
    another suite takes it over without --force, as the README says."""
    path = make_suite(tmp_path / "suite", **SMALL)
    out = tmp_path / "run"
    assert run(path, out, "--corruptions", "none") == 0
    for name in ("results.csv", "results.parquet", "curves.parquet", "summary.json"):
        (out / name).unlink()
    for state in (out / "states").rglob("*.pt"):
        state.rename(state.with_name(f".{state.stem}.k2j3h4.tmp.pt"))
    assert run(path, out, "--corruptions", "none", "--limit", "1") == 0
    assert not list(out.rglob(".*.tmp*"))


def test_a_folder_another_run_is_writing_is_refused_and_free_again_after_it(tmp_path, capsys):
    """Two runs into one --out (a second terminal, or ranks left running by a killed torchrun launcher) would
    discard or clean under each other: the second is refused in one line naming the first's pid. A process
    that holds the lock: a child, since flock also refuses a second descriptor of this process."""
    path = make_suite(tmp_path / "suite", **SMALL)
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                               "from shiftbench.runner.store import RunStore; s = RunStore(sys.argv[2]); s.lock(); "
                               "print('locked', flush=True); sys.stdin.read()", str(ROOT), str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run(path, out, "--corruptions", "none") == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"shiftbench: error: {out}: another shiftbench run (pid {holder.pid}) is writing this folder; "
                       "wait for it to end, stop it (under torchrun stop its ranks too), or use another --out"), err
        assert run(path, out, "--corruptions", "none", "--force") == 2  # --force does not take a live run's folder
        assert not (out / "manifest.json").exists()
    finally:
        holder.kill()  # killed: the system drops its lock
        holder.wait(timeout=30)
    assert run(path, out, "--corruptions", "none") == 0  # a lock file left by a killed run does not block
    assert run(path, out, "--corruptions", "none") == 0  # nor does this process's own finished run


def test_the_lock_is_refused_before_models_load_and_not_kept_by_forked_children(tmp_path, monkeypatch, capsys):
    """A second run into a busy folder loads no model (on a shared GPU it could push the live run out of memory);
    a forked child (a DataLoader worker) does not keep the folder locked after the run let go of it; a lock
    whose pid cannot be written (a full disk) is still let go."""
    import errno

    from shiftbench.models.zoo import ModelZoo
    from shiftbench.runner import store as store_module
    from shiftbench.runner.store import RunStore

    path = make_suite(tmp_path / "suite", **SMALL)
    out = tmp_path / "run"
    out.mkdir()
    holder = RunStore(out)
    holder.lock()
    ready, started = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a worker that outlives the parent's hold on the lock
        os.write(started, b"1")  # its fork hooks have run
        time.sleep(3)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"1"
        holder.unlock()
        other = RunStore(out)
        other.lock()  # refused had the child kept the parent's lock
        monkeypatch.setattr(ModelZoo, "from_suite", classmethod(lambda *a, **k: pytest.fail("models loaded")))
        assert run(path, out, "--corruptions", "none") == 2  # in-process: flock refuses another descriptor
        assert "another shiftbench run" in capsys.readouterr().err
        other.unlock()
    finally:
        os.waitpid(pid, 0)
        os.close(ready)
        os.close(started)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "write", full)
    third = RunStore(out)
    third.lock()
    monkeypatch.undo()
    third.unlock()
    RunStore(out).lock()  # refused had the failed pid write kept the descriptor


def test_a_file_system_without_flock_runs_unlocked(tmp_path, monkeypatch):
    """flock failing for another reason than a holder (ENOLCK on some network file systems) is no refusal, and
    the descriptor opened for it is closed."""
    import errno
    import fcntl

    from shiftbench.runner import store as store_module
    from shiftbench.runner.store import RunStore

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    opened, closed = [], []
    real_open, real_close = os.open, os.close
    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(store_module.os, "open", lambda *a, **k: opened.append(real_open(*a, **k)) or opened[-1])
    monkeypatch.setattr(store_module.os, "close", lambda fd: closed.append(fd) or real_close(fd))
    store = RunStore(tmp_path)
    store.lock()
    assert store._lock_fd is None and opened and closed == opened


def test_a_folder_that_is_not_a_run_is_refused_before_models_load_and_left_untouched(tmp_path, monkeypatch, capsys):
    from shiftbench.models.zoo import ModelZoo

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("someone's data")
    monkeypatch.setattr(ModelZoo, "from_suite", classmethod(lambda *a, **k: pytest.fail("models loaded")))
    assert run(make_suite(tmp_path / "suite", **SMALL), out, "--corruptions", "none") == 2
    assert "exists and is not a shiftbench run directory" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # no lock file left in it


def test_a_lock_file_that_is_a_symbolic_link_is_refused_not_followed(tmp_path):
    from shiftbench.runner.store import LOCK, RunStore

    victim = tmp_path / "victim.txt"
    victim.write_text("important data")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).symlink_to(victim)
    with pytest.raises(ShiftbenchError, match=r"lock file \(it is a symbolic link; remove it\)$"):
        RunStore(tmp_path / "run").lock()
    assert victim.read_text() == "important data"


def test_a_refused_open_releases_the_lock(tmp_path):
    from shiftbench.runner.store import RunStore

    (tmp_path / "manifest.json").write_text("{broken")
    (tmp_path / "results.csv").write_text("a result to keep")
    first = RunStore(tmp_path)
    with pytest.raises(ShiftbenchError, match="unreadable"):
        first.open("tiny", "d" * 64)
    second = RunStore(tmp_path)
    second.lock()  # would be refused had the failed open kept its lock
    second.unlock()


def test_a_rank_without_run_log_prints_no_bare_log_lines():
    """Ranks other than the main one keep no run.log; their records (a failed condition) must not reach Python's
    last-resort handler, which would print them bare on stderr (a fresh process: pytest's own handlers hide it)."""
    code = "from shiftbench.runner import log; log.error('condition %s failed: %s', 'id/fog/1', 'a reason')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stderr == ""


def test_gallery_ids_not_in_the_data_are_named(tmp_path, capsys):
    data = suite_dict(**SMALL)
    data["metrics"]["gallery"] = ["highway/test/000000", "urban/test/999999"]
    path = make_suite(tmp_path / "suite", **SMALL)
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet", "--corruptions", "none"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["gallery_missing"] == ["urban/test/999999"]
    assert "warning: metrics.gallery: 1 sample id not among the evaluated images" in capsys.readouterr().out
    assert " WARNING metrics.gallery: 1 sample id not among" in (tmp_path / "run" / "run.log").read_text()


def _parent(proc: Path) -> int | None:
    """The parent pid of /proc/<pid> (None once it is gone)."""
    try:
        return int(proc.joinpath("stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to see the DataLoader workers")
@pytest.mark.parametrize("group", [False, True], ids=["process", "process group with DataLoader workers"])
def test_sigterm_ends_a_run_like_ctrl_c_and_it_resumes(suite, tmp_path, group):
    """A batch system's stop (SIGTERM) after a finished condition: exit 143, one line on stderr, the reason in
    run.log, the lock released and the finished conditions kept for the resume. Sent to the process group
    (torchrun, Slurm) it also kills the DataLoader workers, whose deaths are no second error."""
    import signal

    out = tmp_path / "run"
    if group:  # splits streamed by 2 workers, one image a batch: workers are alive through every condition
        suite = make_suite(tmp_path / "suite", count=6, size=(48, 64))
    path = _with_run(suite, tmp_path / "stopped", **(dict(workers=2, cache=0, batch_size=1) if group else {}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "shiftbench", "run", str(path), "--out", str(out), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300

    def ready() -> bool:  # a condition finished and, for the group, workers alive (a split being read)
        if not list(out.glob("states/*/*/[!.]*.pt")):
            return False
        return not group or any(_parent(p) == proc.pid for p in Path("/proc").glob("[0-9]*"))

    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.005)
    (os.killpg if group else os.kill)(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and err.strip().splitlines() == ["shiftbench: terminated (SIGTERM)"], err[-2000:]
    assert (out / "run.log").read_text().splitlines()[-1].endswith(
        "ERROR terminated (SIGTERM); the finished conditions are kept, the same command resumes")
    kept = len(list(out.glob("states/*/*/[!.]*.pt")))
    assert run(path, out) == 0  # no stale lock; the kept conditions are not run again
    done = json.loads((out / "summary.json").read_text())["conditions"]["already_done"]
    assert kept >= 1 and done == kept


def test_a_dataloader_iterator_cut_short_by_sigterm_adds_no_traceback():
    """SIGTERM inside a DataLoader iterator's __init__ (before it records its workers): the half-made iterator is
    collected after the run has unwound, and its __del__'s AttributeError must not follow the one-line message
    (it did, once in a while, in the process-group SIGTERM test). Other objects' errors are still shown."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        from shiftbench.runner import Terminated, _sigterm_interrupts

        class _MultiProcessingDataLoaderIter:  # torch's name; this one fails in __del__ like a cut-short one
            def __init__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises here
                self._workers_status = []

            def __del__(self):
                self._workers_status

        class Other:
            def __del__(self):
                raise ValueError("shown")

        holder = []
        try:
            with _sigterm_interrupts():
                try:
                    _MultiProcessingDataLoaderIter()
                except Terminated as exc:
                    holder.append(exc)  # its traceback keeps the half-made iterator alive past the block
                    raise
        except Terminated:
            print("terminated", file=sys.stderr)
        holder.clear()
        Other()
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 0 and lines[0] == "terminated", proc.stderr
    assert "_workers_status" not in proc.stderr and "ValueError: shown" in proc.stderr, proc.stderr


@pytest.mark.parametrize("stop, rc, logged", [
    (KeyboardInterrupt(), 130, "ERROR interrupted; the finished conditions are kept, the same command resumes"),
    (Terminated("SIGTERM"), 143,
     "ERROR terminated (SIGTERM); the finished conditions are kept, the same command resumes"),
    (ShiftbenchError("x.csv: cannot be written"), 2, "ERROR stopped by an error: x.csv: cannot be written"),
    (RuntimeError("boom"), None, "ERROR stopped by an error: RuntimeError: boom"),
], ids=["interrupted", "terminated", "one-line error", "other error"])
def test_what_ended_a_run_early_is_in_its_log(tmp_path, monkeypatch, capsys, stop, rc, logged):
    path = make_suite(tmp_path / "suite", **SMALL)

    def stopped(*args, **kwargs):
        raise stop

    monkeypatch.setattr("shiftbench.runner.results.write_results", stopped)
    if rc is None:  # a bug: the traceback is the CLI's to show
        with pytest.raises(type(stop)):
            run(path, tmp_path / "run", "--corruptions", "none")
    else:
        assert run(path, tmp_path / "run", "--corruptions", "none") == rc
    assert (tmp_path / "run" / "run.log").read_text().splitlines()[-1].split(" ", 2)[2] == logged
    assert len(capsys.readouterr().err.strip().splitlines()) <= 1  # the log adds no line on the terminal


@pytest.mark.parametrize("args, expected", [
    (["--corruptions", "fog,smog"], "corruptions.names[1]: 'smog' is not one of"),
    (["--severities", "0"], "corruptions.severities[0]: 0 is not one of 1, 2, 3, 4, 5"),
    (["--severities", "x"], "--severities: 'x' is not a comma-separated list"),
    (["--severities", ","], "--severities: ',' is empty; give a comma-separated list of 1..5"),
    (["--severities", "1,,3"], "--severities: '1,,3' has an empty item (two commas in a row, or one at an end)"),
    (["--corruptions", ""], "--corruptions: '' is empty; give comma-separated corruption names, 'all' or 'none'"),
    (["--corruptions", "fog,"], "--corruptions: 'fog,' has an empty item"),
    (["--corruptions", "none", "--severities", "3"], "--severities: has no effect with no corruptions"),
    (["--limit", "0"], "run.limit: 0 must be > 0"),
    (["--workers", "x"], "run.workers: 'x' is not auto or an integer 0..64"),
    (["--cache", "[1"], "run.cache: '[1' is not auto or a size in GiB >= 0"),
    (["--cache", "-1"], "run.cache: -1.0 must be a finite size in GiB >= 0"),
])
def test_bad_overrides_are_one_line_exit_2(suite, tmp_path, capsys, args, expected):
    assert run(suite, tmp_path / "r", *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_an_output_folder_that_cannot_be_made_is_one_line_exit_2(suite, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    assert run(suite, tmp_path / "a_file" / "run", "--corruptions", "none") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a_file/run" in err and "Not a directory" in err


def test_a_full_disk_is_one_line_exit_2_and_the_rerun_finishes(suite, base, tmp_path, capsys, monkeypatch):
    import errno
    import pathlib

    real = pathlib.Path.write_bytes

    def full_for_states(self, data):
        if self.name.endswith(".tmp.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")  # as the kernel reports it: no file name
        return real(self, data)

    out = tmp_path / "full"
    monkeypatch.setattr(pathlib.Path, "write_bytes", full_for_states)
    assert run(suite, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(out / "states" / "id" / "clean" / "0.pt") in err and "free some space" in err
    assert not list(out.rglob("*.tmp*")) and not (out / "states" / "id" / "clean" / "0.pt").exists()
    monkeypatch.undo()
    assert run(suite, out) == 0
    assert (out / "results.csv").read_bytes() == (base / "results.csv").read_bytes()


@pytest.mark.parametrize("broken", ["images", "model output"])
def test_nan_images_or_model_output_fail_only_that_condition(suite, tmp_path, monkeypatch, capsys, broken):
    import shiftbench.runner.sweep as sweep

    real_corrupt, real_predict, fog = sweep.corrupt, sweep.predict, []

    def nan_fog(x, name, severity, seed=0):
        fog[:] = [name == "fog"]
        y = real_corrupt(x, name, severity, seed=seed)
        return y * float("nan") if fog[0] and broken == "images" else y

    def nan_baseline(zoo, x, seeds, exact=True):
        preds = real_predict(zoo, x, seeds, exact)
        if fog and fog[0] and broken == "model output":
            preds["baseline"].probs.mul_(float("nan"))
        return preds

    monkeypatch.setattr(sweep, "corrupt", nan_fog)
    monkeypatch.setattr(sweep, "predict", nan_baseline)
    out = tmp_path / "nan"
    assert run(suite, out) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [f["condition"] for f in summary["failed"]] == ["id/fog/2"]
    reason = summary["failed"][0]["reason"]
    assert reason.startswith("the corrupted images of highway/test/") and "x holds NaN or Inf" in reason \
        if broken == "images" else reason == "model baseline produced NaN or Inf probabilities"
    res = pd.read_csv(out / "results.csv")
    assert "fog" not in set(res.corruption) and {"clean", "gaussian_noise"} <= set(res.corruption)
    err = capsys.readouterr().err  # the terminal names the failure too, not only run.log and summary.json
    assert err.strip().splitlines()[-1] == (f"shiftbench: warning: 1 condition failed (listed in {out / 'summary.json'} "
                                            f"failed and in run.log), the first: id/fog/2: {reason}")


@pytest.mark.parametrize("mode", ["cached", "streamed", "streamed by a worker"])
def test_unreadable_image_is_skipped_and_named(tmp_path, monkeypatch, capsys, mode):
    """Named once in summary.json, whether the split is cached, or streamed again for every condition,
    in this process or in DataLoader workers."""
    if mode != "cached":
        monkeypatch.setattr("shiftbench.runner.data.CACHE_BYTES", 0)  # open_split's default, used below

    tree = tmp_path / "a2d2"
    assert main(["data", "synth", str(tree), "--format", "a2d2", "--count", "2", "--size", "48x64",
                 "--domain", "highway"]) == 0
    victim = sorted(tree.rglob("*_camera_frontcenter_*.png"))[-1]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated PNG
    data = suite_dict(**SMALL)
    data["dataset"] = {"name": "a2d2", "root": str(tree), "split_dir": str(tree / "split"), "classes": 11,
                       "size": [48, 64], "eval": {"id": ["highway_test", "highway_val", "highway_train"]}}
    data["metrics"]["gallery"] = []
    data["run"]["workers"] = 1 if mode == "streamed by a worker" else 0
    data["run"]["cache"] = 0 if mode != "cached" else "auto"
    write_checkpoints(tmp_path)
    path = tmp_path / "a2d2.yaml"
    path.write_text(yaml.safe_dump(data))
    out_dir = tmp_path / "run"
    assert run(path, out_dir, "--corruptions", "fog", "--severities", "1") == 0  # two conditions stream the split
    summary = json.loads((out_dir / "summary.json").read_text())
    assert len(summary["skipped_files"]) == 1
    assert summary["data"]["cached"] == {"id": mode == "cached"}
    assert summary["data"]["workers"] == data["run"]["workers"]
    # the file's path as the dataset lists it, and the reason alone
    assert summary["skipped_files"] == [{"file": str(victim), "reason": summary["skipped_files"][0]["reason"]}]
    assert summary["skipped_files"][0]["reason"].startswith("not a readable PNG, truncated or corrupt (")
    assert " WARNING 1 unreadable image skipped " in (out_dir / "run.log").read_text()
    out, err = capsys.readouterr()
    assert "0 failed" in out and err.strip().splitlines()[-1] == (  # not silent: a warning line names it
        f"shiftbench: warning: 1 unreadable image skipped (listed in {out_dir / 'summary.json'} skipped_files), "
        f"the first: {victim}: {summary['skipped_files'][0]['reason']}")
    results = pd.read_csv(out_dir / "results.csv")
    assert set(results.corruption) == {"clean", "fog"} and results.n_images.eq(5).all()
    if mode != "cached":  # the split really was streamed, twice, and the file is named once
        from shiftbench.runner.data import open_split
        from shiftbench.runner.dist import World
        from shiftbench.suite import load_suite

        split = open_split(load_suite(path), "id", World())
        assert split.cache is None
        for _ in range(2):
            assert sum(len(b.ids) for b in split.batches(2, data["run"]["workers"])) == 5
        assert len(split.skipped) == 1


@pytest.mark.parametrize("cache, workers", [(0, 0), (0, 1), ("auto", 1)],
                         ids=["streamed", "streamed by a worker", "cached by a worker"])
def test_cached_or_streamed_by_any_workers_gives_the_same_results(suite, base, tmp_path, cache, workers):
    path = _with_run(suite, tmp_path, cache=cache)
    out = tmp_path / "r"
    assert run(path, out, "--workers", str(workers)) == 0  # one of the two through the command line
    assert (out / "results.csv").read_bytes() == (base / "results.csv").read_bytes()
    data = json.loads((out / "summary.json").read_text())["data"]
    # ood is swept once (clean), so it is streamed even where it would fit: decoded once either way
    assert data["workers"] == workers and data["cached"] == {"id": cache == "auto", "ood": False}
    assert json.loads((base / "summary.json").read_text())["data"]["workers"] == 0  # auto on the CPU


def test_streamed_workers_are_forked_with_no_job_on_the_metric_thread(suite, tmp_path, monkeypatch):
    """A fork copies only the forking thread: the DataLoader of a streamed group starts its processes while
    the metric thread runs no torch ops (whose locks a child could otherwise inherit held)."""
    from shiftbench.runner import data, sweep

    workers, busy_at_fork = [], []
    real_init, real_update, real_readable = (sweep.MetricWorker.__init__, sweep._ConditionRun.update,
                                             data.SplitData._readable)

    def init(self, threads=0):
        real_init(self, threads)
        workers.append(self)

    def slow_update(self, batch, preds):
        time.sleep(0.2)  # a job still running when the next condition starts
        real_update(self, batch, preds)

    def readable(self, batch_size, n):
        if n:
            busy_at_fork.append(not all(w.idle for w in workers))
        return real_readable(self, batch_size, n)

    monkeypatch.setattr(sweep.MetricWorker, "__init__", init)
    monkeypatch.setattr(sweep._ConditionRun, "update", slow_update)
    monkeypatch.setattr(data.SplitData, "_readable", readable)
    path = _with_run(suite, tmp_path, cache=0, workers=1, overlap=True)
    assert run(path, tmp_path / "r") == 0
    assert workers[0].threaded and len(busy_at_fork) == 4 and not any(busy_at_fork)


def test_the_cache_keeps_labels_in_one_byte_and_yields_int64(suite):
    from shiftbench.runner.data import open_split
    from shiftbench.runner.dist import World
    from shiftbench.suite import load_suite

    s = load_suite(suite)
    cached, streamed = open_split(s, "id", World()), open_split(s, "id", World(), cache_bytes=0)
    assert cached.cache.images.dtype == torch.uint8 and cached.cache.labels.dtype == torch.uint8
    assert streamed.cache is None
    for a, b in zip(cached.batches(3), streamed.batches(3), strict=True):
        assert a.labels.dtype == b.labels.dtype == torch.int64
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.ids == b.ids


def test_a_label_id_past_255_switches_the_cache_to_int64(monkeypatch):
    from shiftbench.runner.data import SplitData

    labels = [torch.full((4, 5), v) for v in (3, 255, 300, 7)]
    items = [(torch.zeros(3, 4, 5, dtype=torch.uint8), lab, f"s{k}") for k, lab in enumerate(labels)]
    split = SplitData("g", [items], [(0, k) for k in range(4)])
    monkeypatch.setattr(SplitData, "load", lambda self, k: items[k])
    split.fill_cache()
    assert split.cache.labels.dtype == torch.int64 and torch.equal(split.cache.labels, torch.stack(labels))



def test_the_limit_takes_evenly_from_the_splits_and_tops_up_from_the_longer_ones():
    from shiftbench.runner.data import limited_indices

    assert limited_indices([2, 3], None) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert limited_indices([5, 5], 3) == [(0, 0), (0, 1), (1, 0)]  # ceil(3 / 2) from the first, the rest after
    assert limited_indices([5, 5, 5], 4) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert limited_indices([4, 4], 16) == [(d, i) for d in range(2) for i in range(4)]  # all there is
    # a short split: what it lacks comes from the others (6, not the 4 a fixed share per split gave)
    assert limited_indices([1, 10], 6) == [(0, 0)] + [(1, i) for i in range(5)]
    assert limited_indices([0, 1, 10, 10], 8) == [(1, 0), (2, 0), (2, 1), (2, 2), (2, 3), (3, 0), (3, 1), (3, 2)]


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_share_a_group_whole_and_without_overlap(tmp_path, ranks):
    """Groups of 5 and 3 images over 2 and 3 ranks: the ranks' images are disjoint and make up the group."""
    import dataclasses

    from shiftbench.runner.data import open_split
    from shiftbench.runner.dist import World
    from shiftbench.suite import load_suite

    s = load_suite(make_suite(tmp_path / "suite", count=3, size=(48, 64)))
    s = dataclasses.replace(s, run=dataclasses.replace(s.run, limit=5))  # id: 3 + 2 of its 2 x 3; ood: its 3
    for group, n in (("id", 5), ("ood", 3)):
        whole = [i for b in open_split(s, group, World(), cache_bytes=0).batches(4) for i in b.ids]
        parts = [[i for b in open_split(s, group, World(rank=r, size=ranks), cache_bytes=0).batches(4) for i in b.ids]
                 for r in range(ranks)]
        assert len(whole) == n and sorted(sum(parts, [])) == sorted(whole), (group, parts)


def test_the_groups_swept_most_are_cached_first_within_the_budget(suite):
    from shiftbench.runner.data import open_split, open_splits
    from shiftbench.runner.dist import World
    from shiftbench.runner.conditions import enumerate_conditions
    from shiftbench.suite import load_suite

    s = load_suite(suite)
    one = open_split(s, "id", World(), cache_bytes=0)
    need = len(one) * (one.load(0)[0].numel() + one.load(0)[1].numel())  # uint8 image + uint8 label per sample
    todo = enumerate_conditions(["id", "ood"], ["id", "ood"], ["fog"], [1, 2], True)  # 3 sweeps each
    todo = [c for c in todo if not (c.split == "ood" and c.severity == 2)]  # ood: 2 sweeps
    cached = lambda budget: {g: sp.cache is not None for g, sp in open_splits(s, todo, World(), budget, 0).items()}
    assert cached(need) == {"id": True, "ood": False}  # room for one group: the one swept most
    assert cached(need - 1) == {"id": False, "ood": True}  # ood has 2 of the 4 id images, so it still fits
    assert cached(10 * need) == {"id": True, "ood": True}
    assert cached(0) == {"id": False, "ood": False}


def test_cache_budget_and_workers_resolve_auto(monkeypatch):
    from shiftbench.runner import data
    from shiftbench.runner.dist import World

    monkeypatch.setattr(data, "_available_memory", lambda: 64 << 30)
    assert data.cache_budget("auto", World()) == 32 << 30
    assert data.cache_budget("auto", World(0, 8, 0, 4)) == 8 << 30  # four ranks on the node share the half
    assert data.cache_budget(1.5, World()) == 3 << 29
    monkeypatch.setattr(data, "_available_memory", lambda: None)
    assert data.cache_budget("auto", World()) == data.CACHE_BYTES
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(data, "_shared_memory_free", lambda: 64 << 30)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert data.loader_workers("auto", cuda, World()) == data.MAX_AUTO_WORKERS
    assert data.loader_workers("auto", cuda, World(0, 4, 0, 4)) == 3  # 16 CPUs / 4 ranks, one for the rank
    assert data.loader_workers("auto", cpu, World()) == 0
    assert data.loader_workers(5, cpu, World()) == 5
    monkeypatch.setattr(data, "_shared_memory_free", lambda: 64 << 20)  # a container's default /dev/shm
    assert data.loader_workers("auto", cuda, World()) == 0
    monkeypatch.setattr(data, "_shared_memory_free", lambda: 2 << 30)
    assert data.loader_workers("auto", cuda, World()) == 4
    assert data.loader_workers(5, cuda, World()) == 5  # a number is taken as given


def test_missing_data_stops_at_once_with_what_to_set(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("A2D2_ROOT", raising=False)
    assert main(["run", str(ROOT / "suites" / "a2d2.yaml"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "A2D2_ROOT" in err and "a2d2.audi" in err


def _states(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): torch.load(p, weights_only=True) for p in (out / "states").rglob("*.pt")}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("overlap", [False, True])
def test_torchrun_two_gloo_processes_equal_single_process(suite, tmp_path, overlap):
    # CPU convolutions round differently with different thread counts (oneDNN splits the
    # reductions), and torchrun gives each process one thread: compare like with like.
    # overlap=True: each rank also runs a metric worker thread (reductions stay on the main thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(suite, tmp_path / "single") == 0
    finally:
        torch.set_num_threads(threads)
    base = tmp_path / "single"
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    ranked = _with_run(suite, tmp_path / "ranked", overlap=overlap)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "shiftbench", "run", str(ranked), "--out", str(out), "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["threads"] == {"forward": 1, "metrics": int(overlap)}
    single, double = _states(base), _states(out)
    assert single.keys() == double.keys()
    for name in single:
        assert single[name]["n_images"] == double[name]["n_images"]
        for acc, state in single[name]["states"].items():
            for k, a in state.items():
                b = double[name]["states"][acc][k]
                if a.is_floating_point():
                    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (name, acc, k)
                else:
                    assert torch.equal(a, b), (name, acc, k)
    a, b = pd.read_csv(base / "results.csv"), pd.read_csv(out / "results.csv")
    counts = ["n_images", "n_pixels", "miou", "pixel_accuracy"]
    assert a[counts].equals(b[counts])


def test_a_bad_input_only_rank_0_sees_ends_every_rank_in_one_line(suite, tmp_path):
    # rank 0 alone opens the run folder; here it holds another suite's run, so rank 0 refuses while rank 1
    # waits in a barrier, whose backend then fails: that must be one line too, not gloo's traceback
    out = tmp_path / "run"
    path = _other_suite_beside_a_run(suite, out)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "shiftbench", "run", str(path), "--out", str(out), "--quiet", "--corruptions", "none"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    err = done.stderr
    ours = [line for line in err.splitlines() if line.startswith("shiftbench: error:")]
    assert any("different suite" in line and "--force" in line for line in ours), err[-3000:]
    # rank 1 either said why it stopped in one line or was stopped by torchrun before it noticed
    assert len(ours) <= 2 and all("different suite" in line or "rank 1 of 2 stopped while opening the run folder"
                                  in line for line in ours), ours
    assert not re.search(r"^\[rank\d\]: Traceback", err, re.M) and "RuntimeError" not in err, err[-3000:]


def test_ranks_that_read_other_checkpoints_are_refused(tmp_path):
    """A node with a stale copy of a checkpoint would merge its states silently with the others': every rank
    compares its suite digest and checkpoint bytes with rank 0's first. (${RANK}: each rank its own file.)"""
    import shutil

    folder = tmp_path / "suite"
    make_suite(folder, **SMALL)
    shutil.copy(folder / "baseline.pt", folder / "baseline_0.pt")
    write_checkpoints(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "baseline.pt", folder / "baseline_1.pt")
    data = yaml.safe_load((folder / "tiny.yaml").read_text())
    data["models"][0]["checkpoint"] = "baseline_${RANK}.pt"
    path = folder / "ranked.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "shiftbench", "run", str(path), "--out", str(tmp_path / "run"), "--quiet", "--corruptions", "none"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    said = re.findall(r"shiftbench: error: (.*?)(?=shiftbench: error:|\n|$)", done.stderr)  # ranks' lines may interleave
    assert said and all(s == "rank 1 of 2 reads other checkpoint bytes (a node with another copy?) than rank 0: "
                        "every rank must see the same suite and checkpoints" for s in said), done.stderr[-3000:]
    assert not (tmp_path / "run" / "results.csv").exists()
    shutil.copy(folder / "baseline.pt", folder / "baseline_1.pt")  # the same bytes under each rank's own name
    cmd[cmd.index("--out") + 1] = str(tmp_path / "same")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_failed_collective_is_one_line_naming_the_rank():
    from shiftbench.runner import dist

    world = dist.World(rank=1, size=2)
    with pytest.raises(dist.PeerLost, match=r"^rank 1 of 2 stopped while summing: another rank left the run "
                                            r"\(its own message says why; backend: Connection closed by peer "
                                            r"\[127.0.0.1\]:1234\)$"):
        with dist.collective(world, "summing"):
            raise RuntimeError("[/x/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1234. "
                               "This is typically caused by a remote worker crashing.")
    with pytest.raises(RuntimeError, match="not a collective"):  # one process: no peers to lose
        with dist.collective(dist.World(), "summing"):
            raise RuntimeError("not a collective")


def test_out_of_memory_halves_the_batch(suite, base, tmp_path, monkeypatch):
    import shiftbench.runner.sweep as sweep

    real, sizes = sweep.predict, []

    def small_memory(zoo, x, seeds, exact=True):
        sizes.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(zoo, x, seeds, exact)

    monkeypatch.setattr(sweep, "predict", small_memory)
    assert run(suite, tmp_path / "oom") == 0
    assert 2 in sizes and 1 in sizes
    assert (tmp_path / "oom" / "results.csv").read_bytes() == (base / "results.csv").read_bytes()


def test_out_of_memory_on_a_single_image_fails_the_condition(suite, tmp_path, monkeypatch):
    import shiftbench.runner.sweep as sweep

    def no_memory(zoo, x, seeds, exact=True):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(sweep, "predict", no_memory)
    assert run(suite, tmp_path / "oom", "--corruptions", "none") == 1
    failed = json.loads((tmp_path / "oom" / "summary.json").read_text())["failed"]
    assert len(failed) == 2 and all("out of memory on a single image" in f["reason"] for f in failed)


def _metrics_short_of_memory(monkeypatch, fits: int) -> list[int]:
    """Let the histogram updates (the last of each batch: the other accumulators are already updated)
    raise CUDA out-of-memory above ``fits`` images, with the retry enabled on the CPU."""
    import shiftbench.runner.sweep as sweep

    real, sizes = sweep.UncertaintyHistogram.update, []

    def update(self, uncertainty, target, **kwargs):
        sizes.append(target.shape[0])
        if target.shape[0] > fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, uncertainty, target, **kwargs)

    monkeypatch.setattr(sweep.UncertaintyHistogram, "update", update)
    monkeypatch.setattr(sweep.Accumulators, "OOM_RETRY", ("cpu", "cuda"))
    return sizes


def test_out_of_memory_in_the_metrics_undoes_the_batch_and_halves_it(suite, base, tmp_path, monkeypatch):
    sizes = _metrics_short_of_memory(monkeypatch, fits=1)
    assert run(suite, tmp_path / "oom") == 0
    assert 2 in sizes and 1 in sizes
    for path in sorted((base / "states").rglob("*.pt")):  # nothing counted twice: the states themselves agree
        want = torch.load(path, weights_only=True)
        got = torch.load(tmp_path / "oom" / path.relative_to(base), weights_only=True)
        assert got["n_images"] == want["n_images"]
        for acc, state in want["states"].items():
            for k, v in state.items():
                if v.is_floating_point():
                    assert torch.allclose(got["states"][acc][k], v, rtol=1e-9, atol=1e-12, equal_nan=True), (acc, k)
                else:
                    assert torch.equal(got["states"][acc][k], v), (path, acc, k)
    maps = np.load(tmp_path / "oom" / "maps" / "id" / "highway__test__000000.npz")
    same = np.load(base / "maps" / "id" / "highway__test__000000.npz")
    assert all(np.array_equal(maps[k], same[k]) for k in same.files)


def test_out_of_memory_in_the_metrics_on_a_single_image_fails_the_condition(suite, tmp_path, monkeypatch):
    _metrics_short_of_memory(monkeypatch, fits=0)
    assert run(suite, tmp_path / "oom", "--corruptions", "none") == 1
    failed = json.loads((tmp_path / "oom" / "summary.json").read_text())["failed"]
    assert len(failed) == 2
    assert all("out of memory in the estimators and metrics on a single image" in f["reason"] for f in failed)


def test_more_ranks_per_node_than_gpus_is_refused_before_joining(monkeypatch):
    from shiftbench.runner import dist

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ShiftbenchError, match=r"local rank 1 has no GPU of its own: 1 CUDA device\(s\) visible.*"
                                              r"--nproc-per-node 1 or fewer"):
        dist.init(torch.device("cuda"))
    assert not torch.distributed.is_initialized()
