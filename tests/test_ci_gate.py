"""The project's calibration regression gate: a reduced demo sweep must match results/ci_baseline.json.

A change that shifts calibration (an estimator, a metric, a model, the data or the corruptions)
fails here. If the change is intended, update the baseline (see results/README.md):

    python -m shiftbench run suites/demo.yaml --limit 16 --corruptions fog,contrast,gaussian_noise \\
        --severities 2,4 --device cpu --out runs/ci
    python -m shiftbench check runs/ci --write-baseline results/ci_baseline.json
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml

from shiftbench.cli import main as cli
from tests.run_fixture import CI_BASELINE, CI_SWEEP, ROOT, ci_sweep


def test_ci_sweep_matches_the_committed_baseline(tmp_path_factory, capsys):
    run = ci_sweep(tmp_path_factory.mktemp("ci") / "run")
    assert CI_BASELINE.is_file(), f"{CI_BASELINE} is missing; write it with `shiftbench check RUN --write-baseline`"
    code = cli(["check", str(run), "--baseline", str(CI_BASELINE)])
    out = capsys.readouterr()
    failing = [ln for ln in out.out.splitlines() if ln.endswith(("REGRESSED", "BECAME NaN"))]
    assert code == 0, (f"calibration regressed against {CI_BASELINE.name} (exit {code}):\n" + out.err
                       + "\n".join(failing[:40]) + "\n"
                       + "".join(ln + "\n" for ln in out.out.splitlines() if ln.startswith(("PASS:", "FAIL:")))
                       + "If the change is intended, update the baseline (see tests/test_ci_gate.py).")


def test_ci_sweep_rows_match_a_direct_computation(tmp_path_factory):
    """The clean id rows of two trained demo models against the metrics computed here, image by image, from the
    zoo's outputs: u from each estimator, calibration of the confidence 1 - u, conditional metrics of u, mIoU of
    the argmax. This ties each column of results.csv to its formula, not only to a stored baseline (the runner
    tests' random tiny models put every pixel in one confidence bin, where ECE equals MCE)."""
    from shiftbench.metrics import CalibrationMetrics, ConditionalMetrics, SegmentationMetrics
    from shiftbench.models.zoo import ModelZoo
    from shiftbench.runner.data import open_split
    from shiftbench.runner.dist import World
    from shiftbench.suite import parse_suite
    from shiftbench.uncertainty import ESTIMATORS

    run = ci_sweep(tmp_path_factory.mktemp("ci") / "run")
    path = ROOT / CI_SWEEP[0]
    raw = yaml.safe_load(path.read_text())
    raw["run"]["limit"] = int(CI_SWEEP[CI_SWEEP.index("--limit") + 1])
    s = parse_suite(raw, path.parent, path)
    m, k = s.metrics, s.dataset.classes
    assert m.calibration_confidence == "uncertainty"
    res = pd.read_csv(run / "results.csv")
    res = res[(res.split == "id") & (res.corruption == "clean")]
    names = ("ensemble", "moe_simple")
    plan = {n: list(res[res.model == n].estimator) for n in names}
    seg = {n: SegmentationMetrics(k, ignore_index=255) for n in names}
    cal = {(n, e): CalibrationMetrics(k, n_bins=m.n_bins, ignore_index=255, average=m.calibration_average)
           for n in names for e in plan[n]}
    con = {(n, e): ConditionalMetrics(patch_size=m.patch_size, accuracy_threshold=m.accuracy_threshold,
                                      thresholds=m.thresholds, threshold_range=m.threshold_range, ignore_index=255)
           for n in names for e in plan[n]}
    zoo = ModelZoo.from_suite(s, torch.device("cpu"))
    for batch in open_split(s, "id", World()).batches(1):  # run.exact: one image per forward, as the runner
        with torch.no_grad():
            out = zoo(batch.images.float() / 255, [0])
        for n in names:
            label = out[n].probs.argmax(1)
            seg[n].update(label, batch.labels)
            for e in plan[n]:
                u = ESTIMATORS[e](out[n])
                cal[n, e].update(out[n].probs, batch.labels, confidence=1 - u)
                con[n, e].update(label, batch.labels, u)
    assert len(plan["moe_simple"]) == 6 and len(plan["ensemble"]) == 2
    for n in names:
        rows = res[res.model == n].set_index("estimator")
        # forwards here run on this process's threads, the runner's on its share of them: rounding ~1e-7
        assert rows.miou.to_numpy() == pytest.approx(float(seg[n].compute()["miou"]), rel=1e-4)
        for e in plan[n]:
            want = {**cal[n, e].compute(), **con[n, e].compute()}
            for column in ("ece", "mce", "brier", "nll", "au_pavpu", "peak_pavpu", "peak_p_accurate_certain",
                           "peak_p_uncertain_inaccurate"):
                assert rows.loc[e, column] == pytest.approx(float(want[column]), rel=1e-4), (n, e, column)
