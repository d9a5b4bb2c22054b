"""The project's calibration regression gate: a reduced demo sweep must match results/ci_baseline.json.

A change that shifts calibration (an estimator, a metric, a model, the data or the corruptions)
fails here. If the change is intended, update the baseline (see results/README.md):

    python -m shiftbench run suites/demo.yaml --limit 16 --corruptions fog,contrast,gaussian_noise \\
        --severities 2,4 --device cpu --out runs/ci
    python -m shiftbench check runs/ci --write-baseline results/ci_baseline.json
"""

from __future__ import annotations

from shiftbench.cli import main as cli
from tests.run_fixture import CI_BASELINE, ci_sweep


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
