"""The report's figures, one function per figure family, registered in :data:`FIGURES`.

Each function takes a :class:`Context` and yields :class:`Rendered` figures or :class:`Note`s
(a figure the run cannot support: no OOD split, no MoE, no corruptions, ...). Figures are
``matplotlib.figure.Figure`` objects (no pyplot state, rendered by Agg), colour = method and
line style = estimator (:mod:`shiftbench.report.style`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from shiftbench.errors import counted
from shiftbench.report import aggregate
from shiftbench.report.load import Run
from shiftbench.report.schema import CALIBRATION, CLEAN, CONDITIONAL, METRICS
from shiftbench.report.style import (COLUMN_WIDTH, FAMILIES, FULL_WIDTH, GALLERY_FAMILIES, estimator_label,
                                     estimator_style, family_groups)

#: per split index: (fill alpha, hatch) for bars and filled histograms; the first split is solid
SPLIT_STYLES = ((0.85, ""), (0.25, "////"), (0.25, "...."), (0.25, "xxxx"))
#: per split index: the outline of overlaid histograms (the first split also filled)
SPLIT_LINES = ("-", "--", ":", "-.")
#: the conditional metrics' axis labels
CONDITIONAL_LABELS = {"p_accurate_certain": "p(accurate | certain)",
                      "p_uncertain_inaccurate": "p(uncertain | inaccurate)", "pavpu": "PAvPU"}
#: the same on two lines, for y labels beside a short panel
CONDITIONAL_YLABELS = {k: v.replace("| ", "|\n") for k, v in CONDITIONAL_LABELS.items()}
GATE = "gate_entropy"


@dataclass
class Context:
    """What every figure function needs."""

    run: Run
    colours: dict[str, str]
    threshold: float = 0.5
    sweep_severities: list[int] = field(default_factory=list)
    gallery_models: list[str] = field(default_factory=list)
    gallery_quantile: float = 0.99


@dataclass
class Rendered:
    name: str
    title: str
    caption: str
    figure: Figure


@dataclass
class Note:
    text: str


# ------------------------------------------------------------------ helpers
def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _panels(fig: Figure, n: int, ncols: int, **kw) -> list:
    """``n`` axes on a grid of ``ncols`` columns; the unused cells are removed."""
    nrows = math.ceil(n / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw).ravel()
    for ax in axes[n:]:
        ax.remove()
    return list(axes[:n])


def _line_kw(ctx: Context, model: str, estimator: str) -> dict:
    """Colour (method), dashes and marker (estimator), and the label ``model/estimator`` the legend leaves out."""
    style = estimator_style(estimator)
    return {"color": ctx.colours[model], "linestyle": style.dashes, "marker": style.marker,
            "label": f"{model}/{estimator}"}


def _legend(fig: Figure, ctx: Context, models: list[str], estimators: list[str] = (), splits: list[str] = (),
            split_lines: bool = False) -> None:
    """One legend below the panels: methods (colours), estimators (line styles), splits (fills, or with
    ``split_lines`` the outlines of overlaid histograms)."""
    handles = [Line2D([], [], color=ctx.colours[m], lw=2.5, label=m) for m in models]
    handles += [Line2D([], [], color="0.25", linestyle=estimator_style(e).dashes, marker=estimator_style(e).marker,
                       label=estimator_label(e)) for e in estimators]
    if split_lines:
        handles += [Line2D([], [], color="0.25", linestyle=SPLIT_LINES[i % len(SPLIT_LINES)], label=s)
                    for i, s in enumerate(splits)]
    else:
        handles += [Patch(facecolor="0.4", alpha=SPLIT_STYLES[i % 4][0], hatch=SPLIT_STYLES[i % 4][1],
                          edgecolor="0.2", label=s) for i, s in enumerate(splits)]
    ncols = min(len(handles), max(1, int(fig.get_figwidth() / 1.15)))
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, frameon=False, handlelength=2.6,
               columnspacing=1.2)


def _present(ctx: Context, frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Models (suite order) and estimators (style order) that occur in ``frame``."""
    models = [m for m in ctx.run.models if m in set(frame["model"])]
    est = [e for e in _estimator_order(ctx.run) if e in set(frame["estimator"])]
    return models, est


def _estimator_order(run: Run) -> list[str]:
    from shiftbench.report.style import ESTIMATOR_STYLES

    known = [e for e in ESTIMATOR_STYLES if e in run.estimators]
    return known + [e for e in run.estimators if e not in known]


def _severity_axis(ax, severities: list[int], xlabel: bool = True) -> None:
    ax.set_xticks(severities, ["clean" if s == 0 else str(s) for s in severities])
    ax.set_xlabel("severity" if xlabel else "")
    ax.grid(True, axis="y")


def _chars(width_in: float, pt: float) -> float:
    """How many characters of a ``pt`` font fit in ``width_in`` inches (about 0.6 em a character)."""
    return width_in * 72 / (0.6 * pt)


def _wrap(name: str, width_in: float, pt: float = 8) -> tuple[str, float]:
    """A title for ``width_in`` inches: a long model name broken after the ``_``, ``-`` or ``.`` that makes its
    longer line shortest, and the font size (at most ``pt``) at which that line fits."""
    fits = _chars(width_in, pt)
    text = name
    if len(name) > fits and any(ch in "_-." for ch in name[1:-1]):
        cut = min((i for i in range(1, len(name) - 1) if name[i] in "_-."),
                  key=lambda i: (max(i + 1, len(name) - i - 1), -i))
        text = name[:cut + 1] + "\n" + name[cut + 1:]
    longest = max(len(line) for line in text.split("\n"))
    return text, min(pt, pt * fits / longest)


# ------------------------------------------------------------------ 1 calibration vs severity
def calibration_vs_severity(ctx: Context) -> Iterator[Rendered | Note]:
    """Per corrupted split and calibration metric: boxes over corruption types per severity, mean as a line."""
    run = ctx.run
    if not run.corrupted_splits:
        yield Note("Calibration vs severity: the run has no corrupted conditions.")
        return
    for split in run.corrupted_splits:
        data = run.results[run.results["split"] == split]
        models, estimators = _present(ctx, data)
        for metric in CALIBRATION:
            ncols = min(4, len(estimators))
            fig = _figure(FULL_WIDTH, 1.5 * math.ceil(len(estimators) / ncols) + 0.6)
            axes = _panels(fig, len(estimators), ncols)
            for i, (ax, est) in enumerate(zip(axes, estimators)):
                _severity_boxes(ax, ctx, data[data["estimator"] == est], models, est, metric,
                                xlabel=i + ncols >= len(estimators))
                ax.set_title(estimator_label(est))
                ax.set_ylabel(METRICS[metric].label if i % ncols == 0 else "")
            _legend(fig, ctx, models, estimators)
            yield Rendered(f"calibration_{metric}_{split}", f"{METRICS[metric].label} vs severity ({split})",
                           f"{METRICS[metric].label} on split {split} per method (colour) and estimator (panel, line "
                           "style). At each severity a box over the corruption types (quartiles, whiskers at min "
                           "and max) and the mean over them as a line; severity 0 is the clean data.", fig)


def _severity_boxes(ax, ctx: Context, data: pd.DataFrame, models: list[str], est: str, metric: str,
                    xlabel: bool) -> None:
    severities = sorted(data["severity"].unique())
    present = [m for m in models if m in set(data["model"])]
    width = 0.8 / max(len(present), 1)
    for k, model in enumerate(present):
        rows = data[data["model"] == model]
        offset = (k - (len(present) - 1) / 2) * width
        groups = [rows.loc[rows["severity"] == s, metric].dropna().to_numpy() for s in severities]
        colour = ctx.colours[model]
        boxes = [(s + offset, g) for s, g in zip(severities, groups) if g.size > 1]
        if boxes:
            ax.boxplot([g for _, g in boxes], positions=[p for p, _ in boxes], widths=width * 0.85,
                       whis=(0, 100), showfliers=False, patch_artist=True, manage_ticks=False,
                       boxprops=dict(facecolor=colour, alpha=0.35, edgecolor=colour, linewidth=0.6),
                       medianprops=dict(color=colour, linewidth=0.8), whiskerprops=dict(color=colour, linewidth=0.6),
                       capprops=dict(color=colour, linewidth=0.6))
        means = [g.mean() if g.size else np.nan for g in groups]
        ax.plot(np.asarray(severities, float) + offset, means, **_line_kw(ctx, model, est))
    _severity_axis(ax, severities, xlabel)


# ------------------------------------------------------------------ 2 conditional metrics vs severity (Fig. 7)
def conditional_vs_severity(ctx: Context) -> Iterator[Rendered | Note]:
    """Per corrupted split: the peaks (from results) and the values at the fixed threshold (from curves) vs
    severity, one figure each; rows the three metrics, columns the estimator families."""
    run = ctx.run
    if not run.corrupted_splits:
        yield Note("Conditional metrics vs severity: the run has no corrupted conditions.")
        return
    at_t = None if run.curves is None else aggregate.at_threshold(run.curves, ctx.threshold)
    t = ctx.threshold if at_t is None else at_t["x"].iloc[0]  # the grid point nearest to --threshold
    for split in run.corrupted_splits:
        data = run.results[run.results["split"] == split]
        models, estimators = _present(ctx, data)
        peaks = aggregate.severity_means(data, [f"peak_{c}" for c in CONDITIONAL])
        fig = _family_grid(ctx, models, estimators, "Peak over the threshold sweep",
                           lambda ax, k, m, e: _severity_line(ax, ctx, peaks, "peak_" + k, m, e))
        _severity_ticks(fig, peaks)
        note = "" if at_t is not None else " The run has no curves.parquet, so no fixed-threshold figure."
        yield Rendered(f"conditional_vs_severity_{split}", f"Conditional metrics vs severity: peaks ({split})",
                       f"Split {split}: p(accurate|certain), p(uncertain|inaccurate) and PAvPU at their peak over the "
                       "threshold sweep, mean over corruption types per severity; severity 0 is clean (cf. the "
                       f"paper's Fig. 7). {FAMILY_WORDS}{note}", fig)
        if at_t is None:
            continue
        fixed = aggregate.severity_means(at_t[at_t["split"] == split], list(CONDITIONAL))
        fig = _family_grid(ctx, models, estimators, f"At the uncertainty threshold t = {t:g}",
                           lambda ax, k, m, e: _severity_line(ax, ctx, fixed, k, m, e))
        _severity_ticks(fig, fixed)
        yield Rendered(f"conditional_at_threshold_{split}", f"Conditional metrics vs severity at t = {t:g} ({split})",
                       f"Split {split}: p(accurate|certain), p(uncertain|inaccurate) and PAvPU at the uncertainty "
                       f"threshold t = {t:g}, mean over corruption types per severity; severity 0 is clean. "
                       + FAMILY_WORDS, fig)


#: how the conditional figures are laid out, for their captions
FAMILY_WORDS = ("Rows: the three metrics; columns: the estimator families (line style: the estimator, colour: "
                "the method).")


def _family_grid(ctx: Context, models: list[str], estimators: list[str], what: str,
                 draw: Callable[..., None], xlabel: str = "severity", sharey: str | bool = "row") -> Figure:
    """Rows the conditional metrics, columns the estimator families (:func:`family_groups`), ``what`` the
    figure's title; each panel's lines by ``draw(ax, metric, model, estimator)``, estimators in style order,
    methods in suite order."""
    groups = family_groups(estimators)
    fig = _figure(FULL_WIDTH, 1.3 * len(CONDITIONAL) + 0.9)
    axes = fig.subplots(len(CONDITIONAL), len(groups), squeeze=False, sharex=True, sharey=sharey)
    for r, metric in enumerate(CONDITIONAL):
        for c, (family, members) in enumerate(groups):
            ax = axes[r, c]
            for est in members:
                for model in models:
                    draw(ax, metric, model, est)
            ax.grid(True)
            if r == 0:
                ax.set_title(family)
            if r == len(CONDITIONAL) - 1:
                ax.set_xlabel(xlabel)
        axes[r, 0].set_ylabel(CONDITIONAL_YLABELS[metric])
    fig.suptitle(what)
    _legend(fig, ctx, models, estimators)
    return fig


def _severity_line(ax, ctx: Context, frame: pd.DataFrame, column: str, model: str, est: str) -> None:
    """One (method, estimator) line of ``frame[column]`` against severity, if ``frame`` has that pair."""
    g = frame[(frame["model"] == model) & (frame["estimator"] == est)]
    if g.empty:
        return
    ax.plot(g["severity"], g[column], **_line_kw(ctx, model, est))


def _severity_ticks(fig: Figure, frame: pd.DataFrame) -> None:
    """The severities of ``frame`` as ticks of every (x-shared) panel; 0 reads "clean"."""
    severities = sorted(frame["severity"].unique())
    fig.axes[0].set_xticks(severities, ["clean" if s == 0 else str(s) for s in severities])


# ------------------------------------------------------------------ 3 threshold sweeps
def threshold_sweeps(ctx: Context) -> Iterator[Rendered | Note]:
    """The three conditional curves against the threshold at chosen severities, peaks marked: a figure per split
    and severity, rows the metrics, columns the estimator families."""
    run = ctx.run
    if run.curves is None:
        yield Note("Threshold sweeps: the run has no curves.parquet.")
        return
    cond = run.curves[run.curves["curve"] == "conditional"]
    for split in run.splits:
        sub = cond[cond["split"] == split]
        models, estimators = _present(ctx, sub)
        for sev in [s for s in ctx.sweep_severities if s in set(sub["severity"])]:
            at = sub[sub["severity"] == sev]
            pooled = {key: aggregate.pooled_conditional(g) for key, g in at.groupby(["model", "estimator"])}
            where = "clean" if sev == 0 else f"severity {sev}"
            fig = _family_grid(ctx, models, estimators, where.capitalize(),
                               lambda ax, k, m, e: _sweep_line(ax, ctx, pooled.get((m, e)), k, m, e),
                               xlabel="threshold t", sharey=True)
            ax = fig.axes[0]
            ax.set_ylim(-0.03, 1.03)  # shared: every panel, and every figure, on one [0, 1] scale
            ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
            yield Rendered(f"threshold_sweeps_{split}_{'clean' if sev == 0 else f'severity{sev}'}",
                           f"Threshold sweeps ({split}, {where})",
                           f"Split {split}, {where}: the conditional metrics against the uncertainty threshold (a "
                           "patch is uncertain when its uncertainty exceeds t), pooled over corruption types "
                           "(patch counts summed); the peak of each curve is marked with a larger marker. "
                           + FAMILY_WORDS, fig)


def _sweep_line(ax, ctx: Context, pooled: pd.DataFrame | None, metric: str, model: str, est: str) -> None:
    if pooled is None:
        return
    kw = _line_kw(ctx, model, est)
    marker = kw.pop("marker")
    ax.plot(pooled["x"], pooled[metric], lw=0.9, **kw)
    peak, where = aggregate.curve_peaks(pooled, metric)
    if math.isfinite(peak):
        ax.plot([where], [peak], marker=marker, markersize=5, color=kw["color"], markeredgecolor="black",
                markeredgewidth=0.4, linestyle="none")


# ------------------------------------------------------------------ 4 ID vs OOD (Fig. 4) and gate (Fig. 5)
def id_vs_ood(ctx: Context) -> Iterator[Rendered | Note]:
    """Calibration metrics per method and estimator on clean data of every split, side by side."""
    run = ctx.run
    if len(run.splits) < 2:
        yield Note("ID vs OOD calibration: the run has a single split group; it needs an ID and an OOD split.")
        return
    clean = run.clean[run.clean["estimator"] != GATE]  # routing calibration has its own figure
    models, _ = _present(ctx, clean)
    fig = _figure(FULL_WIDTH, 1.2 * len(CALIBRATION) + 1.1)
    axes = fig.subplots(len(CALIBRATION), 1, sharex=True, squeeze=False)[:, 0]
    pairs = _pairs(ctx, clean)
    for ax, metric in zip(axes, CALIBRATION):
        _split_bars(ax, ctx, clean, pairs, metric)
        ax.set_ylabel(METRICS[metric].label)
    axes[-1].set_xticks(range(len(pairs)), [estimator_label(e) for _, e in pairs], rotation=40, ha="right",
                        rotation_mode="anchor")
    for tick, (model, _) in zip(axes[-1].get_xticklabels(), pairs):
        tick.set_color(ctx.colours[model])
    _legend(fig, ctx, models, splits=run.splits)
    yield Rendered("id_vs_ood", "Calibration on ID vs OOD data",
                   "ECE, MCE, Brier and NLL on the clean data of each split group (bars side by side per method and "
                   "estimator; x labels coloured by method, dashed rules between methods; cf. the paper's Fig. 4).", fig)


def _pairs(ctx: Context, frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(model, estimator) pairs present in ``frame``: models in suite order, estimators in style order."""
    present = set(zip(frame["model"], frame["estimator"]))
    return [(m, e) for m in ctx.run.models for e in _estimator_order(ctx.run) if (m, e) in present]


def _split_bars(ax, ctx: Context, frame: pd.DataFrame, pairs: list[tuple[str, str]], metric: str) -> None:
    splits = ctx.run.splits
    width = 0.8 / len(splits)
    lut = frame.set_index(["split", "model", "estimator"])[metric]
    for i, split in enumerate(splits):
        alpha, hatch = SPLIT_STYLES[i % len(SPLIT_STYLES)]
        values = [lut.get((split, m, e), np.nan) for m, e in pairs]
        x = np.arange(len(pairs)) + (i - (len(splits) - 1) / 2) * width
        ax.bar(x, values, width, color=[ctx.colours[m] for m, _ in pairs], alpha=alpha, hatch=hatch,
               edgecolor=[ctx.colours[m] for m, _ in pairs], linewidth=0.5)
    for k in range(1, len(pairs)):  # a rule between methods: groups readable without colour (greyscale print)
        if pairs[k][0] != pairs[k - 1][0]:
            ax.axvline(k - 0.5, color="0.55", linewidth=0.6, linestyle=(0, (2, 2)))
    ax.grid(True, axis="y")
    ax.set_xlim(-0.6, len(pairs) - 0.4)


def gate_entropy(ctx: Context) -> Iterator[Rendered | Note]:
    """Gate entropy distributions on every split (histogram curves) and routing calibration (GE rows)."""
    run = ctx.run
    ge = run.clean[run.clean["estimator"] == GATE]
    if ge.empty:
        yield Note("Gate entropy: no model reports gate_entropy (no MoE in this run).")
        return
    models = [m for m in run.models if m in set(ge["model"])]
    if run.curves is not None:
        hist = run.curves[(run.curves["curve"] == "histogram") & (run.curves["estimator"] == GATE)
                          & (run.curves["corruption"] == CLEAN)]
        if not hist.empty:
            yield _gate_histograms(ctx, hist, models)
        else:
            yield Note("Gate entropy distributions: curves.parquet holds no clean gate-entropy histogram.")
    else:
        yield Note("Gate entropy distributions: the run has no curves.parquet.")
    pairs = [(m, GATE) for m in models]
    fig = _figure(FULL_WIDTH if len(models) > 3 else COLUMN_WIDTH * 1.6, 2.2)
    axes = _panels(fig, len(CALIBRATION), len(CALIBRATION))
    for ax, metric in zip(axes, CALIBRATION):
        _split_bars(ax, ctx, ge, pairs, metric)
        ax.set_title(METRICS[metric].label)
        ax.set_xticks([])
    _legend(fig, ctx, models, splits=run.splits)
    yield Rendered("routing_calibration", "Routing calibration (gate entropy)",
                   "Calibration of the gate entropy as an uncertainty (confidence = 1 - normalised gate entropy) "
                   "per MoE on the clean data of each split (cf. the paper's Fig. 5).", fig)


def _gate_histograms(ctx: Context, hist: pd.DataFrame, models: list[str]) -> Rendered:
    fig = _figure(FULL_WIDTH if len(models) > 2 else COLUMN_WIDTH, 1.9)
    axes = _panels(fig, len(models), min(4, len(models)), sharey=True)
    for ax, model in zip(axes, models):
        for i, split in enumerate(ctx.run.splits):
            g = hist[(hist["model"] == model) & (hist["split"] == split)].sort_values("x")
            if g.empty:
                continue
            share = (g["count"] / max(g["count"].sum(), 1)).to_numpy()
            x = g["x"].to_numpy()  # bin centres of equal bins: their edges, so the outer bins are drawn whole
            half = (x[1] - x[0]) / 2 if len(x) > 1 else 0.5
            edges = np.r_[x - half, x[-1] + half]
            if i == 0:
                ax.stairs(share, edges, fill=True, color=ctx.colours[model], alpha=0.35, linewidth=0)
            ax.stairs(share, edges, color=ctx.colours[model], linestyle=SPLIT_LINES[i % len(SPLIT_LINES)],
                      linewidth=1.0)
        ax.set_title(model)
        ax.set_xlabel("normalised gate entropy")
        ax.set_xlim(0, 1)
        ax.grid(True, axis="y")
    axes[0].set_ylabel("share of pixels")
    _legend(fig, ctx, [], splits=ctx.run.splits, split_lines=True)
    return Rendered("gate_entropy", "Gate entropy distributions",
                    "Distribution of the normalised gate entropy on the clean data of each split group, per MoE "
                    "(share of pixels per bin; cf. the paper's Fig. 5). Little difference between ID and OOD means "
                    "the gate is not aware of the distribution shift.", fig)


# ------------------------------------------------------------------ 5 reliability diagrams
def reliability(ctx: Context) -> Iterator[Rendered | Note]:
    """Per split: a reliability diagram per method, clean and (on corrupted splits) the worst severity."""
    run = ctx.run
    if run.curves is None:
        yield Note("Reliability diagrams: the run has no curves.parquet.")
        return
    rel = run.curves[run.curves["curve"] == "reliability"]
    for split in run.splits:
        sub = rel[rel["split"] == split]
        worst = max(sub["severity"], default=0)
        rows = [0] + ([worst] if worst > 0 else [])
        models, estimators = _present(ctx, sub)
        if not models:
            continue
        width = FULL_WIDTH if len(models) > 2 else COLUMN_WIDTH
        panel = (width - 0.8) / len(models) - 0.12  # square panels
        titles = {m: _wrap(m, panel) for m in models}
        lines = max(text.count("\n") + 1 for text, _ in titles.values())
        fig = _figure(width, (panel + 0.2) * len(rows) + 0.8 + 0.14 * (lines - 1))
        axes = fig.subplots(len(rows), len(models), squeeze=False, sharex=True, sharey=True)
        for r, sev in enumerate(rows):
            for c, model in enumerate(models):
                _reliability_panel(axes[r, c], ctx, sub[(sub["model"] == model) & (sub["severity"] == sev)], model)
                text, size = titles[model]
                axes[r, c].set_title(text if r == 0 else "", color=ctx.colours[model], fontsize=size, va="bottom")
            axes[r, 0].set_ylabel(("clean" if sev == 0 else f"severity {sev}") + "\naccuracy")
        for ax in axes[-1]:
            ax.set_xlabel("confidence")
        _legend(fig, ctx, [], estimators)
        yield Rendered(f"reliability_{split}", f"Reliability diagrams ({split})",
                       f"Split {split}: observed accuracy against confidence per bin, per method (column) and "
                       "estimator (line style); clean data" + (f" and severity {worst}, pooled over corruption types "
                                                               "(bin counts summed)" if worst else "")
                       + ". The diagonal is perfect calibration.", fig)


def _reliability_panel(ax, ctx: Context, rows: pd.DataFrame, model: str) -> None:
    """One method's reliability curves (one per estimator) and the diagonal."""
    ax.plot([0, 1], [0, 1], color="0.6", linewidth=0.6)
    for est, g in rows.groupby("estimator", sort=False):
        pooled = aggregate.pooled_reliability(g)
        ax.plot(pooled["bin_confidence"], pooled["bin_accuracy"], markersize=2.5, **_line_kw(ctx, model, est))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])
    ax.set_yticks([0, 0.5, 1], ["0", "0.5", "1"])
    ax.set_aspect("equal")
    ax.grid(True)


# ------------------------------------------------------------------ 6 gallery (Table 1)
def gallery(ctx: Context) -> Iterator[Rendered | Note]:
    """Input, ground truth, and per method its prediction and maps of the first estimator of each family of
    ``GALLERY_FAMILIES`` it has (PE, MI, EV, SE), one shared colour scale."""
    if not ctx.run.maps:
        yield Note(f"Gallery: the run saved no uncertainty maps ({_no_maps_reason(ctx.run)}).")
        return
    if missing := [str(s) for s in ctx.run.summary.get("gallery_missing") or []]:
        yield Note(f"Gallery: {counted(len(missing), 'metrics.gallery id')} not among the evaluated images, "
                   f"so not shown: {_some(missing)}; check the ids and --limit.")
    samples = [_load_npz(p) for p in ctx.run.maps]
    columns = _gallery_columns(ctx, samples)
    if not columns:
        yield Note("Gallery: none of the gallery models has saved maps.")
        return
    vmax = _shared_vmax([s[k] for s in samples for _, _, k in columns if k.startswith("unc__") and k in s],
                        ctx.gallery_quantile)
    groups = [("", [("", "Input", "image"), ("", "Ground truth", "label")])]
    groups += [(m, [c for c in columns if c[0] == m]) for m in dict.fromkeys(c[0] for c in columns)]
    h, w = samples[0]["image"].shape[:2]
    several = len({p.parent.name for p in ctx.run.maps}) > 1  # split groups
    names = _sample_labels(ctx.run.maps, samples, several)
    longest = max(len(line) for name in names for line in name.split("\n"))
    label_w = min(max(0.5, longest / _chars(1, 6) + 0.08), 1.5)  # in, the sample ids left of the first column
    label_pt = min(6.0, 6.0 * _chars(label_w - 0.08, 6) / longest)
    cell = (FULL_WIDTH - label_w - 0.2) / (2 + len(columns)) - 0.03
    fits = _chars(cell, 6)  # characters of a 6 pt column title in one cell
    titles = {title: "\n".join(title.rsplit(" ", 1)) if len(title) > fits else title
              for _, cols in groups for _, title, _ in cols}
    two_line = any("\n" in text for text in titles.values())
    title_pt = min(6.0, 6.0 * fits / max(len(line) for text in titles.values() for line in text.split("\n")))
    body = len(samples) * (cell * h / w + 0.04) + 0.45 + 0.1 * two_line
    fig = _figure(FULL_WIDTH, body + 0.6)
    top, bottom = fig.subfigures(2, 1, height_ratios=[body, 0.6])
    # the sample ids in a column of their own: every image column then has the same width, whatever room they take
    ratios = [label_w / cell] + [len(cols) for _, cols in groups]
    label_sub, *subs = top.subfigures(1, len(groups) + 1, width_ratios=ratios, wspace=0)
    label_sub.suptitle(" ", fontsize=7)
    for r, (ax, name) in enumerate(zip(label_sub.subplots(len(samples), 1, squeeze=False)[:, 0], names)):
        ax.axis("off")
        ax.text(1, 0.5, name, fontsize=label_pt, ha="right", va="center", transform=ax.transAxes)
        if r == 0:  # as many title lines as the image columns have, so that the rows line up
            ax.set_title("\n" * two_line + " ", fontsize=title_pt, pad=2)
    image = None
    for sub, (model, cols) in zip(subs, groups):
        sub.suptitle(model or " ", color=ctx.colours.get(model, "black"), fontsize=7)
        axes = sub.subplots(len(samples), len(cols), squeeze=False)
        for r, sample in enumerate(samples):
            for c, (_, title, key) in enumerate(cols):
                image = _gallery_cell(axes[r, c], sample, key, len(ctx.run.classes), vmax) or image
                if r == 0:  # "PE (stacked)" on two lines where one is wider than the cell; then every title has
                    # two, so that the groups' rows stay aligned
                    text = titles[title]
                    axes[r, c].set_title("\n" * (two_line and "\n" not in text) + text, fontsize=title_pt, pad=2)
    drawn = {key.rpartition("__")[2] for _, _, key in columns if key.startswith("unc__")}  # their estimators
    shown = [f for f in GALLERY_FAMILIES if drawn & set(FAMILIES[f])]
    if image is not None:
        cax = bottom.add_axes((0.3, 0.72, 0.4, 0.13))
        bottom.colorbar(image, cax=cax, orientation="horizontal", label="normalised uncertainty")
        maps = (f"uncertainty maps (the first estimator of the {' / '.join(shown)} families that it has), all on one "
                f"colour scale [0, {vmax:.2f}] (the {ctx.gallery_quantile:.0%} quantile of the shown maps)")
    else:
        maps = ("no uncertainty map: these methods saved none of an estimator of the "
                f"{' / '.join(GALLERY_FAMILIES)} families")
    yield Rendered("gallery", "Uncertainty maps",
                   f"Gallery samples (clean): input, ground truth, and per method its prediction and {maps}; rows "
                   "named by sample id" + (" and split group" if several else "")
                   + " (cf. the paper's Table 1).", fig)


def _sample_labels(paths: list[Path], samples: list[dict], several: bool) -> list[str]:
    """A row label per gallery sample: its id over two lines (``highway`` / ``test 000000``), with the split group
    (``id: highway``) when the maps come from ``several``."""
    labels = []
    for path, sample in zip(paths, samples):
        name = str(sample.get("sample_id", path.stem)).replace("/", "\n", 1).replace("/", " ")
        labels.append(f"{path.parent.name}: {name}" if several else name)
    return labels


def _no_maps_reason(run: Run, shown: int = 3) -> str:
    """Why a run has no maps, from summary.json's ``gallery_missing``, suite.yaml and the clean rows."""
    missing = [str(s) for s in run.summary.get("gallery_missing") or []]
    if missing:
        return (f"none of the metrics.gallery ids was among the evaluated images: {_some(missing, shown)}; check the "
                "ids and --limit")
    if run.gallery == []:
        return "metrics.gallery is empty"
    if run.clean.empty:
        return "no clean conditions; maps are saved on clean data only"
    return "maps/ is missing or empty"


def _some(ids: list[str], shown: int = 3) -> str:
    """``a/1, b/2, c/3 and 2 more``"""
    return ", ".join(ids[:shown]) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def _shared_vmax(maps: list[np.ndarray], quantile: float) -> float:
    """The colour scale's top: the quantile of every shown map's values, within [1e-3, 1]."""
    values = np.concatenate([m.astype(np.float32).ravel() for m in maps]) if maps else np.ones(1)
    values = values[np.isfinite(values)]
    return float(min(max(np.quantile(values, quantile) if values.size else 1.0, 1e-3), 1.0))


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        out = {k: data[k] for k in data.files}
    if "sample_id" in out:
        out["sample_id"] = str(out["sample_id"])
    return out


def _gallery_columns(ctx: Context, samples: list[dict]) -> list[tuple[str, str, str]]:
    """``(model, title, npz key)`` per column: prediction, then the first estimator of each family."""
    keys = set().union(*(s.keys() for s in samples))
    columns = []
    for model in ctx.gallery_models:
        if f"pred__{model}" in keys:
            columns.append((model, "pred.", f"pred__{model}"))
        for family in GALLERY_FAMILIES:
            est = next((e for e in FAMILIES[family] if f"unc__{model}__{e}" in keys), None)
            if est:
                columns.append((model, estimator_label(est), f"unc__{model}__{est}"))
    return columns


def _gallery_cell(ax, sample: dict, key: str, n_classes: int, vmax: float):
    """Draw one map; returns the image when it is an uncertainty map (for the colour bar)."""
    ax.set_xticks([])
    ax.set_yticks([])
    if key not in sample:
        ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, fontsize=6)
        return None
    if key == "image":
        ax.imshow(sample[key], interpolation="nearest")
    elif key == "label" or key.startswith("pred__"):
        ax.imshow(_colour_labels(sample[key], max(n_classes, 1)), interpolation="nearest")
    else:
        return ax.imshow(sample[key].astype(np.float32), cmap="inferno", vmin=0, vmax=vmax, interpolation="nearest")
    return None


def _colour_labels(label: np.ndarray, n_classes: int) -> np.ndarray:
    """Class map ``[H,W]`` -> RGB ``[H,W,3]`` with the tab20 palette; ignore (255) is black."""
    from matplotlib import colormaps

    palette = colormaps["tab20"](np.linspace(0, 1, 20))[:, :3]
    lut = np.zeros((256, 3))
    lut[:n_classes] = palette[np.arange(n_classes) % 20]
    return lut[label.astype(np.int64).clip(0, 255)]


#: every figure family, in report order
FIGURES: dict[str, Callable[[Context], Iterator[Rendered | Note]]] = {
    "calibration_vs_severity": calibration_vs_severity,
    "conditional_vs_severity": conditional_vs_severity,
    "threshold_sweeps": threshold_sweeps,
    "id_vs_ood": id_vs_ood,
    "gate_entropy": gate_entropy,
    "reliability": reliability,
    "gallery": gallery,
}
