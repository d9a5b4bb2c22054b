"""The committed demo checkpoints: size, provenance, and the paper's qualitative structure."""

from pathlib import Path

import pytest
import torch
import yaml

from shiftbench.data import open_split
from shiftbench.models import ModelZoo, read_checkpoint
from shiftbench.models.scores import miou_table
from shiftbench.models.trainer import data_probe
from shiftbench.suite import load_suite, parse_suite

DEMO = Path(__file__).resolve().parents[1] / "suites" / "demo.yaml"
MB = 1 << 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo():
    return load_suite(DEMO)


def _checkpoints(suite) -> list[Path]:
    return [e.checkpoint for e in suite.experts.values()] + [m.checkpoint for m in suite.models if m.checkpoint]


def test_demo_checkpoints_are_small_and_record_the_data_they_saw(demo):
    paths = _checkpoints(demo)
    assert len(paths) == 7 and sum(p.stat().st_size for p in paths) <= 10 * MB
    for p in paths:
        meta = read_checkpoint(p)["meta"]
        assert meta["suite"] == "demo" and meta["classes"] == demo.dataset.classes
        for split, probe in meta["data_probe"].items():  # fails when the generator changed: retrain the demo
            assert data_probe(open_split(demo, split)) == probe, f"{p.name}: {split} differs from its training data"


def test_demo_models_show_the_papers_structure(demo):
    raw = yaml.safe_load(DEMO.read_text())
    raw["models"] += [{"name": f"expert_{e}", "kind": "expert", "experts": [e]} for e in ("highway", "urban")]
    suite = parse_suite(raw, DEMO.parent, DEMO)
    table = miou_table(suite, zoo=ModelZoo.from_suite(suite))
    hw, ur = table["expert_highway"], table["expert_urban"]
    assert hw["highway"] > ur["highway"] and hw["highway"] > hw["urban"]   # each expert best on its own domain
    assert ur["urban"] > hw["urban"] and ur["urban"] > ur["highway"]       # and worse on the other
    for name in ("moe_simple", "moe_simple_conv", "moe_classwise", "moe_classwise_conv"):
        assert table[name]["combined ID"] > table["ensemble"]["combined ID"], name
