"""A fabricated but self-consistent run directory (docs/run-format.md) for the report and check tests.

Every condition simulates patch-level correctness and one uncertainty per estimator, then
computes the run's numbers from those samples the way the format defines them: reliability
bins and ECE/MCE/Brier/NLL of the confidence ``1 - u``, the conditional counts and curves over a
101-point threshold grid (uncertain = ``u > t``), their peaks and AU-PAvPU (trapezoid), and an
uncertainty histogram. So a table or figure built from ``results.csv`` and one built from
``curves.parquet`` must agree, as they do for a real run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

PE, MI = "predictive_entropy", "mutual_information"
PES, PEW, MIS, MIW = (f"{PE}_stacked", f"{PE}_weighted", f"{MI}_stacked", f"{MI}_weighted")
EV, GE = "expert_variance", "gate_entropy"

#: model -> (kind, estimators, accuracy on clean ID data)
MODELS: dict[str, tuple[str, tuple[str, ...], float]] = {
    "baseline": ("mc_dropout", (PE, MI), 0.86),
    "ensemble": ("ensemble", (PE, MI), 0.84),
    "moe_simple": ("moe", (PES, PEW, MIS, MIW, EV, GE), 0.88),
    "moe_classwise": ("moe", (PES, MIS, EV, GE), 0.89),
}
#: estimator -> how well its uncertainty separates errors (mean u of correct, of wrong patches)
SEPARATION = {PE: (0.25, 0.6), MI: (0.1, 0.3), PES: (0.22, 0.62), PEW: (0.24, 0.6), MIS: (0.08, 0.3),
              MIW: (0.09, 0.28), EV: (0.15, 0.5), GE: (0.3, 0.38)}
CORRUPTIONS = ("fog", "contrast", "gaussian_noise")
#: corruption -> accuracy lost per severity step
HARSHNESS = {"fog": 0.03, "contrast": 0.05, "gaussian_noise": 0.08}
SEVERITIES = (1, 2)
SPLITS = ("id", "ood")
N_BINS, N_THRESHOLDS, N_HIST = 15, 101, 20
CLASSES = ("Person", "Car", "Truck", "Drivable", "Nondrivable", "Blocker", "Info", "Sky", "Buildings",
           "Nature", "Lanes")
GALLERY = {"id": "highway/test/000000", "ood": "ambiguous/test/000000"}
#: the manifest's ``comparable`` (``Suite.comparable``) of a fabricated run
COMPARABLE = {"dataset": {"name": "synthetic", "classes": len(CLASSES), "size": [128, 256]},
              "metrics": {"n_bins": N_BINS, "thresholds": N_THRESHOLDS, "patch_size": 4}, "seed": 0, "limit": None,
              "amp": False}


ROOT = Path(__file__).resolve().parents[1]
#: the project's CI sweep: the demo suite reduced to a few images, 3 corruptions x 2 severities (CPU, deterministic)
CI_SWEEP = ("suites/demo.yaml", "--limit", "16", "--corruptions", "fog,contrast,gaussian_noise",
            "--severities", "2,4", "--device", "cpu", "--quiet")
CI_BASELINE = ROOT / "results" / "ci_baseline.json"
_CI_RUNS: dict[str, Path] = {}


def ci_sweep(out: Path) -> Path:
    """Run the CI sweep into ``out`` (a fresh folder), once per test session; later calls reuse the first run.

    The runner runs in a subprocess (as in CI, and so a failure shows its own log).
    """
    if "run" not in _CI_RUNS:
        if not (ROOT / "suites" / "demo").is_dir():
            import pytest

            pytest.skip("suites/demo/ checkpoints are not present")
        cmd = [sys.executable, "-m", "shiftbench", "run", *CI_SWEEP, "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"CI sweep failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        _CI_RUNS["run"] = out
    return _CI_RUNS["run"]


def make_run(root: str | Path, *, splits: tuple[str, ...] = SPLITS, corrupted: tuple[str, ...] = ("id",),
             corruptions: tuple[str, ...] = CORRUPTIONS, severities: tuple[int, ...] = SEVERITIES,
             models: dict = MODELS, n_patches: int = 1200, seed: int = 0, suite: str = "fixture",
             digest: str = "f" * 64, curves: bool = True, maps: bool = True,
             comparable: dict | None = COMPARABLE) -> Path:
    """Write a complete run directory under ``root`` and return its path (``comparable=None``: a manifest of
    an older shiftbench, without it)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, curve_frames = [], []
    for split, corruption, severity in _conditions(splits, corrupted, corruptions, severities):
        for model, (kind, estimators, acc) in models.items():
            drop = 0.05 * (split != "id") + HARSHNESS.get(corruption, 0.04) * severity
            correct = rng.random(n_patches) < max(acc - drop, 0.05)
            for est in estimators:
                u = _uncertainty(rng, correct, est, severity)
                key = dict(split=split, model=model, kind=kind, estimator=est, corruption=corruption,
                           severity=severity)
                row, frame = _condition_numbers(correct, u, key)
                rows.append(row)
                curve_frames.append(frame)
    results = pd.DataFrame(rows)
    results.to_csv(root / "results.csv", index=False)
    results.to_parquet(root / "results.parquet", index=False)
    if curves:
        pd.concat(curve_frames, ignore_index=True).to_parquet(root / "curves.parquet", index=False)
    if maps:
        _write_maps(root, splits, models, rng)
    _write_meta(root, suite, digest, models, splits, corrupted, corruptions, severities, seed, comparable)
    return root


def _conditions(splits, corrupted, corruptions, severities):
    yield from ((s, "clean", 0) for s in splits)
    yield from ((s, c, v) for s in splits if s in corrupted for c in corruptions for v in severities)


def _uncertainty(rng, correct, est, severity):
    """Normalised uncertainty in [0,1]: Beta draws whose mean depends on correctness and severity."""
    lo, hi = SEPARATION.get(est, (0.2, 0.5))
    mean = np.where(correct, lo, hi) + 0.02 * severity
    conc = 6.0
    return rng.beta(mean * conc, (1 - mean) * conc).clip(0, 1)


def _condition_numbers(correct, u, key):
    """One results row and its curve rows, computed from patch correctness and uncertainty."""
    y = correct.astype(float)
    conf = 1.0 - u
    rel = _reliability(conf, y)
    t = np.linspace(0, 1, N_THRESHOLDS)
    uncertain = u[None, :] > t[:, None]
    acc = correct[None, :]
    n_ac, n_au = (acc & ~uncertain).sum(1), (acc & uncertain).sum(1)
    n_ic, n_iu = (~acc & ~uncertain).sum(1), (~acc & uncertain).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        pac = n_ac / (n_ac + n_ic)
        pui = n_iu / (n_ic + n_iu)
    pavpu = (n_ac + n_iu) / len(u)
    eps = 1e-7
    c = conf.clip(eps, 1 - eps)
    gap = np.abs(rel["bin_accuracy"] - rel["bin_confidence"])
    filled = rel["bin_count"] > 0
    row = dict(key, n_images=8, n_pixels=16 * len(u), miou=float(y.mean() * 0.8), pixel_accuracy=float(y.mean()),
               ece=float((gap[filled] * rel["bin_count"][filled]).sum() / len(u)), mce=float(gap[filled].max()),
               brier=float(((conf - y) ** 2).mean()), nll=float(-(y * np.log(c) + (1 - y) * np.log(1 - c)).mean()),
               brier_multiclass=float(((conf - y) ** 2).mean() * 1.3), nll_multiclass=float(-np.log(c).mean()),
               mean_uncertainty=float(u.mean()), au_pavpu=float(np.trapezoid(pavpu, t)))
    for name, curve in (("p_accurate_certain", pac), ("p_uncertain_inaccurate", pui), ("pavpu", pavpu)):
        i = int(np.nanargmax(curve)) if np.isfinite(curve).any() else None
        row[f"peak_{name}"] = float(curve[i]) if i is not None else np.nan
        row[f"peak_{name}_threshold"] = float(t[i]) if i is not None else np.nan
    conditional = pd.DataFrame(dict(key, curve="conditional", x=t, p_accurate_certain=pac,
                                    p_uncertain_inaccurate=pui, pavpu=pavpu, n_ac=n_ac, n_au=n_au,
                                    n_ic=n_ic, n_iu=n_iu))
    reliability = pd.DataFrame(dict(key, curve="reliability", **rel))
    edges = np.linspace(0, 1, N_HIST + 1)
    histogram = pd.DataFrame(dict(key, curve="histogram", x=(edges[:-1] + edges[1:]) / 2,
                                  count=np.histogram(u, edges)[0].astype(float)))
    frame = pd.concat([conditional, reliability, histogram], ignore_index=True)
    for col in ("p_accurate_certain", "p_uncertain_inaccurate", "pavpu", "n_ac", "n_au", "n_ic", "n_iu",
                "bin_confidence", "bin_accuracy", "bin_count", "count"):
        frame[col] = frame[col].astype(float)
    return row, frame


def _reliability(conf, y):
    idx = np.minimum((conf * N_BINS).astype(int), N_BINS - 1)
    count = np.bincount(idx, minlength=N_BINS).astype(float)
    with np.errstate(invalid="ignore"):
        return dict(x=(np.arange(N_BINS) + 0.5) / N_BINS,
                    bin_confidence=np.bincount(idx, conf, N_BINS) / count,
                    bin_accuracy=np.bincount(idx, y, N_BINS) / count, bin_count=count)


def _write_maps(root, splits, models, rng):
    h, w = 32, 64
    for split in splits:
        sid = GALLERY.get(split, f"{split}/test/000000")
        label = (np.arange(w)[None, :] // 6 + np.arange(h)[:, None] // 8).astype(np.int16) % len(CLASSES)
        label[:2] = 255
        arrays = {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": label,
                  "sample_id": np.array(sid)}
        for model, (_, estimators, _) in models.items():
            pred = label.copy()
            pred[rng.random((h, w)) < 0.1] = 3
            arrays[f"pred__{model}"] = pred.clip(0, len(CLASSES) - 1).astype(np.int16)
            for est in estimators:
                arrays[f"unc__{model}__{est}"] = rng.random((h, w)).astype(np.float16) * 0.6
        path = root / "maps" / split / (sid.replace("/", "__") + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)


def _write_meta(root, suite, digest, models, splits, corrupted, corruptions, severities, seed, comparable):
    from shiftbench.runner.store import STATE_FORMAT

    manifest = {"suite": suite, "digest": digest, **({"comparable": comparable} if comparable else {}),
                "format": STATE_FORMAT}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "suite.yaml").write_text(f"name: {suite}\n# fabricated by tests/run_fixture.py\n")
    n_cond = len(list(_conditions(splits, corrupted, corruptions, severities)))
    summary = {
        "suite": {"name": suite, "digest": digest, "path": f"suites/{suite}.yaml"},
        "classes": list(CLASSES), "models": {m: spec[0] for m, spec in models.items()}, "seed": seed,
        "device": "cpu", "world_size": 1,
        "versions": {"python": "3.11", "torch": "x", "torchvision": "x", "kornia": "x", "numpy": np.__version__,
                     "shiftbench": "0.1.0"},
        "git_commit": "0" * 40, "wall_time_s": 1.0,
        "time_s": {"data": 0.1, "corruption": 0.2, "forward": 0.5, "estimators_metrics": 0.1, "io": 0.1},
        "outside_forward_share": 0.5,
        "conditions": {"total": n_cond, "finished": n_cond, "skipped": 0}, "failed": [], "skipped_files": [],
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    (root / "run.log").write_text("fabricated run\n")
