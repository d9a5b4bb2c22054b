"""Clean-data mIoU of every model of a suite, per split and per group of splits.

``python -m shiftbench.models.scores suites/demo.yaml`` prints the Markdown table of
docs/models.md (any other suite: a column per evaluated split and per group of ``dataset.eval``).
A group's mIoU comes from the summed confusion matrices of its splits (not the mean of the
splits' mIoUs). The MC-dropout masks are the runner's (:func:`shiftbench.seeding.model_seeds`),
so the numbers are the clean condition's of ``shiftbench run`` up to the rounding of batched
forwards (``run.exact``).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from shiftbench.data import open_split
from shiftbench.models.training import confusion_matrix, miou
from shiftbench.models.zoo import ModelZoo
from shiftbench.seeding import model_seeds

#: the demo table's columns: name -> splits
DEMO_GROUPS = {"highway": ("highway_test",), "urban": ("urban_test",), "combined ID": ("highway_test", "urban_test"),
               "ambiguous (OOD)": ("ambiguous_test",)}


@torch.no_grad()
def confusions(suite: Any, splits: Sequence[str], device: str | torch.device = "cpu", batch_size: int = 16,
               zoo: ModelZoo | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{model: {split: confusion [K,K]}}`` on clean images of ``splits``, one zoo pass per batch."""
    zoo = zoo or ModelZoo.from_suite(suite, device)
    k = suite.dataset.classes
    out = {m: {} for m in zoo.kinds}
    for split in splits:
        for m in out:
            out[m][split] = torch.zeros(k, k, dtype=torch.int64)
        for x, y, ids in DataLoader(open_split(suite, split), batch_size=batch_size):
            preds = zoo(x.to(device), model_seeds(suite.run.seed, list(ids)))
            for m, p in preds.items():
                out[m][split] += confusion_matrix(p.probs.argmax(1).cpu(), y, k)
    return out


def eval_groups(suite: Any) -> dict[str, tuple[str, ...]]:
    """A column per split of ``dataset.eval``, then one per group of them."""
    groups = {s: (s,) for splits in suite.dataset.eval.values() for s in splits}
    return {**groups, **{g: tuple(splits) for g, splits in suite.dataset.eval.items() if len(splits) > 1}}


def miou_table(suite: Any, groups: dict[str, Sequence[str]] = DEMO_GROUPS, device: str | torch.device = "cpu",
               zoo: ModelZoo | None = None) -> dict[str, dict[str, float]]:
    """``{model: {group: mIoU}}``; a group's confusion is the sum over its splits."""
    splits = list(dict.fromkeys(s for g in groups.values() for s in g))
    conf = confusions(suite, splits, device, zoo=zoo)
    return {m: {g: miou(sum(c[s] for s in ss)) for g, ss in groups.items()} for m, c in conf.items()}


def markdown(table: dict[str, dict[str, float]]) -> str:
    groups = list(next(iter(table.values())))
    lines = ["| model | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    lines += [f"| {m} | " + " | ".join(f"{100 * v:.1f}" for v in row.values()) + " |" for m, row in table.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    from shiftbench.suite import load_suite

    suite = load_suite(sys.argv[1])
    print(markdown(miou_table(suite, DEMO_GROUPS if suite.name == "demo" else eval_groups(suite))))
