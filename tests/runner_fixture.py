"""A small suite with randomly initialised tiny models, for runner tests (no training needed)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from shiftbench.models.backbones import backbone_spec
from shiftbench.models.checkpoints import save_checkpoint
from shiftbench.models.deeplab import DeepLabV3Plus
from shiftbench.models.moe import MoEHead

CLASSES = 11


def write_checkpoints(folder: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    spec = backbone_spec("tiny")
    for name in ("expert_highway", "expert_urban"):
        save_checkpoint(folder / f"{name}.pt", DeepLabV3Plus("tiny", CLASSES).state_dict(), {"kind": "expert"})
    save_checkpoint(folder / "baseline.pt", DeepLabV3Plus("tiny", CLASSES, dropout=0.1, mc_dropout=True).state_dict(),
                    {"kind": "mc_dropout"})
    for gate in ("simple", "classwise"):
        head = MoEHead(gate, 2, spec.aspp, CLASSES, spec.gate_grid, gate == "classwise", "probs")
        save_checkpoint(folder / f"moe_{gate}.pt", head.state_dict(),
                        {"kind": "moe", "gate": gate, "gate_grid": list(spec.gate_grid)})


def suite_dict(count: int = 3, size=(64, 96), corruptions=("fog", "gaussian_noise"), severities=(2,)) -> dict:
    return {
        "name": "tiny",
        "dataset": {"name": "synthetic", "size": list(size), "classes": CLASSES, "seed": 0,
                    "count": {"train": 4, "val": 2, "test": count},
                    "eval": {"id": ["highway_test", "urban_test"], "ood": ["ambiguous_test"]}},
        "experts": {"highway": {"backbone": "tiny", "checkpoint": "expert_highway.pt"},
                    "urban": {"backbone": "tiny", "checkpoint": "expert_urban.pt"}},
        "models": [
            {"name": "baseline", "kind": "mc_dropout", "backbone": "tiny", "checkpoint": "baseline.pt", "passes": 2},
            {"name": "ensemble", "kind": "ensemble", "experts": ["highway", "urban"]},
            {"name": "moe_simple", "kind": "moe", "experts": ["highway", "urban"], "gate": "simple",
             "checkpoint": "moe_simple.pt"},
            {"name": "moe_classwise_conv", "kind": "moe", "experts": ["highway", "urban"], "gate": "classwise",
             "final_conv": True, "checkpoint": "moe_classwise.pt"},
        ],
        "corruptions": {"names": list(corruptions), "severities": list(severities)},
        "metrics": {"gallery": ["highway/test/000000", "ambiguous/test/000001"], "thresholds": 11},
        "run": {"device": "cpu", "batch_size": 2, "seed": 0},
    }


def make_suite(folder: Path, **kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoints(folder)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite_dict(**kwargs), sort_keys=False))
    return path
