import copy
from pathlib import Path

import pytest
import yaml

from shiftbench.suite import SuiteError, load_suite, parse_suite

DEMO = Path(__file__).resolve().parents[1] / "suites" / "demo.yaml"


@pytest.fixture()
def demo():
    return yaml.safe_load(DEMO.read_text())


def parse(data):
    return parse_suite(data, DEMO.parent)


def error(data) -> str:
    with pytest.raises(SuiteError) as exc:
        parse(data)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_demo_suite_loads_with_defaults():
    s = load_suite(DEMO)
    assert s.name == "demo" and s.dataset.name == "synthetic"
    assert len(s.corruptions.names) == 19 and s.corruptions.severities == (1, 2, 3, 4, 5)
    assert s.corruptions.splits == ("id",)
    assert s.model("moe_classwise").estimators == (
        "predictive_entropy_stacked", "mutual_information_stacked", "expert_variance", "gate_entropy")
    assert s.model("baseline").checkpoint == DEMO.parent / "demo" / "baseline.pt"


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["models"][2].__setitem__("gate", "clas"), "models[2].gate: 'clas' is not one of simple, classwise"),
    (lambda d: d["models"][0].__setitem__("passes", 0), "models[0].passes: 0 must be > 0"),
    (lambda d: d["models"][0].__setitem__("dropout", "high"), "models[0].dropout: 'high' is not a number"),
    (lambda d: d["models"][1].__setitem__("experts", ["highway", "rural"]),
     "models[1].experts[1]: 'rural' is not one of highway, urban"),
    (lambda d: d["models"][1].__setitem__("gate", "simple"), "models[1].gate: not a field of a ensemble model"),
    (lambda d: d["models"][0].__setitem__("dropuot", 0.2), "models[0].dropuot: unknown field"),
    (lambda d: d["corruptions"].__setitem__("names", ["fog", "contrast", "fog"]),
     "corruptions.names[2]: 'fog' is given twice; list each name once"),
    (lambda d: d["models"][2].__setitem__("estimators", ["predictive_entropy", "predictive_entropy"]),
     "models[2].estimators[1]: 'predictive_entropy' is given twice"),
    (lambda d: d["dataset"]["eval"].__setitem__("id", ["highway_test", "highway_test"]),
     "dataset.eval.id[1]: 'highway_test' is given twice"),
    (lambda d: d["dataset"]["eval"].__setitem__("ood", []),
     "dataset.eval.ood: empty; list the splits of group ood, or leave the group out"),
    (lambda d: d["dataset"]["eval"].__setitem__(1, ["ambiguous_test"]),
     "dataset.eval.1: the key 1 is an integer, not a name; quote it (\"1\") or rename it"),
    (lambda d: d["experts"].__setitem__(True, {"backbone": "tiny"}), "experts.True: the key True is true/false, not a name"),
    (lambda d: d["models"][0].__setitem__("normalize", "auto"), "models[0].normalize: 'auto' is not one of imagenet, none"),
    (lambda d: d["models"][1].__setitem__("normalize", "none"), "models[1].normalize: not a field of a ensemble model"),
    (lambda d: d["experts"]["urban"].__setitem__("normalize", 0), "experts.urban.normalize: 0 is not a string"),
    (lambda d: d["dataset"].__setitem__("name", "kitti"), "dataset.name: 'kitti' is not one of synthetic, a2d2, cityscapes"),
    (lambda d: d["dataset"].__setitem__("labels", "authors"),
     "dataset.labels: 'authors' needs dataset a2d2 with classes: 38 (the authors' loader decodes A2D2 to its 38 "
     "categories), got synthetic with 11 classes"),
    (lambda d: d["dataset"].__setitem__("size", [100000, 100000]),
     "dataset.size: [100000, 100000] is not [H, W] with integers 32..8192"),
    (lambda d: d["dataset"].__setitem__("labels", "mine"), "dataset.labels: 'mine' is not one of official, authors"),
    (lambda d: d["dataset"]["eval"].__setitem__("id", ["highway_tset"]), "dataset.eval.id[0]: 'highway_tset' is not one of"),
    (lambda d: d["dataset"]["eval"].__setitem__("ood", ["ambiguous_train"]), "'ambiguous_train' is not one of"),
    (lambda d: d["corruptions"].__setitem__("severities", [1, 6]), "corruptions.severities[1]: 6 is not one of 1, 2, 3, 4, 5"),
    (lambda d: d["corruptions"].__setitem__("names", ["fog", "smog"]), "corruptions.names[1]: 'smog' is not one of"),
    (lambda d: d["corruptions"].__setitem__("splits", ["train"]), "corruptions.splits[0]: 'train' is not one of id, ood"),
    (lambda d: d["run"].__setitem__("device", "tpu"), "run.device: 'tpu' is not one of auto, cpu, cuda"),
    (lambda d: d["run"].__setitem__("overlap", "yes"), "run.overlap: 'yes' is not one of auto, true, false"),
    (lambda d: d["run"].__setitem__("overlap", 1), "run.overlap: 1 is not auto, true or false"),
    (lambda d: d["run"].__setitem__("workers", "many"), "run.workers: 'many' is not auto or an integer 0..64"),
    (lambda d: d["run"].__setitem__("workers", -1), "run.workers: -1 must be between 0 and 64"),
    (lambda d: d["run"].__setitem__("workers", 1.5), "run.workers: 1.5 is not auto or an integer 0..64"),
    (lambda d: d["run"].__setitem__("cache", -2), "run.cache: -2.0 must be a finite size in GiB >= 0"),
    (lambda d: d["run"].__setitem__("cache", float("inf")), "run.cache: inf must be a finite size in GiB >= 0"),
    (lambda d: d["run"].__setitem__("cache", "all"), "run.cache: 'all' is not auto or a size in GiB >= 0"),
    (lambda d: d["run"].__setitem__("cache", True), "run.cache: True is not auto or a size in GiB >= 0"),
    (lambda d: d["metrics"].__setitem__("accuracy_threshold", 1.5), "metrics.accuracy_threshold: 1.5 must be in [0, 1)"),
    (lambda d: d["metrics"].__setitem__("thresholds", 100001), "metrics.thresholds: 100001 must be between 2 and 10001"),
    (lambda d: d["metrics"].__setitem__("n_bins", 0), "metrics.n_bins: 0 must be between 1 and 1000"),
    (lambda d: d["metrics"].__setitem__("threshold_range", [0.99, 0.01]),
     "metrics.threshold_range: [0.99, 0.01] is not [lo, hi] with numbers 0 <= lo < hi <= 1"),
    (lambda d: d["metrics"].__setitem__("threshold_range", [0, 1, 2]), "metrics.threshold_range: [0, 1, 2] is not [lo, hi]"),
    (lambda d: d["metrics"].__setitem__("threshold_range", 0.5), "metrics.threshold_range: 0.5 is not a list"),
    (lambda d: d["models"].append(copy.deepcopy(d["models"][0])), "models[6].name: 'baseline' is used twice"),
    (lambda d: d["models"].append({"name": "x", "kind": "custom", "factory": "not a path"}),
     "models[6].factory: 'not a path' is not of the form package.module:function"),
    (lambda d: d.pop("dataset"), "dataset: missing; it is required"),
])
def test_errors_name_the_field_and_what_is_allowed(demo, edit, expected):
    edit(demo)
    assert expected in error(demo)


def test_threshold_range_defaults_to_the_unit_interval_and_reaches_the_metrics(demo):
    from shiftbench.runner.sweep import Accumulators

    assert parse(demo).metrics.threshold_range == (0.01, 0.99)  # the demo sweeps the authors' grid
    demo["metrics"].pop("threshold_range")
    assert parse(demo).metrics.threshold_range == (0.0, 1.0)
    demo["metrics"].update(thresholds=50, threshold_range=[0.01, 0.99])
    suite = parse(demo)
    assert suite.metrics.threshold_range == (0.01, 0.99)
    accs = Accumulators(suite, {"baseline": ("predictive_entropy",)}, "cpu")
    grid = accs.conditional["baseline", "predictive_entropy"].thresholds
    assert len(grid) == 50 and grid[0].item() == 0.01 and grid[-1].item() == 0.99


@pytest.mark.parametrize("name", ["a2d2", "cityscapes", "demo"])
def test_shipped_suites_load_and_sweep_the_authors_threshold_grid(name, monkeypatch, tmp_path):
    """The grid of the paper's Table 2 (0.01, 0.03, ..., 0.99) in every shipped suite, so their tables compare."""
    for var in ("A2D2_ROOT", "A2D2_SPLIT_DIR", "A2D2_CHECKPOINTS", "CITYSCAPES_ROOT", "CITYSCAPES_CHECKPOINTS"):
        monkeypatch.setenv(var, str(tmp_path))
    metrics = load_suite(DEMO.parent / f"{name}.yaml").metrics
    assert (metrics.thresholds, metrics.threshold_range) == (50, (0.01, 0.99))


def test_missing_environment_variable_says_what_to_set(demo, monkeypatch):
    monkeypatch.delenv("A2D2_ROOT", raising=False)
    demo["dataset"].update(name="a2d2", root="${A2D2_ROOT}", split_dir="/x", classes=38)
    msg = error(demo)
    assert "A2D2_ROOT is not set" in msg and "a2d2.audi" in msg


def test_environment_variables_expand(demo, monkeypatch, tmp_path):
    monkeypatch.setenv("A2D2_ROOT", str(tmp_path))
    demo["dataset"].update(name="a2d2", root="${A2D2_ROOT}/camera_lidar_semantic", split_dir="/x", classes=38,
                           eval={"id": ["highway_test"]})
    demo["experts"] = {}
    demo["models"] = [demo["models"][0]]
    demo.pop("train")
    s = parse(demo)
    assert s.dataset.root == tmp_path / "camera_lidar_semantic"


def test_digest_ignores_run_settings_but_not_models(demo):
    a = parse(demo)
    demo["run"]["batch_size"] = 3
    demo["corruptions"]["names"] = ["fog"]
    b = parse(demo)
    demo["models"][0]["passes"] = 5
    c = parse(demo)
    assert a.digest() == b.digest() != c.digest()


def test_comparable_ignores_models_experts_and_gallery_but_not_metrics_data_or_scope(demo):
    """What ``shiftbench check`` needs equal: not the models (matched by name), but every setting of the numbers."""
    a = parse(demo).comparable()
    grown = copy.deepcopy(demo)
    grown["models"].append({"name": "mine", "kind": "custom", "factory": "mypkg.models:build", "kwargs": {"k": 1}})
    grown["models"][0]["passes"] = 5
    grown["experts"]["highway"]["backbone"] = "resnet18"
    grown["metrics"]["gallery"] = []
    grown["metrics"].pop("patch_size")  # the default, written out or not
    assert parse(grown).comparable() == a and parse(grown).digest() != parse(demo).digest()
    for edit in (lambda d: d["metrics"].__setitem__("n_bins", 10), lambda d: d["dataset"].__setitem__("seed", 1),
                 lambda d: d["dataset"]["eval"].pop("ood"), lambda d: d["run"].__setitem__("limit", 8),
                 lambda d: d["run"].__setitem__("seed", 1),
                 lambda d: d["metrics"].__setitem__("calibration_average", "images")):
        changed = copy.deepcopy(demo)
        edit(changed)
        assert parse(changed).comparable() != a
    assert a["metrics"]["n_bins"] == 15 and a["limit"] == 32 and "gallery" not in a["metrics"]


def test_unreadable_yaml_is_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(SuiteError, match="not valid YAML at line"):
        load_suite(p)
    with pytest.raises(SuiteError, match="suite file not found"):
        load_suite(tmp_path / "missing.yaml")
    with pytest.raises(SuiteError, match="suite file is a folder, not a file"):
        load_suite(tmp_path)


def test_a_key_given_twice_is_refused_but_merge_keys_may_be_overridden(tmp_path):
    p = tmp_path / "twice.yaml"
    p.write_text("name: a\nrun:\n  seed: 0\n  seed: 1\n")
    with pytest.raises(SuiteError, match=r"twice.yaml: not valid YAML at line 4, column 3: key 'seed' is given twice"):
        load_suite(p)
    p.write_text("name: a\nx-common: &common {seed: 3, batch_size: 2}\nrun:\n  <<: *common\n  seed: 4\n")
    with pytest.raises(SuiteError) as exc:  # loads; then the suite check names the first unknown key
        load_suite(p)
    assert "given twice" not in str(exc.value)


def test_the_suite_offers_the_choices_the_code_has():
    """The suite validator lists choices without importing torch; they must stay those of the code."""
    from shiftbench.data.a2d2 import LABELS
    from shiftbench.models.deeplab import NORMALIZATIONS
    from shiftbench.suite import A2D2_LABELS, NORMALIZE

    assert NORMALIZE == tuple(NORMALIZATIONS) and A2D2_LABELS == LABELS


def test_corruptions_run_in_the_registry_order_whatever_the_listed_order(demo):
    """Severities are sorted, and so are the corruptions (imagecorruptions' order): results.csv has one row
    order for the same conditions, however they were listed."""
    raw = copy.deepcopy(demo)
    raw["corruptions"]["names"] = ["fog", "gaussian_noise", "contrast"]
    assert parse_suite(raw, DEMO.parent, DEMO).corruptions.names == ("gaussian_noise", "fog", "contrast")


def test_mc_dropout_defaults_are_the_documented_ones(demo):
    """Without those fields an mc_dropout model gets dropout 0.1 and 2 passes (docs/models.md), ResNet-101, ImageNet
    normalisation."""
    model = {k: v for k, v in demo["models"][0].items() if k in ("name", "kind", "checkpoint")}
    assert model["kind"] == "mc_dropout"
    demo["models"][0] = model
    m = parse(demo).models[0]
    assert (m.dropout, m.passes, m.backbone, m.normalize) == (0.1, 2, "resnet101", "imagenet")
