"""`shiftbench check`: baseline round trip, direction-aware regressions, NaN rules, unusable input."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from shiftbench.cli import main as cli
from shiftbench.errors import ShiftbenchError
from shiftbench.report import baseline as bl
from shiftbench.report.load import load_run
from tests.run_fixture import COMPARABLE, MODELS, ROOT, make_run

SMALL = {k: MODELS[k] for k in ("baseline", "moe_simple")}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("template") / "run", models=SMALL, n_patches=300, curves=False,
                    maps=False)


@pytest.fixture()
def run_dir(template, tmp_path):
    """A fresh copy of the small fabricated run, free to edit."""
    return Path(shutil.copytree(template, tmp_path / "run"))


@pytest.fixture()
def baseline(run_dir, tmp_path):
    path = tmp_path / "baseline.json"
    assert cli(["check", str(run_dir), "--write-baseline", str(path)]) == 0
    return path


def edit_results(run_dir, mask, column, change):
    """Rewrite results.csv with ``column`` changed on the rows selected by ``mask(frame)``."""
    df = pd.read_csv(run_dir / "results.csv")
    rows = mask(df)
    assert rows.any()
    df.loc[rows, column] = change(df.loc[rows, column])
    df.to_csv(run_dir / "results.csv", index=False)


def clean_row(model="baseline", est="predictive_entropy", split="id"):
    return lambda d: (d["model"] == model) & (d["estimator"] == est) & (d["split"] == split) & (d["severity"] == 0)


def check(run_dir, baseline, *extra):
    return cli(["check", str(run_dir), "--baseline", str(baseline), *extra])


def status_of(out: str, *parts: str) -> str:
    """The status column of the printed row that contains every part."""
    lines = [ln for ln in out.splitlines() if all(f" {p} " in f" {ln} " for p in parts)]
    assert len(lines) == 1, (parts, lines)
    return lines[0].split("  ")[-1].strip()


# ------------------------------------------------------------------ gate
def test_unchanged_run_passes_and_prints_every_value_when_verbose(run_dir, baseline, capsys):
    capsys.readouterr()
    assert check(run_dir, baseline) == 0
    n = len(bl.baseline_values(json.loads(baseline.read_text())))
    assert n == len(bl.run_values(load_run(run_dir)))
    assert capsys.readouterr().out == f"PASS: {n} values compared ({n} same)\n"  # nothing changed: no table
    assert check(run_dir, baseline, "--verbose") == 0
    out = capsys.readouterr().out
    assert out.count("\n") == n + 2  # header, one line per value, summary
    assert out.rstrip().endswith(f"PASS: {n} values compared ({n} same)")


def test_injected_regression_fails(run_dir, baseline, capsys):
    fog2 = lambda d: (d["model"] == "moe_simple") & (d["estimator"] == "expert_variance") & (d["corruption"] == "fog") \
        & (d["severity"] == 2)
    edit_results(run_dir, fog2, "ece", lambda v: v + 0.03)  # the mean over 3 corruptions moves by 0.01 > 0.005
    capsys.readouterr()
    assert check(run_dir, baseline) == 1
    out = capsys.readouterr().out
    lines = out.rstrip().splitlines()
    assert len(lines) == 4 and "severity 1" not in out  # header, the changed value, summary, what regressed
    assert status_of(out, "moe_simple", "expert_variance", "severity 2", "ece") == "REGRESSED"
    assert lines[2].startswith("FAIL: ") and "1 REGRESSED" in lines[2]
    assert re.fullmatch(r"  REGRESSED: id/moe_simple/expert_variance/severity 2/ece \S+ -> \S+ "
                        r"\(\+0\.01, tolerance 0\.005\)", lines[3]), lines[3]
    assert check(run_dir, baseline, "--verbose") == 1
    assert status_of(capsys.readouterr().out, "moe_simple", "expert_variance", "severity 1", "ece") == "same"


@pytest.mark.parametrize("column, delta, expected, code", [
    ("ece", +0.004, "worse (within tolerance)", 0),
    ("ece", +0.006, "REGRESSED", 1),
    ("ece", -0.2, "better", 0),
    ("nll", +0.03, "REGRESSED", 1),
    ("mce", +0.015, "worse (within tolerance)", 0),
    ("miou", -0.01, "REGRESSED", 1),  # higher is better
    ("miou", +0.2, "better", 0),
    ("au_pavpu", -0.006, "REGRESSED", 1),
    ("au_pavpu", +0.006, "better", 0),
    ("peak_pavpu", -0.004, "worse (within tolerance)", 0),
])
def test_direction_and_default_tolerances(run_dir, baseline, capsys, column, delta, expected, code):
    edit_results(run_dir, clean_row(), column, lambda v: v + delta)
    capsys.readouterr()
    assert check(run_dir, baseline) == code
    assert status_of(capsys.readouterr().out, "id", "baseline", "predictive_entropy", "clean", column) == expected


def test_custom_tolerance_tightens_the_gate(run_dir, baseline, capsys):
    edit_results(run_dir, clean_row(), "ece", lambda v: v + 0.004)
    assert check(run_dir, baseline) == 0
    assert check(run_dir, baseline, "--tolerance", "ece=0.001,nll=0.1") == 1
    assert check(run_dir, baseline, "--tolerance", "ece=0.01") == 0


def test_nan_rules(run_dir, baseline, capsys):
    edit_results(run_dir, clean_row(), "brier", lambda v: np.nan)
    capsys.readouterr()
    assert check(run_dir, baseline) == 1
    assert status_of(capsys.readouterr().out, "id", "baseline", "predictive_entropy", "clean", "brier") == "BECAME NaN"
    # the NaN run as a baseline: NaN vs NaN is equal, NaN -> number passes and is reported
    nan_baseline = baseline.with_name("nan.json")
    assert cli(["check", str(run_dir), "--write-baseline", str(nan_baseline)]) == 0
    assert json.loads(nan_baseline.read_text())["values"]["id"]["baseline"]["predictive_entropy"]["clean"]["brier"] \
        is None
    capsys.readouterr()
    assert check(run_dir, nan_baseline) == 0
    edit_results(run_dir, clean_row(), "brier", lambda v: 0.1)
    capsys.readouterr()
    assert check(run_dir, nan_baseline) == 0
    assert status_of(capsys.readouterr().out, "id", "baseline", "predictive_entropy", "clean", "brier") == "now defined"


def test_status_rules_directly():
    assert bl._status("ece", 0.1, 0.1 + 0.005, 0.005) == "worse (within tolerance)"  # exactly at the tolerance
    assert bl._status("ece", 0.1, 0.1051, 0.005) == "REGRESSED"
    assert bl._status("peak_pavpu", 0.9, 0.8, 0.05) == "REGRESSED"
    assert bl._status("peak_pavpu", 0.8, 0.9, 0.0) == "better"
    assert bl._status("nll", math.inf, math.inf, 0.02) == "same"
    assert bl._status("nll", 1.0, math.inf, 0.02) == "REGRESSED"
    assert bl._status("nll", math.inf, 1.0, 0.02) == "better"
    assert bl._status("ece", math.nan, math.nan, 0.0) == "same"


def test_run_values_are_clean_and_means_over_corruptions(run_dir):
    values = bl.run_values(load_run(run_dir))
    df = pd.read_csv(run_dir / "results.csv")
    for (split, model, est, cond, metric), v in list(values.items())[::7]:
        sel = df[(df["split"] == split) & (df["model"] == model) & (df["estimator"] == est)]
        sel = sel[sel["severity"] == (0 if cond == "clean" else int(cond.split()[1]))]
        assert len(sel) == (1 if cond == "clean" else 3)
        assert v == pytest.approx(sel[metric].mean(), nan_ok=True)
    assert {k[3] for k in values} == {"clean", "severity 1", "severity 2"}


def test_baseline_round_trips_infinity(tmp_path):
    data = {"format": bl.FORMAT, "version": bl.VERSION, "suite": {}, "coverage": {},
            "values": {"id": {"m": {"e": {"clean": {"nll": bl._dump(math.inf), "ece": bl._dump(math.nan),
                                                     "mce": bl._dump(0.25)}}}}}}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    values = bl.baseline_values(bl.read_baseline(path))
    assert values[("id", "m", "e", "clean", "nll")] == math.inf
    assert math.isnan(values[("id", "m", "e", "clean", "ece")]) and values[("id", "m", "e", "clean", "mce")] == 0.25
    assert "Infinity" not in path.read_text() and "NaN" not in path.read_text()


def test_new_values_are_reported_not_failed(run_dir, tmp_path, capsys):
    small = Path(shutil.copytree(run_dir, tmp_path / "small"))
    df = pd.read_csv(small / "results.csv")
    df[df["model"] != "moe_simple"].to_csv(small / "results.csv", index=False)
    path = tmp_path / "small.json"
    assert cli(["check", str(small), "--write-baseline", str(path)]) == 0
    capsys.readouterr()
    assert check(run_dir, path, "--verbose") == 0  # the bigger run has the moe_simple values too
    out = capsys.readouterr().out
    assert status_of(out, "id", "moe_simple", "expert_variance", "clean", "ece") == "new"
    assert status_of(out, "id", "baseline", "mutual_information", "clean", "ece") == "same"


# ------------------------------------------------------------------ unusable input: exit 2, one line
def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("shiftbench: error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_baseline_of_another_suite_is_refused(run_dir, tmp_path, baseline, capsys):
    other = make_run(tmp_path / "other", models=SMALL, n_patches=300, curves=False, maps=False, suite="other")
    capsys.readouterr()
    assert check(other, baseline) == 2
    _one_line_error(capsys, "baseline is of suite 'fixture', the run of suite 'other'")


def _without_model(run_dir, tmp_path, model="moe_simple"):
    """A copy of the run without ``model``'s rows, and its baseline."""
    small = Path(shutil.copytree(run_dir, tmp_path / "small"))
    df = pd.read_csv(small / "results.csv")
    df[df["model"] != model].to_csv(small / "results.csv", index=False)
    assert cli(["check", str(small), "--write-baseline", str(tmp_path / "small.json")]) == 0
    return tmp_path / "small.json"


def _set_manifest(run_dir, **fields):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest.update(fields)
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_suite_digest_changed_by_its_models_alone_is_compared(run_dir, tmp_path, capsys):
    """Adding a model changes the suite digest but not what makes the values comparable: the old values are
    still gated and the new model's are listed as new."""
    small = _without_model(run_dir, tmp_path)
    _set_manifest(run_dir, digest="e" * 64)  # the suite with moe_simple added
    capsys.readouterr()
    assert check(run_dir, small, "--verbose") == 0
    out = capsys.readouterr().out
    assert status_of(out, "id", "moe_simple", "expert_variance", "clean", "ece") == "new"
    assert status_of(out, "id", "baseline", "predictive_entropy", "clean", "ece") == "same"
    edit_results(run_dir, clean_row(), "ece", lambda v: v + 0.05)
    assert check(run_dir, small) == 1  # the old rows are still gated


@pytest.mark.parametrize("change, fragment", [
    (lambda c: c["metrics"].update(n_bins=10), "the run's metrics.n_bins is 10, the baseline's 15"),
    (lambda c: c.update(limit=8), "the run's limit is 8, the baseline's null"),
    (lambda c: c["dataset"].update(size=[64, 128]), "the run's dataset.size is [64, 128], the baseline's [128, 256]"),
    (lambda c: c.update(amp=True), "the run's amp is true, the baseline's false"),
])
def test_a_run_whose_values_are_not_comparable_is_refused(tmp_path, baseline, capsys, change, fragment):
    comparable = json.loads(json.dumps(COMPARABLE))
    change(comparable)
    other = make_run(tmp_path / "other", models=SMALL, n_patches=300, curves=False, maps=False,
                     comparable=comparable)
    capsys.readouterr()
    assert check(other, baseline) == 2
    _one_line_error(capsys, fragment, "models and estimators may differ", "--write-baseline")


def test_a_baseline_from_before_amp_was_recorded_counts_as_amp_off(tmp_path, capsys):
    comparable = {k: v for k, v in COMPARABLE.items() if k != "amp"}
    base = make_run(tmp_path / "base", models=SMALL, n_patches=300, curves=False, maps=False, comparable=comparable)
    assert cli(["check", str(base), "--write-baseline", str(tmp_path / "b.json")]) == 0
    amp = make_run(tmp_path / "amp", models=SMALL, n_patches=300, curves=False, maps=False,
                   comparable={**COMPARABLE, "amp": True})
    capsys.readouterr()
    assert check(amp, tmp_path / "b.json") == 2
    _one_line_error(capsys, "the run's amp is true, the baseline's false")


@pytest.mark.parametrize("change", [
    lambda c: c["dataset"].pop("size"),  # a setting only one shiftbench records
    lambda c: c["dataset"].update(eval={"id": ["highway_test"], "ood": ["ambiguous_test"]}),  # a group added
])
def test_settings_recorded_on_one_side_only_are_no_difference(tmp_path, capsys, change):
    """Only the settings both files record are compared: a newer shiftbench's extra field or an eval group
    one run lacks does not refuse the check (the group's rows are new, or missing and named so)."""
    comparable = json.loads(json.dumps(COMPARABLE))
    comparable["dataset"].update(eval={"id": ["highway_test"]})
    base_run = make_run(tmp_path / "base", models=SMALL, n_patches=300, curves=False, maps=False,
                        comparable=comparable)
    assert cli(["check", str(base_run), "--write-baseline", str(tmp_path / "b.json")]) == 0
    changed = json.loads(json.dumps(comparable))
    change(changed)
    other = make_run(tmp_path / "other", models=SMALL, n_patches=300, curves=False, maps=False, comparable=changed)
    capsys.readouterr()
    assert check(other, tmp_path / "b.json") == 0, capsys.readouterr().err


def test_a_synthetic_suites_record_leaves_the_training_splits_sizes_out(tmp_path):
    """Training on more synthetic images changes no evaluated image: the train count is not part of the record."""
    from shiftbench.suite import load_suite

    raw = yaml.safe_load((ROOT / "suites" / "demo.yaml").read_text())
    records = []
    for train in (16, 512):
        raw["dataset"].setdefault("count", {})["train"] = train
        path = tmp_path / f"s{train}.yaml"
        path.write_text(yaml.safe_dump(raw))
        records.append(load_suite(path).comparable())
    assert records[0] == records[1] and "train" not in records[0]["dataset"]["count"]
    raw.setdefault("run", {})["amp"] = True  # while mixed precision changes every value
    (tmp_path / "amp.yaml").write_text(yaml.safe_dump(raw))
    assert load_suite(tmp_path / "amp.yaml").comparable()["amp"] is True and records[0]["amp"] is False


def test_without_a_comparable_record_the_whole_suite_digest_must_match(run_dir, tmp_path, baseline, capsys):
    """Baselines and runs of an older shiftbench (no ``comparable``) keep the old rule: the same suite digest."""
    legacy = make_run(tmp_path / "legacy", models=SMALL, n_patches=300, curves=False, maps=False, comparable=None)
    capsys.readouterr()
    assert check(legacy, baseline) == 0  # the same digest
    changed = make_run(tmp_path / "digest", models=SMALL, n_patches=300, curves=False, maps=False, digest="e" * 64,
                       comparable=None)
    assert check(changed, baseline) == 2
    _one_line_error(capsys, "digest ffffffffffff", "digest eeeeeeeeeeee", "the run was written by an older shiftbench")
    small = _without_model(run_dir, tmp_path)
    data = json.loads(small.read_text())
    assert data["suite"]["comparable"] == COMPARABLE
    del data["suite"]["comparable"]
    small.write_text(json.dumps(data))
    capsys.readouterr()
    assert check(run_dir, small) == 0  # the same digest: the new model's values are new
    _set_manifest(run_dir, digest="e" * 64)
    assert check(run_dir, small) == 2
    _one_line_error(capsys, "the baseline was written by an older shiftbench", "--write-baseline from a run of this")


def test_other_corruptions_are_refused(tmp_path, baseline, capsys):
    other = make_run(tmp_path / "cov", models=SMALL, n_patches=300, curves=False, maps=False,
                     corruptions=("fog", "contrast"))
    capsys.readouterr()
    assert check(other, baseline) == 2
    _one_line_error(capsys, "the run lacks 2 conditions of the baseline on split 'id', e.g. gaussian_noise/1",
                    "run the same conditions")


def test_run_lacking_baseline_values_is_refused(run_dir, baseline, capsys):
    df = pd.read_csv(run_dir / "results.csv")
    df[df["model"] != "moe_simple"].to_csv(run_dir / "results.csv", index=False)
    capsys.readouterr()
    assert check(run_dir, baseline) == 2
    _one_line_error(capsys, "the run lacks", "moe_simple")


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "unreadable JSON"),
    ("[1, 2]", "not a shiftbench baseline"),
    ('{"format": "shiftbench-baseline", "version": 99}', "version 99 is not supported"),
    ('{"format": "shiftbench-baseline", "version": 1, "suite": {}, "coverage": {}}', "missing or malformed 'values'"),
])
def test_unreadable_baselines(run_dir, tmp_path, capsys, content, fragment):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert check(run_dir, path) == 2
    _one_line_error(capsys, fragment)


def test_malformed_values_are_refused(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"format": bl.FORMAT, "version": 1, "suite": {}, "coverage": {},
                                "values": {"id": {"m": {"e": {"clean": {"ece": "high"}}}}}}))
    with pytest.raises(ShiftbenchError, match="malformed 'values'"):
        bl.baseline_values(bl.read_baseline(path))


def test_missing_paths_and_bad_tolerances(run_dir, tmp_path, baseline, capsys):
    assert check(tmp_path / "absent", baseline) == 2
    _one_line_error(capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    assert check(tmp_path / "empty", baseline) == 2
    _one_line_error(capsys, "not a shiftbench run directory (no manifest.json)")
    assert check(run_dir, tmp_path / "absent.json") == 2
    _one_line_error(capsys, "absent.json' not found", "--write-baseline")
    assert check(run_dir, tmp_path) == 2
    _one_line_error(capsys, "is a folder, not a file", "--write-baseline")
    assert check(baseline, baseline) == 2
    _one_line_error(capsys, "is a file, not a folder", "--out folder of `shiftbench run`")
    assert cli(["check", str(run_dir), "--write-baseline", str(tmp_path)]) == 2
    _one_line_error(capsys, f"cannot use '{tmp_path}': Is a directory; a folder stands where a file is needed")
    assert cli(["check", str(run_dir), "--write-baseline", str(baseline / "b.json")]) == 2
    _one_line_error(capsys, f"cannot use '{baseline}'", "a file stands where a folder is needed")
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    for bad, fragment in (("ece", "expected METRIC=VALUE"), ("foo=1", "METRIC one of ece"),
                          ("ece=-0.1", "finite number >= 0"), ("ece=nan", "finite number >= 0"),
                          ("ece=0.1,", "--tolerance: 'ece=0.1,' has an empty item")):
        assert check(run_dir, baseline, "--tolerance", bad) == 2
        _one_line_error(capsys, fragment)
    with pytest.raises(SystemExit) as exc:
        cli(["check", str(run_dir)])
    assert exc.value.code == 2


def test_a_run_missing_one_condition_or_with_failed_ones_is_refused(run_dir, baseline, capsys):
    """A failed condition is absent from results.csv; the corruptions and severities seen are still all of
    them, but the per-severity mean then averages fewer corruptions: refused, not compared (nor written)."""
    df = pd.read_csv(run_dir / "results.csv")
    df[~((df["corruption"] == "fog") & (df["severity"] == 2))].to_csv(run_dir / "results.csv", index=False)
    capsys.readouterr()
    assert check(run_dir, baseline) == 2
    _one_line_error(capsys, "the run lacks 1 condition of the baseline on split 'id', e.g. fog/2")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["failed"] = [{"condition": "id/fog/2", "reason": "NaN model outputs"}]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert check(run_dir, baseline) == 2
    _one_line_error(capsys, "1 condition failed in its sweep (id/fog/2; summary.json says why)")
    assert cli(["check", str(run_dir), "--write-baseline", str(run_dir / "b.json")]) == 2
    assert not (run_dir / "b.json").exists()


def test_old_baselines_without_conditions_mean_every_pair(run_dir, baseline, capsys):
    data = json.loads(baseline.read_text())
    for cov in data["coverage"].values():
        del cov["conditions"]
    baseline.write_text(json.dumps(data))
    assert check(run_dir, baseline) == 0
    df = pd.read_csv(run_dir / "results.csv")
    df[~((df["corruption"] == "contrast") & (df["severity"] == 1))].to_csv(run_dir / "results.csv", index=False)
    capsys.readouterr()
    assert check(run_dir, baseline) == 2
    _one_line_error(capsys, "e.g. contrast/1")


# ------------------------------------------------------------------ end to end: `shiftbench run`, then check
def test_a_model_added_to_the_suite_is_new_and_other_metrics_settings_are_refused(tmp_path, capsys):
    """The gate across suite edits, through real runs of a tiny suite: one model more passes with its values
    listed as new; another n_bins is refused."""
    from runner_fixture import make_suite

    path = make_suite(tmp_path / "suite", count=2, size=(48, 64), corruptions=("fog",), severities=(2,))
    full = yaml.safe_load(path.read_text())

    def run(suite: dict, name: str) -> Path:
        file = path.with_name(f"{name}.yaml")
        file.write_text(yaml.safe_dump(suite, sort_keys=False))
        assert cli(["run", str(file), "--out", str(tmp_path / name), "--quiet"]) == 0
        return tmp_path / name

    one = run({**full, "models": full["models"][:1]}, "one")
    baseline = tmp_path / "baseline.json"
    assert cli(["check", str(one), "--write-baseline", str(baseline)]) == 0
    two = run({**full, "models": full["models"][:2]}, "two")
    capsys.readouterr()
    assert check(two, baseline, "--verbose") == 0
    out = capsys.readouterr().out
    assert status_of(out, "ood", "ensemble", "mutual_information", "clean", "ece") == "new"
    assert status_of(out, "id", "baseline", "predictive_entropy", "severity 2", "nll") == "same"
    assert "REGRESSED" not in out and re.search(r"PASS: \d+ values compared \(\d+ same, \d+ new\)", out), out
    bins = run({**full, "models": full["models"][:2], "metrics": {**full["metrics"], "n_bins": 10}}, "bins")
    capsys.readouterr()
    assert check(bins, baseline) == 2
    _one_line_error(capsys, "the run's metrics.n_bins is 10, the baseline's 15")
