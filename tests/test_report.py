"""`shiftbench report` on a fabricated run (tests/run_fixture.py): files, numbers, degraded runs, CLI errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from shiftbench.cli import main as cli
from shiftbench.errors import ShiftbenchError
from shiftbench.report import aggregate, tables
from shiftbench.report.build import build_report
from shiftbench.report.load import load_run
from shiftbench.report.style import ESTIMATOR_STYLES, estimator_label
from tests.run_fixture import MODELS, PE, SEPARATION, ci_sweep, make_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "fixture")


@pytest.fixture(scope="module")
def report(run_dir):
    return build_report(run_dir, fmt="pdf")


def parse_markdown(text: str) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, cells (bold markers removed) and bold flags of a Markdown table."""
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("|")]

    def split(line: str) -> list[str]:
        return [c.strip().replace("\0", "|") for c in line.strip().strip("|").replace("\\|", "\0").split("|")]

    body = [split(ln) for ln in lines[2:]]
    return split(lines[0]), [[c.strip("*") for c in r] for r in body], [[c.startswith("**") for c in r] for r in body]


def number(cell: str) -> float:
    return math.nan if cell == tables.MISSING else float(cell)


LABEL_TO_ESTIMATOR = {estimator_label(e): e for e in ESTIMATOR_STYLES}


# ------------------------------------------------------------------ files
def test_every_figure_and_table_is_written(report):
    out = report.out
    families = {f.family for f in report.figures}
    assert families == {"calibration_vs_severity", "conditional_vs_severity", "threshold_sweeps", "id_vs_ood",
                        "gate_entropy", "reliability", "gallery"}
    names = {f.name for f in report.figures}
    assert {"calibration_ece_id", "calibration_mce_id", "calibration_brier_id", "calibration_nll_id",
            "routing_calibration", "reliability_ood", "gallery"} <= names
    for fig in report.figures:
        assert [p.suffix for p in fig.files] == [".pdf", ".png"]
        for rel in fig.files:
            assert (out / rel).stat().st_size > 2000, rel
        assert (out / fig.files[0]).read_bytes().startswith(b"%PDF")
        assert (out / fig.files[1]).read_bytes().startswith(b"\x89PNG")
    assert {t.name for t, _ in report.tables} == {"table3", "table2_id", "robustness_id"}
    for _, files in report.tables:
        assert all((out / f).stat().st_size > 200 for f in files)
    assert report.notes == []
    assert not list(out.rglob(".*.tmp*")), "temporary files left behind"


def test_html_and_markdown_reference_every_figure_relatively(report):
    page = (report.out / "report.html").read_text()
    md = (report.out / "report.md").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(srcs) == sorted(f.files[-1].as_posix() for f in report.figures)
    assert all(not s.startswith("/") and (report.out / s).is_file() for s in srcs)
    assert page.count("<table>") == len(report.tables)
    for fig in report.figures:
        assert f"]({fig.files[-1].as_posix()})" in md
    for table, files in report.tables:
        assert tables.to_markdown(table).strip() in md
        assert files[1].as_posix() in page


# ------------------------------------------------------------------ numbers
def _expected(results: pd.DataFrame, split: str, metrics, corrupted: bool) -> dict[tuple[str, str], list[float]]:
    """Brute force: per (estimator, model), the clean value or the mean over corrupted rows."""
    out = {}
    rows = results[(results["split"] == split) & ((results["corruption"] != "clean") == corrupted)]
    for (est, model), g in rows.groupby(["estimator", "model"]):
        out[(est, model)] = [float(np.nanmean(g[m])) if g[m].notna().any() else math.nan for m in metrics]
    return out


def _assert_table(md: str, expected: dict, scales: list[float], decimals: list[int], first_col: int = 2):
    header, rows, _ = parse_markdown(md)
    assert len(rows) == len(expected)
    for row in rows:
        values = expected[(LABEL_TO_ESTIMATOR[row[0]], row[1])]
        for cell, v, scale, dec in zip(row[first_col:], values, scales, decimals):
            if math.isnan(v):
                assert cell == tables.MISSING
            else:
                assert abs(float(cell) - v * scale) <= 0.5 * 10 ** -dec + 1e-9, (row, cell, v)


def test_table2_holds_the_mean_peaks_over_corrupted_data(report, run_dir):
    results = pd.read_csv(run_dir / "results.csv")
    metrics = ["peak_p_accurate_certain", "peak_p_uncertain_inaccurate", "peak_pavpu", "au_pavpu"]
    md = (report.out / "tables" / "table2_id.md").read_text()
    _assert_table(md, _expected(results, "id", metrics, corrupted=True), [100] * 4, [2] * 4)
    caption = next(table.caption for table, _ in report.tables if table.name == "table2_id")
    assert "peaks over the threshold sweep (t = 0, 0.01, ..., 1: 101 points) of" in caption  # the fixture's grid


def test_table3_holds_clean_values_per_split_and_corrupted_means(report, run_dir):
    results = pd.read_csv(run_dir / "results.csv")
    metrics = ["miou", "ece", "mce", "brier", "nll"]
    scales, decimals = [100, 100, 100, 1, 1], [2, 2, 2, 4, 3]
    clean_id, clean_ood = (_expected(results, s, metrics, False) for s in ("id", "ood"))
    corr = _expected(results, "id", metrics, True)
    expected = {k: clean_id[k] + clean_ood[k] + corr[k] for k in clean_id}
    md = (report.out / "tables" / "table3.md").read_text()
    header, _, _ = parse_markdown(md)
    assert header[2:4] == ["clean id: mIoU (%)", "clean id: ECE (%)"]
    assert header[-5] == "corrupted id (mean): mIoU (%)"
    _assert_table(md, expected, scales * 3, decimals * 3)


def test_robustness_table_is_clean_corrupted_and_their_ratio(report, run_dir):
    results = pd.read_csv(run_dir / "results.csv")
    metrics = ["miou", "ece", "au_pavpu"]
    clean, corr = _expected(results, "id", metrics, False), _expected(results, "id", metrics, True)
    expected = {k: [v for c0, c1 in zip(clean[k], corr[k]) for v in (c0, c1, c1 / c0)] for k in clean}
    md = (report.out / "tables" / "robustness_id.md").read_text()
    _assert_table(md, expected, [100, 100, 100] * 3, [2, 2, 1] * 3)


def test_best_value_per_column_is_bold_direction_aware(report):
    for table, files in report.tables:
        header, rows, bold = parse_markdown((report.out / files[0]).read_text())
        for j, col in enumerate(table.columns, start=2):
            values = [number(r[j]) for r in rows]
            finite = [v for v in values if math.isfinite(v)]
            best = max(finite) if col.higher_is_better else min(finite)
            assert [b[j] for b in bold] == [v == best for v in values], (table.name, header[j])
    # lower is better for ECE: the bold ECE is the minimum
    t3 = next(t for t, _ in report.tables if t.name == "table3")
    assert not t3.columns[1].higher_is_better and t3.columns[0].higher_is_better


def test_latex_tables_are_booktabs_with_the_same_bold_cells(report):
    for table, files in report.tables:
        tex = (report.out / files[1]).read_text()
        md = (report.out / files[0]).read_text()
        for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}"):
            assert rule in tex
        wide = len(table.index) + len(table.columns) > tables.WIDE_COLUMNS  # page-wide and scaled to fit
        env = "table*" if wide else "table"
        assert tex.count("\\begin{" + env + "}[t]") == 1 and tex.rstrip().endswith("\\end{" + env + "}")
        shrink = r"\resizebox{\ifdim\width>\textwidth\textwidth\else\width\fi}{!}{%"  # shrunk, never enlarged
        assert (shrink in tex) == wide and tex.count("{") == tex.count("}")
        assert tex.count(r"\textbf{") == md.count("**") // 2
        assert "moe\\_simple" in tex and "moe_simple" not in tex.replace("moe\\_simple", "")
        body = [ln for ln in tex.splitlines() if ln.endswith(r"\\")]
        assert all(ln.count("&") == len(table.index) + len(table.columns) - 1 for ln in body[-len(table.rows):])


def test_latex_escapes_special_characters():
    assert tables.latex_escape("a_b & 50% #1 {x}") == r"a\_b \& 50\% \#1 \{x\}"


def test_ties_are_all_bold_and_single_values_are_not():
    col = tables.Column("ECE", higher_is_better=False, scale=100, decimals=2)
    t = tables.Table("t", "t", "", ("Estimator", "Model"), [col],
                     [(("PE", "a"), [0.10001]), (("PE", "b"), [0.1]), (("PE", "c"), [0.2]), (("PE", "d"), [math.nan])])
    assert t.best() == [{0, 1}]
    assert tables.Table("u", "u", "", ("E", "M"), [col], [(("PE", "a"), [0.1])]).best() == [set()]


# ------------------------------------------------------------------ reductions
def test_pooled_conditional_of_one_condition_is_its_curve(run_dir):
    curves = pd.read_parquet(run_dir / "curves.parquet")
    one = curves[(curves["curve"] == "conditional") & (curves["model"] == "moe_simple")
                 & (curves["estimator"] == "expert_variance") & (curves["corruption"] == "fog")
                 & (curves["severity"] == 2)]
    pooled = aggregate.pooled_conditional(one)
    for metric in ("p_accurate_certain", "p_uncertain_inaccurate", "pavpu"):
        np.testing.assert_allclose(pooled[metric], one.sort_values("x")[metric], equal_nan=True)


def test_pooled_conditional_sums_counts_over_conditions(run_dir):
    curves = pd.read_parquet(run_dir / "curves.parquet")
    rows = curves[(curves["curve"] == "conditional") & (curves["model"] == "baseline")
                  & (curves["estimator"] == "predictive_entropy") & (curves["severity"] == 1)]
    pooled = aggregate.pooled_conditional(rows).set_index("x")
    for x in (0.0, 0.3, 0.5, 1.0):
        at = rows[np.isclose(rows["x"], x)]
        ac, au, ic, iu = (at[c].sum() for c in ("n_ac", "n_au", "n_ic", "n_iu"))
        assert pooled.loc[x, "pavpu"] == pytest.approx((ac + iu) / (ac + au + ic + iu))
        assert pooled.loc[x, "p_accurate_certain"] == pytest.approx(ac / (ac + ic)) if ac + ic else True


def test_pooled_reliability_weights_bins_by_count():
    frame = pd.DataFrame({"x": [0.25, 0.25, 0.75, 0.75], "bin_confidence": [0.2, 0.3, 0.7, np.nan],
                          "bin_accuracy": [0.0, 1.0, 0.5, np.nan], "bin_count": [1.0, 3.0, 2.0, 0.0]})
    pooled = aggregate.pooled_reliability(frame)
    assert pooled["bin_confidence"].tolist() == pytest.approx([(0.2 + 3 * 0.3) / 4, 0.7])
    assert pooled["bin_accuracy"].tolist() == pytest.approx([0.75, 0.5])
    assert pooled["bin_count"].tolist() == [4.0, 2.0]


def test_at_threshold_reads_the_grid_point(run_dir):
    curves = pd.read_parquet(run_dir / "curves.parquet")
    at = aggregate.at_threshold(curves, 0.5)
    cond = curves[(curves["curve"] == "conditional") & np.isclose(curves["x"], 0.5)]
    assert len(at) == len(cond) == len(pd.read_csv(run_dir / "results.csv"))
    np.testing.assert_array_equal(at["pavpu"].to_numpy(), cond["pavpu"].to_numpy())
    with pytest.raises(ShiftbenchError, match="must lie in"):
        aggregate.at_threshold(curves, 1.5)
    coarse = curves[np.isclose(curves["x"] * 4, np.round(curves["x"] * 4))]  # grid 0, .25, .5, .75, 1
    assert aggregate.at_threshold(coarse, 0.3)["pavpu"].equals(aggregate.at_threshold(coarse, 0.25)["pavpu"])
    assert set(at["x"]) == {0.5} and set(aggregate.at_threshold(coarse, 0.3)["x"]) == {0.25}  # the point it read


def test_the_fixed_threshold_figure_names_the_grid_point_it_read(run_dir):
    """--threshold 0.333 on the 101-point grid reads t = 0.33, and the figure says 0.33, not 0.333."""
    from shiftbench.report import figures
    from shiftbench.report.style import method_colours

    run = load_run(run_dir)
    ctx = figures.Context(run=run, colours=method_colours(list(run.models)), threshold=0.333)
    rendered = {r.name: r for r in figures.conditional_vs_severity(ctx) if isinstance(r, figures.Rendered)}
    assert set(rendered) == {f"conditional_{kind}_{split}" for kind in ("vs_severity", "at_threshold")
                             for split in run.corrupted_splits}
    fixed = [r for name, r in rendered.items() if name.startswith("conditional_at_threshold")]
    assert all("threshold t = 0.33," in r.caption for r in fixed)
    assert all(r.figure.get_suptitle() == "At the uncertainty threshold t = 0.33" for r in fixed)
    assert not any("0.333" in r.caption + r.title for r in rendered.values())


def _panel_families(fig) -> dict[tuple[int, int], tuple[str, list]]:
    """(row, column) -> (the column's family title, the panel's data lines)."""
    axes = {(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start): ax for ax in fig.axes}
    titles = {c: ax.get_title() for (r, c), ax in axes.items() if r == 0}
    return {(r, c): (titles[c], [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1])
            for (r, c), ax in axes.items()}


@pytest.mark.parametrize("family_name", ["conditional_vs_severity", "threshold_sweeps"])
def test_conditional_figures_give_each_estimator_family_a_column(run_dir, family_name):
    """A column per family (PE, MI, EV, GE), each panel holding one line per (method, estimator) of its family
    and nothing else; the lines are the numbers they plot."""
    from shiftbench.report import figures
    from shiftbench.report.style import FAMILIES, method_colours

    run = load_run(run_dir)
    ctx = figures.Context(run=run, colours=method_colours(list(run.models)), sweep_severities=[0, 2])
    rendered = [r for r in figures.FIGURES[family_name](ctx) if isinstance(r, figures.Rendered)]
    assert len(rendered) == (2 * len(run.corrupted_splits) if family_name == "conditional_vs_severity"
                             else 2 * len(run.splits) - (len(run.splits) - len(run.corrupted_splits)))
    pairs = {(m, e) for m, (_, ests, _) in MODELS.items() for e in ests}
    for r in rendered:
        panels = _panel_families(r.figure)
        assert [panels[0, c][0] for c in range(4)] == ["PE", "MI", "EV", "GE"] and len(panels) == 12
        for (row, _), (family, lines) in panels.items():
            drawn = [tuple(ln.get_label().split("/")) for ln in lines]
            assert sorted(drawn) == sorted(p for p in pairs if p[1] in FAMILIES[family]), (r.name, family)
    if family_name == "conditional_vs_severity":  # the PAvPU panel of PE holds the severity means
        results = pd.read_csv(run_dir / "results.csv")
        peaks = next(r for r in rendered if r.name == "conditional_vs_severity_id")
        line = next(ln for ln in _panel_families(peaks.figure)[2, 0][1] if ln.get_label() == f"baseline/{PE}")
        rows = results[(results["split"] == "id") & (results["model"] == "baseline") & (results["estimator"] == PE)]
        expected = rows.groupby("severity")["peak_pavpu"].mean()
        np.testing.assert_allclose(line.get_ydata(), expected.to_numpy())
        np.testing.assert_array_equal(line.get_xdata(), expected.index.to_numpy())


def _figures(run_dir, family: str, **kw) -> dict:
    """name -> Rendered of one figure family on the fixture run (``kw``: Context fields)."""
    from shiftbench.report import figures
    from shiftbench.report.style import method_colours

    run = load_run(run_dir)
    ctx = figures.Context(run=run, colours=method_colours(list(run.models)), **kw)
    return {r.name: r for r in figures.FIGURES[family](ctx) if isinstance(r, figures.Rendered)}


def _method_lines(ax) -> list:
    """The ``model/estimator`` data lines of an axes (not the diagonal, box parts or peak markers)."""
    return [ln for ln in ax.get_lines() if "/" in ln.get_label() and len(ln.get_xdata()) > 1]


def test_calibration_figure_draws_the_mean_over_corruptions_per_severity(run_dir):
    """The ECE-vs-severity line of every method and estimator is the mean (not the median) over corruptions."""
    results = pd.read_csv(run_dir / "results.csv")
    rows = results[results["split"] == "id"]
    fig = _figures(run_dir, "calibration_vs_severity")["calibration_ece_id"].figure
    checked, median_differs = 0, False
    for ax in fig.axes:
        for line in _method_lines(ax):
            model, est = line.get_label().split("/")
            g = rows[(rows["model"] == model) & (rows["estimator"] == est)].groupby("severity")["ece"]
            assert ax.get_title() == estimator_label(est)
            np.testing.assert_allclose(line.get_ydata(), g.mean().to_numpy())
            np.testing.assert_allclose(np.round(line.get_xdata()), g.mean().index.to_numpy())
            median_differs |= not np.allclose(g.median(), g.mean())
            checked += 1
    assert checked == sum(len(ests) for _, ests, _ in MODELS.values()) and median_differs


def test_threshold_sweep_lines_pool_exactly_the_chosen_severity(run_dir):
    """The severity-1 sweep's curves are the counts pooled over severity 1 only (severity 2 left out)."""
    from shiftbench.report.schema import CONDITIONAL

    curves = pd.read_parquet(run_dir / "curves.parquet")
    cond = curves[(curves["curve"] == "conditional") & (curves["split"] == "id") & (curves["severity"] == 1)]
    fig = _figures(run_dir, "threshold_sweeps", sweep_severities=[1])["threshold_sweeps_id_severity1"].figure
    checked = 0
    for ax in fig.axes:
        metric = CONDITIONAL[ax.get_subplotspec().rowspan.start]
        for line in _method_lines(ax):
            model, est = line.get_label().split("/")
            pooled = aggregate.pooled_conditional(cond[(cond["model"] == model) & (cond["estimator"] == est)])
            np.testing.assert_allclose(line.get_xdata(), pooled["x"])
            np.testing.assert_allclose(line.get_ydata(), pooled[metric], equal_nan=True)
            checked += 1
    assert checked == len(CONDITIONAL) * sum(len(ests) for _, ests, _ in MODELS.values())


def test_reliability_diagram_rows_are_clean_and_the_worst_severity(run_dir):
    """Rows 'clean' and 'severity 2' (the fixture's worst), their curves the bins pooled at that severity."""
    curves = pd.read_parquet(run_dir / "curves.parquet")
    rel = curves[(curves["curve"] == "reliability") & (curves["split"] == "id")]
    fig = _figures(run_dir, "reliability")["reliability_id"].figure
    rows = {ax.get_subplotspec().rowspan.start for ax in fig.axes}
    assert rows == {0, 1}
    checked = 0
    for ax in fig.axes:
        r = ax.get_subplotspec().rowspan.start
        if ax.get_subplotspec().colspan.start == 0:
            assert ax.get_ylabel() == ["clean", "severity 2"][r] + "\naccuracy"
        for line in _method_lines(ax):
            model, est = line.get_label().split("/")
            g = rel[(rel["model"] == model) & (rel["estimator"] == est) & (rel["severity"] == [0, 2][r])]
            pooled = aggregate.pooled_reliability(g)
            np.testing.assert_allclose(line.get_xdata(), pooled["bin_confidence"])
            np.testing.assert_allclose(line.get_ydata(), pooled["bin_accuracy"])
            checked += 1
    assert checked == 2 * sum(len(ests) for _, ests, _ in MODELS.values())


def test_gallery_maps_share_the_quantile_colour_scale(run_dir):
    """Every uncertainty image is drawn on [0, the 99 % quantile of all shown maps' values]."""
    rendered = _figures(run_dir, "gallery", gallery_models=list(MODELS))["gallery"]
    images = [im for ax in rendered.figure.axes for im in ax.images if im.get_cmap().name == "inferno"]
    assert len(images) == 2 * 10  # 2 samples x (PE, MI; PE, MI; PE, MI, EV; PE, MI, EV)
    vmax = float(np.quantile(np.concatenate([np.ma.compressed(im.get_array()) for im in images]), 0.99))
    assert 0.3 < vmax < 0.6  # the fixture's maps lie in [0, 0.6): below the clip at 1 and below their max
    assert all(im.get_clim() == pytest.approx((0, vmax), rel=1e-6) for im in images)
    assert f"colour scale [0, {vmax:.2f}] (the 99% quantile" in rendered.caption


def test_shared_vmax_is_the_quantile_not_the_maximum():
    """_shared_vmax of 0, 0.001, ..., 0.999 at q = 0.99 is numpy's 99 % quantile (0.98901), not the max."""
    from shiftbench.report.figures import _shared_vmax

    values = np.arange(1000) / 1000
    assert _shared_vmax([values], 0.99) == pytest.approx(np.quantile(values, 0.99), rel=1e-6)
    assert _shared_vmax([values], 0.99) != pytest.approx(values.max(), rel=1e-6)


def test_label_colours_are_tab20_and_ignore_is_black():
    """Class k takes tab20's k-th colour (k mod 20), the ignore label 255 black, whatever n_classes is."""
    from matplotlib import colormaps
    from matplotlib.colors import to_rgb

    from shiftbench.report.figures import _colour_labels

    palette = colormaps["tab20"].colors
    rgb = _colour_labels(np.array([[0, 3, 10, 255]], dtype=np.int16), 11)
    assert rgb.shape == (1, 4, 3)
    np.testing.assert_allclose(rgb[0, :3], [to_rgb(palette[k]) for k in (0, 3, 10)])
    np.testing.assert_array_equal(rgb[0, 3], [0, 0, 0])
    np.testing.assert_allclose(_colour_labels(np.array([21, 255]), 25), [to_rgb(palette[1]), (0, 0, 0)])


def test_robustness_relative_columns_bold_their_best_ratio(report):
    """The bold cell of each 'relative (%)' column holds its best ratio: max for mIoU and AU-PAvPU, min for ECE."""
    header, rows, bold = parse_markdown((report.out / "tables" / "robustness_id.md").read_text())
    best = {"mIoU: relative (%)": max, "ECE: relative (%)": min, "AU-PAvPU: relative (%)": max}
    assert set(best) <= set(header)
    for name, pick in best.items():
        j = header.index(name)
        values = [number(r[j]) for r in rows]
        assert len(set(values)) > 1
        assert [b[j] for b in bold] == [v == pick(values) for v in values], name


def test_family_groups_keep_order_and_gather_the_rest():
    from shiftbench.report.style import OTHER, family_groups

    ests = ["gate_entropy", "mutual_information", "predictive_entropy", "my_score", "predictive_entropy_stacked",
            "one_minus_max_prob"]
    assert family_groups(ests) == [("PE", ["predictive_entropy", "predictive_entropy_stacked"]),
                                   ("MI", ["mutual_information"]), ("GE", ["gate_entropy"]),
                                   ("SE, 1-MSP", ["one_minus_max_prob"]), (OTHER, ["my_score"])]
    assert family_groups([]) == []


def test_severity_means_against_a_loop(run_dir):
    results = pd.read_csv(run_dir / "results.csv")
    frame = aggregate.severity_means(results, ["ece", "peak_pavpu"])
    for row in frame.itertuples():
        rows = results[(results["split"] == row.split) & (results["model"] == row.model)
                       & (results["estimator"] == row.estimator) & (results["severity"] == row.severity)]
        assert len(rows) == (1 if row.severity == 0 else 3)
        assert row.ece == pytest.approx(sum(rows["ece"]) / len(rows))


# ------------------------------------------------------------------ a real run (the CI sweep of the demo suite)
def test_report_of_a_real_run(tmp_path_factory):
    run = ci_sweep(tmp_path_factory.mktemp("ci") / "run")
    report = build_report(run, fmt="pdf", out=tmp_path_factory.mktemp("real") / "report")
    results = pd.read_csv(run / "results.csv")
    assert {f.family for f in report.figures} == {"calibration_vs_severity", "conditional_vs_severity",
                                                 "threshold_sweeps", "id_vs_ood", "gate_entropy", "reliability",
                                                 "gallery"}
    for fig in report.figures:
        assert all((report.out / f).stat().st_size > 2000 for f in fig.files), fig.name
    metrics = ["peak_p_accurate_certain", "peak_p_uncertain_inaccurate", "peak_pavpu", "au_pavpu"]
    _assert_table((report.out / "tables" / "table2_id.md").read_text(),
                  _expected(results, "id", metrics, corrupted=True), [100] * 4, [2] * 4)
    metrics, scales, decimals = ["miou", "ece", "mce", "brier", "nll"], [100, 100, 100, 1, 1], [2, 2, 2, 4, 3]
    blocks = [_expected(results, "id", metrics, False), _expected(results, "ood", metrics, False),
              _expected(results, "id", metrics, True)]
    _assert_table((report.out / "tables" / "table3.md").read_text(),
                  {k: blocks[0][k] + blocks[1][k] + blocks[2][k] for k in blocks[0]}, scales * 3, decimals * 3)


# ------------------------------------------------------------------ degraded runs
BASE, ENS, MOE = ({k: MODELS[k]} for k in ("baseline", "ensemble", "moe_classwise"))
DEGRADED = {  # run -> (fixture arguments, notes expected, figure families that must be missing)
    "one_split_no_moe_one_severity": (dict(splits=("id",), models={**BASE, **ENS}, severities=(3,),
                                           corruptions=("fog", "contrast")),
                                      ["ID vs OOD", "Gate entropy"], {"id_vs_ood", "gate_entropy"}),
    "no_corruptions": (dict(models={**BASE, **MOE}, corruptions=()),
                       ["Calibration vs severity", "Conditional metrics vs severity", "Table 2"],
                       {"calibration_vs_severity", "conditional_vs_severity"}),
}


@pytest.mark.parametrize("case", sorted(DEGRADED))
def test_degraded_runs_report_what_they_have(tmp_path, case):
    kwargs, notes, missing = DEGRADED[case]
    report = build_report(make_run(tmp_path / case, n_patches=300, **kwargs), fmt="svg")
    assert report.figures and report.tables
    assert not missing & {f.family for f in report.figures}
    for note in notes:
        assert any(n.startswith(note) for n in report.notes), (note, report.notes)
    for fig in report.figures:
        assert (report.out / fig.files[0]).read_text().lstrip().startswith("<?xml")
    assert (report.out / "report.html").read_text().count("<img") == len(report.figures)


# ------------------------------------------------------------------ CLI
def test_cli_report_of_a_run_without_curves_and_maps(tmp_path, capsys):
    run = make_run(tmp_path / "r", models={"baseline": MODELS["baseline"]}, splits=("id",), corruptions=("fog",),
                   severities=(1,), n_patches=200, curves=False, maps=False)
    assert cli(["report", str(run), "--format", "png", "--out", str(tmp_path / "o"), "--threshold", "0.3",
                "--sweep-severities", "0,1"]) == 0
    out = capsys.readouterr().out
    for note in ("Threshold sweeps", "Reliability", "Gallery", "ID vs OOD", "Gate entropy"):
        assert f"note: {note}" in out
    assert out.splitlines()[-1].startswith("report: 5 figures, 3 tables")
    assert (tmp_path / "o" / "figures" / "conditional_vs_severity_id.png").is_file()


def test_cli_report_counts_in_the_singular(tmp_path, capsys):
    run = make_run(tmp_path / "r", models={"baseline": MODELS["baseline"]}, splits=("id",), corruptions=(),
                   n_patches=100, curves=False, maps=False)
    assert cli(["report", str(run), "--format", "png", "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"report: 0 figures, 1 table -> {tmp_path / 'o' / 'report.html'}"


@pytest.mark.parametrize("missing, suite_yaml, reason", [
    (["a/1", "b/2"], "metrics: {gallery: [a/1, b/2]}\n",
     "none of the metrics.gallery ids was among the evaluated images: a/1, b/2; check the ids and --limit"),
    ([f"x/{i}" for i in range(5)], "metrics: {gallery: [x/0, x/1, x/2, x/3, x/4]}\n",
     "images: x/0, x/1, x/2 and 2 more; check"),
    ([], "metrics: {gallery: []}\n", "(metrics.gallery is empty)"),
    ([], "name: fixture\n", "(metrics.gallery is empty)"),  # the suite's default
    (None, "metrics: {gallery: [a/1]}\n", "(maps/ is missing or empty)"),  # maps deleted, or an older run
])
def test_the_gallery_note_says_why_there_are_no_maps(tmp_path, missing, suite_yaml, reason):
    import json

    from shiftbench.report.figures import Context, gallery

    run = make_run(tmp_path / "r", models={"baseline": MODELS["baseline"]}, splits=("id",), corruptions=(),
                   n_patches=100, curves=False, maps=False)
    if missing is not None:
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "gallery_missing": missing}))
    (run / "suite.yaml").write_text(suite_yaml)
    [note] = gallery(Context(load_run(run), colours={}))
    assert note.text.startswith("Gallery: the run saved no uncertainty maps (") and reason in note.text, note.text


def test_gallery_ids_that_were_not_evaluated_are_noted_beside_the_figure(tmp_path):
    import json

    from shiftbench.report.figures import Context, Note, Rendered, gallery

    run = make_run(tmp_path / "r", models={"baseline": MODELS["baseline"]}, splits=("id",), corruptions=(),
                   n_patches=100, curves=False)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "gallery_missing": ["z/9"]}))
    note, figure = gallery(Context(load_run(run), colours={}, gallery_models=["baseline"]))
    assert isinstance(note, Note) and isinstance(figure, Rendered)
    assert note.text == ("Gallery: 1 metrics.gallery id not among the evaluated images, so not shown: z/9; "
                         "check the ids and --limit.")


@pytest.mark.parametrize("fmt", ["pdf", "svg"])
def test_a_report_is_the_same_bytes_twice_and_leaves_no_stale_files(tmp_path, fmt):
    """No creation date and no random ids in the vector figures; a smaller run reported into the same folder
    leaves none of the bigger run's figures or tables behind."""
    small = make_run(tmp_path / "r", models={"baseline": MODELS["baseline"]}, splits=("id",), corruptions=("fog",),
                     severities=(1,), n_patches=200, curves=False, maps=False)
    files = {}
    for out in ("a", "b"):
        build_report(small, tmp_path / out, fmt=fmt)
        files[out] = {p.relative_to(tmp_path / out): p.read_bytes() for p in (tmp_path / out).rglob("*") if p.is_file()}
    assert files["a"] == files["b"] and any(p.suffix == f".{fmt}" for p in files["a"])
    big = make_run(tmp_path / "big", models={"baseline": MODELS["baseline"]}, splits=("id", "ood"),
                   corruptions=("fog",), severities=(1,), n_patches=200, curves=False, maps=False)
    build_report(big, tmp_path / "a", fmt="png")
    assert (tmp_path / "a" / "figures" / "id_vs_ood.png").is_file()  # the small run has no ood split
    mine = [tmp_path / "a" / "figures" / "my_diagram.png", tmp_path / "a" / "tables" / "notes.md"]
    for path in mine:
        path.write_text("the user's own")
    build_report(small, tmp_path / "a", fmt=fmt)
    now = {p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert now == set(files["b"]) | {p.relative_to(tmp_path / "a") for p in mine}  # never touched


def test_failed_conditions_and_skipped_files_are_warned_about(tmp_path, capsys):
    import json

    run = make_run(tmp_path / "r", models={"baseline": MODELS["baseline"]}, splits=("id",), corruptions=("fog",),
                   severities=(1,), n_patches=200, maps=False)
    summary = json.loads((run / "summary.json").read_text())
    summary["failed"] = [{"condition": "id/snow/1", "reason": "model baseline produced NaN or Inf probabilities"}]
    summary["skipped_files"] = [{"file": "x.png", "reason": "not a readable PNG"}]
    (run / "summary.json").write_text(json.dumps(summary))
    assert cli(["report", str(run), "--format", "png", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("warning: 1 condition failed") and "id/snow/1 (model baseline" in out[0]
    assert out[1].startswith("warning: 1 unreadable image was skipped")
    md, page = (tmp_path / "o" / "report.md").read_text(), (tmp_path / "o" / "report.html").read_text()
    assert md.count("> **Warning:**") == 2 and "id/snow/1" in md
    assert page.count('<p class="warning">') == 2 and "id/snow/1" in page
    assert cli(["report", str(make_run(tmp_path / "ok", models={"baseline": MODELS["baseline"]}, splits=("id",),
                                       corruptions=("fog",), severities=(1,), n_patches=200, maps=False)),
                "--format", "png"]) == 0
    assert "warning" not in capsys.readouterr().out


def run_cli(argv: list[str]) -> int:
    """The CLI's exit code, whether it returns it or argparse exits."""
    try:
        return cli(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv, message", [
    (["--threshold", "1.5"], "--threshold 1.5: must lie in [0, 1]"),
    (["--sweep-severities", "4"], "--sweep-severities 4: not in this run"),
    (["--gallery-models", "nope"], "--gallery-models nope: not in this run"),
    (["--sweep-severities", "a"], "expected comma-separated severities"),
    (["--sweep-severities", "0,,2"], "--sweep-severities: '0,,2' has an empty item"),
    (["--gallery-models", ","], "--gallery-models: ',' is empty; give comma-separated model names or 'all'"),
    (["--format", "jpg"], "invalid choice"),
])
def test_cli_report_bad_input_is_one_line_exit_2(run_dir, capsys, argv, message):
    code = run_cli(["report", str(run_dir), "--out", str(run_dir / "unused"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (run_dir / "unused").exists()


def test_missing_or_broken_run_dir(tmp_path, capsys):
    assert cli(["report", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'}: not a shiftbench run directory (no manifest.json); give the --out folder" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "manifest.json").write_text('{"suite": "demo", "digest": "0"}')
    assert cli(["report", str(tmp_path / "unfinished")]) == 2
    assert "no results.csv or results.parquet; the run has not finished" in capsys.readouterr().err
    run = make_run(tmp_path / "cols", models={"baseline": MODELS["baseline"]}, splits=("id",), corruptions=(),
                   n_patches=100, curves=False, maps=False)
    pd.read_csv(run / "results.csv").drop(columns=["ece"]).to_csv(run / "results.csv", index=False)
    assert cli(["report", str(run)]) == 2
    assert "missing column(s) ece" in capsys.readouterr().err
    data = (run / "results.csv").read_bytes()
    (run / "results.csv").write_bytes(data[:len(data) * 2 // 3].rstrip(b"\n") + b"0")  # cut mid-line
    assert cli(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "results.csv: ends in the middle of a line (cut short?)" in err and len(err.strip().splitlines()) == 1
    assert cli(["report", str(tmp_path / "empty" / "..") + "/cols/results.csv"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_model_names_stay_strings(tmp_path):
    run = make_run(tmp_path / "na", models={"NA": MODELS["baseline"]}, splits=("id",), corruptions=(),
                   n_patches=100, curves=False, maps=False)
    assert load_run(run).models == {"NA": "mc_dropout"}


# ------------------------------------------------------------------ layout
def _titles_fit_and_do_not_overlap(fig) -> None:
    """Every axes title, axis label and text, and the figure's title and x label, lies inside the figure, and none
    overlaps another or the figure's legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # shiftbench's figures have no canvas of a backend of their own
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox
    texts = ([t for ax in fig.get_axes() for t in (ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts)]
             + [fig._suptitle, fig._supxlabel])
    boxes = []
    for text in texts:
        if text is None or not text.get_text().strip():
            continue
        ext = text.get_window_extent(renderer)
        assert (box.x0 - 0.5 <= ext.x0 and ext.x1 <= box.x1 + 0.5 and box.y0 - 0.5 <= ext.y0
                and ext.y1 <= box.y1 + 0.5), text.get_text()
        boxes.append((text.get_text(), ext))
    boxes += [("legend", legend.get_window_extent(renderer)) for legend in fig.legends]
    for i, (a, ea) in enumerate(boxes):
        for b, eb in boxes[i + 1:]:
            assert not ea.overlaps(eb), (a, b)


def test_long_model_names_and_estimator_labels_fit_their_panels(tmp_path, monkeypatch):
    """Six methods with the demo's longest names: reliability titles are wrapped and scaled inside the figure,
    the gallery's column titles ("PE (stacked)") do not run into each other, and six estimator families (six
    panel columns) keep the conditional figures' labels apart."""
    import matplotlib

    from shiftbench.report import figures
    from shiftbench.report.style import RC, method_colours

    names = ["baseline", "ensemble", "moe_simple", "moe_simple_conv", "moe_classwise", "moe_classwise_conv"]
    models = {n: MODELS[list(MODELS)[min(i, len(MODELS) - 1)]] for i, n in enumerate(names)}
    extra = ("softmax_entropy", "one_minus_max_prob", "my_score")  # six estimator families: six panel columns
    models["baseline"] = ("mc_dropout", MODELS["baseline"][1] + extra, MODELS["baseline"][2])
    for est in extra:
        monkeypatch.setitem(SEPARATION, est, (0.2, 0.5))
    run = load_run(make_run(tmp_path / "long", models=models))
    ctx = figures.Context(run=run, colours=method_colours(list(run.models)), sweep_severities=[1],
                          gallery_models=list(run.models))
    with matplotlib.rc_context(RC):
        rendered = [r for family in ("reliability", "gallery", "conditional_vs_severity", "threshold_sweeps")
                    for r in figures.FIGURES[family](ctx) if isinstance(r, figures.Rendered)]
        assert {r.name for r in rendered} >= {"reliability_id", "gallery", "conditional_at_threshold_id",
                                              "threshold_sweeps_id_severity1"}
        for r in rendered:
            _titles_fit_and_do_not_overlap(r.figure)
        bars = next(r for r in figures.FIGURES["id_vs_ood"](ctx) if r.name == "id_vs_ood")
        for ax in bars.figure.get_axes():  # a rule between each two methods, for greyscale prints
            rules = [ln for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1]
            assert len(rules) == len(names) - 1
    text, size = figures._wrap("moe_classwise_conv", 0.9)
    assert text == "moe_classwise_\nconv" and size * 0.6 * len("moe_classwise_") <= 0.9 * 72 + 1e-9


def test_the_gallery_of_single_pass_models_with_long_ids(tmp_path, monkeypatch):
    """Custom single-pass models (SE, 1-MSP) get an uncertainty column (SE, the family's first) and the colour bar;
    Cityscapes-long sample ids widen the label column instead of squeezing the input panels; with maps of two
    split groups the rows name their group."""
    import matplotlib

    from shiftbench.report import figures
    from shiftbench.report.style import RC, method_colours
    from tests import run_fixture

    for est in ("softmax_entropy", "one_minus_max_prob"):
        monkeypatch.setitem(run_fixture.SEPARATION, est, (0.2, 0.5))
    monkeypatch.setitem(run_fixture.GALLERY, "id", "frankfurt/frankfurt_000000_000294")
    monkeypatch.setitem(run_fixture.GALLERY, "ood", "munster/munster_000001_000019")
    models = {m: ("custom", ("softmax_entropy", "one_minus_max_prob"), 0.8) for m in ("tiny", "lraspp")}
    run = load_run(make_run(tmp_path / "r", models=models, corruptions=(), n_patches=100, curves=False))
    ctx = figures.Context(run=run, colours=method_colours(list(run.models)), gallery_models=list(run.models))
    with matplotlib.rc_context(RC):
        [rendered] = [r for r in figures.gallery(ctx) if isinstance(r, figures.Rendered)]
        fig = rendered.figure
        _titles_fit_and_do_not_overlap(fig)
        titles = [ax.get_title().strip() for ax in fig.axes if ax.get_title().strip()]
        assert titles == ["Input", "Ground truth", "pred.", "SE", "pred.", "SE"]
        assert any(ax.get_xlabel() == "normalised uncertainty" for ax in fig.axes)  # the colour bar
        labels = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert labels == ["id: frankfurt\nfrankfurt_000000_000294", "ood: munster\nmunster_000001_000019"]
        panels = [ax for ax in fig.axes if ax.images]
        heights = {round(ax.get_window_extent().height, 1) for ax in panels}
        assert len(heights) == 1, heights  # input, ground truth and the maps: one size
    assert "(the first estimator of the SE, 1-MSP families that it has)" in rendered.caption
    assert "rows named by sample id and split group" in rendered.caption


def test_a_run_whose_every_condition_failed_says_so(tmp_path, capsys):
    """An empty results table: the one line says why when summary.json lists failed conditions."""
    import json

    run = make_run(tmp_path / "r", models={"baseline": MODELS["baseline"]}, splits=("id",), corruptions=("fog",),
                   severities=(1,), n_patches=100, curves=False, maps=False)
    header = (run / "results.csv").read_text().splitlines()[0]
    (run / "results.csv").write_text(header + "\n")
    assert cli(["report", str(run)]) == 2
    assert capsys.readouterr().err.strip() == f"shiftbench: error: {run}: results table has no rows"
    summary = json.loads((run / "summary.json").read_text())
    failed = [{"condition": "id/clean/0", "reason": "model baseline produced NaN or Inf probabilities"},
              {"condition": "id/fog/1", "reason": "model baseline produced NaN or Inf probabilities"}]
    (run / "summary.json").write_text(json.dumps({**summary, "failed": failed}))
    assert cli(["report", str(run)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"shiftbench: error: {run}: results table has no rows: all its 2 conditions failed, the first id/clean/0: "
        "model baseline produced NaN or Inf probabilities (summary.json's failed)")
