"""One colour per method, one line style per estimator, the same in every figure.

Methods (the suite's models) take the Okabe-Ito colour-blind-safe palette in the order of
``summary.json``'s ``models``; estimators have a fixed line style and marker. Sizes follow a
two-column paper: 3.4 in (one column) and 7 in (full width), 7-9 pt fonts.
"""

from __future__ import annotations

from dataclasses import dataclass

COLUMN_WIDTH = 3.4  # in
FULL_WIDTH = 7.0  # in

#: Okabe & Ito (2008), black last
METHOD_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000")


@dataclass(frozen=True)
class EstimatorStyle:
    label: str
    dashes: tuple  # matplotlib line style: (offset, (on, off, ...)) in points
    marker: str


#: estimator -> label, line style, marker (labels as in the paper)
ESTIMATOR_STYLES: dict[str, EstimatorStyle] = {
    "predictive_entropy": EstimatorStyle("PE", (0, ()), "o"),
    "predictive_entropy_stacked": EstimatorStyle("PE (stacked)", (0, (5, 1.5)), "s"),
    "predictive_entropy_weighted": EstimatorStyle("PE (weighted)", (0, (5, 1.5, 1, 1.5)), "D"),
    "mutual_information": EstimatorStyle("MI", (0, (3, 2)), "^"),
    "mutual_information_stacked": EstimatorStyle("MI (stacked)", (0, (1, 1)), "v"),
    "mutual_information_weighted": EstimatorStyle("MI (weighted)", (0, (3, 1, 1, 1, 1, 1)), "<"),
    "expert_variance": EstimatorStyle("EV", (0, (7, 2, 2, 2)), ">"),
    "gate_entropy": EstimatorStyle("GE", (0, (1, 2.5)), "P"),
    "softmax_entropy": EstimatorStyle("SE", (0, (9, 3)), "X"),
    "one_minus_max_prob": EstimatorStyle("1-MSP", (0, (2, 2)), "*"),
}
_FALLBACK_DASHES = ((0, (4, 1, 4, 3)), (0, (6, 1)), (0, (2, 1, 2, 4)))
_FALLBACK_MARKERS = ("h", "p", "d")

#: the paper's estimator families, in panel order: the conditional figures give each family present a column
#: (estimators of no family share a last one, :data:`OTHER`); the gallery shows :data:`GALLERY_FAMILIES`
FAMILIES: dict[str, tuple[str, ...]] = {
    "PE": ("predictive_entropy", "predictive_entropy_stacked", "predictive_entropy_weighted"),
    "MI": ("mutual_information", "mutual_information_stacked", "mutual_information_weighted"),
    "EV": ("expert_variance",),
    "GE": ("gate_entropy",),
    "SE, 1-MSP": ("softmax_entropy", "one_minus_max_prob"),
}
OTHER = "other"
#: the gallery's uncertainty columns per model: the first estimator of each of these families it has
GALLERY_FAMILIES = ("PE", "MI", "EV", "SE, 1-MSP")


def family_groups(estimators: list[str]) -> list[tuple[str, list[str]]]:
    """``[(family, its estimators among ``estimators``), ...]`` in :data:`FAMILIES` order, empty families left
    out; the estimators of no family form a last group :data:`OTHER`. Order within a group is kept."""
    groups = [(family, [e for e in estimators if e in members]) for family, members in FAMILIES.items()]
    known = {e for members in FAMILIES.values() for e in members}
    groups.append((OTHER, [e for e in estimators if e not in known]))
    return [(family, members) for family, members in groups if members]


#: matplotlib settings for every figure
RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "figure.titlesize": 9,
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.1,
    "lines.markersize": 3.5,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.5,
    "savefig.dpi": 200,
    "pdf.fonttype": 42,  # embed TrueType: editable text in the PDF
    "svg.fonttype": "none",
    "svg.hashsalt": "shiftbench",  # fixed clip-path ids: the same run gives the same SVG bytes
    "axes.formatter.useoffset": False,  # tick labels are the values, never "1e-6 + 0.9952" offsets
}


def estimator_style(name: str) -> EstimatorStyle:
    """The style of an estimator; its label from ``shiftbench.uncertainty.ESTIMATORS`` when that exists."""
    style = ESTIMATOR_STYLES.get(name)
    if style is None:
        i = sum(map(ord, name)) % len(_FALLBACK_DASHES)
        style = EstimatorStyle(name, _FALLBACK_DASHES[i], _FALLBACK_MARKERS[i])
    label = _registry_label(name)
    return EstimatorStyle(label, style.dashes, style.marker) if label else style


def _registry_label(name: str) -> str | None:
    try:
        from shiftbench.uncertainty import ESTIMATORS  # added by the estimators module, when present
    except ImportError:
        return None
    label = getattr(ESTIMATORS.get(name), "label", None) if hasattr(ESTIMATORS, "get") else None
    return label if isinstance(label, str) and label else None


def estimator_label(name: str) -> str:
    return estimator_style(name).label


def method_colours(models: list[str]) -> dict[str, str]:
    """``{model: colour}`` in the given (suite) order, cycling through the palette."""
    return {m: METHOD_COLOURS[i % len(METHOD_COLOURS)] for i, m in enumerate(models)}
